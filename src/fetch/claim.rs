//! The claim: one call of `sp_fetch_and_lock` (see its migration for the protocol).

use duroxide::providers::ProviderError;

use super::{Claim, ClaimArgs, OP};
use crate::errors::db_error;
use crate::provider::PostgresProvider;

const CLAIM: &str = "SELECT o_instance_id, o_lock_token, o_execution_id, o_attempt_count \
     FROM {s}.sp_fetch_and_lock($1, $2, $3, $4, $5, $6, $7, $8)";

/// Gives a claimed instance back after its reads failed: the lease is dropped and the
/// attempt is not counted, so a transient read error cannot push a turn towards poison.
const RELEASE: &str = "WITH released AS (DELETE FROM {s}.instance_locks WHERE lock_token = $1 RETURNING 1) \
     UPDATE {s}.orchestrator_queue q \
     SET lock_token = NULL, attempt_count = greatest(0, q.attempt_count - 1) \
     WHERE q.lock_token = $1 AND EXISTS (SELECT 1 FROM released)";

impl PostgresProvider {
    pub(crate) async fn claim(&self, a: &ClaimArgs) -> Result<Option<Claim>, ProviderError> {
        sqlx::query_as::<_, Claim>(&self.sql(CLAIM))
            .bind(a.lock_timeout_ms)
            .bind(a.filter_enabled)
            .bind(a.min.0)
            .bind(a.min.1)
            .bind(a.min.2)
            .bind(a.max.0)
            .bind(a.max.1)
            .bind(a.max.2)
            .fetch_optional(self.pool_ref())
            .await
            .map_err(|e| db_error(OP, None, e))
    }

    pub(crate) async fn release_after_failed_read(&self, lock_token: &str, instance: &str) {
        if let Err(e) = sqlx::query(&self.sql(RELEASE)).bind(lock_token).execute(self.pool_ref()).await {
            // The lease expires on its own; nothing is lost, the turn is only delayed.
            tracing::warn!(
                target: crate::provider::TRACING_TARGET,
                operation = OP,
                instance = %instance,
                error = %e,
                "could not release a claim after a failed read; it will expire"
            );
        }
    }
}
