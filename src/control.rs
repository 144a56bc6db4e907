//! The local control socket: one JSON request line in, one JSON response
//! line out. The socket is created mode 0600 by root in a root-owned 0700
//! directory, so only root can talk to it, and the daemon (once it runs as
//! its own user) cannot replace another instance's socket; the daemon also
//! checks each client's credentials.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;

use crate::core::{NodeStatus, ReconfigureReport};

/// Where control sockets live unless configured otherwise.
pub const DEFAULT_SOCKET_DIR: &str = "/run/veilmesh";

/// Longest request line accepted: a reload carries a whole config file,
/// ~110 bytes a peer with an endpoint only, ~300 with every address (1 MiB
/// refused the reload of 10,000 peers). Only root reaches the socket.
pub const MAX_REQUEST: usize = 64 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Show,
    /// Apply peer changes from the config file. `config` is its text, read
    /// by the (root) client from `file`, the path on the client's own
    /// command line (never one the daemon reports: root would read whatever
    /// a compromised daemon names): after dropping privileges the daemon
    /// may not be able to read it. Without it the daemon reads its file
    /// itself.
    Reload {
        #[serde(default)]
        config: Option<String>,
        #[serde(default)]
        file: Option<PathBuf>,
    },
    /// Probe a peer (by name, public key or mesh address) over the path in
    /// use, or every path (`all`); answered once every probe was answered
    /// or `timeout_ms` passed.
    Ping {
        peer: String,
        #[serde(default)]
        all: bool,
        timeout_ms: u64,
    },
    /// What works right now, per transport.
    Netcheck,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(DaemonStatus),
    Reloaded(ReconfigureReport),
    Pinged(PingReport),
    Netcheck(NetcheckReport),
    Error { message: String },
}

/// What `veilmesh netcheck` found (a struct: the answer's enum is
/// internally tagged, which cannot hold a bare list).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetcheckReport {
    pub transports: Vec<TransportCheck>,
}

/// One transport as `veilmesh netcheck` found it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransportCheck {
    pub transport: String,
    pub up: bool,
    pub facts: Vec<String>,
}

/// What `veilmesh ping` got: per probe, the path and the round trip.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PingReport {
    pub peer: String,
    pub probes: Vec<PingResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PingResult {
    /// The path, e.g. `udp 198.18.0.2:51820`.
    pub path: String,
    pub transport: String,
    /// None: no answer in time.
    pub rtt_ms: Option<f64>,
}

/// Everything `veilmesh show` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub interface: String,
    /// The config file the daemon runs from.
    pub config_file: PathBuf,
    pub transports: Vec<String>,
    /// The transports this node runs (udp, tox, i2p).
    #[serde(default)]
    pub running: Vec<String>,
    #[serde(flatten)]
    pub node: NodeStatus,
}

/// Binds the control socket, refusing to steal one a live daemon answers
/// on. A missing directory is created (root's, 0700).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        check_socket_dir(dir)?;
    }
    if path.exists() {
        if StdUnixStream::connect(path).is_ok() {
            bail!(
                "another veilmesh is already running with control socket {} \
                 (stop it first, or set a different [interface] name or control_socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale control socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict permissions of {}", path.display()))?;
    Ok(listener)
}

/// A socket directory the daemon's user (or anyone but root) owns would
/// let a compromised instance replace another instance's socket, and
/// receive the configs root sends it.
fn check_socket_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("cannot inspect {}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        bail!(
            "control socket directory {} must be a directory owned by root that only root \
             can write to (run `chown root:root {0} && chmod 700 {0}`, or let veilmesh create it)",
            dir.display()
        );
    }
    Ok(())
}

/// `reload` as a client call. With `file` (the path on the client's own
/// command line), reads it with the client's (root's) permissions and sends
/// it; without, the daemon reads its own file.
pub fn reload(socket: &Path, file: Option<&Path>) -> anyhow::Result<ReconfigureReport> {
    let config = file
        .map(|file| {
            std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
        })
        .transpose()?;
    let reload = Request::Reload {
        config,
        file: file.map(Path::to_owned),
    };
    match request(socket, &reload)? {
        Response::Reloaded(report) => Ok(report),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// Removes the socket file on drop, where the daemon still may (as root;
/// after dropping privileges it cannot write to the root-owned directory,
/// and the next start replaces the stale socket).
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn parse_request(line: &str) -> Result<Request, String> {
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))
}

