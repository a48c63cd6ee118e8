//! # duroxide-pg-hybrid
//!
//! A PostgreSQL storage provider for [duroxide](https://docs.rs/duroxide) 0.1.32.
//!
//! See the README for the design, the fetch paths and operations.

#![warn(missing_docs)]

mod ack;
mod admin;
mod codec;
mod contract;
pub mod errors;
pub mod inspect;
mod fetch;
mod history;
mod kv;
mod notify;
mod poll;
pub mod options;
mod provider;
mod queue;
pub mod schema;
mod worker;

pub use errors::ConfigError;
pub use options::{FetchPath, ProviderOptions, DEFAULT_SCHEMA};
pub use provider::{PostgresProvider, TRACING_TARGET};
