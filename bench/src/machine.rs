//! Machine and server facts recorded with every result file.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use sqlx::{PgPool, Row};

use crate::results::Meta;

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub fn cpu_model() -> String {
    read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

pub fn memory_gib() -> f64 {
    read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| (kb / 1024.0 / 1024.0 * 10.0).round() / 10.0)
        .unwrap_or(0.0)
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `YYYY-MM-DDTHH:MM:SSZ` for now (UTC), without a date crate.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub async fn collect(
    admin: &PgPool,
    url: &str,
    scenario: &str,
    quick: bool,
    providers: Vec<String>,
    pgss: bool,
) -> Meta {
    let postgres_version = sqlx::query_scalar::<_, String>("SELECT version()")
        .fetch_one(admin)
        .await
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let mut settings = Map::new();
    if let Ok(rows) = sqlx::query(
        "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN \
         ('shared_buffers','fsync','synchronous_commit','max_connections','work_mem','jit','wal_level')",
    )
    .fetch_all(admin)
    .await
    {
        for r in rows {
            settings.insert(r.get::<String, _>(0), Value::String(r.get::<String, _>(1)));
        }
    }
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
    Meta {
        scenario: scenario.to_string(),
        started_at: utc_now(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        quick,
        git_commit: git(&["rev-parse", "--short", "HEAD"]),
        git_dirty: dirty,
        cpu_model: cpu_model(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        memory_gib: memory_gib(),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        postgres_version,
        postgres_settings: Value::Object(settings),
        pg_stat_statements: pgss,
        providers,
        incumbent_crate: cfg!(feature = "incumbent").then(|| "duroxide-pg 0.1.38".to_string()),
        duroxide_version: "0.1.32".to_string(),
        database_url: duroxide_pg_hybrid::options::redact_url(url),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_now_is_well_formed() {
        let s = super::utc_now();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20"), "{s}");
    }
}
