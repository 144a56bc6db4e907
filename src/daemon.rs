//! The one event loop: it owns the TUN, the transports, the control socket
//! and the timer, and drives the sans-IO core with them.

use std::future::poll_fn;
use std::io;
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use veilmesh_transport::{DatagramLimits, PeerAddr, Received, SendError, Transport, TransportKind};
use veilmesh_udp::{UdpConfig, UdpTransport};

use crate::config::{Config, DEFAULT_STATE_DIR};
use crate::control::{self, DaemonStatus, Request, Response};
use crate::core::{FromNetwork, FromTun, Node, ReconfigureReport, BUFFER_SIZE};
use crate::hosts::HostsFile;
use crate::netdev::NetDevice;
use crate::notify::Notifier;
use crate::privileges;
use crate::rendezvous::{Found, Rendezvous, RendezvousConfig, Wanted};

/// Packets handled per wake-up of one source before the loop looks at the
/// others, so a flood on one side cannot starve timers or the other side.
const BATCH: usize = 64;

/// The transports this node runs, reached by the kind of a peer address.
struct Transports {
    all: Vec<Box<dyn Transport>>,
    /// Each transport's `generation` as last reported to the core.
    generations: Vec<u64>,
    /// Where `poll_recv` starts, rotated for fairness.
    next: usize,
}

impl Transports {
    fn get(&self, kind: TransportKind) -> Option<&dyn Transport> {
        self.all
            .iter()
            .find(|t| t.kind() == kind)
            .map(|t| t.as_ref())
    }

    fn get_mut(&mut self, kind: TransportKind) -> Option<&mut Box<dyn Transport>> {
        self.all.iter_mut().find(|t| t.kind() == kind)
    }

    fn limits(&self, to: &PeerAddr) -> DatagramLimits {
        self.get(to.kind())
            .map(|t| t.limits(to))
            // No transport for this kind: nothing fits.
            .unwrap_or(DatagramLimits {
                unfragmented: 0,
                absolute: 0,
            })
    }

    fn send(&mut self, to: &PeerAddr, datagram: &[u8], ttl: Option<u8>) -> Result<(), SendError> {
        match (self.get_mut(to.kind()), ttl) {
            (Some(t), None) => t.send(to, datagram),
            (Some(t), Some(ttl)) => t.send_with_ttl(to, datagram, ttl),
            (None, _) => Err(SendError::NotReady("transport not enabled")),
        }
    }

    /// Transports whose presence was re-created since the last call.
    fn rehomed(&mut self) -> Vec<TransportKind> {
        let mut kinds = Vec::new();
        for (t, seen) in self.all.iter().zip(&mut self.generations) {
            let generation = t.generation();
            if generation != *seen {
                *seen = generation;
                kinds.push(t.kind());
            }
        }
        kinds
    }

