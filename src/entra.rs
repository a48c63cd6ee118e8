//! Microsoft Entra ID authentication for Azure Database for PostgreSQL (cargo feature
//! `entra`), built on the [password-source hook](crate::PasswordSource): the access
//! token is the password of every new connection.
//!
//! Credential chain (as duroxide-pg 0.1.38 offers it, on `azure_identity` 0.35):
//! `WorkloadIdentityCredential` (only when its environment, e.g. AKS workload identity's
//! `AZURE_FEDERATED_TOKEN_FILE`, is present), then `ManagedIdentityCredential`, then
//! `DeveloperToolsCredential` (`az login`, `azd auth login`). The first that returns a
//! token wins; its class is logged once at INFO, the token never.
//!
//! Tokens are cached and replaced before they expire: a token is reused until it is
//! within [`EXPIRY_MARGIN`] of its expiry or older than
//! [`EntraAuthOptions::refresh_interval`]. The provider asks the hook for every new
//! connection and, for its application pool, at least every minute, so an idle provider
//! still refreshes in time. When the identity endpoint fails while the cached token is
//! still valid, the cached token is used and the failure logged.
//!
//! With this crate's own API:
//!
//! ```no_run
//! use duroxide_pg_hybrid::entra::EntraAuthOptions;
//! use duroxide_pg_hybrid::{PostgresProvider, ProviderOptions};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let options = ProviderOptions {
//!     password_source: Some(EntraAuthOptions::new().password_source()?),
//!     ..ProviderOptions::default()
//! };
//! let provider = PostgresProvider::connect_with(
//!     "postgres://my-app-identity@myserver.postgres.database.azure.com:5432/mydb?sslmode=verify-full",
//!     options,
//! )
//! .await?;
//! # Ok(()) }
//! ```
//!
//! With the duroxide-pg names: [`ProviderConfig::entra`](crate::ProviderConfig::entra).

use std::fmt;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use azure_core::credentials::TokenCredential;
use azure_identity::{
    DeveloperToolsCredential, ManagedIdentityCredential, WorkloadIdentityCredential,
};
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::credentials::{PasswordError, PasswordSource};
use crate::errors::ConfigError;
use crate::provider::TRACING_TARGET;

/// Token audience (scope) of Azure Database for PostgreSQL in the Azure public cloud.
/// Sovereign clouds need another one: [`EntraAuthOptions::audience`].
pub const DEFAULT_AUDIENCE: &str = "https://ossrdbms-aad.database.windows.net/.default";

/// A token is replaced once it is this close to its expiry.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(5 * 60);

/// Default of [`EntraAuthOptions::refresh_interval`].
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(20 * 60);

/// A token fetched less than this long ago is not fetched again (guards against a token
/// issued with less than [`EXPIRY_MARGIN`] of life, and against hammering the endpoint).
const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(30);

/// Environment variable read by [`EntraAuthOptions::new`] for the pool size (the name
/// duroxide-pg uses).
pub const POOL_MAX_ENV: &str = "DUROXIDE_PG_POOL_MAX";

/// Options of Microsoft Entra ID authentication (duroxide-pg's type and defaults).
///
/// ```no_run
/// use std::time::Duration;
/// use duroxide_pg_hybrid::entra::EntraAuthOptions;
///
/// let options = EntraAuthOptions::new()
///     .audience("https://ossrdbms-aad.database.usgovcloudapi.net/.default")
///     .refresh_interval(Duration::from_secs(15 * 60))
///     .max_connections(20)
///     .acquire_timeout(Duration::from_secs(45));
/// # let _ = options;
/// ```
#[derive(Clone, Debug)]
pub struct EntraAuthOptions {
    audience: String,
    max_connections: u32,
    acquire_timeout: Duration,
    refresh_interval: Duration,
}

impl Default for EntraAuthOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl EntraAuthOptions {
    /// Public-cloud audience, refresh at least every 20 minutes, pool of
    /// `DUROXIDE_PG_POOL_MAX` (default 10) connections, 30 s acquire timeout.
    pub fn new() -> Self {
        let max_connections = std::env::var(POOL_MAX_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(10)
            .max(1);
        Self {
            audience: DEFAULT_AUDIENCE.to_string(),
            max_connections,
            acquire_timeout: Duration::from_secs(30),
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
        }
    }

    /// Token audience (scope), e.g. for a sovereign cloud.
    #[must_use]
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = audience.into();
        self
    }

