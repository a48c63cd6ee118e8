//! A loopback TCP proxy that delays every chunk by half the simulated round-trip time in
//! each direction, and counts what crosses it.
//!
//! Each accepted client gets its own upstream connection and four tasks: per direction a
//! reader that stamps each chunk with `arrival + one_way_delay` and queues it, and a writer
//! that sleeps until that instant and writes. Chunks keep their order, and a slow writer
//! never stops the reader, so pipelined requests stay pipelined (the delay is a latency,
//! not a bandwidth limit).
//!
//! Faults (for the reliability tests), see [`ProxyFaults`]: refuse connections, sever
//! every open connection, swallow the reply to the next statement and answer like
//! PgBouncer does when its server connection dies (`FATAL 08P01 server conn crashed?`),
//! drop the next statement before it reaches the server, and silently black-hole
//! connections idle longer than a limit (a load balancer's idle cut).
//!
//! Counters (shared by all connections):
//! - bytes in each direction;
//! - request bursts: a client→server chunk that arrives after the server sent something
//!   since the previous client chunk. One burst ≈ one round trip the client waited for;
//! - statements: `Execute` and simple `Query` messages in the client→server stream
//!   (PostgreSQL frontend protocol, parsed on the fly; connections that switch to TLS are
//!   not parsed and are counted in `unparsed_connections`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use std::sync::Mutex;
use std::sync::atomic::AtomicU8;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use tokio::sync::{Notify, mpsc};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Counters shared by every connection of one proxy.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Bytes sent by clients towards the server.
    pub bytes_c2s: AtomicU64,
    /// Bytes sent by the server towards clients.
    pub bytes_s2c: AtomicU64,
    /// Client→server request bursts (≈ round trips).
    pub bursts: AtomicU64,
    /// `Execute` + `Query` protocol messages sent by clients.
    pub statements: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections whose stream could not be parsed (TLS or unexpected framing).
    pub unparsed_connections: AtomicU64,
}

/// A point-in-time copy of [`ProxyStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxySnapshot {
    pub bytes_c2s: u64,
    pub bytes_s2c: u64,
    pub bursts: u64,
    pub statements: u64,
    pub connections: u64,
    pub unparsed_connections: u64,
}

impl ProxySnapshot {
    /// Counter differences `self - earlier`.
    pub fn since(&self, earlier: &ProxySnapshot) -> ProxySnapshot {
        ProxySnapshot {
            bytes_c2s: self.bytes_c2s - earlier.bytes_c2s,
            bytes_s2c: self.bytes_s2c - earlier.bytes_s2c,
            bursts: self.bursts - earlier.bursts,
            statements: self.statements - earlier.statements,
            connections: self.connections - earlier.connections,
            unparsed_connections: self.unparsed_connections - earlier.unparsed_connections,
        }
    }
}

impl ProxyStats {
    pub fn snapshot(&self) -> ProxySnapshot {
        ProxySnapshot {
            bytes_c2s: self.bytes_c2s.load(Ordering::Relaxed),
            bytes_s2c: self.bytes_s2c.load(Ordering::Relaxed),
            bursts: self.bursts.load(Ordering::Relaxed),
            statements: self.statements.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            unparsed_connections: self.unparsed_connections.load(Ordering::Relaxed),
        }
    }
}

/// What to do to the next client chunk that carries a statement (`Execute` / `Query`).
const ARM_NONE: u8 = 0;
const ARM_SWALLOW_REPLY_08P01: u8 = 1;
const ARM_DROP_REQUEST: u8 = 2;

/// Fault switches shared by every connection of one proxy.
#[derive(Default)]
pub struct ProxyFaults {
    refusing: AtomicBool,
    armed: AtomicU8,
    /// Milliseconds of silence after which a connection is black-holed (0 = never).
    idle_cut_ms: AtomicU64,
    /// Faults that fired (armed faults consumed, connections black-holed).
    pub fired: AtomicU64,
    connections: Mutex<Vec<std::sync::Weak<Notify>>>,
}