/// Client side: sends one request and waits for the answer.
pub fn request(path: &Path, request: &Request) -> anyhow::Result<Response> {
    let mut stream = StdUnixStream::connect(path).with_context(|| {
        format!(
            "cannot reach the daemon at {} (is `veilmesh up` running? are you root?)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .context("no answer from the daemon")?;
    match serde_json::from_str::<Response>(&answer).context("malformed answer from the daemon")? {
        Response::Error { message } => bail!("{message}"),
        response => Ok(response),
    }
}

/// `show` as a client call.
pub fn show(path: &Path) -> anyhow::Result<DaemonStatus> {
    match request(path, &Request::Show)? {
        Response::Status(status) => Ok(status),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// `veilmesh ping`: one round of probes, answered when all came back or
/// after `timeout_ms`.
pub fn ping(path: &Path, peer: &str, all: bool, timeout_ms: u64) -> anyhow::Result<PingReport> {
    let ping = Request::Ping {
        peer: peer.to_owned(),
        all,
        timeout_ms,
    };
    match request(path, &ping)? {
        Response::Pinged(report) => Ok(report),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// `veilmesh netcheck`: the daemon's transports as they are now.
pub fn netcheck(path: &Path) -> anyhow::Result<Vec<TransportCheck>> {
    match request(path, &Request::Netcheck)? {
        Response::Netcheck(report) => Ok(report.transports),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// "udp: up" and its facts indented below, per transport.
pub fn render_netcheck(checks: &[TransportCheck]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for check in checks {
        let state = if check.up { "up" } else { "DOWN" };
        let _ = writeln!(out, "{}: {state}", check.transport);
        for fact in &check.facts {
            let _ = writeln!(out, "  {fact}");
        }
    }
    out
}

/// One line per probe: "pong from b over udp 198.18.0.2:51820 in 0.42 ms".
pub fn render_ping(report: &PingReport, timeout_ms: u64) -> String {
    report
        .probes
        .iter()
        .map(|p| match p.rtt_ms {
            Some(ms) => format!("pong from {} over {} in {ms:.2} ms\n", report.peer, p.path),
            None => format!(
                "no answer from {} over {} within {:.1} s\n",
                report.peer,
                p.path,
                timeout_ms as f64 / 1000.0
            ),
        })
        .collect()
}

/// The human form of `veilmesh show`, in the spirit of `wg show`.
pub fn render(status: &DaemonStatus) -> String {
    use std::fmt::Write as _;
    let node = &status.node;
    let c = &node.counters;
    let mut out = String::new();
    let _ = writeln!(out, "interface: {}", status.interface);
    let _ = writeln!(out, "  public key: {}", node.public_key);
    let _ = writeln!(out, "  mesh address: {}", node.mesh_address);
    for t in &status.transports {
        let _ = writeln!(out, "  transport: {t}");
    }
    let _ = writeln!(
        out,
        "  dropped: {} unknown-key handshakes, {} from unknown Tox/I2P identities, {} bad packets, \
         {} no route, {} multicast ignored, {} rate limited, {} send errors",
        c.unknown_peer_handshakes,
        c.unknown_sender,
        c.bad_packet,
        c.no_route,
        c.multicast_ignored,
        c.rate_limited,
        c.send_errors,
    );
    if c.relayed > 0 || c.relay_refused > 0 {
        let _ = writeln!(
            out,
            "  relay: {} datagrams forwarded between peers, {} requests refused",
            c.relayed, c.relay_refused
        );
    }
    for peer in &node.peers {
        let c = &peer.counters;
        let allowed: Vec<String> = peer.allowed_ips.iter().map(|n| n.to_string()).collect();
        let handshake = match peer.seconds_since_handshake {
            Some(secs) => format!("{secs} seconds ago"),
            None => "never".to_owned(),
        };
        let _ = writeln!(out);
        let _ = writeln!(out, "peer: {}", peer.name);
        let _ = writeln!(out, "  public key: {}", peer.public_key);
        let _ = writeln!(out, "  mesh address: {}", peer.mesh_address);
        let _ = writeln!(out, "  allowed ips: {}", allowed.join(", "));
        if let Some(rules) = &peer.accept {
            let rules = if rules.is_empty() {
                "nothing (answers to what we open only)".to_owned()
            } else {
                rules.join(", ")
            };
            let _ = writeln!(out, "  accepts: {rules}");
        }
        let path = peer.path.as_deref().unwrap_or("(none)");
        match &peer.path_state {
            Some(state) => {
                let _ = writeln!(out, "  path: {path} ({state})");
            }
            None => {
                let _ = writeln!(out, "  path: {path}");
            }
        }
        for p in &peer.paths {
            let rtt = p
                .rtt_ms
                .map(|ms| format!(", rtt {ms:.1} ms"))
                .unwrap_or_default();
            let marker = if p.in_use { "*" } else { " " };
            let _ = writeln!(
                out,
                "   {marker} {} ({}): {}{rtt}",
                p.address, p.origin, p.state
            );
        }
        let _ = writeln!(
            out,
            "  transports: {}",
            transport_summary(peer, &status.running)
        );
        let _ = writeln!(out, "  latest handshake: {handshake}");
        let _ = writeln!(
            out,
            "  transfer: {} received, {} sent",
            human_bytes(peer.rx_bytes),
            human_bytes(peer.tx_bytes)
        );
        let _ = writeln!(
            out,
            "  dropped: {} spoofed source, {} no route, {} oversize, {} bad packets, {} wrong path, \
             {} to addresses it may not reach, {} from addresses it may not see, \
             {} not accepted",
            c.spoofed_source,
            c.no_route,
            c.oversize,
            c.bad_packet,
            c.wrong_path,
            c.refused_destination,
            c.refused_source,
            c.not_accepted,
        );
    }
    out
}

/// Which transport carries the peer and why the others do not, in one
/// line: "udp in use (live, 0.3 ms); tox standby (live, 1.5 ms); i2p not
/// allowed for this peer".
pub fn transport_summary(peer: &crate::core::PeerStatus, running: &[String]) -> String {
    use veilmesh_transport::TransportKind;
    let in_use = peer.paths.iter().find(|p| p.in_use);
    // Relay paths are the core's own: listed when the peer has one.
    let relay = TransportKind::Relay.as_str();
    let relayed = peer.transports.iter().any(|t| t == relay);
    let kinds = TransportKind::ALL.iter().copied();
    kinds
        .chain(relayed.then_some(TransportKind::Relay))
        .map(|kind| {
            let kind = kind.as_str();
            let allowed = peer.transports.iter().any(|t| t == kind);
            let run = kind == relay || running.iter().any(|t| t == kind);
            let reason = if !run {
                "not run by this node".to_owned()
            } else if !allowed {
                "not allowed for this peer".to_owned()
            } else {
                let paths: Vec<_> = peer.paths.iter().filter(|p| p.transport == *kind).collect();
                // Its best path: the one in use, else a live one, else any.
                let best = paths
                    .iter()
                    .find(|p| p.in_use)
                    .or_else(|| paths.iter().find(|p| p.state == "live"))
                    .or_else(|| paths.first());
                match best {
                    None => "no address of the peer known".to_owned(),
                    Some(p) => {
                        let rtt = p
                            .rtt_ms
                            .map(|ms| format!(", {ms:.1} ms"))
                            .unwrap_or_default();
                        let role = if p.in_use {
                            "in use"
                        } else if p.state == "live" {
                            "standby"
                        } else {
                            "not answering"
                        };
                        let why = match (role, in_use) {
                            ("standby", Some(used)) => {
                                format!(": {} comes first", used.transport)
                            }
                            _ => String::new(),
                        };
                        format!("{role} ({}{rtt}){why}", p.state)
                    }
                }
            };
            format!("{kind} {reason}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transport_line_says_what_carries_a_peer_and_why_not_the_rest() {
        use crate::core::paths::{Origin, PathStatus};
        let path = |transport: &str, state: &str, rtt: Option<f64>, in_use: bool| PathStatus {
            address: format!("{transport} x"),
            transport: transport.into(),
            origin: Origin::Configured,
            state: state.into(),
            rtt_ms: rtt,
            in_use,
        };
        let peer = crate::core::PeerStatus {
            name: "b".into(),
            public_key: String::new(),
            mesh_address: std::net::Ipv6Addr::LOCALHOST,
            allowed_ips: vec![],
            path: None,
            path_state: None,
            paths: vec![
                path("tox", "live", Some(1.52), false),
                path("udp", "live", Some(0.31), true),
            ],
            seconds_since_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            transports: vec!["udp".into(), "tox".into()],
            accept: None,
            counters: Default::default(),
        };
        let running = ["udp".to_string(), "tox".to_string(), "i2p".to_string()];
        assert_eq!(
            transport_summary(&peer, &running),
            "udp in use (live, 0.3 ms); tox standby (live, 1.5 ms): udp comes first; \
             i2p not allowed for this peer"
        );
        let mut quiet = peer.clone();
        quiet.paths = vec![path("tox", "silent", None, true)];
        assert_eq!(
            transport_summary(&quiet, &running[1..]),
            "udp not run by this node; tox in use (silent); i2p not allowed for this peer"
        );
        quiet.paths.clear();
        quiet.transports.push("i2p".into());
        assert_eq!(
            transport_summary(&quiet, &running),
            "udp no address of the peer known; tox no address of the peer known; \
             i2p no address of the peer known"
        );
    }

    #[test]
    fn requests_round_trip_and_garbage_is_rejected() {
        let line = serde_json::to_string(&Request::Show).unwrap();
        assert_eq!(line, r#"{"command":"show"}"#);
        assert_eq!(parse_request(&line), Ok(Request::Show));
        assert!(parse_request("{\"command\":\"rm -rf\"}")
            .unwrap_err()
            .contains("bad request"));
        assert!(parse_request("\u{0}\u{ff}").is_err());
        assert!(parse_request(&"x".repeat(MAX_REQUEST + 1))
            .unwrap_err()
            .contains("longer"));
    }

    #[test]
    fn byte_counts_are_human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
    }

    /// A daemon that answers every request with a status naming a secret
    /// file as its config; returns the requests it got.
    fn lying_daemon(socket: &Path, secret: &Path) -> std::thread::JoinHandle<Vec<Request>> {
        let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
        let secret = secret.to_owned();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            for _ in 0..2 {
                let (stream, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                let request = parse_request(&line).unwrap();
                let answer = match &request {
                    Request::Show => Response::Status(DaemonStatus {
                        interface: "veil0".into(),
                        config_file: secret.clone(),
                        transports: vec![],
                        running: vec![],
                        node: crate::core::NodeStatus {
                            public_key: String::new(),
                            mesh_address: std::net::Ipv6Addr::LOCALHOST,
                            counters: Default::default(),
                            peers: vec![],
                        },
                    }),
                    Request::Reload { .. } => Response::Reloaded(ReconfigureReport::default()),
                    Request::Ping { .. } => Response::Pinged(PingReport::default()),
                    Request::Netcheck => Response::Netcheck(NetcheckReport::default()),
                };
                got.push(request);
                let answer = serde_json::to_string(&answer).unwrap();
                let _ = (&stream).write_all(format!("{answer}\n").as_bytes());
                if matches!(got.last(), Some(Request::Reload { .. })) {
                    break;
                }
            }
            got
        })
    }

    /// `reload` reads the file on its own command line (or none), never
    /// one the daemon names: root would read whatever a compromised daemon
    /// asked for and hand it over.
    #[test]
    fn reload_reads_only_the_file_it_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "root's secret").unwrap();
        let mine = dir.path().join("veil0.toml");
        std::fs::write(&mine, "[interface]\n").unwrap();
        for (given, expected) in [(Some(&mine), Some("[interface]\n")), (None, None)] {
            let socket = dir.path().join("c.sock");
            let _ = std::fs::remove_file(&socket);
            let daemon = lying_daemon(&socket, &secret);
            reload(&socket, given.map(|p| p.as_path())).unwrap();
            let got = daemon.join().unwrap();
            assert_eq!(
                got,
                vec![Request::Reload {
                    config: expected.map(str::to_owned),
                    file: given.cloned(),
                }]
            );
        }
    }

    #[tokio::test]
    async fn socket_is_private_and_a_live_one_is_not_stolen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/veil0.sock");
        let _listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        let err = bind(&path).unwrap_err().to_string();
        assert!(err.contains("already running"), "{err}");
    }
}
