//! Result records (one JSON object per line) and the small statistics they need.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One line of a results file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    Meta(Meta),
    Result(Record),
}

/// Where and when a run happened.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Meta {
    pub scenario: String,
    pub started_at: String,
    pub command: String,
    pub quick: bool,
    pub git_commit: Option<String>,
    pub git_dirty: Option<bool>,
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub postgres_version: String,
    pub postgres_settings: Value,
    pub pg_stat_statements: bool,
    pub providers: Vec<String>,
    pub incumbent_crate: Option<String>,
    pub duroxide_version: String,
    /// Connection URL with the password redacted.
    #[serde(default)]
    pub database_url: String,
}

/// One measured quantity for one provider under one set of parameters: the median of
/// the per-run values, with their range.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub scenario: String,
    pub provider: String,
    /// What varies within the scenario, e.g. `"2:2"`, `"1000 events"`.
    pub case: String,
    pub rtt_ms: u64,
    pub metric: String,
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: Vec<f64>,
    /// Scenario-specific extras (parameters, counts, notes).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub extra: Value,
}

impl Record {
    pub fn new(
        scenario: &str,
        provider: &str,
        case: impl Into<String>,
        rtt_ms: u64,
        metric: &str,
        unit: &str,
        runs: Vec<f64>,
    ) -> Record {
        let (median, min, max) = summarize(&runs);
        Record {
            scenario: scenario.into(),
            provider: provider.into(),
            case: case.into(),
            rtt_ms,
            metric: metric.into(),
            unit: unit.into(),
            median,
            min,
            max,
            runs,
            extra: Value::Null,
        }
    }

    pub fn with_extra(mut self, extra: Value) -> Record {
        self.extra = extra;
        self
    }
}

/// (median, min, max); NaN for an empty slice.
pub fn summarize(values: &[f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    (median_sorted(&v), v[0], v[v.len() - 1])
}

pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    median_sorted(&v)
}

fn median_sorted(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile (`p` in 0..=100).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats() {
        assert_eq!(summarize(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&v, 95.0), 19.0);
        assert_eq!(percentile(&[5.0], 95.0), 5.0);
    }
}
