//! Throwaway PostgreSQL clusters for the fault tests (server restart, TLS, password
//! authentication): `initdb` into a temp directory, a port found by a free-port probe,
//! `fsync=off`, listening on 127.0.0.1 only. The cluster is stopped (`-m immediate`) and
//! its directory deleted when the [`Cluster`] is dropped, also when the test panics.
//!
//! The server refuses to run as root: when the tests run as root, every PostgreSQL
//! binary is started through `runuser -u postgres --` and the directory is handed to the
//! `postgres` OS user.
//!
//! Binaries: `$PG_BINDIR`, else the newest `/usr/lib/postgresql/*/bin`, else
//! `pg_config --bindir`. Missing binaries fail the test with a message saying so.

#![allow(dead_code)] // each test binary uses a different subset

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What to configure before the first start.
#[derive(Default, Clone)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` lines (appended, so they win over the defaults).
    pub conf: Vec<String>,
    /// `pg_hba.conf` lines placed BEFORE initdb's own (first match wins). initdb's own
    /// lines trust every local and loopback connection.
    pub hba: Vec<String>,
    /// Files written into the data directory: (file name, contents, mode). Owned by the
    /// server's OS user (e.g. `server.key` with mode 0600).
    pub files: Vec<(String, Vec<u8>, u32)>,
}

/// A running (or stopped) throwaway cluster.
pub struct Cluster {
    bindir: PathBuf,
    root: PathBuf,
    data: PathBuf,
    port: u16,
    /// `Some((uid, gid))` of the `postgres` OS user when the tests run as root.
    run_as: Option<(u32, u32)>,
    running: bool,
}

/// The directory holding `initdb` and `pg_ctl`, or a message saying why there is none.
pub fn find_bindir() -> Result<PathBuf, String> {
    let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(d) = std::env::var_os("PG_BINDIR") {
        let d = PathBuf::from(d);
        return if has_tools(&d) {
            Ok(d)
        } else {
            Err(format!("PG_BINDIR={} holds no initdb/pg_ctl", d.display()))
        };
    }
    let mut candidates: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let version: u32 = e.file_name().to_str()?.parse().ok()?;
                    Some((version, e.path().join("bin")))
                })
                .filter(|(_, d)| has_tools(d))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    if let Some((_, d)) = candidates.pop() {
        return Ok(d);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_tools(&d) {
            return Ok(d);
        }
    }
    Err(
        "PostgreSQL server binaries (initdb, pg_ctl) not found in $PG_BINDIR, \
         /usr/lib/postgresql/*/bin or `pg_config --bindir`: install the PostgreSQL server \
         (e.g. `apt-get install postgresql`) or set PG_BINDIR"
            .to_string(),
    )
}

/// A TCP port on 127.0.0.1 that nothing listened on a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot probe for a free port on 127.0.0.1")
}

