//! systemd's readiness protocol (sd_notify): datagrams like `READY=1` or
//! `STATUS=...` to the socket named by $NOTIFY_SOCKET. Without the variable
//! (not under systemd) every call does nothing.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            // A leading '@' names a socket in the abstract namespace.
            let addr = match path.strip_prefix('@') {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
                None => SocketAddr::from_pathname(&path),
            };
            let addr = addr
                .map_err(|e| tracing::warn!(%path, %e, "bad NOTIFY_SOCKET"))
                .ok()?;
            let socket = UnixDatagram::unbound()
                .map_err(|e| tracing::warn!(%e, "no notify socket"))
                .ok()?;
            Some((socket, addr))
        });
        Notifier { target }
    }

    fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.target {
            if let Err(error) = socket.send_to_addr(message.as_bytes(), addr) {
                tracing::debug!(%error, "sd_notify failed");
            }
        }
    }

    /// The service is up: the TUN exists and the data path runs.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}\n"));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}\n"));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=shutting down\n");
    }
}
