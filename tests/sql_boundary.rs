//! The Rust side of every SQL function call against `pg_proc`: argument names and order,
//! left-out arguments having defaults, and selected columns being result columns. A
//! renamed, reordered or retyped SQL argument fails here, not in production.

mod common;

use common::new_provider;
use duroxide_pg_hybrid::FetchPath;
use duroxide_pg_hybrid::sql_fn;

#[derive(sqlx::FromRow, Debug)]
struct ProcRow {
    /// Names of every argument, IN and OUT/TABLE, in declaration order.
    names: Vec<String>,
    /// Mode of each (i = in, o = out, t = table column, b = inout); NULL = all in.
    modes: Option<Vec<String>>,
    defaults: i16,
    overloads: i64,
}

#[tokio::test]
async fn every_call_matches_its_sql_function() {
    let (p, guard) = new_provider(FetchPath::Hybrid).await;
    let functions = sql_fn::all();
    assert!(functions.len() >= 9);
    for f in functions {
        let row: ProcRow = sqlx::query_as(
            "SELECT coalesce(p.proargnames, '{}') AS names, p.proargmodes::TEXT[] AS modes, \
                    p.pronargdefaults AS defaults, count(*) OVER () AS overloads \
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = $1 AND p.proname = $2",
        )
        .bind(guard.schema())
        .bind(f.name)
        .fetch_optional(p.pool())
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{} does not exist in the schema", f.name));
        assert_eq!(row.overloads, 1, "{} is overloaded", f.name);

        let mode = |i: usize| row.modes.as_ref().map_or("i", |m| m[i].as_str());
        let inputs: Vec<&str> = (0..row.names.len())
            .filter(|&i| matches!(mode(i), "i" | "b"))
            .map(|i| row.names[i].as_str())
            .collect();
        let outputs: Vec<&str> = (0..row.names.len())
            .filter(|&i| matches!(mode(i), "o" | "t" | "b"))
            .map(|i| row.names[i].as_str())
            .collect();

        assert_eq!(
            &inputs[..f.args.len().min(inputs.len())],
            f.args,
            "{}: Rust binds {:?}, SQL declares {:?}",
            f.name,
            f.args,
            inputs
        );
        let left_out = inputs.len() - f.args.len();
        assert!(
            left_out <= row.defaults as usize,
            "{}: {left_out} arguments left out but only {} have defaults",
            f.name,
            row.defaults
        );
        if let Some(columns) = f.columns {
            for col in columns.split(',').map(str::trim) {
                assert!(
                    outputs.contains(&col),
                    "{}: selects {col}, result columns are {outputs:?}",
                    f.name
                );
            }
        } else {
            assert!(
                outputs.is_empty(),
                "{}: called as a scalar, but returns columns {outputs:?}",
                f.name
            );
        }
    }
}

/// Every function the provider calls runs its statements with generic plans
/// (`plan_cache_mode = force_generic_plan`, see `01_primitives.sql`): without it the
/// plan cache re-plans statements with parameters in OR branches on every call, which
/// cost more than executing them (the worker claim: 0.45 ms per call instead of 0.15).
/// The trigger functions a plain client INSERT or lease end fires carry it too.
#[tokio::test]
async fn calls_and_triggers_run_with_generic_plans() {
    let (p, guard) = new_provider(FetchPath::Hybrid).await;
    let mut names: Vec<&str> = sql_fn::all().iter().map(|f| f.name).collect();
    names.extend([
        "pending_instances_on_enqueue",
        "pending_instances_on_lease_end",
    ]);
    for name in names {
        assert_eq!(
            proconfig(&p, guard.schema(), name).await,
            Some("plan_cache_mode=force_generic_plan".to_string()),
            "{name} runs with the session's plan cache mode"
        );
    }
    // ... except the functions made of lookups of one instance's rows, which a generic
    // plan would make scan a queue where one instance holds most rows.
    for name in [
        "claim_instance",
        "pending_refresh",
        "pending_instance_facts",
    ] {
        assert_eq!(
            proconfig(&p, guard.schema(), name).await,
            Some("plan_cache_mode=auto".to_string()),
            "{name}"
        );
    }
}

/// The function's `plan_cache_mode` setting, if it has one.
async fn proconfig(
    p: &duroxide_pg_hybrid::PostgresProvider,
    schema: &str,
    name: &str,
) -> Option<String> {
    settings(p, schema, name)
        .await
        .into_iter()
        .find(|c| c.starts_with("plan_cache_mode="))
}

/// The function's `SET` clauses (`pg_proc.proconfig`).
async fn settings(
    p: &duroxide_pg_hybrid::PostgresProvider,
    schema: &str,
    name: &str,
) -> Vec<String> {
    let config: Option<Vec<String>> = sqlx::query_scalar(
        "SELECT p.proconfig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = $1 AND p.proname = $2",
    )
    .bind(schema)
    .bind(name)
    .fetch_one(p.pool())
    .await
    .unwrap();
    config.unwrap_or_default()
}