    /// Our UDP endpoints, as the transports know them.
    fn local_udp_endpoints(&self) -> Vec<std::net::SocketAddr> {
        self.all
            .iter()
            .flat_map(|t| t.local_endpoints())
            .filter_map(|a| match a {
                PeerAddr::Udp(sa) => Some(sa),
                _ => None,
            })
            .collect()
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<Received>> {
        let n = self.all.len();
        for i in 0..n {
            let index = (self.next + i) % n;
            if let Poll::Ready(r) = self.all[index].poll_recv(cx, buf) {
                self.next = (index + 1) % n;
                return Poll::Ready(r);
            }
        }
        Poll::Pending
    }

    fn path_state(&self, to: &PeerAddr) -> Option<String> {
        self.get(to.kind())?.path_state(to)
    }

    fn describe(&self) -> Vec<String> {
        self.all.iter().map(|t| t.describe()).collect()
    }
}

type ControlRequest = (Request, oneshot::Sender<Response>);

/// UDP ports Tox may bind (toxcore's own default range).
const TOX_PORTS: (u16, u16) = (33445, 33545);

fn tox_settings_lack_bootstrap(config: &Config) -> bool {
    config.tox.as_ref().is_some_and(|t| {
        t.bootstrap_nodes.is_empty() && t.tcp_relays.is_empty() && !t.local_discovery
    })
}

/// Runs the daemon until SIGINT or SIGTERM, then tears down what it set up.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let iface = &config.interface;
    // The control socket goes first: it is how a second `up` finds the first.
    let (listener, created_socket_dir) = control::bind(&iface.control_socket)?;
    let _socket_file = control::SocketFile(iface.control_socket.clone());
    crate::netdev::ensure_absent(&iface.name)?;
    let udp = UdpTransport::bind(UdpConfig {
        listen_port: iface.listen_port,
        stun_servers: config.udp.stun_servers.clone(),
        skip_interfaces: vec![iface.name.clone()],
        ..UdpConfig::default()
    })
    .with_context(|| format!("{}: interface.listen_port", config.file.display()))?;
    let mut all: Vec<Box<dyn Transport>> = vec![Box::new(udp)];
    let mut tox_control = None;
    if let Some(tox) = &config.tox {
        let tox = veilmesh_tox::ToxTransport::start(veilmesh_tox::ToxConfig {
            state_file: tox.state_file.clone(),
            udp: tox.udp,
            local_discovery: tox.local_discovery,
            port_range: TOX_PORTS,
            relay_port: tox.relay_port,
            bootstrap: tox.bootstrap_nodes.clone(),
            tcp_relays: tox.tcp_relays.clone(),
            friends: config.tox_friends(),
        })
        .with_context(|| format!("{}: [tox]", config.file.display()))?;
        if tox_settings_lack_bootstrap(&config) {
            tracing::warn!(
                "[tox] has no bootstrap_nodes or tcp_relays: peers can only be found on the LAN"
            );
        }
        tox_control = Some(tox.control());
        all.push(Box::new(tox));
    }
    if let Some(i2p) = &config.i2p {
        let i2p = veilmesh_i2p::I2pTransport::start(veilmesh_i2p::I2pConfig {
            bridges: i2p.sam.clone(),
            key_file: i2p.key_file.clone(),
            options: i2p.options.clone(),
            label: iface.name.clone(),
        })
        .with_context(|| format!("{}: [i2p]", config.file.display()))?;
        all.push(Box::new(i2p));
    }
    let transports = Transports {
        generations: vec![0; all.len()],
        all,
        next: 0,
    };
    let rendezvous = match &config.rendezvous {
        Some(settings) => Some(
            Rendezvous::start(
                &RendezvousConfig {
                    bootstrap: settings.bootstrap.clone(),
                    port: settings.port,
                },
                &iface.private_key,
            )
            .with_context(|| format!("{}: [rendezvous]", config.file.display()))?,
        ),
        None => None,
    };

    let now = Instant::now();
    let mut node = Node::new(&iface.private_key, config.peers.clone(), now)?;
    node.set_punch_ttl(config.udp.punch_ttl);
    let device = NetDevice::create(
        &iface.name,
        iface.mtu,
        node.mesh_address(),
        &iface.addresses,
        config.peer_subnets(),
    )?;

