//! A throwaway PostgreSQL cluster with `pg_stat_statements` loaded, for scenarios that
//! report server execution time when the main server does not have the extension
//! preloaded. Same recipe as `scripts/with-postgres.sh` (initdb into a temporary
//! directory, trust auth, loopback only, fsync off; run as the `postgres` OS user when
//! the bench runs as root); stopped and deleted on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::providers::BoxError;

pub struct Cluster {
    bindir: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The newest `/usr/lib/postgresql/<version>/bin` holding `initdb` and `pg_ctl`.
fn find_bindir() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((v, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, d)| d)
}

fn free_port(from: u16) -> Option<u16> {
    (from..from + 200).find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
}

impl Cluster {
    pub fn start() -> Result<Cluster, BoxError> {
        let bindir =
            find_bindir().ok_or("no PostgreSQL server binaries under /usr/lib/postgresql")?;
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!("bench-pgss-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let port = free_port(55_600).ok_or("no free port for the throwaway cluster")?;
        let cluster = Cluster {
            bindir,
            dir,
            port,
            as_postgres,
        };
        if as_postgres {
            cluster.run(
                "chown",
                &["postgres:", &cluster.dir.display().to_string()],
                false,
            )?;
        }
        let data = cluster.dir.join("data").display().to_string();
        cluster.run(
            &cluster.bin("initdb"),
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
            ],
            true,
        )?;
        let settings = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={} \
             -c max_connections=200 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c shared_preload_libraries=pg_stat_statements \
             -c pg_stat_statements.track=top",
            cluster.dir.display()
        );
        let log = cluster.dir.join("server.log").display().to_string();
        cluster.run(
            &cluster.bin("pg_ctl"),
            &[
                "-D", &data, "-l", &log, "-w", "-t", "60", "-o", &settings, "start",
            ],
            true,
        )?;
        Ok(cluster)
    }

    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    fn bin(&self, name: &str) -> String {
        self.bindir.join(name).display().to_string()
    }

    fn run(&self, program: &str, args: &[&str], as_pg: bool) -> Result<(), BoxError> {
        let mut cmd = if as_pg && self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            Command::new(program)
        };
        let out = cmd.args(args).current_dir(Path::new("/")).output()?;
        if !out.status.success() {
            return Err(format!(
                "{program} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data").display().to_string();
        let _ = self.run(
            &self.bin("pg_ctl"),
            &["-D", &data, "-m", "immediate", "-w", "stop"],
            true,
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
