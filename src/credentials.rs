//! Password-source hook: a callback that returns the current password (a rotating
//! secret, a cloud access token), asked every time the provider opens a connection.
//!
//! Where it is used:
//! * the provider's own pool (`pool.rs`): every new connection asks the hook;
//! * the LISTEN connection (`notify.rs`): asked before every (re)connect;
//! * the migrations / application pool ([`PostgresProvider::pool`]): a `sqlx::PgPool`
//!   cannot ask a callback per connection (sqlx 0.8 has no before-connect hook), so its
//!   connect options are refreshed from the hook before each internal use (migrations,
//!   verification, listener set-up, schema drop) and by a background task every
//!   [`PasswordSource::pool_refresh_interval`] while the provider is alive.
//!
//! Secrets never reach a log line or `Debug` output: [`PasswordSource`] prints no value,
//! and nothing here derives `Debug` on connect options (sqlx's `PgConnectOptions` `Debug`
//! shows the password).
//!
//! [`PostgresProvider::pool`]: crate::PostgresProvider::pool

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection, PgPool};

use crate::provider::TRACING_TARGET;

/// Error a password source may return (shown in the provider's error, so it must not
/// contain the secret).
pub type PasswordError = Box<dyn std::error::Error + Send + Sync>;

/// The future a password source returns.
pub type PasswordFuture = Pin<Box<dyn Future<Output = Result<String, PasswordError>> + Send>>;

/// Default of [`PasswordSource::pool_refresh_interval`].
pub const DEFAULT_POOL_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// A callback returning the password to use for the next new connection.
///
/// The password in the URL (if any) is replaced by the callback's answer. The callback
/// should be cheap (cache the secret, refresh it in the background or when it nears
/// expiry): it runs on the path of every new connection. An error makes that connection
/// attempt fail with a retryable error naming the source; provider calls are retried by
/// duroxide.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use duroxide_pg_hybrid::{PasswordSource, ProviderOptions};
///
/// let secret = Arc::new(Mutex::new(String::from("first")));
/// let current = secret.clone();
/// let options = ProviderOptions {
///     password_source: Some(PasswordSource::new(move || {
///         let password = current.lock().unwrap().clone();
///         async move { Ok(password) }
///     })),
///     ..ProviderOptions::default()
/// };
/// // Later, after rotating the secret: *secret.lock().unwrap() = "second".into();
/// # let _ = options;
/// ```
#[derive(Clone)]
pub struct PasswordSource {
    fetch: Arc<dyn Fn() -> PasswordFuture + Send + Sync>,
    pool_refresh_interval: Duration,
}

impl PasswordSource {
    /// A source calling `fetch` for every new connection.
    pub fn new<F, Fut>(fetch: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, PasswordError>> + Send + 'static,
    {
        Self {
            fetch: Arc::new(move || Box::pin(fetch())),
            pool_refresh_interval: DEFAULT_POOL_REFRESH_INTERVAL,
        }
    }

    /// How often the connect options of [`PostgresProvider::pool`] (migrations and the
    /// application's own queries) are refreshed from the source (default 60 s). The
    /// provider's own connections and the LISTEN connection ask the source at every
    /// connect regardless.
    ///
    /// [`PostgresProvider::pool`]: crate::PostgresProvider::pool
    #[must_use]
    pub fn with_pool_refresh_interval(mut self, interval: Duration) -> Self {
        self.pool_refresh_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// See [`with_pool_refresh_interval`](Self::with_pool_refresh_interval).
    pub fn pool_refresh_interval(&self) -> Duration {
        self.pool_refresh_interval
    }

    /// Asks the source for the current password.
    ///
    /// # Errors
    /// Whatever the source returns.
    pub async fn current(&self) -> Result<String, PasswordError> {
        (self.fetch)().await
    }
}

impl fmt::Debug for PasswordSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret: there is none to show until the callback runs.
        f.debug_struct("PasswordSource")
            .field("pool_refresh_interval", &self.pool_refresh_interval)
            .finish_non_exhaustive()
    }
}

/// How the provider makes connections: fixed connect options (from the URL or the
/// application's pool), plus the password source when one is configured.
///
/// Deliberately not `Debug`: the options may hold a password.
pub(crate) struct Credentials {
    base: PgConnectOptions,
    source: Option<PasswordSource>,
}

impl Credentials {
    pub(crate) fn new(base: PgConnectOptions, source: Option<PasswordSource>) -> Self {
        Self { base, source }
    }

    /// Connect options carrying the current password.
    pub(crate) async fn connect_options(&self) -> Result<PgConnectOptions, sqlx::Error> {
        let Some(source) = &self.source else {
            return Ok(self.base.clone());
        };
        match source.current().await {
            Ok(password) => Ok(self.base.clone().password(&password)),
            Err(e) => {
                tracing::warn!(target: TRACING_TARGET, error = %e, "password source failed");
                // Transient by nature (a token endpoint or secret store that is briefly
                // unreachable): an I/O error, which maps to a retryable provider error.
                Err(sqlx::Error::Io(std::io::Error::other(format!(
                    "password source failed: {e}"
                ))))
            }
        }
    }

    /// Opens one connection with the current password.
    pub(crate) async fn connect(&self) -> Result<PgConnection, sqlx::Error> {
        self.connect_options().await?.connect().await
    }

    /// Puts the current password into `pool`'s connect options (no-op without a source).
    pub(crate) async fn refresh(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        if self.source.is_some() {
            pool.set_connect_options(self.connect_options().await?);
        }
        Ok(())
    }

    /// Keeps `pool`'s connect options current while `owner` is alive (no-op without a
    /// source). A failed refresh keeps the previous options and is retried next interval.
    pub(crate) fn keep_refreshed<T: Send + Sync + 'static>(
        self: &Arc<Self>,
        pool: PgPool,
        owner: Weak<T>,
    ) {
        let Some(source) = &self.source else {
            return;
        };
        let interval = source.pool_refresh_interval();
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let (Some(creds), true) = (me.upgrade(), owner.strong_count() > 0) else {
                    return;
                };
                if pool.is_closed() {
                    return;
                }
                // The failure is logged by connect_options.
                let _ = creds.refresh(&pool).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn password_replaces_the_url_password_and_is_never_shown() {
        let base: PgConnectOptions = "postgres://app:old-secret@db/x".parse().unwrap();
        let source = PasswordSource::new(|| async { Ok("n3w-s3cret".to_string()) });
        assert!(!format!("{source:?}").contains("s3cret"));
        let creds = Credentials::new(base, Some(source));
        let opts = creds.connect_options().await.unwrap();
        assert_eq!(opts.get_username(), "app");
        // PgConnectOptions has no password getter: its Debug (which shows it) is the
        // only way to look, and proves why Credentials must not derive Debug.
        let shown = format!("{opts:?}");
        assert!(shown.contains("n3w-s3cret") && !shown.contains("old-secret"));
    }

    #[tokio::test]
    async fn a_failing_source_is_a_retryable_error_naming_it() {
        let base: PgConnectOptions = "postgres://app@db/x".parse().unwrap();
        let creds = Credentials::new(
            base,
            Some(PasswordSource::new(|| async {
                Err::<String, PasswordError>("vault unreachable".into())
            })),
        );
        let e = creds.connect_options().await.unwrap_err();
        assert!(crate::errors::is_retryable(&e));
        assert!(
            e.to_string()
                .contains("password source failed: vault unreachable")
        );
    }
}
