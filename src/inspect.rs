//! Read-only operational queries for tooling (the CLI's `stats`, `instances`, `instance`).
//! (being written)