    /// Pool size for provider calls (0 is taken as 1).
    #[must_use]
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How long a call waits for a pooled connection.
    #[must_use]
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Longest a token is reused before a new one is fetched (a token nearing expiry is
    /// replaced sooner).
    #[must_use]
    pub fn refresh_interval(mut self, interval: Duration) -> Self {
        self.refresh_interval = interval;
        self
    }

    pub(crate) fn max_connections_value(&self) -> u32 {
        self.max_connections
    }

    pub(crate) fn acquire_timeout_value(&self) -> Duration {
        self.acquire_timeout
    }

    /// A password source handing out Entra access tokens from the default credential
    /// chain, for [`ProviderOptions::password_source`](crate::ProviderOptions::password_source).
    /// Nothing is fetched until the first connection.
    ///
    /// # Errors
    /// No credential of the chain can be constructed here.
    pub fn password_source(&self) -> Result<PasswordSource, ConfigError> {
        let chain = default_chain().map_err(|e| {
            ConfigError::new(format!("Entra ID: cannot build the credential chain: {e}"))
        })?;
        Ok(TokenCache::new(chain, self.audience.clone(), self.refresh_interval).into_source())
    }
}

/// Connect options for an Entra-authenticated server: TLS with full certificate and host
/// verification (as duroxide-pg), no password (the token is added per connection).
pub(crate) fn connect_options(
    host: &str,
    port: u16,
    database: &str,
    user: &str,
) -> PgConnectOptions {
    PgConnectOptions::new()
        .host(host)
        .port(port)
        .database(database)
        .username(user)
        .ssl_mode(PgSslMode::VerifyFull)
}

type Chain = Vec<(&'static str, Arc<dyn TokenCredential>)>;

fn default_chain() -> azure_core::Result<Chain> {
    let mut chain: Chain = Vec::new();
    // Constructible only when its environment is present: absent elsewhere.
    if let Ok(c) = WorkloadIdentityCredential::new(None) {
        chain.push(("WorkloadIdentityCredential", c));
    }
    chain.push((
        "ManagedIdentityCredential",
        ManagedIdentityCredential::new(None)?,
    ));
    chain.push((
        "DeveloperToolsCredential",
        DeveloperToolsCredential::new(None)?,
    ));
    Ok(chain)
}

struct CachedToken {
    secret: String,
    expires_at: SystemTime,
    fetched_at: Instant,
}

impl fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedToken")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The current token of one provider, shared by all its connections.
struct TokenCache {
    chain: Chain,
    audience: String,
    refresh_interval: Duration,
    current: tokio::sync::Mutex<Option<CachedToken>>,
    logged_source: Once,
}

impl TokenCache {
    fn new(chain: Chain, audience: String, refresh_interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            chain,
            audience,
            refresh_interval,
            current: tokio::sync::Mutex::new(None),
            logged_source: Once::new(),
        })
    }

    fn into_source(self: Arc<Self>) -> PasswordSource {
        PasswordSource::new(move || {
            let cache = self.clone();
            async move { cache.token().await }
        })
    }

    /// The cached token while it is good, else a new one. Callers queue on the lock, so
    /// a burst of new connections fetches once.
    async fn token(&self) -> Result<String, PasswordError> {
        let mut current = self.current.lock().await;
        let now = SystemTime::now();
        if let Some(t) = current.as_ref() {
            let young = t.fetched_at.elapsed() < MIN_REFETCH_INTERVAL;
            let far_from_expiry = t.expires_at > now + EXPIRY_MARGIN;
            if young || (far_from_expiry && t.fetched_at.elapsed() < self.refresh_interval) {
                return Ok(t.secret.clone());
            }
        }
        match self.fetch().await {
            Ok(fresh) => {
                let secret = fresh.secret.clone();
                tracing::debug!(target: TRACING_TARGET, expires_at = ?fresh.expires_at, "Entra ID token refreshed");
                *current = Some(fresh);
                Ok(secret)
            }
            Err(e) => match current.as_mut() {
                // Still valid: keep using it, and do not ask again for a while.
                Some(t) if t.expires_at > now + MIN_REFETCH_INTERVAL => {
                    tracing::warn!(target: TRACING_TARGET, error = %e, "Entra ID token refresh failed; using the cached token until it nears expiry");
                    t.fetched_at = Instant::now()
                        .checked_sub(self.refresh_interval.saturating_sub(MIN_REFETCH_INTERVAL))
                        .unwrap_or_else(Instant::now);
                    Ok(t.secret.clone())
                }
                _ => Err(e),
            },
        }
    }