impl ProxyFaults {
    /// While `true`, new connections are accepted and closed at once (the client sees
    /// the server hang up before the startup reply).
    pub fn set_refusing(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Closes every open connection (both sides).
    pub fn sever_all(&self) {
        let conns = std::mem::take(&mut *self.connections.lock().unwrap());
        for c in conns.iter().filter_map(std::sync::Weak::upgrade) {
            c.notify_one();
        }
    }

    /// The next statement a client sends reaches the server and runs (and commits);
    /// its reply is swallowed, and the client gets `FATAL 08P01 server conn crashed?`
    /// and a closed connection instead, as from PgBouncer whose server connection died.
    pub fn swallow_next_reply_with_08p01(&self) {
        self.armed.store(ARM_SWALLOW_REPLY_08P01, Ordering::SeqCst);
    }

    /// The next statement a client sends never reaches the server: the connection is
    /// closed instead of forwarding it.
    pub fn drop_next_request(&self) {
        self.armed.store(ARM_DROP_REQUEST, Ordering::SeqCst);
    }

    /// Whether an armed fault is still waiting for its statement.
    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::SeqCst) != ARM_NONE
    }

    /// Connections silent for `cut` stop forwarding in both directions without closing
    /// the client side (no FIN, no RST), like a load balancer that dropped the flow:
    /// the client's next call on it waits for a reply that never comes. `None` = off.
    pub fn set_idle_cut(&self, cut: Option<Duration>) {
        let ms = cut.map_or(0, |d| d.as_millis().max(1) as u64);
        self.idle_cut_ms.store(ms, Ordering::SeqCst);
    }
}