    let (control_tx, mut control_rx) = mpsc::channel::<ControlRequest>(16);
    let metrics = match iface.metrics_address {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!(
                    "{}: interface.metrics_address: cannot listen on {addr}",
                    config.file.display()
                )
            })?;
            tracing::info!(%addr, "serving Prometheus metrics");
            Some(tokio::spawn(serve_metrics(listener, control_tx.clone())))
        }
        None => None,
    };
    let acceptor = tokio::spawn(accept_control(listener, control_tx));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    // Opened while still root; written through this descriptor later.
    let hosts = iface.hosts_file.as_deref().and_then(|p| {
        HostsFile::open(p, &iface.name)
            .map_err(|error| tracing::warn!("peer names disabled: {error:#}"))
            .ok()
    });

    // Everything privileged is set up: drop to the daemon user.
    if let Some(target) = privileges::resolve(iface.user.as_deref())? {
        // So the daemon can still remove its socket at exit: the directory
        // it created, or the shared default one (ours by convention).
        let socket_dir = created_socket_dir.or_else(|| {
            let parent = iface.control_socket.parent()?;
            (parent == std::path::Path::new(control::DEFAULT_SOCKET_DIR)).then(|| parent.to_owned())
        });
        if let Some(dir) = &socket_dir {
            target.hand_over(dir)?;
        }
        // Tox saves its state (friends) and I2P its new destination while
        // running: the default state directory and the files go to the
        // daemon user too.
        for file in config.state_files() {
            // The I2P key may only be written after the drop: its default
            // directory must exist and be ours by then.
            if let Some(dir) = file.parent().filter(|d| d.starts_with(DEFAULT_STATE_DIR)) {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            for path in [file.parent(), Some(file)].into_iter().flatten() {
                if path.starts_with(DEFAULT_STATE_DIR) && path.exists() {
                    target.hand_over(path)?;
                }
            }
        }
        privileges::drop_to(&target)?;
    }

    let notifier = Notifier::from_env();
    notifier.ready(&format!(
        "running on {}, {} peers",
        iface.name,
        config.peers.len()
    ));
    tracing::info!(
        interface = %iface.name,
        mesh_address = %node.mesh_address(),
        peers = config.peers.len(),
        "veilmesh running"
    );

    let mut path = DataPath {
        tox_control,
        rendezvous,
        hosts,
        config: config.clone(),
        node,
        transports,
        device,
        tun_buf: vec![0u8; BUFFER_SIZE],
        net_buf: vec![0u8; BUFFER_SIZE],
        out: vec![0u8; BUFFER_SIZE],
    };
    path.update_hosts();
    // One timer, moved only when the core's deadline changes.
    let timer = tokio::time::sleep_until(tokio::time::Instant::from_std(path.node.poll_timeout()));
    tokio::pin!(timer);
    loop {
        let deadline = tokio::time::Instant::from_std(path.node.poll_timeout());
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        let tun = &path.device.tun;
        let transports = &mut path.transports;
        let net_buf = &mut path.net_buf;
        tokio::select! {
            biased;
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break }
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: reloading {}", path.config.file.display());
                let _ = path.reload(None, &notifier);
            }
            _ = &mut timer => {
                let now = Instant::now();
                path.node.set_local_candidates(path.transports.local_udp_endpoints(), now);
                for kind in path.transports.rehomed() {
                    path.node.transport_rehomed(kind, now);
                }
                path.node.handle_timeout(now);
                path.flush_transmits();
                path.update_rendezvous();
            }
            Some(found) = next_found(&mut path.rendezvous) => {
                path.node.rendezvous(&found.peer, &found.endpoints, Instant::now());
                path.flush_transmits();
            }
            Some((request, reply)) = control_rx.recv() => {
                let _ = reply.send(path.answer(request, &notifier));
            }
            readable = tun.readable() => {
                readable.context("TUN device failed")?;
                path.drain_tun().await?;
            }
            received = poll_fn(|cx| transports.poll_recv(cx, net_buf)) => {
                path.on_received(received).await;
                path.drain_network().await;
            }
        }
    }
    notifier.stopping();
    if let Some(hosts) = &mut path.hosts {
        if let Err(error) = hosts.remove() {
            tracing::warn!("{error:#}");
        }
    }
    acceptor.abort();
    if let Some(task) = metrics {
        task.abort();
    }
    drop(path);
    tracing::info!("veilmesh stopped");
    Ok(())
}

/// The TUN, the transports and the core, with the buffers that carry
/// packets between them.
struct DataPath {
    /// The configuration in force (the last one that loaded cleanly).
    config: Config,
    /// Where peer names go, unless disabled.
    hosts: Option<HostsFile>,
    /// Friend list updates for the Tox transport, when it runs.
    tox_control: Option<veilmesh_tox::ToxControl>,
    /// The rendezvous DHT node, when enabled.
    rendezvous: Option<Rendezvous>,
    node: Node,
    transports: Transports,
    device: NetDevice,
    tun_buf: Vec<u8>,
    net_buf: Vec<u8>,
    out: Vec<u8>,
}

/// The next peer endpoints the rendezvous DHT found; never, without one.
async fn next_found(rendezvous: &mut Option<Rendezvous>) -> Option<Found> {
    match rendezvous {
        Some(r) => r.found.recv().await,
        None => std::future::pending().await,
    }
}

impl DataPath {
    /// Tells the rendezvous task what to publish and whom to look up.
    fn update_rendezvous(&self) {
        let Some(rendezvous) = &self.rendezvous else {
            return;
        };
        let mut wanted = Wanted {
            endpoints: self.node.candidates(),
            ..Wanted::default()
        };
        for (peer, has_session) in self.node.udp_peers() {
            wanted.publish_to.push(peer);
            if !has_session {
                wanted.look_up.push(peer);
            }
        }
        rendezvous.wanted.send_if_modified(|current| {
            let changed = *current != wanted;
            if changed {
                *current = wanted;
            }
            changed
        });
    }
    fn answer(&mut self, request: Request, notifier: &Notifier) -> Response {
        match request {
            Request::Show => Response::Status(DaemonStatus {
                interface: self.device.name().to_owned(),
                config_file: self.config.file.clone(),
                transports: self.transports.describe(),
                node: self
                    .node
                    .status_with(Instant::now(), |to| self.transports.path_state(to)),
            }),
            Request::Reload { config } => match self.reload(config, notifier) {
                Ok(report) => Response::Reloaded(report),
                Err(error) => Response::Error {
                    message: format!("{error:#}"),
                },
            },
        }
    }

