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
use veilmesh_i2p::I2pTransport;
use veilmesh_tox::ToxTransport;
use veilmesh_transport::{DatagramLimits, PeerAddr, Received, SendError, Transport, TransportKind};
use veilmesh_udp::{UdpConfig, UdpTransport};

use crate::config::{Config, DEFAULT_STATE_DIR};
use crate::control::{self, DaemonStatus, Request, Response};
use crate::core::batch::{Run, TunBatchOutput, TunSink, TxBatch};
use crate::core::{Event, Node, ReconfigureReport, BUFFER_SIZE};
use crate::hosts::HostsFile;
use crate::netdev::{NetDevice, Tun, TunReads, TunWrites};
use crate::notify::Notifier;
use crate::privileges;
use crate::rendezvous::{Found, Rendezvous, RendezvousConfig};

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

    fn add(&mut self, transport: Box<dyn Transport>) {
        self.generations.push(transport.generation());
        self.all.push(transport);
    }

    /// Drops the transport of `kind`; false if there was none.
    fn remove(&mut self, kind: TransportKind) -> bool {
        let Some(i) = self.all.iter().position(|t| t.kind() == kind) else {
            return false;
        };
        self.all.remove(i);
        self.generations.remove(i);
        self.next = 0;
        true
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

    /// A run of datagrams to one path (see `batch`).
    fn send_run(&mut self, run: &Run<'_>) -> Result<(), SendError> {
        match self.get_mut(run.to.kind()) {
            Some(t) => t.send_batch(&run.to, run.datagrams, run.segment),
            None => Err(SendError::NotReady("transport not enabled")),
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

/// A config parsed off the event loop (names in it may need DNS), with
/// where the result goes: a control client, or the log (SIGHUP).
type ParsedReload = (anyhow::Result<Config>, Option<oneshot::Sender<Response>>);

/// Metrics scrapes served at once; more connections are closed at once.
const MAX_METRICS_CONNECTIONS: usize = 8;

fn tox_settings_lack_bootstrap(config: &Config) -> bool {
    config
        .tox
        .as_ref()
        .is_some_and(|t| t.bootstrap.is_empty() && t.tcp_relays.is_empty() && !t.local_discovery)
}

/// Does this config give UDP any use? Not if it is off, nor if no peer
/// may use it: then no UDP socket is bound on a routable address at all
/// (an I2P-only node must not answer anything at its IP).
fn udp_wanted(config: &Config) -> bool {
    config.udp.enabled && config.peers.iter().any(|p| p.allows(TransportKind::Udp))
}

/// Segmentation offload: `[interface] offload`, unless
/// `VEILMESH_OFFLOAD=off` (or 0, false) in the environment turns it off,
/// to run a test suite or compare without it.
fn offload_wanted(config: &Config) -> bool {
    let off_by_env = std::env::var("VEILMESH_OFFLOAD").is_ok_and(|v| {
        matches!(
            v.to_ascii_lowercase().as_str(),
            "off" | "0" | "false" | "no"
        )
    });
    config.interface.offload && !off_by_env
}

fn bind_udp(config: &Config) -> anyhow::Result<UdpTransport> {
    let iface = &config.interface;
    UdpTransport::bind(UdpConfig {
        listen_port: iface.listen_port,
        stun_servers: config.udp.stun_servers.clone(),
        skip_interfaces: vec![iface.name.clone()],
        offload: offload_wanted(config),
        ..UdpConfig::default()
    })
    .with_context(|| format!("{}: interface.listen_port", config.file.display()))
}

/// The UDP sockets libraries opened get our mark too: the DHT's (its
/// bootstrap queries left before, and went wherever the routes said), and
/// toxcore's (marked by the Tox transport at its start already; checked here).
fn mark_library_sockets(config: &Config) {
    let subnets: Vec<_> = config.peer_subnets().collect();
    let has_exit = !crate::exit::exit_families(&subnets).is_empty();
    match veilmesh_transport::sockets::mark_datagram_sockets(config.interface.fwmark) {
        Ok(marked) => tracing::debug!(marked, "library sockets marked"),
        Err(error) if has_exit => tracing::warn!(
            %error,
            "cannot mark the transports' UDP sockets: their traffic may enter the exit's tunnel"
        ),
        Err(error) => tracing::debug!(%error, "library sockets not marked"),
    }
}

/// Runs the daemon until SIGINT or SIGTERM, then tears down what it set up.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let create_tun = |config: &Config, mesh_address| {
        let iface = &config.interface;
        crate::netdev::ensure_absent(&iface.name)?;
        NetDevice::create(
            &iface.name,
            iface.mtu,
            mesh_address,
            &iface.addresses,
            config.peer_subnets(),
            offload_wanted(config),
            crate::exit::ExitRouting::new(iface.fwmark, config.exit_bypass()),
        )
    };
    run_with(config, create_tun, std::future::pending()).await
}

/// [`run`] with the TUN `make_tun` makes (given the mesh address): the
/// kernel's, or a test's in memory, which needs no root. Also ends when
/// `stop` does.
///
/// Order: everything that needs root (control socket, TUN, routes, the UDP
/// socket, the metrics listener, the hosts file) is set up without running
/// any task, then privileges are dropped; only then do the network-facing
/// parts start (Tox, the DHT on its thread, the I2P tasks, the event
/// loop), so none of them ever runs as root.
pub async fn run_with<T: Tun>(
    config: Config,
    make_tun: impl FnOnce(&Config, std::net::Ipv6Addr) -> anyhow::Result<T>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let iface = &config.interface;
    // Every socket the transports open carries our mark: an exit's default
    // route never takes them.
    veilmesh_transport::sockets::use_mark(iface.fwmark);
    // The control socket goes first: it is how a second `up` finds the first.
    let listener = control::bind(&iface.control_socket)?;
    let _socket_file = control::SocketFile(iface.control_socket.clone());
    let now = Instant::now();
    let mut node = Node::new(&iface.private_key, config.peer_specs(), now)?;
    node.set_punch_ttl(config.udp.punch_ttl);
    node.set_relay_service(iface.relay);
    if iface.relay.is_some() {
        tracing::info!("relaying between this node's peers that may use UDP");
    }
    node.set_tunnel_addresses(iface.addresses.iter().map(|net| net.addr()));
    // Before the UDP port: a second `up` of this interface is told so,
    // not that the port is taken.
    let device = make_tun(&config, node.mesh_address())?;
    let udp = udp_wanted(&config).then(|| bind_udp(&config)).transpose()?;
    if udp.is_none() {
        tracing::info!("no peer may use UDP: no UDP socket");
    }
    let metrics_listener = match iface.metrics_address {
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .with_context(|| {
                    format!(
                        "{}: interface.metrics_address: cannot listen on {addr}",
                        config.file.display()
                    )
                })?;
            Some((addr, listener))
        }
        None => None,
    };
    // Opened while still root; written through this descriptor later.
    let hosts = iface.hosts_file.as_deref().and_then(|p| {
        HostsFile::open(p, &iface.name)
            .map_err(|error| tracing::warn!("peer names disabled: {error:#}"))
            .ok()
    });

    // Everything privileged is set up: drop to the daemon user.
    if let Some(target) = privileges::resolve(iface.user.as_deref())? {
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
    privileges::forbid_new_privileges()?;

    let mut all: Vec<Box<dyn Transport>> = udp
        .into_iter()
        .map(|t| Box::new(t) as Box<dyn Transport>)
        .collect();
    if let Some(tox) = &config.tox {
        let tox = ToxTransport::start(tox.clone(), &config.contacts(TransportKind::Tox))
            .with_context(|| format!("{}: [tox]", config.file.display()))?;
        if tox_settings_lack_bootstrap(&config) {
            tracing::warn!(
                "[tox] has no bootstrap_nodes or tcp_relays: peers can only be found on the LAN"
            );
        }
        all.push(Box::new(tox));
    }
    if let Some(i2p) = &config.i2p {
        let i2p = I2pTransport::start(i2p.clone())
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

    mark_library_sockets(&config);

    let (control_tx, mut control_rx) = mpsc::channel::<ControlRequest>(16);
    let (parsed_tx, mut parsed_rx) = mpsc::channel::<ParsedReload>(4);
    let metrics = match metrics_listener {
        Some((addr, listener)) => {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tracing::info!(%addr, "serving Prometheus metrics");
            Some(tokio::spawn(serve_metrics(listener, control_tx.clone())))
        }
        None => None,
    };
    let acceptor = tokio::spawn(accept_control(listener, control_tx));
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;

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
        rendezvous,
        hosts,
        config: config.clone(),
        node,
        transports,
        device,
        parsed: parsed_tx,
        tun_reads: TunReads::new(usize::from(config.interface.mtu)),
        tun_writes: TunWrites::new(),
        net_buf: vec![0u8; BUFFER_SIZE],
        tx: TxBatch::new(),
        transmit_tx: TxBatch::new(),
        pings: Vec::new(),
    };
    path.update_hosts();
    // One timer, moved only when the core's deadline changes.
    let timer =
        tokio::time::sleep_until(tokio::time::Instant::from_std(path.node.poll_timeout().at));
    tokio::pin!(timer);
    tokio::pin!(stop);
    loop {
        // The core's next timer, or a ping's time being up if sooner.
        let due =
            (path.pings.iter().map(|p| p.deadline)).fold(path.node.poll_timeout().at, Instant::min);
        let deadline = tokio::time::Instant::from_std(due);
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        let tun = &path.device;
        let transports = &mut path.transports;
        let net_buf = &mut path.net_buf;
        tokio::select! {
            biased;
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break }
            () = &mut stop => { tracing::info!("stopped: shutting down"); break }
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: reloading {}", path.config.file.display());
                path.parse_reload(None, None);
            }
            _ = &mut timer => {
                let now = Instant::now();
                path.node.set_local_candidates(path.transports.local_udp_endpoints(), now);
                for kind in path.transports.rehomed() {
                    path.node.transport_rehomed(kind, now);
                }
                path.node.handle_timeout(now);
                path.flush_transmits();
                path.answer_pings(now);
            }
            Some(found) = next_found(&mut path.rendezvous) => {
                path.node.rendezvous(&found.peer, &found.endpoints, Instant::now());
                path.flush_transmits();
            }
            Some((request, reply)) = control_rx.recv() => match request {
                Request::Show => {
                    let _ = reply.send(path.show());
                }
                Request::Ping { peer, all, timeout_ms } => path.start_ping(&peer, all, timeout_ms, reply),
                Request::Netcheck => {
                    let transports = path.netcheck();
                    let _ = reply.send(Response::Netcheck(control::NetcheckReport { transports }));
                }
                Request::Reload { config, file } => match path.check_reload_file(file.as_deref()) {
                    Ok(()) => path.parse_reload(config, Some(reply)),
                    Err(error) => {
                        let _ = reply.send(Response::Error { message: format!("{error:#}") });
                    }
                },
            },
            Some((parsed, reply)) = parsed_rx.recv() => {
                let response = match path.reload(parsed, &notifier) {
                    Ok(report) => Response::Reloaded(report),
                    Err(error) => Response::Error { message: format!("{error:#}") },
                };
                if let Some(reply) = reply {
                    let _ = reply.send(response);
                }
            }
            readable = tun.readable() => {
                readable.context("TUN device failed")?;
                if path.drain_tun().await? == BATCH {
                    // More waits: the network gets a turn first, or a
                    // flood from this host would starve what peers send
                    // (and toxcore's iterations).
                    path.drain_network().await;
                }
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
struct DataPath<T> {
    /// The configuration in force (the last one that loaded cleanly).
    config: Config,
    /// Where peer names go, unless disabled.
    hosts: Option<HostsFile>,
    /// The rendezvous DHT node, when enabled.
    rendezvous: Option<Rendezvous>,
    node: Node,
    transports: Transports,
    device: T,
    /// Where configs parsed off the event loop come back.
    parsed: mpsc::Sender<ParsedReload>,
    /// Packets of one TUN read (a super-packet cut up, with offload).
    tun_reads: TunReads,
    /// Decrypted packets on their way to the TUN, written together.
    tun_writes: TunWrites,
    net_buf: Vec<u8>,
    /// Datagrams sealed from TUN packets, gathered per path.
    tx: TxBatch,
    /// Runs of the core's queued transmits (a relay's forwards, many to
    /// one peer in a row, go out in one call each).
    transmit_tx: TxBatch,
    /// `veilmesh ping` requests waiting for their probes' answers.
    pings: Vec<PendingPing>,
}

/// A `veilmesh ping` request in flight: its probes, in the report's order.
struct PendingPing {
    probes: Vec<u64>,
    report: control::PingReport,
    deadline: Instant,
    reply: oneshot::Sender<Response>,
}

/// The next peer endpoints the rendezvous DHT found; never, without one.
async fn next_found(rendezvous: &mut Option<Rendezvous>) -> Option<Found> {
    match rendezvous {
        Some(r) => r.found.recv().await,
        None => std::future::pending().await,
    }
}

impl<T: Tun> DataPath<T> {
    fn show(&self) -> Response {
        Response::Status(DaemonStatus {
            interface: self.device.name().to_owned(),
            config_file: self.config.file.clone(),
            transports: self.transports.describe(),
            running: self
                .transports
                .all
                .iter()
                .map(|t| t.kind().as_str().to_owned())
                .collect(),
            node: self
                .node
                .status_with(Instant::now(), |to| self.transports.path_state(to)),
        })
    }

    /// A client's reload names the file it read: it must be this
    /// daemon's, or a config meant for another instance would replace ours.
    fn check_reload_file(&self, file: Option<&std::path::Path>) -> anyhow::Result<()> {
        let Some(file) = file else { return Ok(()) };
        let same = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        if same(file) != same(&self.config.file) {
            anyhow::bail!(
                "this daemon runs {}, not {} (nothing was reloaded)",
                self.config.file.display(),
                file.display()
            );
        }
        Ok(())
    }

    /// Reads (without `text`) and parses the config on a blocking thread:
    /// host names in it are resolved, and DNS must not stall the data
    /// path. The result comes back to the event loop through `parsed`.
    fn parse_reload(&self, text: Option<String>, reply: Option<oneshot::Sender<Response>>) {
        let file = self.config.file.clone();
        let running = self.config.interface.clone();
        let parsed = self.parsed.clone();
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(move || -> anyhow::Result<Config> {
                let text = match text {
                    Some(text) => text,
                    None => std::fs::read_to_string(&file).with_context(|| {
                        format!(
                            "cannot read {} (after dropping privileges the daemon may not be \
                             allowed to; `veilmesh reload --config FILE`, which systemctl reload \
                             runs, reads it as root)",
                            file.display()
                        )
                    })?,
                };
                Ok(Config::parse_for_reload(&text, &file, &running)?)
            })
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("config parser failed: {e}")));
            let _ = parsed.send((result, reply)).await;
        });
    }

    /// Applies a parsed config's peers. A config that did not load, or
    /// that changes what only a restart can change, is refused and the
    /// running one stays.
    fn reload(
        &mut self,
        parsed: anyhow::Result<Config>,
        notifier: &Notifier,
    ) -> anyhow::Result<ReconfigureReport> {
        let result = parsed.and_then(|new| self.apply(new));
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

    fn apply(&mut self, new: Config) -> anyhow::Result<ReconfigureReport> {
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
            ("interface.offload", old_if.offload != new_if.offload),
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
        // UDP before anything else changes: binding can fail.
        let udp = match (udp_wanted(&new), self.transports.get(TransportKind::Udp)) {
            (true, None) => Some(bind_udp(&new)?),
            _ => None,
        };
        self.device.sync_routes(new.peer_subnets().collect())?;
        let report = self.node.reconfigure(new.peer_specs(), Instant::now())?;
        self.node.set_relay_service(new_if.relay);
        if let Some(udp) = udp {
            self.transports.add(Box::new(udp));
        } else if !udp_wanted(&new) && self.transports.remove(TransportKind::Udp) {
            tracing::info!("no peer may use UDP any more: UDP socket closed");
        }
        for transport in &mut self.transports.all {
            transport.reconfigure(&new.contacts(transport.kind()));
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

    /// Handles up to `BATCH` reads of the TUN (with offload, each may be a
    /// super-packet cut into many); returns how many. Their sealed
    /// datagrams gather in runs per path, each sent in one call (see the
    /// core's `batch`).
    async fn drain_tun(&mut self) -> anyhow::Result<usize> {
        let now = Instant::now();
        let mut handled = 0;
        while handled < BATCH {
            match self.device.try_recv_batch(&mut self.tun_reads) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("reading from the TUN device"),
            }
            handled += 1;
            let mut output = TxOutput {
                transports: &mut self.transports,
                replies: &mut self.tun_writes,
            };
            let packets = (0..self.tun_reads.len()).map(|i| self.tun_reads.packet(i));
            self.node
                .handle_tun_batch(packets, &mut self.tx, &mut output, now);
            self.flush_transmits();
        }
        let mut output = TxOutput {
            transports: &mut self.transports,
            replies: &mut self.tun_writes,
        };
        self.node.flush_tun_batch(&mut self.tx, &mut output);
        write_tun_batch(&mut self.device, &mut self.tun_writes).await;
        Ok(handled)
    }

    /// Handles up to `BATCH` waiting datagrams, then writes what they
    /// carried to the TUN; returns how many.
    async fn drain_network(&mut self) -> usize {
        let mut handled = 0;
        while handled < BATCH {
            let next = self
                .transports
                .all
                .iter_mut()
                .find_map(|t| t.try_recv(&mut self.net_buf).transpose());
            let Some(received) = next else { break };
            self.on_received(received).await;
            handled += 1;
        }
        write_tun_batch(&mut self.device, &mut self.tun_writes).await;
        handled
    }

    /// Decrypts what one receive call got into the TUN batch (written
    /// once it is full, and when the sockets are drained).
    async fn on_received(&mut self, received: io::Result<Received>) {
        let got = match received {
            Ok(got) => got,
            Err(error) => {
                // Transient (ICMP errors reported on the socket, ENOBUFS): keep serving.
                tracing::debug!(%error, "receive error");
                return;
            }
        };
        let now = Instant::now();
        let mut datagrams = got.datagrams(&self.net_buf);
        while !self
            .node
            .handle_datagram_batch(&got.from, &mut datagrams, &mut self.tun_writes, now)
        {
            write_tun_batch(&mut self.device, &mut self.tun_writes).await;
        }
        self.flush_transmits();
    }

    /// Sends `veilmesh ping`'s probes to the peer named `who`; the answer
    /// goes out once all are answered or `timeout_ms` passed.
    fn start_ping(
        &mut self,
        who: &str,
        all: bool,
        timeout_ms: u64,
        reply: oneshot::Sender<Response>,
    ) {
        let Some(id) = self.node.find_peer(who) else {
            let message = format!("no peer `{who}` (a name, public key or mesh address)");
            let _ = reply.send(Response::Error { message });
            return;
        };
        let now = Instant::now();
        let probes = self.node.ping(id, all, now);
        self.flush_transmits();
        if probes.is_empty() {
            let message = format!("no path to `{who}` known yet");
            let _ = reply.send(Response::Error { message });
            return;
        }
        let timeout = std::time::Duration::from_millis(timeout_ms).clamp(
            std::time::Duration::from_millis(10),
            crate::core::PING_WATCH,
        );
        let report = control::PingReport {
            peer: who.to_owned(),
            probes: probes
                .iter()
                .map(|p| control::PingResult {
                    path: self.node.describe_path(&p.to),
                    transport: p.to.kind().as_str().to_owned(),
                    rtt_ms: None,
                })
                .collect(),
        };
        self.pings.push(PendingPing {
            probes: probes.iter().map(|p| p.probe).collect(),
            report,
            deadline: now + timeout,
            reply,
        });
        self.answer_pings(now);
    }

    /// Every transport, then the rendezvous DHT if it runs.
    fn netcheck(&self) -> Vec<control::TransportCheck> {
        let check = |name: &str, health: veilmesh_transport::Health| control::TransportCheck {
            transport: name.to_owned(),
            up: health.up,
            facts: health.facts,
        };
        let transports = self.transports.all.iter();
        let rendezvous = self.rendezvous.iter();
        transports
            .map(|t| check(t.kind().as_str(), t.health()))
            .chain(rendezvous.map(|r| check("rendezvous", r.health())))
            .collect()
    }

    /// Sends the open run of queued transmits, if any.
    fn send_transmit_run(&mut self) {
        let Some(run) = self.transmit_tx.take() else {
            return;
        };
        if let Err(error) = self.transports.send_run(&run) {
            for _ in 0..run.count {
                self.node.record_send_error();
            }
            tracing::debug!(to = %run.to, %error, "send failed");
        }
    }

    /// Answers the pings whose probes all came back, or whose time is up.
    fn answer_pings(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.pings.len() {
            let ping = &self.pings[i];
            let done = ping.report.probes.iter().all(|p| p.rtt_ms.is_some());
            if done || now >= ping.deadline {
                let ping = self.pings.swap_remove(i);
                let _ = ping.reply.send(Response::Pinged(ping.report));
            } else {
                i += 1;
            }
        }
    }

    fn flush_transmits(&mut self) {
        while let Some(t) = self.node.poll_transmit() {
            let len = t.payload.len();
            if t.ttl.is_some() || len > BUFFER_SIZE {
                // Alone, and after what was queued before it.
                self.send_transmit_run();
                if let Err(error) = self.transports.send(&t.to, &t.payload, t.ttl) {
                    self.node.record_send_error();
                    tracing::debug!(to = %t.to, %error, "send failed");
                }
                continue;
            }
            if !self.transmit_tx.has_room() || !self.transmit_tx.joins(&t.to, len) {
                self.send_transmit_run();
            }
            self.transmit_tx.space()[..len].copy_from_slice(&t.payload);
            self.transmit_tx.add(&t.to, len);
        }
        self.send_transmit_run();
        let mut pinged = false;
        while let Some(event) = self.node.poll_event() {
            match event {
                Event::RenewPresence(kind) => {
                    if let Some(t) = self.transports.get_mut(kind) {
                        t.renew();
                    }
                }
                Event::PingAnswered { probe, rtt } => {
                    for ping in &mut self.pings {
                        if let Some(i) = ping.probes.iter().position(|p| *p == probe) {
                            ping.report.probes[i].rtt_ms = Some(rtt.as_secs_f64() * 1e3);
                        }
                    }
                    pinged = true;
                }
                Event::RendezvousWanted(wanted) => {
                    // A reload may re-state the same wish: the DHT task
                    // wakes only for a real change.
                    if let Some(rendezvous) = &self.rendezvous {
                        rendezvous.wanted.send_if_modified(|current| {
                            let changed = *current != wanted;
                            if changed {
                                *current = wanted;
                            }
                            changed
                        });
                    }
                }
            }
        }
        if pinged {
            self.answer_pings(Instant::now());
        }
    }
}

/// The transports as the core's TUN batches see them; ICMP errors it
/// makes join the TUN writes.
struct TxOutput<'a> {
    transports: &'a mut Transports,
    replies: &'a mut TunWrites,
}

