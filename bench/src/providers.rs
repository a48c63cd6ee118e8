//! The providers under test, and a session: a fresh schema, an optional latency proxy and
//! a provider connected through it, torn down (schema dropped) at the end.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::ValueEnum;
use duroxide::providers::Provider;
use duroxide_pg_hybrid::{FetchPath, PostgresProvider, ProviderOptions};
use sqlx::PgPool;

use duroxide_pg_hybrid_testkit::proxy::{Proxy, ProxySnapshot, rewrite_url};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Pool size of every provider under test (the incumbent reads `DUROXIDE_PG_POOL_MAX`,
/// whose default is also 10).
pub const POOL_SIZE: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
pub enum ProviderKind {
    /// duroxide-pg-hybrid, claim procedure + concurrent plain-SQL reads.
    Hybrid,
    /// duroxide-pg-hybrid, everything in one function call.
    Procedure,
    /// duroxide-pg 0.1.38 (needs the `incumbent` cargo feature).
    Incumbent,
}

impl ProviderKind {
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Hybrid => "hybrid",
            ProviderKind::Procedure => "procedure",
            ProviderKind::Incumbent => "incumbent",
        }
    }

    pub fn available(self) -> bool {
        self != ProviderKind::Incumbent || cfg!(feature = "incumbent")
    }

    /// Every provider compiled into this binary.
    pub fn all_available() -> Vec<ProviderKind> {
        [
            ProviderKind::Hybrid,
            ProviderKind::Procedure,
            ProviderKind::Incumbent,
        ]
        .into_iter()
        .filter(|p| p.available())
        .collect()
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A connected provider of any kind.
#[derive(Clone)]
pub enum AnyProvider {
    Hybrid(PostgresProvider),
    #[cfg(feature = "incumbent")]
    Incumbent(Arc<duroxide_pg::PostgresProvider>),
}

impl AnyProvider {
    pub async fn connect(
        kind: ProviderKind,
        url: &str,
        schema: &str,
        migrate: bool,
    ) -> Result<AnyProvider, BoxError> {
        match kind {
            ProviderKind::Hybrid | ProviderKind::Procedure => {
                let fetch_path = if kind == ProviderKind::Hybrid {
                    FetchPath::Hybrid
                } else {
                    FetchPath::Procedure
                };
                // DUROXIDE_PG_* variables tune what the bench leaves at its default, e.g.
                // DUROXIDE_PG_HANDOVER=false or DUROXIDE_PG_FAN_IN_GRACE_MS=0 for an A/B.
                let tuned = ProviderOptions::default().with_env_overrides()?;
                let options = ProviderOptions {
                    schema: schema.to_string(),
                    max_connections: POOL_SIZE,
                    fetch_path: Some(fetch_path),
                    auto_migrate: migrate,
                    application_name: format!("duroxide-pg-hybrid-bench-{}", kind.name()),
                    ..tuned
                };
                Ok(AnyProvider::Hybrid(
                    PostgresProvider::connect_with(url, options).await?,
                ))
            }
            ProviderKind::Incumbent => {
                #[cfg(feature = "incumbent")]
                {
                    // The incumbent always runs its migration check on connect.
                    let _ = migrate;
                    let p = duroxide_pg::PostgresProvider::new_with_schema(url, Some(schema))
                        .await
                        .map_err(|e| format!("duroxide-pg connect: {e:#}"))?;
                    Ok(AnyProvider::Incumbent(Arc::new(p)))
                }
                #[cfg(not(feature = "incumbent"))]
                {
                    let _ = (url, schema, migrate);
                    Err("the incumbent provider is not compiled in: rebuild with `--features incumbent`".into())
                }
            }
        }
    }

    pub fn as_provider(&self) -> Arc<dyn Provider> {
        match self {
            AnyProvider::Hybrid(p) => Arc::new(p.clone()),
            #[cfg(feature = "incumbent")]
            AnyProvider::Incumbent(p) => p.clone(),
        }
    }

    pub async fn close(&self) {
        match self {
            AnyProvider::Hybrid(p) => p.close().await,
            #[cfg(feature = "incumbent")]
            AnyProvider::Incumbent(p) => p.pool().close().await,
        }
    }
}

/// Connection facts shared by all scenarios.
pub struct Env {
    pub url: String,
    /// A small direct pool for seeding, inspection and schema drops.
    pub admin: PgPool,
    pub pg_stat_statements: bool,
    pub force_proxy: bool,
}

static SCHEMA_SEQ: AtomicU64 = AtomicU64::new(0);

impl Env {
    /// A schema name unique to this process and call.
    pub fn unique_schema(&self, scenario: &str, kind: ProviderKind) -> String {
        let n = SCHEMA_SEQ.fetch_add(1, Ordering::Relaxed);
        format!(
            "bench_{}_{}_{}_{}",
            scenario,
            kind.name(),
            std::process::id(),
            n
        )
    }

    /// Creates a fresh schema for `kind`, migrates it over a direct connection, then
    /// connects the provider that the scenario will use: through a proxy with `rtt`
    /// when `rtt > 0` (or when `proxy` is requested), directly otherwise. With a proxy, the
    /// direct connection stays usable as [`Session::direct`] only if `keep_direct`.
    pub async fn session(
        &self,
        scenario: &str,
        kind: ProviderKind,
        rtt_ms: u64,
        proxy: bool,
        keep_direct: bool,
    ) -> Result<Session, BoxError> {
        let schema = self.unique_schema(scenario, kind);
        let direct = AnyProvider::connect(kind, &self.url, &schema, true).await?;
        let mut session = Session {
            kind,
            schema,
            proxy: None,
            provider: direct.clone(),
            direct,
            rtt_ms,
        };
        if rtt_ms > 0 || proxy || self.force_proxy {
            match self.proxied(&session, rtt_ms).await {
                Ok((p, prov)) => {
                    session.proxy = Some(p);
                    session.provider = prov;
                    // Keep the direct pool only where a scenario uses it (connections are
                    // shared with whatever else runs on the server).
                    if !keep_direct {
                        session.direct.close().await;
                    }
                }
                Err(e) => {
                    session.teardown(self).await;
                    return Err(e);
                }
            }
        }
        Ok(session)
    }

    async fn proxied(
        &self,
        session: &Session,
        rtt_ms: u64,
    ) -> Result<(Proxy, AnyProvider), BoxError> {
        let (_, upstream) = rewrite_url(&self.url, "127.0.0.1:1".parse()?)?;
        let proxy = Proxy::start(upstream, Duration::from_millis(rtt_ms)).await?;
        let (url, _) = rewrite_url(&self.url, proxy.addr())?;
        let provider = AnyProvider::connect(session.kind, &url, &session.schema, false).await?;
        Ok((proxy, provider))
    }

    pub async fn drop_schema(&self, schema: &str) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
        for attempt in 0..5 {
            match sqlx::query(&sql).execute(&self.admin).await {
                Ok(_) => return,
                Err(e) if attempt == 4 => eprintln!("warning: could not drop schema {schema}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// One provider on one fresh schema.
pub struct Session {
    pub kind: ProviderKind,
    pub schema: String,
    pub rtt_ms: u64,
    /// The provider to measure (through the proxy when there is one).
    pub provider: AnyProvider,
    /// A direct connection to the same schema (same as `provider` without a proxy; closed
    /// unless the session was opened with `keep_direct`).
    pub direct: AnyProvider,
    pub proxy: Option<Proxy>,
}

impl Session {
    pub fn dyn_provider(&self) -> Arc<dyn Provider> {
        self.provider.as_provider()
    }

    pub fn snapshot(&self) -> Option<ProxySnapshot> {
        self.proxy.as_ref().map(Proxy::snapshot)
    }

    /// Closes pools, stops the proxy and drops the schema.
    pub async fn teardown(self, env: &Env) {
        self.provider.close().await;
        self.direct.close().await;
        if let Some(p) = &self.proxy {
            p.shutdown();
        }
        env.drop_schema(&self.schema).await;
    }
}
