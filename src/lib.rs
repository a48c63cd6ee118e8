#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

/// Runs one query on a connection of the provider's own pool (see `pool.rs`) and
/// returns the connection afterwards: `on_conn!(provider, fetch_one, query)` evaluates
/// to the query's `Result<_, sqlx::Error>`. A statement the server certainly did not run
/// (the connection was already terminated: 57P0x, class 08) is retried on a fresh
/// connection, twice at most: after a restart or a mass kill, the first calls would
/// otherwise all fail on connections that died while idle.
macro_rules! on_conn {
    ($provider:expr, $method:ident, $query:expr) => {{
        let mut attempt = 0u64;
        loop {
            let result = match $provider.conns().acquire().await {
                Ok(mut conn) => {
                    let result = $query.$method(&mut *conn).await;
                    conn.finish(result)
                }
                Err(e) => Err(e),
            };
            match result {
                Err(e) if attempt < 2 && $crate::pool::not_run_by_server(&e) => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10 * attempt)).await;
                }
                other => break other,
            }
        }
    }};
}

mod admin;
mod codec;
pub mod compat;
mod contract;
pub mod credentials;
#[cfg(feature = "entra")]
pub mod entra;
pub mod errors;
mod history;
pub mod incumbent;
pub mod inspect;
mod kv;
mod notify;
pub mod options;
mod poll;
mod pool;
pub mod provider;
mod queue;
pub mod schema;
#[doc(hidden)]
pub mod sql_fn;
mod turn;
mod worker;

pub use compat::{ConnectionConfig, MigrationPolicy, ProviderConfig};
pub use credentials::PasswordSource;
#[cfg(feature = "entra")]
pub use entra::EntraAuthOptions;
pub use errors::ConfigError;
pub use options::{DEFAULT_SCHEMA, FetchPath, ProviderOptions};
pub use provider::{PostgresProvider, TRACING_TARGET};