/// A running proxy. Dropping it (or calling [`Proxy::shutdown`]) stops the listener;
/// connections already open keep flowing until either end closes them (so a pool that
/// is closed first shuts down cleanly).
pub struct Proxy {
    addr: SocketAddr,
    stats: Arc<ProxyStats>,
    faults: Arc<ProxyFaults>,
    accept: AbortHandle,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards to `upstream` (`host:port`), delaying each
    /// direction by `rtt / 2`.
    pub async fn start(upstream: String, rtt: Duration) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(ProxyStats::default());
        let faults = Arc::new(ProxyFaults::default());
        let one_way = rtt / 2;
        let accept = {
            let stats = stats.clone();
            let faults = faults.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    if faults.refusing.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let stats = stats.clone();
                    let faults = faults.clone();
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(&upstream).await {
                            serve(client, server, one_way, stats, faults).await;
                        }
                    });
                }
            })
        };
        Ok(Proxy {
            addr,
            stats,
            faults,
            accept: accept.abort_handle(),
        })
    }

    /// The loopback address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Fault switches.
    pub fn faults(&self) -> &ProxyFaults {
        &self.faults
    }

    /// Current counter values.
    pub fn snapshot(&self) -> ProxySnapshot {
        self.stats.snapshot()
    }

    /// Stops accepting new connections.
    pub fn shutdown(&self) {
        self.accept.abort();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Per-connection state shared by the two directions.
struct ConnState {
    /// The server sent bytes since the client's previous chunk (so the next client chunk
    /// starts a new burst). Starts `true`: the first client chunk is a burst.
    server_spoke: AtomicBool,
    /// The server accepted an SSL/GSS encryption request: stop parsing.
    encrypted: AtomicBool,
    /// The first server chunk has been seen.
    server_started: AtomicBool,
    /// An armed fault this connection took (ARM_*).
    fault: AtomicU8,
    /// Stop forwarding in both directions, keep the client socket open.
    blackholed: AtomicBool,
    /// Milliseconds since `epoch` of the last byte in either direction.
    last_traffic_ms: AtomicU64,
    epoch: Instant,
    /// Closes the connection (both sides) when notified.
    kill: Arc<Notify>,
}

impl ConnState {
    fn touch(&self) {
        self.last_traffic_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// `ErrorResponse` FATAL 08P01 "server conn crashed?", as PgBouncer sends it.
fn fatal_08p01() -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "08P01"),
        (b'M', "server conn crashed?"),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    msg.extend_from_slice(&body);
    msg
}

async fn serve(
    client: TcpStream,
    server: TcpStream,
    one_way: Duration,
    stats: Arc<ProxyStats>,
    faults: Arc<ProxyFaults>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let kill = Arc::new(Notify::new());
    faults
        .connections
        .lock()
        .unwrap()
        .push(Arc::downgrade(&kill));
    let state = Arc::new(ConnState {
        server_spoke: AtomicBool::new(true),
        encrypted: AtomicBool::new(false),
        server_started: AtomicBool::new(false),
        fault: AtomicU8::new(ARM_NONE),
        blackholed: AtomicBool::new(false),
        last_traffic_ms: AtomicU64::new(0),
        epoch: Instant::now(),
        kill: kill.clone(),
    });
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();

    let (c2s_tx, c2s_rx) = mpsc::unbounded_channel();
    let (s2c_tx, s2c_rx) = mpsc::unbounded_channel();
    let server_side = vec![
        tokio::spawn(read_server(
            server_r,
            s2c_tx.clone(),
            one_way,
            stats.clone(),
            state.clone(),
        )),
        tokio::spawn(write_side(server_w, c2s_rx, state.clone())),
    ];
    let client_side = vec![
        tokio::spawn(read_client(
            client_r,
            c2s_tx,
            s2c_tx,
            one_way,
            stats.clone(),
            state.clone(),
            faults.clone(),
        )),
        tokio::spawn(write_side(client_w, s2c_rx, state.clone())),
    ];
    let watch_idle = {
        let state = state.clone();
        let faults = faults.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let cut = faults.idle_cut_ms.load(Ordering::SeqCst);
                let idle = state.epoch.elapsed().as_millis() as u64
                    - state.last_traffic_ms.load(Ordering::Relaxed);
                if cut > 0 && idle >= cut {
                    state.blackholed.store(true, Ordering::SeqCst);
                    faults.fired.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        })
    };
    let aborts: Vec<AbortHandle> = client_side
        .iter()
        .chain(server_side.iter())
        .map(|h| h.abort_handle())
        .collect();
    let server_aborts: Vec<AbortHandle> = server_side.iter().map(|h| h.abort_handle()).collect();
    let all_done = async move {
        for h in client_side.into_iter().chain(server_side) {
            let _ = h.await;
        }
    };
    let blackholed = async {
        while !state.blackholed.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The server side goes away (the server sees the client vanish); the client side
        // stays open and silent until the client gives up or the proxy severs it.
        for h in &server_aborts {
            h.abort();
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = all_done => {}
        _ = kill.notified() => {}
        _ = blackholed => {}
    }
    watch_idle.abort();
    for h in aborts {
        h.abort();
    }
}

/// A chunk to write at an instant; `close` shuts the connection down after writing it.
type Chunk = (Instant, Vec<u8>, bool);

async fn read_client(
    mut r: OwnedReadHalf,
    tx: mpsc::UnboundedSender<Chunk>,
    to_client: mpsc::UnboundedSender<Chunk>,
    one_way: Duration,
    stats: Arc<ProxyStats>,
    state: Arc<ConnState>,
    faults: Arc<ProxyFaults>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut parser = FrontendParser::default();
    let mut unparsed_reported = false;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if state.blackholed.load(Ordering::SeqCst) {
            // Swallowed without a trace, like a dropped flow.
            continue;
        }
        state.touch();
        let release = Instant::now() + one_way;
        stats.bytes_c2s.fetch_add(n as u64, Ordering::Relaxed);
        if state.server_spoke.swap(false, Ordering::AcqRel) {
            stats.bursts.fetch_add(1, Ordering::Relaxed);
        }
        if state.encrypted.load(Ordering::Acquire) {
            parser.disable();
        }
        let statements = parser.feed(&buf[..n]);
        stats.statements.fetch_add(statements, Ordering::Relaxed);
        if parser.is_disabled() && !unparsed_reported {
            unparsed_reported = true;
            stats.unparsed_connections.fetch_add(1, Ordering::Relaxed);
        }
        if statements > 0 {
            let fault = faults.armed.swap(ARM_NONE, Ordering::SeqCst);
            if fault != ARM_NONE {
                faults.fired.fetch_add(1, Ordering::Relaxed);
                state.fault.store(fault, Ordering::SeqCst);
                if fault == ARM_DROP_REQUEST {
                    // Never forwarded: close the client side after nothing.
                    let _ = to_client.send((Instant::now(), Vec::new(), true));
                    break;
                }
            }
        }
        if tx.send((release, buf[..n].to_vec(), false)).is_err() {
            break;
        }
    }
}

