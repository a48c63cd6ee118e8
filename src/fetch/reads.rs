//! Hybrid path, second round trip: the four reads of a claimed turn, issued concurrently
//! with `tokio::join!`. Each query checks out its own pooled connection, so they
//! overlap on the wire.

use duroxide::providers::ProviderError;

use super::{Claim, OP};
use crate::errors::db_error;
use crate::provider::PostgresProvider;

const MESSAGES: &str = "SELECT o_work_item FROM {s}.read_batch_messages($1)";
const META: &str =
    "SELECT o_orchestration_name, o_orchestration_version FROM {s}.read_instance_meta($1)";
const HISTORY: &str = "SELECT o_event_data FROM {s}.read_execution_history($1, $2)";
const KV: &str = "SELECT o_key, o_value, o_last_updated_at_ms FROM {s}.read_kv_snapshot($1)";

type Meta = Option<(String, Option<String>)>;
type KvRows = Vec<(String, String, i64)>;

impl PostgresProvider {
    pub(crate) async fn read_turn(
        &self,
        claim: &Claim,
    ) -> Result<(Meta, Vec<String>, Vec<String>, KvRows), ProviderError> {
        let instance = claim.instance.as_str();
        let (messages_sql, meta_sql, history_sql, kv_sql) = (
            self.sql(MESSAGES),
            self.sql(META),
            self.sql(HISTORY),
            self.sql(KV),
        );
        let (messages, meta, history, kv) = tokio::join!(
            async {
                on_conn!(
                    self,
                    fetch_all,
                    sqlx::query_scalar::<_, String>(&messages_sql).bind(&claim.lock_token)
                )
            },
            async {
                on_conn!(
                    self,
                    fetch_optional,
                    sqlx::query_as::<_, (String, Option<String>)>(&meta_sql).bind(instance)
                )
            },
            async {
                on_conn!(
                    self,
                    fetch_all,
                    sqlx::query_scalar::<_, String>(&history_sql)
                        .bind(instance)
                        .bind(claim.execution_id)
                )
            },
            async {
                on_conn!(
                    self,
                    fetch_all,
                    sqlx::query_as::<_, (String, String, i64)>(&kv_sql).bind(instance)
                )
            },
        );
        let err = |e| db_error(OP, Some(instance), e);
        Ok((
            meta.map_err(err)?,
            messages.map_err(err)?,
            history.map_err(err)?,
            kv.map_err(err)?,
        ))
    }
}
