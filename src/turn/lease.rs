//! Renewing and giving back an orchestration turn's lease outside the ack:
//! `renew_orchestration_item_lock`, `abandon_orchestration_item`, and the release of a
//! claim whose reads failed. One function call each (migrations/functions/06_turn_lease.sql),
//! which also keeps the instance's claim state in step.

use std::time::Duration;

use duroxide::providers::ProviderError;

use crate::codec::millis;
use crate::errors::db_error;
use crate::provider::{PostgresProvider, TRACING_TARGET};
use crate::sql_fn::{Args, SqlFunction};

pub(crate) static ABANDON_TURN: SqlFunction = SqlFunction {
    name: "abandon_orchestration_turn",
    args: &["p_lock_token", "p_delay_ms", "p_ignore_attempt"],
    columns: None,
};

pub(crate) static RENEW_TURN: SqlFunction = SqlFunction {
    name: "renew_orchestration_turn",
    args: &["p_lock_token", "p_extend_ms"],
    columns: None,
};

impl PostgresProvider {
    /// Drops the lease of `lock_token` and hands its batch back; `Ok(None)` when no lease
    /// holds the token.
    pub(crate) async fn abandon_turn(
        &self,
        op: &str,
        lock_token: &str,
        delay: Option<Duration>,
        ignore_attempt: bool,
    ) -> Result<Option<String>, ProviderError> {
        let sql = self.call_sql(&ABANDON_TURN);
        let args = || {
            Args::new(&ABANDON_TURN)
                .bind("p_lock_token", lock_token)
                .bind("p_delay_ms", delay.map(millis))
                .bind("p_ignore_attempt", ignore_attempt)
                .finish(op)
        };
        on_conn!(
            self,
            fetch_one,
            sqlx::query_scalar_with::<_, Option<String>, _>(&sql, args()?)
        )
        .map_err(|e| db_error(op, None, e))
    }

    pub(crate) async fn abandon_orchestration(
        &self,
        lock_token: &str,
        delay: Option<Duration>,
        ignore_attempt: bool,
    ) -> Result<(), ProviderError> {
        const OP: &str = "abandon_orchestration_item";
        match self
            .abandon_turn(OP, lock_token, delay, ignore_attempt)
            .await?
        {
            Some(instance) => {
                tracing::debug!(
                    target: TRACING_TARGET,
                    operation = OP,
                    instance = %instance,
                    delay_ms = delay.map(millis),
                    ignore_attempt,
                    "abandoned orchestration turn"
                );
                Ok(())
            }
            None => Err(ProviderError::permanent(
                OP,
                format!("Invalid lock token: {lock_token} holds no lease"),
            )),
        }
    }

    pub(crate) async fn renew_orchestration(
        &self,
        lock_token: &str,
        extend_for: Duration,
    ) -> Result<(), ProviderError> {
        const OP: &str = "renew_orchestration_item_lock";
        let sql = self.call_sql(&RENEW_TURN);
        let args = || {
            Args::new(&RENEW_TURN)
                .bind("p_lock_token", lock_token)
                .bind("p_extend_ms", millis(extend_for))
                .finish(OP)
        };
        // Idempotent (extends to now + extend_for): resent also after a lost reply.
        let renewed: Option<String> = on_conn!(
            idempotent: self,
            fetch_one,
            sqlx::query_scalar_with::<_, Option<String>, _>(&sql, args()?)
        )
        .map_err(|e| db_error(OP, None, e))?;
        match renewed {
            Some(_) => Ok(()),
            None => Err(ProviderError::permanent(
                OP,
                format!("Invalid lock token or lease expired: {lock_token} holds no live lease"),
            )),
        }
    }
}