    /// Re-reads the config file and applies its peers. A config that does
    /// not load, or that changes what only a restart can change, is refused
    /// and the running one stays.
    fn reload(
        &mut self,
        text: Option<String>,
        notifier: &Notifier,
    ) -> anyhow::Result<ReconfigureReport> {
        let result = self.try_reload(text);
        match &result {
            Ok(r) => {
                tracing::info!(
                    added = ?r.added, removed = ?r.removed, changed = ?r.changed,
                    unchanged = r.unchanged.len(), "config reloaded"
                );
                notifier.status(&format!(
                    "running on {}, {} peers (reloaded)",
                    self.config.interface.name,
                    self.config.peers.len()
                ));
            }
            Err(error) => {
                tracing::error!("reload refused, running config kept: {error:#}");
                notifier.status(&format!("reload refused: {error:#}"));
            }
        }
        result
    }

    fn try_reload(&mut self, text: Option<String>) -> anyhow::Result<ReconfigureReport> {
        let file = &self.config.file;
        let text = match text {
            Some(text) => text,
            None => std::fs::read_to_string(file).with_context(|| {
                format!(
                    "cannot read {} (after dropping privileges the daemon may not be allowed to; \
                     `veilmesh reload`, which systemctl reload runs, reads it as root)",
                    file.display()
                )
            })?,
        };
        let new = Config::parse_for_reload(&text, file, &self.config.interface)?;
        let (old_if, new_if) = (&self.config.interface, &new.interface);
        let restart_only = [
            (
                "interface private key",
                old_if.private_key.public_key() != new_if.private_key.public_key(),
            ),
            ("interface.name", old_if.name != new_if.name),
            (
                "interface.listen_port",
                old_if.listen_port != new_if.listen_port,
            ),
            ("interface.mtu", old_if.mtu != new_if.mtu),
            ("interface.addresses", old_if.addresses != new_if.addresses),
            (
                "interface.control_socket",
                old_if.control_socket != new_if.control_socket,
            ),
            (
                "interface.metrics_address",
                old_if.metrics_address != new_if.metrics_address,
            ),
            (
                "interface.hosts_file",
                old_if.hosts_file != new_if.hosts_file,
            ),
            ("interface.user", old_if.user != new_if.user),
            ("[udp]", self.config.udp != new.udp),
            ("[rendezvous]", self.config.rendezvous != new.rendezvous),
            ("[tox]", self.config.tox != new.tox),
            ("[i2p]", self.config.i2p != new.i2p),
        ];
        let changed: Vec<&str> = restart_only
            .iter()
            .filter(|(_, c)| *c)
            .map(|(n, _)| *n)
            .collect();
        if !changed.is_empty() {
            anyhow::bail!(
                "{}: [interface] {} changed; that takes a restart (nothing was reloaded)",
                new.file.display(),
                changed.join(", ")
            );
        }
        self.device.sync_routes(new.peer_subnets())?;
        let report = self.node.reconfigure(new.peers.clone(), Instant::now())?;
        if let Some(tox) = &self.tox_control {
            tox.set_friends(new.tox_friends());
        }
        self.config = new;
        self.update_hosts();
        Ok(report)
    }

    /// Names are a convenience: failing to write them is logged, not fatal.
    fn update_hosts(&mut self) {
        let Some(hosts) = &mut self.hosts else { return };
        let entries: Vec<_> = self
            .config
            .peers
            .iter()
            .map(|p| (p.name.clone(), p.public_key.mesh_address()))
            .collect();
        if let Err(error) = hosts.update(&entries) {
            tracing::warn!("peer names not published: {error:#}");
        }
    }

    /// Reads and handles up to `BATCH` packets from the TUN; returns how many.
    async fn drain_tun(&mut self) -> anyhow::Result<usize> {
        for handled in 0..BATCH {
            let Some(n) = self.read_tun().context("reading from the TUN device")? else {
                return Ok(handled);
            };
            let transports = &self.transports;
            match self.node.handle_tun_packet(
                &self.tun_buf[..n],
                |to| transports.limits(to),
                &mut self.out,
            ) {
                FromTun::Send { to, datagram } => {
                    if let Err(error) = self.transports.send(&to, datagram, None) {
                        self.node.record_send_error();
                        tracing::trace!(%to, %error, "send failed");
                    }
                }
                FromTun::Reply(packet) => write_tun(&self.device.tun, packet).await,
                FromTun::Done(_) => {}
            }
            self.flush_transmits();
        }
        Ok(BATCH)
    }