async fn read_server(
    mut r: OwnedReadHalf,
    tx: mpsc::UnboundedSender<Chunk>,
    one_way: Duration,
    stats: Arc<ProxyStats>,
    state: Arc<ConnState>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        state.touch();
        if state.fault.load(Ordering::SeqCst) == ARM_SWALLOW_REPLY_08P01 {
            // The statement ran; swallow its reply up to ReadyForQuery (sent after the
            // commit), then answer as PgBouncer and hang up.
            let chunk = &buf[..n];
            let ready = chunk.len() >= 6 && chunk[chunk.len() - 6] == b'Z';
            if ready {
                let _ = tx.send((Instant::now() + one_way, fatal_08p01(), true));
                break;
            }
            continue;
        }
        let release = Instant::now() + one_way;
        stats.bytes_s2c.fetch_add(n as u64, Ordering::Relaxed);
        if !state.server_started.swap(true, Ordering::AcqRel) && matches!(buf[0], b'S' | b'G') {
            // Answer to SSLRequest/GSSENCRequest: the rest of the stream is encrypted.
            // (A plain startup is answered with 'R' or 'E'; a refusal with 'N'.)
            state.encrypted.store(true, Ordering::Release);
        }
        state.server_spoke.store(true, Ordering::Release);
        if tx.send((release, buf[..n].to_vec(), false)).is_err() {
            break;
        }
    }
}

async fn write_side(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Chunk>,
    state: Arc<ConnState>,
) {
    while let Some((release, bytes, close)) = rx.recv().await {
        if release > Instant::now() {
            tokio::time::sleep_until(release).await;
        }
        if state.blackholed.load(Ordering::SeqCst) {
            continue;
        }
        if !bytes.is_empty() && w.write_all(&bytes).await.is_err() {
            return;
        }
        if close {
            let _ = w.shutdown().await;
            state.kill.notify_one();
            return;
        }
    }
    if !state.blackholed.load(Ordering::SeqCst) {
        let _ = w.shutdown().await;
    }
}

/// Streaming parser of the client side of the PostgreSQL protocol that counts
/// `Execute` ('E') and simple `Query` ('Q') messages.
#[derive(Debug)]
pub struct FrontendParser {
    /// Still in the untyped startup phase (StartupMessage, SSLRequest, ...).
    startup: bool,
    disabled: bool,
    header: Vec<u8>,
    skip: usize,
}

impl Default for FrontendParser {
    fn default() -> Self {
        Self {
            startup: true,
            disabled: false,
            header: Vec::with_capacity(8),
            skip: 0,
        }
    }
}

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;

impl FrontendParser {
    /// Stops parsing (the stream is encrypted or malformed).
    pub fn disable(&mut self) {
        self.disabled = true;
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// Consumes a chunk; returns the number of statements that started in it.
    pub fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut count = 0;
        while !data.is_empty() && !self.disabled {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let header_len = if self.startup { 8 } else { 5 };
            let take = (header_len - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.header.len() < header_len {
                break;
            }
            if self.startup {
                let len = i32::from_be_bytes([
                    self.header[0],
                    self.header[1],
                    self.header[2],
                    self.header[3],
                ]);
                let code = i32::from_be_bytes([
                    self.header[4],
                    self.header[5],
                    self.header[6],
                    self.header[7],
                ]);
                if len < 8 {
                    self.disabled = true;
                    break;
                }
                self.skip = (len - 8) as usize;
                if code != SSL_REQUEST && code != GSSENC_REQUEST {
                    self.startup = false;
                }
            } else {
                let ty = self.header[0];
                let len = i32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                if len < 4 {
                    self.disabled = true;
                    break;
                }
                self.skip = (len - 4) as usize;
                if ty == b'E' || ty == b'Q' {
                    count += 1;
                }
            }
            self.header.clear();
        }
        count
    }
}

/// Splits a `postgres://` URL into (URL with `host:port` replaced by `addr`, upstream
/// `host:port`). The rewritten URL asks for an unencrypted connection when the original
/// leaves TLS optional (no `sslmode`, `prefer`, `allow`): the proxy counts statements and
/// injects faults by reading the protocol, which it cannot do inside TLS (a server with
/// TLS on, like Debian's default cluster, would otherwise get every test's connection
/// encrypted). A URL that requires TLS keeps it; the proxy then only forwards bytes.
pub fn rewrite_url(url: &str, addr: SocketAddr) -> Result<(String, String), String> {
    let scheme_end = url
        .find("://")
        .ok_or_else(|| format!("not a URL: {url:?}"))?
        + 3;
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    if rest[authority_end..].contains("host=") {
        return Err("URLs with a host= parameter (e.g. Unix sockets) cannot be proxied; use a TCP host in DATABASE_URL".into());
    }
    if hostport.contains(',') {
        return Err("multi-host URLs cannot be proxied".into());
    }
    let upstream = if hostport.is_empty() {
        "localhost:5432".to_string()
    } else if hostport.starts_with('[') {
        // [v6]:port or [v6]
        if hostport.contains("]:") {
            hostport.to_string()
        } else {
            format!("{hostport}:5432")
        }
    } else if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:5432")
    };
    let rewritten = format!(
        "{}{}{}{}",
        &url[..scheme_end],
        userinfo,
        addr,
        without_optional_tls(&rest[authority_end..])
    );
    Ok((rewritten, upstream))
}

