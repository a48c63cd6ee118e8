#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

/// Runs one query on a connection of the provider's own pool (see `pool.rs`) and
/// returns the connection afterwards: `on_conn!(provider, fetch_one, query)` evaluates
/// to the query's `Result<_, sqlx::Error>`.
macro_rules! on_conn {
    ($provider:expr, $method:ident, $query:expr) => {{
        match $provider.conns().acquire().await {
            Ok(mut conn) => {
                let result = $query.$method(&mut *conn).await;
                conn.finish(result)
            }
            Err(e) => Err(e),
        }
    }};
}

mod ack;
mod admin;
mod codec;
mod contract;
pub mod errors;
mod fetch;
mod history;
pub mod inspect;
mod kv;
mod notify;
pub mod options;
mod poll;
mod pool;
mod provider;
mod queue;
pub mod schema;
mod worker;

pub use errors::ConfigError;
pub use options::{DEFAULT_SCHEMA, FetchPath, ProviderOptions};
pub use provider::{PostgresProvider, TRACING_TARGET};