    /// One packet from the TUN, if one is waiting. tokio's `try_recv`
    /// clears its readiness cache on EAGAIN, which re-arms `readable()`.
    fn read_tun(&mut self) -> io::Result<Option<usize>> {
        match self.device.tun.try_recv(&mut self.tun_buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Handles up to `BATCH` waiting datagrams; returns how many.
    async fn drain_network(&mut self) -> usize {
        for handled in 0..BATCH {
            let next = self
                .transports
                .all
                .iter_mut()
                .find_map(|t| t.try_recv(&mut self.net_buf).transpose());
            match next {
                Some(received) => self.on_received(received).await,
                None => return handled,
            }
        }
        BATCH
    }

    async fn on_received(&mut self, received: io::Result<Received>) {
        let got = match received {
            Ok(got) => got,
            Err(error) => {
                // Transient (ICMP errors reported on the socket, ENOBUFS): keep serving.
                tracing::debug!(%error, "receive error");
                return;
            }
        };
        if let FromNetwork::ToTun(packet) = self.node.handle_datagram(
            &got.from,
            &self.net_buf[..got.len],
            &mut self.out,
            Instant::now(),
        ) {
            write_tun(&self.device.tun, packet).await;
        }
        self.flush_transmits();
    }

    fn flush_transmits(&mut self) {
        while let Some(t) = self.node.poll_transmit() {
            if let Err(error) = self.transports.send(&t.to, &t.payload, t.ttl) {
                self.node.record_send_error();
                tracing::debug!(to = %t.to, %error, "send failed");
            }
        }
        while let Some(kind) = self.node.poll_renewal() {
            if let Some(t) = self.transports.get_mut(kind) {
                t.renew();
            }
        }
    }
}

async fn write_tun(tun: &tun_rs::AsyncDevice, packet: &[u8]) {
    if let Err(error) = tun.send(packet).await {
        tracing::debug!(%error, len = packet.len(), "TUN write failed");
    }
}

/// Accepts control connections; each gets its own task so a slow or
/// malicious client never stalls the data path.
async fn accept_control(
    listener: tokio::net::UnixListener,
    requests: mpsc::Sender<ControlRequest>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_control(stream, requests.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_control(stream: UnixStream, requests: mpsc::Sender<ControlRequest>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(control::MAX_REQUEST as u64 + 1));
    let read_line = reader.read_line(&mut line);
    let response = match tokio::time::timeout(std::time::Duration::from_secs(5), read_line).await {
        Ok(Ok(_)) => match control::parse_request(&line) {
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                if requests.send((request, tx)).await.is_err() {
                    return;
                }
                match rx.await {
                    Ok(r) => r,
                    Err(_) => return,
                }
            }
            Err(message) => Response::Error { message },
        },
        Ok(Err(error)) => Response::Error {
            message: format!("read error: {error}"),
        },
        Err(_) => Response::Error {
            message: "timed out waiting for a request".into(),
        },
    };
    if let Ok(mut text) = serde_json::to_string(&response) {
        text.push('\n');
        let _ = write.write_all(text.as_bytes()).await;
    }
}

/// Minimal HTTP/1.0 server for `GET /metrics`; everything else gets 404.
/// Each scrape is a `show` request to the event loop.
async fn serve_metrics(listener: tokio::net::TcpListener, requests: mpsc::Sender<ControlRequest>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut first_line = String::new();
            let mut reader = BufReader::new(read.take(8192));
            let got = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                reader.read_line(&mut first_line),
            )
            .await;
            let response = if !matches!(got, Ok(Ok(_))) {
                return;
            } else if first_line.starts_with("GET /metrics ")
                || first_line.trim_end() == "GET /metrics"
            {
                let (tx, rx) = oneshot::channel();
                if requests.send((Request::Show, tx)).await.is_err() {
                    return;
                }
                match rx.await {
                    Ok(Response::Status(status)) => {
                        let body = crate::metrics::render(&status);
                        format!(
                            "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    }
                    _ => return,
                }
            } else {
                "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned()
            };
            let _ = write.write_all(response.as_bytes()).await;
        });
    }
}