/// `path_and_query` (the URL after its authority) with `sslmode=disable` when TLS was
/// optional there.
fn without_optional_tls(path_and_query: &str) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, query),
        None => (path_and_query, ""),
    };
    let mut params: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    match params.iter().position(|p| p.starts_with("sslmode=")) {
        Some(i) if matches!(&params[i]["sslmode=".len()..], "prefer" | "allow") => {
            params[i] = "sslmode=disable".to_string();
        }
        Some(_) => {}
        None => params.push("sslmode=disable".to_string()),
    }
    format!("{path}?{}", params.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_counts_execute_and_query_across_chunk_boundaries() {
        let mut stream = Vec::new();
        // SSLRequest, then StartupMessage (len 8 + "user\0x\0\0")
        stream.extend_from_slice(&8i32.to_be_bytes());
        stream.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        let params = b"user\0x\0\0";
        stream.extend_from_slice(&(8 + params.len() as i32).to_be_bytes());
        stream.extend_from_slice(&196_608i32.to_be_bytes());
        stream.extend_from_slice(params);
        // Parse, Bind, Execute, Sync, Query
        for (ty, body) in [
            (b'P', &b"abc"[..]),
            (b'B', b""),
            (b'E', b"\0\0\0\0\0"),
            (b'S', b""),
            (b'Q', b"select 1\0"),
        ] {
            stream.push(ty);
            stream.extend_from_slice(&(4 + body.len() as i32).to_be_bytes());
            stream.extend_from_slice(body);
        }
        for chunk in [1usize, 3, 7, stream.len()] {
            let mut p = FrontendParser::default();
            let total: u64 = stream.chunks(chunk).map(|c| p.feed(c)).sum();
            assert_eq!(total, 2, "chunk size {chunk}");
            assert!(!p.is_disabled());
        }
    }

    #[test]
    fn rewrites_urls() {
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(
            rewrite_url("postgres://u:p@db.example:6543/x?sslmode=disable", addr).unwrap(),
            (
                "postgres://u:p@127.0.0.1:4000/x?sslmode=disable".into(),
                "db.example:6543".into()
            )
        );
        assert_eq!(
            rewrite_url("postgresql://127.0.0.1/postgres", addr).unwrap(),
            (
                "postgresql://127.0.0.1:4000/postgres?sslmode=disable".into(),
                "127.0.0.1:5432".into()
            )
        );
        assert_eq!(
            rewrite_url("postgres://u@[::1]:5433/d", addr).unwrap(),
            (
                "postgres://u@127.0.0.1:4000/d?sslmode=disable".into(),
                "[::1]:5433".into()
            )
        );
        // Optional TLS is turned off (the proxy reads the protocol); required TLS is kept.
        assert_eq!(
            rewrite_url("postgres://h/d?application_name=x&sslmode=prefer", addr)
                .unwrap()
                .0,
            "postgres://127.0.0.1:4000/d?application_name=x&sslmode=disable"
        );
        assert_eq!(
            rewrite_url("postgres://h/d?sslmode=verify-full", addr)
                .unwrap()
                .0,
            "postgres://127.0.0.1:4000/d?sslmode=verify-full"
        );
        assert!(rewrite_url("postgres:///d?host=/var/run/postgresql", addr).is_err());
    }

    #[tokio::test]
    async fn delays_and_counts_bursts() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let proxy = Proxy::start(echo_addr.to_string(), Duration::from_millis(40))
            .await
            .unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut buf = [0u8; 4];
        let t = std::time::Instant::now();
        for _ in 0..3 {
            c.write_all(b"ping").await.unwrap();
            c.read_exact(&mut buf).await.unwrap();
        }
        let elapsed = t.elapsed();
        assert!(elapsed >= Duration::from_millis(120), "{elapsed:?}");
        // Pipelined: two writes back to back cost one round trip, not two.
        let t = std::time::Instant::now();
        c.write_all(b"ab").await.unwrap();
        c.write_all(b"cd").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(75), "{:?}", t.elapsed());
        let s = proxy.snapshot();
        assert_eq!(s.bursts, 4);
        assert_eq!(s.bytes_c2s, 16);
        assert_eq!(s.bytes_s2c, 16);
    }
}
