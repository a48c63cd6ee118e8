//! Error mapping: every database error becomes a `ProviderError` that names the
//! operation (and the instance, where known) and is classified by SQLSTATE.
//!
//! | SQLSTATE / error                         | meaning                          | class      |
//! |------------------------------------------|----------------------------------|------------|
//! | `40001` serialization_failure            | concurrent update conflict       | retryable  |
//! | `40P01` deadlock_detected                | the server broke a deadlock      | retryable  |
//! | `55P03` lock_not_available               | `lock_timeout` expired           | retryable  |
//! | `57014` query_canceled                   | `statement_timeout` / cancel     | retryable  |
//! | `57P01`/`57P02`/`57P03` shutdown, crash, cannot connect now | server restarting | retryable |
//! | class `08` connection exception          | connection lost or refused       | retryable  |
//! | class `53` insufficient resources (`53300` too many connections, disk, memory) | retryable |
//! | `0A000` feature_not_supported            | cached plan invalidated by a concurrent migration | retryable |
//! | `28000`/`28P01` invalid authorization / password | a new connection was refused: the secret rotated (or a token expired) between asking the password source and connecting | retryable |
//! | `DX001` (ours) invalid lock token        | unknown / acked / stolen token   | permanent  |
//! | `DX002` (ours) instance lock expired     | lease ran out before the ack     | permanent  |
//! | class `23` integrity (`23505` duplicate event id, ...) | contract violation  | permanent  |
//! | class `22` data exception                | bad value                        | permanent  |
//! | class `42` syntax / privilege (`42501`)  | missing privilege or schema      | permanent  |
//! | anything else from the server            | unknown                          | permanent  |
//! | pool timed out, I/O, TLS, protocol error | transient transport trouble      | retryable  |
//! | pool closed                              | provider shut down               | permanent  |
//! | row decode / serde error                 | corrupt or foreign data          | permanent  |
//!
//! Retryable matters most on ack: duroxide retries a retryable ack, while a permanent one
//! fails the orchestration, so a transient database error must never be permanent.

use std::fmt;

use duroxide::providers::ProviderError;

/// Bad configuration, detected before any SQL runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    message: String,
}

impl ConfigError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid duroxide-pg-hybrid configuration: {}",
            self.message
        )
    }
}

impl std::error::Error for ConfigError {}

impl From<ConfigError> for ProviderError {
    fn from(e: ConfigError) -> Self {
        ProviderError::permanent("configure", e.to_string())
    }
}

/// Retry class of a SQLSTATE code (see the module table).
pub fn sqlstate_is_retryable(code: &str) -> bool {
    matches!(
        code,
        "40001"
            | "40P01"
            | "55P03"
            | "57014"
            | "57P01"
            | "57P02"
            | "57P03"
            | "0A000"
            | "28000"
            | "28P01"
    ) || code.starts_with("08")
        || code.starts_with("53")
}

/// Retry class of any sqlx error.
pub fn is_retryable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db.code().is_some_and(|c| sqlstate_is_retryable(&c)),
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// SQLSTATE of a database error, if any.
pub fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Converts a sqlx error into a `ProviderError` naming the operation and, when given,
/// the instance.
pub fn db_error(operation: &str, instance: Option<&str>, err: sqlx::Error) -> ProviderError {
    let retryable = is_retryable(&err);
    let detail = match &err {
        sqlx::Error::Database(db) => {
            format!(
                "{} (SQLSTATE {})",
                db.message(),
                db.code().unwrap_or_default()
            )
        }
        sqlx::Error::PoolTimedOut => {
            "timed out waiting for a pooled connection (raise max_connections or acquire_timeout)"
                .to_string()
        }
        other => other.to_string(),
    };
    let message = match instance {
        Some(i) => format!("instance {i:?}: {detail}"),
        None => detail,
    };
    if retryable {
        ProviderError::retryable(operation, message)
    } else {
        ProviderError::permanent(operation, message)
    }
}

/// A permanent error for data that does not decode (corrupt row, foreign format).
pub fn decode_error(
    operation: &str,
    instance: Option<&str>,
    what: impl fmt::Display,
) -> ProviderError {
    let message = match instance {
        Some(i) => format!("instance {i:?}: {what}"),
        None => what.to_string(),
    };
    ProviderError::permanent(operation, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_table() {
        let cases = [
            ("40001", true),
            ("40P01", true),
            ("55P03", true),
            ("57014", true),
            ("57P01", true),
            ("57P02", true),
            ("57P03", true),
            ("08006", true),
            ("08001", true),
            ("53300", true),
            ("53100", true),
            ("0A000", true),
            ("28000", true),
            ("28P01", true),
            ("23505", false),
            ("23503", false),
            ("22P02", false),
            ("42501", false),
            ("42P01", false),
            ("DX001", false),
            ("DX002", false),
            ("XX000", false),
        ];
        for (code, retryable) in cases {
            assert_eq!(sqlstate_is_retryable(code), retryable, "SQLSTATE {code}");
        }
    }

    #[test]
    fn transport_errors_are_retryable() {
        assert!(is_retryable(&sqlx::Error::PoolTimedOut));
        assert!(!is_retryable(&sqlx::Error::PoolClosed));
        assert!(!is_retryable(&sqlx::Error::RowNotFound));
        let e = db_error(
            "ack_orchestration_item",
            Some("i-1"),
            sqlx::Error::PoolTimedOut,
        );
        assert!(e.is_retryable());
        assert!(e.message.contains("\"i-1\""), "{e}");
        assert_eq!(e.operation, "ack_orchestration_item");
    }
}
