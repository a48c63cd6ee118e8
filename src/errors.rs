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
//! | class `53` insufficient resources (`53300` too many connections, `53100` disk full) | retryable |
//! | `53200` out of shared memory (the lock table is full) | see below | retryable / permanent |
//! | `0A000` feature_not_supported            | cached plan invalidated by a concurrent migration | retryable |
//! | `XX000` "cache lookup failed for ..."    | a function dropped and re-created by a concurrent migration between a statement's plan check and its execution | retryable |
//! | `28000`/`28P01` invalid authorization / password | a new connection was refused: the secret rotated (or a token expired) between asking the password source and connecting | retryable |
//! | `DX001` (ours) invalid lock token        | unknown / acked / stolen token   | permanent  |
//! | `DX002` (ours) instance lock expired     | lease ran out before the ack     | permanent  |
//! | class `23` integrity (`23505` duplicate event id, ...) | contract violation  | permanent  |
//! | class `22` data exception                | bad value                        | permanent  |
//! | class `42` syntax / privilege (`42501`)  | missing privilege or schema      | permanent  |
//! | anything else from the server (other `XX000` included) | unknown            | permanent  |
//! | pool timed out, I/O, TLS, protocol error | transient transport trouble      | retryable  |
//! | TLS certificate verification failed      | wrong `sslmode`/`sslrootcert`, or an impostor | permanent |
//! | pool closed                              | provider shut down               | permanent  |
//! | row decode / serde error                 | corrupt or foreign data          | permanent  |
//!
//! `53200` comes from the shared lock table (`max_locks_per_transaction` x connections)
//! being full. For the statements that take a lock per instance they touch (instance
//! deletes and prunes, [`LOCK_HEAVY_OPERATIONS`]) it is their own size that fills it, so
//! the same call fails again every time: permanent, with a message that says to delete
//! fewer instances per call or raise `max_locks_per_transaction` (bulk deletes are
//! batched so they never get there). For any other call another session caused it, and
//! it clears when that session's transaction ends: retryable, which duroxide bounds (an
//! ack is retried 5 times, then the orchestration fails; fetches back off).
//!
//! A TLS error is transport trouble, except a failed certificate verification, which
//! fails the same way on every attempt: permanent, naming `sslmode` and `sslrootcert`.
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

/// Operations for which `53200` (lock table full) is permanent: they take one lock per
/// instance they touch, so retrying the same call fails the same way.
pub const LOCK_HEAVY_OPERATIONS: &[&str] = &[
    "delete_instances_atomic",
    "delete_instance",
    "delete_instance_bulk",
    "prune_executions",
    "prune_executions_bulk",
];

/// A TLS error that says the server's certificate was rejected (unknown CA, self-signed,
/// wrong host name, expired): it fails the same way on every attempt.
pub fn is_tls_verification_failure(err: &sqlx::Error) -> bool {
    let sqlx::Error::Tls(e) = err else {
        return false;
    };
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&s.to_string());
        source = s.source();
    }
    let text = text.to_lowercase();
    text.contains("certificate verify failed")
        || text.contains("unable to get local issuer certificate")
        || text.contains("self-signed certificate")
        || text.contains("self signed certificate")
        || text.contains("hostname mismatch")
        || text.contains("certificate has expired")
        || text.contains("unknown ca")
}

/// A migration that changes a function's signature drops and re-creates it in one
/// transaction (migrations/functions/*.sql). Other sessions never see it missing, but a
/// statement whose plan was checked just before that commit can still look up the
/// dropped function: PostgreSQL then reports an internal error. The next attempt plans
/// the statement again and finds the new function.
fn is_concurrent_function_swap(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.code().as_deref() == Some("XX000") && db.message().starts_with("cache lookup failed for ")
}

/// Retry class of any sqlx error.
pub fn is_retryable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|c| sqlstate_is_retryable(&c))
                || is_concurrent_function_swap(db.as_ref())
        }
        sqlx::Error::Tls(_) => !is_tls_verification_failure(err),
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => true,
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
    let mut retryable = is_retryable(&err);
    let detail = match &err {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("53200") => {
            retryable = !LOCK_HEAVY_OPERATIONS.contains(&operation);
            format!(
                "{} (SQLSTATE 53200): the server's shared lock table is full. Delete or prune \
                 fewer instances per call, or raise max_locks_per_transaction on the server",
                db.message()
            )
        }
        sqlx::Error::Tls(e) if is_tls_verification_failure(&err) => format!(
            "TLS certificate verification failed: {e}. Check sslmode (verify-ca and \
             verify-full check the server certificate against the root certificate named \
             by sslrootcert, verify-full also checks the host name) and that sslrootcert \
             is the CA that signed the server's certificate"
        ),
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

    #[test]
    fn tls_verification_failures_are_permanent_and_name_the_settings() {
        let verify: Box<dyn std::error::Error + Send + Sync> = "error:0A000086:SSL routines:\
            tls_post_process_server_certificate:certificate verify failed:ssl/statem/statem_clnt.c:1889: \
            (self-signed certificate in certificate chain)"
            .into();
        let err = sqlx::Error::Tls(verify);
        assert!(!is_retryable(&err));
        let e = db_error("migrate", None, err);
        assert!(!e.is_retryable());
        assert!(
            e.message.contains("sslmode") && e.message.contains("sslrootcert"),
            "{e}"
        );
        let reset: Box<dyn std::error::Error + Send + Sync> = "connection reset by peer".into();
        assert!(is_retryable(&sqlx::Error::Tls(reset)));
    }
}