    async fn fetch(&self) -> Result<CachedToken, PasswordError> {
        let scopes = [self.audience.as_str()];
        let mut failures = Vec::new();
        for (name, credential) in &self.chain {
            match credential.get_token(&scopes, None).await {
                Ok(token) => {
                    self.logged_source.call_once(|| {
                        tracing::info!(target: TRACING_TARGET, credential = name, "Entra ID token acquired");
                    });
                    let expires_at = u64::try_from(token.expires_on.unix_timestamp())
                        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
                        .unwrap_or(UNIX_EPOCH);
                    return Ok(CachedToken {
                        secret: token.token.secret().to_string(),
                        expires_at,
                        fetched_at: Instant::now(),
                    });
                }
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        Err(format!(
            "Entra ID: no credential returned a token ({})",
            failures.join("; ")
        )
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::credentials::{AccessToken, Secret, TokenRequestOptions};
    use azure_core::time::OffsetDateTime;
    use std::sync::Mutex;

    /// Hands out `token-<n>` expiring `lifetime` from now, or fails while `failing`.
    #[derive(Debug)]
    struct Scripted {
        lifetime: Duration,
        calls: Mutex<Vec<Vec<String>>>,
        failing: Mutex<bool>,
    }

    #[async_trait::async_trait]
    impl TokenCredential for Scripted {
        async fn get_token(
            &self,
            scopes: &[&str],
            _options: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            let mut calls = self.calls.lock().unwrap();
            calls.push(scopes.iter().map(|s| s.to_string()).collect());
            if *self.failing.lock().unwrap() {
                return Err(azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Credential,
                    "endpoint down",
                ));
            }
            let expires = OffsetDateTime::now_utc()
                + azure_core::time::Duration::seconds(self.lifetime.as_secs() as i64);
            Ok(AccessToken::new(
                Secret::new(format!("token-{}", calls.len())),
                expires,
            ))
        }
    }

    fn scripted(lifetime: Duration) -> Arc<Scripted> {
        Arc::new(Scripted {
            lifetime,
            calls: Mutex::default(),
            failing: Mutex::new(false),
        })
    }

    #[tokio::test]
    async fn caches_then_refreshes_before_expiry() {
        let cred = scripted(Duration::from_secs(3600));
        let cache = TokenCache::new(
            vec![("Scripted", cred.clone() as Arc<dyn TokenCredential>)],
            "aud/.default".into(),
            DEFAULT_REFRESH_INTERVAL,
        );
        let source = cache.clone().into_source();
        assert_eq!(source.current().await.unwrap(), "token-1");
        assert_eq!(source.current().await.unwrap(), "token-1");
        assert_eq!(*cred.calls.lock().unwrap(), vec![vec!["aud/.default"]]);
        // Pretend the token is 4 minutes from expiry and was fetched a while ago.
        {
            let mut cur = cache.current.lock().await;
            let t = cur.as_mut().unwrap();
            t.expires_at = SystemTime::now() + Duration::from_secs(240);
            t.fetched_at = Instant::now() - Duration::from_secs(60);
        }
        assert_eq!(source.current().await.unwrap(), "token-2");
        assert!(!format!("{source:?}").contains("token-"));
        assert!(!format!("{:?}", cache.current.lock().await).contains("token-"));
    }

    #[tokio::test]
    async fn falls_back_to_the_valid_cached_token_then_to_the_next_credential() {
        let down = scripted(Duration::from_secs(3600));
        let cache = TokenCache::new(
            vec![("Down", down.clone() as Arc<dyn TokenCredential>)],
            DEFAULT_AUDIENCE.into(),
            Duration::from_secs(60),
        );
        assert_eq!(cache.token().await.unwrap(), "token-1");
        *down.failing.lock().unwrap() = true;
        cache.current.lock().await.as_mut().unwrap().fetched_at =
            Instant::now() - Duration::from_secs(120);
        assert_eq!(cache.token().await.unwrap(), "token-1");

        let up = scripted(Duration::from_secs(3600));
        let chain = TokenCache::new(
            vec![
                ("Down", down.clone() as Arc<dyn TokenCredential>),
                ("Up", up.clone() as Arc<dyn TokenCredential>),
            ],
            DEFAULT_AUDIENCE.into(),
            DEFAULT_REFRESH_INTERVAL,
        );
        assert_eq!(chain.token().await.unwrap(), "token-1");
        assert_eq!(up.calls.lock().unwrap().len(), 1);

        let nothing = TokenCache::new(
            vec![("Down", down as Arc<dyn TokenCredential>)],
            DEFAULT_AUDIENCE.into(),
            DEFAULT_REFRESH_INTERVAL,
        );
        let e = nothing.token().await.unwrap_err().to_string();
        assert!(e.contains("Down: ") && e.contains("endpoint down"), "{e}");
    }

    #[test]
    fn options_defaults_and_connect_options() {
        let o = EntraAuthOptions::new().max_connections(0);
        assert_eq!(o.max_connections_value(), 1);
        assert_eq!(o.acquire_timeout_value(), Duration::from_secs(30));
        let c = connect_options("h.example", 5432, "db", "me@x");
        assert_eq!(c.get_host(), "h.example");
        assert_eq!(c.get_username(), "me@x");
        assert!(matches!(c.get_ssl_mode(), PgSslMode::VerifyFull));
    }
}
