//! The local control socket: one JSON request line in, one JSON response
//! line out. The socket is created mode 0600 in a 0700 directory, so only
//! root (the daemon's user) can talk to it.

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

/// Longest request line accepted: a reload carries a whole config file.
pub const MAX_REQUEST: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Show,
    /// Apply peer changes from the config file. `config` is its text, read
    /// by the (root) client: after dropping privileges the daemon may not be
    /// able to read it. Without it the daemon reads the file itself.
    Reload {
        #[serde(default)]
        config: Option<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(DaemonStatus),
    Reloaded(ReconfigureReport),
    Error { message: String },
}

/// Everything `veilmesh show` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub interface: String,
    /// The config file the daemon runs from.
    pub config_file: PathBuf,
    pub transports: Vec<String>,
    #[serde(flatten)]
    pub node: NodeStatus,
}

/// Binds the control socket, refusing to steal one a live daemon answers on.
/// Returns the directory it had to create, if any.
pub fn bind(path: &Path) -> anyhow::Result<(UnixListener, Option<PathBuf>)> {
    let mut created = None;
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            created = Some(dir.to_owned());
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
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
    Ok((listener, created))
}

/// `reload` as a client call: reads the daemon's config file (with the
/// client's, i.e. root's, permissions) and sends it.
pub fn reload(socket: &Path) -> anyhow::Result<ReconfigureReport> {
    let file = show(socket)?.config_file;
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
    match request(socket, &Request::Reload { config: Some(text) })? {
        Response::Reloaded(report) => Ok(report),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// Removes the socket file on drop.
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
             {} to addresses it may not reach, {} from addresses it may not see",
            c.spoofed_source,
            c.no_route,
            c.oversize,
            c.bad_packet,
            c.wrong_path,
            c.refused_destination,
            c.refused_source,
        );
    }
    out
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

    #[tokio::test]
    async fn socket_is_private_and_a_live_one_is_not_stolen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/veil0.sock");
        let (_listener, created) = bind(&path).unwrap();
        assert_eq!(created.as_deref(), path.parent());
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
