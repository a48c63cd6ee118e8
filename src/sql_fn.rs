//! The typed boundary between Rust and the schema's SQL functions.
//!
//! Every function the provider calls is described once by a [`SqlFunction`]: its name,
//! its argument names in declaration order, and the columns the call selects. Calls use
//! PostgreSQL's named notation (`p_lock_token => $1`), and values are bound through
//! `Args`, which names each value as it binds it and refuses a value bound under the
//! wrong name. So swapping two arguments of the same type cannot pass silently: the
//! names would have to be swapped too, in plain sight, and `tests/sql_boundary.rs`
//! checks every description against `pg_proc`.

use duroxide::providers::ProviderError;
use sqlx::postgres::PgArguments;
use sqlx::{Arguments, Encode, Postgres, Type};

/// One SQL function of the schema, as the provider calls it.
#[derive(Debug)]
pub struct SqlFunction {
    /// Function name (unqualified; the provider's schema is prepended).
    pub name: &'static str,
    /// Argument names the provider passes, in declaration order. Trailing arguments with
    /// defaults may be left out.
    pub args: &'static [&'static str],
    /// Select list of the call: the result columns for a set-returning function, or
    /// `None` for a scalar function (`SELECT f(...)`).
    pub columns: Option<&'static str>,
}

impl SqlFunction {
    /// The call's SQL text for a quoted schema name.
    pub(crate) fn call_sql(&self, schema_q: &str) -> String {
        let args = self
            .args
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{a} => ${}", i + 1))
            .collect::<Vec<_>>()
            .join(", ");
        match self.columns {
            Some(cols) => format!("SELECT {cols} FROM {schema_q}.{}({args})", self.name),
            None => format!("SELECT {schema_q}.{}({args})", self.name),
        }
    }
}

/// Every SQL function the provider calls (for `tests/sql_boundary.rs`).
pub fn all() -> Vec<&'static SqlFunction> {
    use crate::turn;
    vec![
        &turn::SP_FETCH_AND_LOCK,
        &turn::FETCH_ORCHESTRATION_FULL,
        &turn::FETCH_ORCHESTRATION_TURN,
        &turn::READ_HISTORY_SINCE,
        &turn::READ_BATCH_MESSAGES,
        &turn::READ_INSTANCE_META,
        &turn::READ_EXECUTION_HISTORY,
        &turn::READ_KV_SNAPSHOT,
        &crate::history::READ_LATEST_HISTORY_SINCE,
        &turn::ack::ACK_ORCHESTRATION_ITEM,
        &turn::ack::ACK_ORCHESTRATION_HANDOVER,
        &crate::worker::CLAIM_WORKER_ITEM,
        &crate::worker::ACK_WORK_ITEM,
        &crate::queue::ENQUEUE_ORCHESTRATOR_ITEM,
        &crate::queue::ENQUEUE_ORCHESTRATOR_HANDOVER,
        &turn::ABANDON_TURN,
        &turn::RENEW_TURN,
    ]
}

/// Values for one call, bound by name in the function's declaration order.
pub(crate) struct Args {
    function: &'static SqlFunction,
    values: PgArguments,
    bound: usize,
    error: Option<String>,
}

impl Args {
    pub(crate) fn new(function: &'static SqlFunction) -> Self {
        Self {
            function,
            values: PgArguments::default(),
            bound: 0,
            error: None,
        }
    }

    /// Binds `value` as argument `name`, which must be the function's next argument.
    pub(crate) fn bind<'q, T>(mut self, name: &str, value: T) -> Self
    where
        T: Encode<'q, Postgres> + Type<Postgres> + 'q,
    {
        if self.error.is_none() {
            let expected = self.function.args.get(self.bound).copied();
            if expected != Some(name) {
                self.error = Some(format!(
                    "{}: argument {} bound as {name:?}, expected {expected:?}",
                    self.function.name,
                    self.bound + 1
                ));
            } else if let Err(e) = self.values.add(value) {
                self.error = Some(format!("{}: cannot encode {name}: {e}", self.function.name));
            }
        }
        self.bound += 1;
        self
    }

    /// The bound values, or a permanent error naming the function and the argument that
    /// was bound out of order or left out (a programming error, never a data error).
    pub(crate) fn finish(self, operation: &str) -> Result<PgArguments, ProviderError> {
        let error = self.error.or_else(|| {
            (self.bound != self.function.args.len()).then(|| {
                format!(
                    "{}: {} of {} arguments bound",
                    self.function.name,
                    self.bound,
                    self.function.args.len()
                )
            })
        });
        match error {
            None => Ok(self.values),
            Some(e) => Err(ProviderError::permanent(
                operation,
                format!("internal error, SQL call built wrong: {e}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static F: SqlFunction = SqlFunction {
        name: "f",
        args: &["p_a", "p_b"],
        columns: Some("o_x"),
    };

    #[test]
    fn call_text_uses_named_notation() {
        assert_eq!(
            F.call_sql("\"s\""),
            "SELECT o_x FROM \"s\".f(p_a => $1, p_b => $2)"
        );
    }

    #[test]
    fn binding_checks_names_order_and_count() {
        assert!(
            Args::new(&F)
                .bind("p_a", 1i64)
                .bind("p_b", "x")
                .finish("op")
                .is_ok()
        );
        let swapped = Args::new(&F)
            .bind("p_b", "x")
            .bind("p_a", 1i64)
            .finish("op");
        assert!(swapped.unwrap_err().message.contains("bound as \"p_b\""));
        let short = Args::new(&F).bind("p_a", 1i64).finish("op");
        assert!(short.unwrap_err().message.contains("1 of 2"));
    }
}