impl TunBatchOutput for TxOutput<'_> {
    fn limits(&self, to: &PeerAddr) -> DatagramLimits {
        self.transports.limits(to)
    }

    fn send(&mut self, run: Run<'_>) -> bool {
        match self.transports.send_run(&run) {
            Ok(()) => true,
            Err(error) => {
                tracing::trace!(to = %run.to, %error, "send failed");
                false
            }
        }
    }

    fn reply(&mut self, packet: &[u8]) {
        // Only when 64 packets wait already; an ICMP error may be lost.
        let Some(space) = self.replies.space() else {
            return;
        };
        space[..packet.len()].copy_from_slice(packet);
        self.replies.commit(packet.len());
    }
}

async fn write_tun_batch(tun: &mut impl Tun, writes: &mut TunWrites) {
    if writes.is_empty() {
        return;
    }
    if let Err(error) = tun.send_batch(writes).await {
        tracing::debug!(%error, "TUN write failed");
    }
}

/// Accepts control connections; each gets its own task so a slow or
/// malicious client never stalls the data path. Only root and the daemon's
/// own user are served, whatever the socket's permissions say.
async fn accept_control(
    listener: tokio::net::UnixListener,
    requests: mpsc::Sender<ControlRequest>,
) {
    let own = nix::unistd::geteuid().as_raw();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let uid = stream.peer_cred().map(|c| c.uid());
                let allowed = matches!(uid, Ok(u) if u == 0 || u == own);
                if !allowed {
                    tracing::warn!(?uid, "control connection from another user refused");
                }
                tokio::spawn(serve_control(stream, allowed, requests.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_control(stream: UnixStream, allowed: bool, requests: mpsc::Sender<ControlRequest>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(control::MAX_REQUEST as u64 + 1));
    let read_line = reader.read_line(&mut line);
    let response = match tokio::time::timeout(std::time::Duration::from_secs(5), read_line).await {
        Ok(Ok(_)) if !allowed => Response::Error {
            message: "refused: the control socket serves root and the daemon's own user only"
                .into(),
        },
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
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        // Each connection holds a slot until it is done; with none free
        // it is closed at once (dropped).
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("metrics connection refused: too many at once");
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let _slot = slot;
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
