//! Secrets and transport (issue 6, part 9), against throwaway clusters of their own
//! (`faults/cluster.rs`):
//!
//! * TLS chosen through the URL: `sslmode=require` works (and is really used: the
//!   cluster rejects every non-TLS connection), `verify-full` with the right root
//!   certificate and host `localhost` works, `verify-full` with a wrong root fails with a
//!   clear error.
//! * Passwords never appear in logs (everything at TRACE level is captured), in `Debug`
//!   output of the provider or its options, or in any returned error.
//!
//! This binary installs a process-wide `tracing` subscriber (with the `log` bridge) that
//! writes into a buffer, so it is kept apart from the other test binaries.
//!
//! Certificates come from the `openssl` command-line tool.

#[path = "faults/cluster.rs"]
mod cluster;
mod common;

use common::start_item;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use cluster::{Cluster, ClusterOptions};
use duroxide::providers::{ExecutionMetadata, Provider, ProviderAdmin, TagFilter, WorkItem};
use duroxide::runtime::registry::ActivityRegistry;
use duroxide::runtime::{Runtime, RuntimeOptions};
use duroxide::{
    ActivityContext, Client, OrchestrationContext, OrchestrationRegistry, OrchestrationStatus,
};
use duroxide_pg_hybrid::{FetchPath, PostgresProvider, ProviderOptions};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

// ---- log capture ----------------------------------------------------------------------