fn id_of(flag: &str, user: &str) -> Option<u32> {
    let out = Command::new("id").args([flag, user]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

impl Cluster {
    /// Creates and starts a cluster. Panics with a clear message when the binaries are
    /// missing or the server does not come up (the server log is included).
    pub fn start_new(options: ClusterOptions) -> Cluster {
        let bindir =
            find_bindir().unwrap_or_else(|e| panic!("cannot start a throwaway cluster: {e}"));
        let run_as = if running_as_root() {
            let uid = id_of("-u", "postgres");
            let gid = id_of("-g", "postgres");
            match (uid, gid) {
                (Some(u), Some(g)) => Some((u, g)),
                _ => panic!(
                    "running as root, but there is no `postgres` OS user to run the throwaway \
                     cluster as (PostgreSQL refuses to run as root): create one, or run the tests \
                     as an unprivileged user"
                ),
            }
        } else {
            None
        };
        let id = uuid::Uuid::new_v4().simple().to_string();
        let root = std::env::temp_dir().join(format!("dpgh-faults-{}", &id[..12]));
        fs::create_dir_all(&root).expect("create the cluster directory");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .expect("chmod the cluster directory");
        let mut cluster = Cluster {
            bindir,
            data: root.join("data"),
            root,
            port: 0,
            run_as,
            running: false,
        };
        cluster.give_to_server_user(&cluster.root.clone());
        let data = cluster.data.display().to_string();
        let out = cluster.run_pg(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
        );
        assert!(out.status.success(), "initdb failed: {}", describe(&out));

        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{}'", cluster.root.display()),
            "fsync = off".to_string(),
            "synchronous_commit = off".to_string(),
            "full_page_writes = off".to_string(),
            "max_connections = 100".to_string(),
            "shared_buffers = '32MB'".to_string(),
        ];
        conf.extend(options.conf);
        cluster.append_conf(&conf);
        if !options.hba.is_empty() {
            let path = cluster.data.join("pg_hba.conf");
            let old = fs::read_to_string(&path).expect("read pg_hba.conf");
            // Overwriting keeps the file's owner.
            fs::write(&path, format!("{}\n{old}", options.hba.join("\n")))
                .expect("write pg_hba.conf");
        }
        for (name, contents, mode) in &options.files {
            let path = cluster.data.join(name);
            fs::write(&path, contents).unwrap_or_else(|e| panic!("write {name}: {e}"));
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).expect("chmod");
            cluster.give_to_server_user(&path);
        }

        // A port can be taken between the probe and the start: try a few.
        let mut last_error = String::new();
        for _ in 0..3 {
            cluster.port = free_port();
            cluster.append_conf(&[format!("port = {}", cluster.port)]);
            match cluster.try_start() {
                Ok(()) => return cluster,
                Err(e) => last_error = e,
            }
        }
        panic!("the throwaway cluster did not start: {last_error}");
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The superuser URL (trust authentication, TLS off).
    pub fn admin_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// The server log so far (for failure messages).
    pub fn server_log(&self) -> String {
        fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
    }

    /// `pg_ctl stop -m fast`: sessions are terminated, the server shuts down cleanly.
    pub fn stop_fast(&mut self) {
        let data = self.data.display().to_string();
        let out = self.run_pg(
            "pg_ctl",
            &["-D", &data, "-m", "fast", "-w", "-t", "60", "stop"],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}\n{}",
            describe(&out),
            self.server_log()
        );
        self.running = false;
    }

    /// `pg_ctl start` on the same port.
    pub fn start(&mut self) {
        if let Err(e) = self.try_start() {
            panic!("pg_ctl start failed: {e}");
        }
    }

    fn try_start(&mut self) -> Result<(), String> {
        let data = self.data.display().to_string();
        let log = self.root.join("server.log").display().to_string();
        let out = self.run_pg(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-t", "60", "start"],
        );
        if out.status.success() {
            self.running = true;
            Ok(())
        } else {
            Err(format!(
                "{}\nserver log:\n{}",
                describe(&out),
                self.server_log()
            ))
        }
    }

    fn append_conf(&self, lines: &[String]) {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        for l in lines {
            writeln!(f, "{l}").expect("write postgresql.conf");
        }
    }

    fn give_to_server_user(&self, path: &Path) {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
        }
    }

    fn run_pg(&self, tool: &str, args: &[&str]) -> Output {
        let bin = self.bindir.join(tool);
        let mut cmd = if self.run_as.is_some() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        // The server user may not be able to enter the test's working directory.
        cmd.args(args).current_dir("/");
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let data = self.data.display().to_string();
            let out = self.run_pg(
                "pg_ctl",
                &["-D", &data, "-m", "immediate", "-w", "-t", "30", "stop"],
            );
            if !out.status.success() {
                eprintln!(
                    "warning: could not stop the throwaway cluster: {}",
                    describe(&out)
                );
            }
        }
        if std::env::var_os("DUROXIDE_PG_TEST_KEEP_CLUSTER").is_none() {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}
