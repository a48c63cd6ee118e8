//! Helpers shared by the integration tests and the benchmark: a loopback TCP proxy that
//! simulates network distance to PostgreSQL and counts the round trips crossing it.

pub mod proxy;