fn capture() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUFFER: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUFFER.get_or_init(|| {
        let buffer: Arc<Mutex<Vec<u8>>> = Arc::default();
        let sink = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .try_init()
            .expect("this test binary installs the only global subscriber");
        buffer
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn captured() -> String {
    String::from_utf8_lossy(&capture().lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
}

// ---- certificates -----------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("dpgh-tls-{}", &id[..12]));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate for `localhost` / 127.0.0.1: (certificate path, PEM, key PEM).
fn self_signed(dir: &Path, name: &str) -> (PathBuf, Vec<u8>, Vec<u8>) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .output()
        .unwrap_or_else(|e| {
            panic!("the openssl command-line tool is needed to make test certificates (apt-get install openssl): {e}")
        });
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = std::fs::read(&cert).unwrap();
    let key_pem = std::fs::read(&key).unwrap();
    (cert, pem, key_pem)
}

// ---- helpers ----------------------------------------------------------------------------

const LONG: Duration = Duration::from_secs(30);

fn options(schema: &str) -> ProviderOptions {
    ProviderOptions {
        schema: schema.to_string(),
        max_connections: 3,
        acquire_timeout: Duration::from_secs(5),
        fetch_path: Some(FetchPath::Hybrid),
        application_name: format!("dpgh-tls {schema}"),
        long_poll: false,
        ..ProviderOptions::default()
    }
}

/// One orchestration turn and one activity through every main provider call.
async fn exercise(p: &PostgresProvider, instance: &str) {
    p.enqueue_for_orchestrator(start_item(instance), None)
        .await
        .unwrap();
    let (item, token, _) = p
        .fetch_orchestration_item(LONG, Duration::ZERO, None)
        .await
        .unwrap()
        .expect("claimed");
    assert_eq!(item.instance, instance);
    let activity = WorkItem::ActivityExecute {
        instance: instance.to_string(),
        execution_id: 1,
        id: 1,
        name: "A".to_string(),
        input: "x".to_string(),
        session_id: None,
        tag: None,
    };
    let metadata = ExecutionMetadata {
        orchestration_name: Some("O".to_string()),
        orchestration_version: Some("1.0.0".to_string()),
        status: Some("Running".to_string()),
        ..Default::default()
    };
    p.ack_orchestration_item(&token, 1, vec![], vec![activity], vec![], metadata, vec![])
        .await
        .unwrap();
    let (_, wtoken, _) = p
        .fetch_work_item(LONG, Duration::ZERO, None, &TagFilter::Any)
        .await
        .unwrap()
        .unwrap();
    p.ack_work_item(&wtoken, None).await.unwrap();
    p.read(instance).await.unwrap();
    p.get_instance_info(instance).await.unwrap();
}

async fn uses_tls(p: &PostgresProvider) -> bool {
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(p.pool())
        .await
        .unwrap()
}

// ---- TLS ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_chosen_by_url_require_verify_full_and_wrong_root() {
    capture();
    let certs = TempDir::new();
    let (ca, cert, key) = self_signed(&certs.0, "server");
    let (wrong_ca, _, _) = self_signed(&certs.0, "impostor");
    let cluster = Cluster::start_new(ClusterOptions {
        conf: vec![
            "ssl = on".into(),
            "ssl_cert_file = 'server.crt'".into(),
            "ssl_key_file = 'server.key'".into(),
        ],
        // TLS or nothing over TCP: proves the provider really encrypts.
        hba: vec!["hostnossl all all 127.0.0.1/32 reject".into()],
        files: vec![
            ("server.crt".into(), cert, 0o644),
            ("server.key".into(), key, 0o600),
        ],
    });
    let port = cluster.port();
    let url =
        |host: &str, params: &str| format!("postgres://postgres@{host}:{port}/postgres?{params}");

    let require = PostgresProvider::connect_with(
        &url("127.0.0.1", "sslmode=require"),
        options("tls_require"),
    )
    .await
    .unwrap_or_else(|e| panic!("sslmode=require: {e}\n{}", cluster.server_log()));
    assert!(uses_tls(&require).await);
    exercise(&require, "tls-1").await;

    let verified = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    let full = PostgresProvider::connect_with(&url("localhost", &verified), options("tls_verify"))
        .await
        .unwrap_or_else(|e| panic!("sslmode=verify-full with the right root: {e}"));
    assert!(uses_tls(&full).await);
    exercise(&full, "tls-2").await;

    let impostor = format!("sslmode=verify-full&sslrootcert={}", wrong_ca.display());
    let t = Instant::now();
    let e = PostgresProvider::connect_with(&url("localhost", &impostor), options("tls_wrong"))
        .await
        .expect_err("verify-full accepted a server certificate its root did not sign");
    let took = t.elapsed();
    println!(
        "verify-full with a wrong root ({took:?}, retryable: {}): {e}",
        e.is_retryable()
    );
    let lower = e.message.to_lowercase();
    assert!(
        lower.contains("certificate") || lower.contains("tls"),
        "unclear TLS error: {e}"
    );
    // It fails the same way on every attempt: permanent, and it says what to check.
    assert!(
        !e.is_retryable(),
        "a failed certificate verification must not be retried: {e}"
    );
    assert!(
        e.message.contains("sslmode") && e.message.contains("sslrootcert"),
        "the message must name sslmode and the root certificate: {e}"
    );
    assert!(
        took < Duration::from_secs(15),
        "the failing TLS connect took {took:?}"
    );

    let e =
        PostgresProvider::connect_with(&url("127.0.0.1", "sslmode=disable"), options("tls_off"))
            .await
            .expect_err("the cluster accepts TLS connections only");
    assert!(e.message.contains("pg_hba.conf"), "{e}");
    require.close().await;
    full.close().await;
}

// ---- secrets ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_appear_in_logs_debug_output_or_errors() {
    capture();
    let hex = uuid::Uuid::new_v4().simple().to_string();
    let secret = format!("SeCrEt{}", &hex[..10]);
    let wrong = format!("WrOnG{}", &hex[10..20]);
    let role = "dpgh_secret";
    let cluster = Cluster::start_new(ClusterOptions {
        conf: vec!["password_encryption = 'scram-sha-256'".into()],
        hba: vec![format!("host all {role} 127.0.0.1/32 scram-sha-256")],
        files: vec![],
    });
    let port = cluster.port();
    // The admin session that sets the password must not log its own statements.
    let admin_options = PgConnectOptions::from_str(&cluster.admin_url())
        .unwrap()
        .log_statements(tracing::log::LevelFilter::Off)
        .log_slow_statements(tracing::log::LevelFilter::Off, Duration::from_secs(60));
    let mut admin = admin_options.connect().await.unwrap();
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{secret}'; GRANT CREATE ON DATABASE postgres TO {role};"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    admin.close().await.unwrap();

    let url = format!("postgres://{role}:{secret}@127.0.0.1:{port}/postgres?sslmode=disable");
    let opts = options("secret_app");
    let provider = Arc::new(
        PostgresProvider::connect_with(&url, opts.clone())
            .await
            .unwrap(),
    );
    exercise(&provider, "s-1").await;
    let mut errors = Vec::new();
    errors.push(
        provider
            .ack_orchestration_item(
                "lock_nope",
                1,
                vec![],
                vec![],
                vec![],
                ExecutionMetadata::default(),
                vec![],
            )
            .await
            .unwrap_err()
            .to_string(),
    );

    // A runtime on top (long polling, LISTEN, renewals, the runtime's own logging).
    let activities = ActivityRegistry::builder()
        .register("Echo", |_ctx: ActivityContext, input: String| async move {
            Ok(input)
        })
        .build();
    let orchestrations = OrchestrationRegistry::builder()
        .register(
            "Run",
            |ctx: OrchestrationContext, input: String| async move {
                ctx.schedule_activity("Echo", input).await
            },
        )
        .build();
    let long_poll = Arc::new(
        PostgresProvider::connect_with(
            &url,
            ProviderOptions {
                long_poll: true,
                ..opts.clone()
            },
        )
        .await
        .unwrap(),
    );
    let rt = Runtime::start_with_options(
        long_poll.clone(),
        activities,
        orchestrations,
        RuntimeOptions::default(),
    )
    .await;
    let client = Client::new(long_poll.clone());
    client
        .start_orchestration("s-run", "Run", "hello")
        .await
        .unwrap();
    match client
        .wait_for_orchestration("s-run", Duration::from_secs(30))
        .await
        .unwrap()
    {
        OrchestrationStatus::Completed { output, .. } => assert_eq!(output, "hello"),
        other => panic!("{other:?}"),
    }
    rt.shutdown(None).await;

    // The password as a query parameter works too.
    let query_url = format!(
        "postgres://127.0.0.1:{port}/postgres?user={role}&password={secret}&sslmode=disable"
    );
    let by_query = PostgresProvider::connect_with(&query_url, options("secret_query"))
        .await
        .unwrap();
    exercise(&by_query, "s-2").await;

    // Failing connects: wrong password, unparsable URL, nothing listening.
    let bad_urls = [
        format!("postgres://{role}:{wrong}@127.0.0.1:{port}/postgres?sslmode=disable"),
        format!(
            "postgres://127.0.0.1:{port}/postgres?user={role}&password={wrong}&sslmode=disable"
        ),
        format!("postgres://{role}:{secret}@127.0.0.1:notaport/postgres"),
        format!("postgres://{role}:{secret}@127.0.0.1:1/postgres?sslmode=disable"),
    ];
    for bad in &bad_urls {
        let e = PostgresProvider::connect_with(bad, options("secret_bad"))
            .await
            .expect_err(bad);
        errors.push(format!("{e} / {e:?}"));
    }
    assert!(
        errors[1].contains("password authentication failed"),
        "a wrong password should say so: {}",
        errors[1]
    );
    let debug = [
        format!("{provider:?}"),
        format!("{long_poll:?}"),
        format!("{by_query:?}"),
        format!("{opts:?}"),
    ];
    let logs = captured();
    assert!(
        logs.contains("duroxide-pg-hybrid provider ready"),
        "the log capture saw nothing"
    );
    assert!(logs.contains("TRACE"), "TRACE events were not captured");
    assert!(
        logs.contains("sqlx::query"),
        "sqlx's statement log was not captured"
    );
    for s in [&secret, &wrong] {
        assert!(!logs.contains(s.as_str()), "a password appears in the logs");
        for d in &debug {
            assert!(
                !d.contains(s.as_str()),
                "a password appears in Debug output: {d}"
            );
        }
        for e in &errors {
            assert!(
                !e.contains(s.as_str()),
                "a password appears in an error: {e}"
            );
        }
    }
    println!(
        "{} bytes of TRACE logs, {} errors checked; e.g. {}",
        logs.len(),
        errors.len(),
        errors[1]
    );
    provider.close().await;
    long_poll.close().await;
    by_query.close().await;
}
