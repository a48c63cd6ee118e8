//! Compile test for issue 12, item 1: code written against duroxide-pg 0.1.38's public
//! API, unchanged, with `duroxide-pg = { package = "duroxide-pg-hybrid", ... }`.
//!
//! Written in duroxide-pg's edition (2021) and style: `anyhow::Result` everywhere and
//! `?` on every constructor. Building this crate is the test (`cargo build -p
//! duroxide-pg-compat-check`, and `--features entra` for the Entra items); the unit tests
//! below also run the parts that need no database.

use std::sync::Arc;
use std::time::Duration;

use duroxide::providers::{Provider, ProviderAdmin};
use duroxide_pg::{ConnectionConfig, MigrationPolicy, PostgresProvider, ProviderConfig};

/// README "Usage": `new(url)`, then the provider as a duroxide store.
pub async fn usage(url: &str) -> anyhow::Result<Arc<dyn Provider>> {
    let provider = PostgresProvider::new(url).await?;
    Ok(Arc::new(provider))
}

/// README "Custom Schema".
pub async fn custom_schema(url: &str) -> anyhow::Result<PostgresProvider> {
    let provider = PostgresProvider::new_with_schema(url, Some("my_schema")).await?;
    let _name: &str = provider.schema_name();
    let _pool: &sqlx::PgPool = provider.pool();
    Ok(provider)
}

/// `ProviderConfig` with its public fields, `MigrationPolicy`, `new_with_config`.
pub async fn with_config(url: &str) -> anyhow::Result<PostgresProvider> {
    let mut config = ProviderConfig::url(url);
    config.schema_name = Some("my_app".into());
    config.migration_policy = MigrationPolicy::VerifyOnly;
    let _: &ConnectionConfig = &config.connection;
    PostgresProvider::new_with_config(config).await
}

/// Returning the constructor's result directly (needs the same `Result` type).
pub async fn tail_expression(url: &str) -> anyhow::Result<PostgresProvider> {
    PostgresProvider::new_with_schema(url, None).await
}

/// `initialize_schema` (deprecated in duroxide-pg too), `cleanup_schema`, admin trait.
#[allow(deprecated)]
pub async fn schema_helpers(provider: &PostgresProvider) -> anyhow::Result<()> {
    provider.initialize_schema().await?;
    let _admin: Option<&dyn ProviderAdmin> = provider.as_management_capability();
    provider.cleanup_schema().await?;
    Ok(())
}

/// Matching on the (non-exhaustive) connection enum.
pub fn describe(config: &ProviderConfig) -> &'static str {
    match &config.connection {
        ConnectionConfig::Url(_) => "url",
        #[cfg(feature = "entra")]
        ConnectionConfig::Entra { .. } => "entra",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

/// Module paths duroxide-pg exposes besides the crate root.
pub fn module_paths() -> ProviderConfig {
    let policy: duroxide_pg::provider::MigrationPolicy = Default::default();
    let mut config = duroxide_pg::provider::ProviderConfig::url("postgres://localhost/db");
    config.migration_policy = policy;
    config
}

/// README "Microsoft Entra ID Authentication", all three spellings.
#[cfg(feature = "entra")]
#[allow(deprecated)]
pub async fn entra() -> anyhow::Result<Vec<PostgresProvider>> {
    use duroxide_pg::EntraAuthOptions;
    let options = EntraAuthOptions::new()
        .audience("https://ossrdbms-aad.database.usgovcloudapi.net/.default")
        .refresh_interval(Duration::from_secs(15 * 60))
        .max_connections(20)
        .acquire_timeout(Duration::from_secs(45));
    let _same_type: duroxide_pg::entra::EntraAuthOptions = options.clone();
    let _audience: &str = duroxide_pg::entra::DEFAULT_AUDIENCE;
    let config = ProviderConfig::entra(
        "myserver.postgres.database.azure.com",
        5432,
        "mydb",
        "my-entra-principal@contoso.onmicrosoft.com",
        options.clone(),
    );
    let a = PostgresProvider::new_with_config(config).await?;
    let b = PostgresProvider::new_with_entra(
        "myserver.postgres.database.azure.com",
        5432,
        "mydb",
        "my-entra-principal@contoso.onmicrosoft.com",
        EntraAuthOptions::new(),
    )
    .await?;
    let c = PostgresProvider::new_with_schema_and_entra(
        "myserver.postgres.database.azure.com",
        5432,
        "mydb",
        "my-entra-principal@contoso.onmicrosoft.com",
        Some("tenant_a"),
        options,
    )
    .await?;
    Ok(vec![a, b, c])
}

/// Keeps `Duration` used without the `entra` feature.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_are_duroxide_pg_s() {
        let config = ProviderConfig::url("postgres://app:pw@localhost/db");
        assert_eq!(config.schema_name, None);
        assert_eq!(config.migration_policy, MigrationPolicy::ApplyAll);
        assert_eq!(MigrationPolicy::default(), MigrationPolicy::ApplyAll);
        assert_eq!(describe(&config), "url");
        assert_eq!(describe(&module_paths()), "url");
        // Debug never shows the password.
        assert!(!format!("{config:?}").contains(":pw@"));
    }

    #[tokio::test]
    async fn errors_work_with_anyhow() {
        // Invalid schema names fail before any connection: an anyhow error whose
        // message says why, and which downcasts to this crate's error.
        let e = PostgresProvider::new_with_schema("postgres://127.0.0.1:1/db", Some("a;b"))
            .await
            .expect_err("invalid schema name");
        assert!(e.to_string().contains("schema name"), "{e}");
        let with_context =
            anyhow::Context::context(Err::<(), _>(e), "starting the worker").unwrap_err();
        assert!(format!("{with_context:#}").contains("starting the worker"));
    }

    #[cfg(feature = "entra")]
    #[test]
    fn entra_config_shape() {
        let config =
            ProviderConfig::entra("h", 5432, "db", "u", duroxide_pg::EntraAuthOptions::new());
        assert_eq!(describe(&config), "entra");
        assert_eq!(config.schema_name, None);
    }
}
