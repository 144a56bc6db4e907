//! Interface configuration: one TOML file per interface.
//!
//! Parsing happens in two steps: serde reads the raw shape (rejecting unknown
//! fields), then `validate` turns strings into typed values and checks what
//! only makes sense across fields. Every error names the file and the field.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use crate::core::{PeerSpec, DEFAULT_RELAY_RATE};
use crate::identity::{PrivateKey, PublicKey};
use veilmesh_i2p::{I2pConfig, SessionOptions};
use veilmesh_tox::{ToxConfig, ToxId, ToxNode};
use veilmesh_transport::{Contact, I2pAddress, PeerAddr, RelayAddr, TransportKind};

pub const DEFAULT_INTERFACE_NAME: &str = "veil0";
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// The firewall mark of veilmesh's own sockets and the number of the
/// routing table an exit's default route goes in ("vm").
pub const DEFAULT_FWMARK: u32 = 0x766d;
/// `relay_rate_mbit` at most (100 Gbit/s): no limit a link could reach.
const MAX_RELAY_RATE_MBIT: u64 = 100_000;
/// 1500 minus the outer IPv6 (40) + UDP (8) + WireGuard data (32) headers.
pub const DEFAULT_MTU: u16 = 1420;
/// IPv6 requires every link to carry 1280-byte packets.
pub const MIN_MTU: u16 = 1280;
const MAX_INTERFACE_NAME: usize = 15;
pub const DEFAULT_HOSTS_FILE: &str = "/etc/hosts";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Dotted path of the offending field, e.g. `peer[1] "site-b".endpoint`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.field,
                self.message
            )
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: RawInterface,
    udp: Option<RawUdp>,
    rendezvous: Option<RawRendezvous>,
    tox: Option<RawTox>,
    i2p: Option<RawI2p>,
    #[serde(default, rename = "peer")]
    peers: Vec<RawPeer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
    name: Option<String>,
    listen_port: Option<u16>,
    mtu: Option<u16>,
    #[serde(default)]
    addresses: Vec<String>,
    control_socket: Option<PathBuf>,
    metrics_address: Option<String>,
    #[serde(default)]
    metrics_allow_remote: bool,
    hosts_file: Option<PathBuf>,
    user: Option<String>,
    offload: Option<bool>,
    fwmark: Option<u32>,
    relay: Option<bool>,
    relay_rate_mbit: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUdp {
    enabled: Option<bool>,
    #[serde(default)]
    stun_servers: Vec<String>,
    punch_ttl: Option<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRendezvous {
    #[serde(default)]
    dht: bool,
    #[serde(default)]
    bootstrap: Vec<String>,
    #[serde(default)]
    port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTox {
    #[serde(default)]
    enabled: bool,
    state_file: Option<PathBuf>,
    #[serde(default)]
    bootstrap_nodes: Vec<String>,
    bootstrap_nodes_file: Option<PathBuf>,
    udp: Option<bool>,
    #[serde(default)]
    local_discovery: bool,
    #[serde(default)]
    tcp_relays: Vec<String>,
    #[serde(default)]
    relay_port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawI2p {
    #[serde(default)]
    enabled: bool,
    sam: Option<Vec<String>>,
    key_file: Option<PathBuf>,
    inbound_length: Option<u8>,
    outbound_length: Option<u8>,
    inbound_quantity: Option<u8>,
    outbound_quantity: Option<u8>,
    encryption_types: Option<String>,
    inbound_tags: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Option<String>,
    public_key: String,
    endpoint: Option<String>,
    #[serde(default)]
    allowed_ips: Vec<String>,
    persistent_keepalive: Option<u16>,
    tox: Option<String>,
    i2p: Option<String>,
    transports: Option<Vec<String>>,
    allowed_destinations: Option<Vec<String>>,
    accept: Option<Vec<String>>,
    exit: Option<bool>,
    relay: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub interface: InterfaceConfig,
    /// NAT traversal settings of the UDP transport.
    pub udp: UdpSettings,
    /// Rendezvous through the BitTorrent DHT, when enabled.
    pub rendezvous: Option<RendezvousSettings>,
    /// The Tox transport's own settings, when enabled.
    pub tox: Option<ToxConfig>,
    /// The I2P transport's own settings, when enabled.
    pub i2p: Option<I2pConfig>,
    pub peers: Vec<PeerConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousSettings {
    /// DHT nodes to join through, `host:port`; empty: mainline's defaults.
    pub bootstrap: Vec<String>,
    /// UDP port of the DHT node; 0 picks one.
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpSettings {
    /// `false` keeps the node off UDP altogether, whatever the peers say.
    pub enabled: bool,
    /// Asked for our public mapping; none by default (peers also tell us).
    pub stun_servers: Vec<SocketAddr>,
    /// TTL of the probe that opens our NAT mapping for a punch.
    pub punch_ttl: u8,
}

impl Default for UdpSettings {
    fn default() -> Self {
        UdpSettings {
            enabled: true,
            stun_servers: Vec::new(),
            punch_ttl: crate::core::DEFAULT_PUNCH_TTL,
        }
    }
}

/// Safe for the real I2P network: 3 hops each way (the I2P default).
pub const DEFAULT_I2P_TUNNEL_LENGTH: u8 = 3;
pub const DEFAULT_I2P_TUNNEL_QUANTITY: u8 = 2;
/// ECIES-X25519 lease sets.
pub const DEFAULT_I2P_ENCRYPTION: &str = "4";
pub const DEFAULT_SAM_BRIDGE: &str = "127.0.0.1:7656";
/// I2P routers build tunnels of at most 7 hops.
const MAX_I2P_TUNNEL_LENGTH: u8 = 7;
const MAX_I2P_TUNNEL_QUANTITY: u8 = 16;
/// Each tag the router keeps ahead costs it a few dozen bytes per session.
const MAX_I2P_INBOUND_TAGS: u32 = 65_536;

pub fn default_i2p_key_file(interface: &str) -> PathBuf {
    Path::new(DEFAULT_STATE_DIR).join(format!("{interface}.i2p"))
}

/// Where per-interface state lives by default (systemd's StateDirectory).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/veilmesh";

pub fn default_tox_state_file(interface: &str) -> PathBuf {
    Path::new(DEFAULT_STATE_DIR).join(format!("{interface}.tox"))
}

#[derive(Debug, Clone)]
pub struct InterfaceConfig {
    pub private_key: PrivateKey,
    /// Where the key came from, if from a file (resolved path).
    pub private_key_file: Option<PathBuf>,
    /// The user to run as after setup (None: the default, see privileges).
    pub user: Option<String>,
    pub name: String,
    pub listen_port: u16,
    pub mtu: u16,
    /// Extra addresses on the TUN besides the mesh address (site-to-site).
    pub addresses: Vec<IpNet>,
    pub control_socket: PathBuf,
    /// Where Prometheus metrics are served over HTTP, if anywhere.
    pub metrics_address: Option<SocketAddr>,
    /// Where `NAME.veil` entries go; empty path disables them.
    pub hosts_file: Option<PathBuf>,
    /// Segmentation offload where the kernel has it (UDP GSO/GRO).
    pub offload: bool,
    /// Mark of our own sockets, and the table of an exit's default route.
    pub fwmark: u32,
    /// Forward sealed datagrams between our own peers, at most this many
    /// bytes per second for each sender; None: no relay service.
    pub relay: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    /// Subnets routed through this peer, besides its mesh /128.
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
    /// The peer's Tox ID, for the Tox transport.
    pub tox: Option<ToxId>,
    /// The peer's I2P destination (by hash), for the I2P transport.
    pub i2p: Option<I2pAddress>,
    /// The transports this peer may be reached over, in order of preference.
    /// Nothing is ever sent to the peer, or accepted from it, over another.
    pub transports: Vec<TransportKind>,
    /// Our addresses the peer may send to besides our mesh address, and
    /// may get answers from. None: anywhere, unless the peer is anonymous
    /// (then our mesh address only).
    pub allowed_destinations: Option<Vec<IpNet>>,
    /// What the peer may open towards us (stateful: what we open to it may
    /// always answer). None: anything.
    pub accept: Option<Vec<crate::core::accept::Rule>>,
    /// Said explicitly: the peer may carry our traffic to the internet
    /// (required of an I2P-only peer with a default route).
    pub exit: bool,
    /// We may reach our other peers through this one.
    pub relay: bool,
}

impl PeerConfig {
    /// Everything this peer may use as a source address: its mesh /128 and
    /// its configured subnets.
    pub fn all_allowed_ips(&self) -> impl Iterator<Item = IpNet> + '_ {
        crate::core::spec::all_allowed_ips(&self.public_key, &self.allowed_ips)
    }

    pub fn allows(&self, kind: TransportKind) -> bool {
        self.transports.contains(&kind)
    }

    /// See `core::spec::is_anonymous`.
    pub fn is_anonymous(&self) -> bool {
        crate::core::spec::is_anonymous(&self.transports)
    }

    /// What the core needs of this peer: its paths as typed addresses,
    /// with a path through each of `relays` (their keys) unless the peer is
    /// anonymous or the relay itself. A relay path ranks after direct UDP.
    pub fn spec(&self, relays: &[PublicKey]) -> PeerSpec {
        let paths = self.endpoint.map(PeerAddr::Udp).into_iter();
        let mut paths: Vec<PeerAddr> = paths
            .chain(self.tox.map(|id| PeerAddr::Tox(id.public_key())))
            .chain(self.i2p.map(PeerAddr::I2p))
            .collect();
        let mut transports = self.transports.clone();
        if !self.is_anonymous() {
            let through = relays.iter().filter(|r| **r != self.public_key);
            paths.extend(through.map(|r| {
                PeerAddr::Relay(RelayAddr {
                    relay: r.0,
                    peer: self.public_key.0,
                })
            }));
            if paths.iter().any(|p| p.kind() == TransportKind::Relay) {
                let after_udp = transports
                    .iter()
                    .position(|k| *k == TransportKind::Udp)
                    .map_or(0, |i| i + 1);
                transports.insert(after_udp, TransportKind::Relay);
            }
        }
        PeerSpec {
            name: self.name.clone(),
            public_key: self.public_key,
            allowed_ips: self.allowed_ips.clone(),
            paths,
            transports,
            relay: self.relay,
            persistent_keepalive: self.persistent_keepalive,
            allowed_destinations: self.allowed_destinations.clone(),
            accept: self.accept.clone(),
        }
    }
}

pub fn default_config_file(interface: &str) -> PathBuf {
    PathBuf::from(format!("/etc/veilmesh/{interface}.toml"))
}

pub fn default_control_socket(interface: &str) -> PathBuf {
    Path::new(crate::control::DEFAULT_SOCKET_DIR).join(format!("{interface}.sock"))
}

impl Config {
    /// The peers, as the core takes them.
    pub fn peer_specs(&self) -> Vec<PeerSpec> {
        let relays: Vec<PublicKey> = self
            .peers
            .iter()
            .filter(|p| p.relay)
            .map(|p| p.public_key)
            .collect();
        self.peers.iter().map(|p| p.spec(&relays)).collect()
    }

    /// Subnets routed into the TUN: every peer's allowed IPs.
    pub fn peer_subnets(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
    }

    /// Addresses an exit never carries: the Tox nodes toxcore may reach
    /// over TCP, whose sockets cannot be marked before they connect.
    pub fn exit_bypass(&self) -> Vec<IpAddr> {
        let Some(tox) = &self.tox else {
            return Vec::new();
        };
        let mut addrs: Vec<IpAddr> = tox
            .bootstrap
            .iter()
            .chain(&tox.tcp_relays)
            .filter_map(|node| node.host.parse().ok())
            .collect();
        addrs.sort();
        addrs.dedup();
        addrs
    }

    /// Files the transports write while running (Tox state, I2P key).
    pub fn state_files(&self) -> impl Iterator<Item = &Path> {
        let tox = self.tox.as_ref().map(|t| t.state_file.as_path());
        let i2p = self.i2p.as_ref().map(|t| t.key_file.as_path());
        tox.into_iter().chain(i2p)
    }

    /// The Tox friend list: the Tox IDs of the peers allowed Tox, and of
    /// no other peer (a friend connection shows the friend our IP).
    /// What the transport of `kind` must know of the peers allowed on it
    /// (Tox IDs to befriend): `Transport::reconfigure`'s input.
    pub fn contacts(&self, kind: TransportKind) -> Vec<Contact> {
        self.peers
            .iter()
            .filter(|p| p.allows(kind))
            .filter_map(|p| match kind {
                TransportKind::Tox => p.tox.map(Contact::Tox),
                TransportKind::I2p => p.i2p.map(Contact::I2p),
                TransportKind::Udp | TransportKind::Relay => None,
            })
            .collect()
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            field: String::new(),
            message: format!("cannot read config file: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// `file` names the source in errors; relative key file paths are taken
    /// relative to its directory.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        Validator {
            file,
            running: None,
        }
        .validate(parse_raw(text, file)?)
    }

    /// Parses a new version of a running config. The key file is not read
    /// again when its path is unchanged: after dropping privileges the daemon
    /// cannot read it, and a new key takes a restart anyway.
    pub fn parse_for_reload(
        text: &str,
        file: &Path,
        running: &InterfaceConfig,
    ) -> Result<Config, ConfigError> {
        Validator {
            file,
            running: Some(running),
        }
        .validate(parse_raw(text, file)?)
    }
}

fn parse_raw(text: &str, file: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError {
        file: file.to_owned(),
        field: String::new(),
        message: e.to_string().trim_end().to_owned(),
    })
}

struct Validator<'a> {
    file: &'a Path,
    running: Option<&'a InterfaceConfig>,
}

impl Validator<'_> {
    /// Parses every entry of the list `field`; an error names the entry
    /// (`field[i]`).
    fn each<T, E: std::fmt::Display>(
        &self,
        field: &str,
        list: &[String],
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Result<Vec<T>, ConfigError> {
        list.iter()
            .enumerate()
            .map(|(i, text)| {
                parse(text).map_err(|e| self.err(format!("{field}[{i}]"), e.to_string()))
            })
            .collect()
    }

    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let interface = self.interface(raw.interface)?;
        let udp = raw
            .udp
            .map(|u| self.udp(u))
            .transpose()?
            .unwrap_or_default();
        let rendezvous = raw
            .rendezvous
            .map(|r| self.rendezvous(r))
            .transpose()?
            .flatten();
        let tox = raw
            .tox
            .map(|t| self.tox(t, &interface.name))
            .transpose()?
            .flatten();
        let i2p = raw
            .i2p
            .map(|t| self.i2p(t, &interface.name))
            .transpose()?
            .flatten();
        if rendezvous.is_some() && !udp.enabled {
            return Err(self.err(
                "rendezvous.dht",
                "publishes UDP endpoints, but [udp] enabled = false",
            ));
        }
        let enabled: Vec<TransportKind> = TransportKind::ALL
            .into_iter()
            .filter(|kind| match kind {
                TransportKind::Udp => udp.enabled,
                TransportKind::Tox => tox.is_some(),
                TransportKind::I2p => i2p.is_some(),
                TransportKind::Relay => false,
            })
            .collect();
        if enabled.is_empty() {
            return Err(self.err(
                "udp.enabled",
                "is false and neither [tox] nor [i2p] is enabled: this node would have no transport",
            ));
        }
        let own_key = interface.private_key.public_key();
        let mut peers: Vec<PeerConfig> = Vec::with_capacity(raw.peers.len());
        // Hash lookups, not pairwise checks: 10,000 peers must not cost 10^8
        // comparisons (start and every reload validate the whole file).
        let mut by_key: HashMap<[u8; 32], usize> = HashMap::with_capacity(raw.peers.len());
        let mut by_name: HashMap<String, usize> = HashMap::with_capacity(raw.peers.len());
        for (index, raw_peer) in raw.peers.into_iter().enumerate() {
            let peer = self.peer(index, raw_peer, &enabled)?;
            let label = peer_label(index, &peer.name);
            if peer.public_key == own_key {
                return Err(self.err(
                    format!("{label}.public_key"),
                    "is this node's own public key; a node cannot be its own peer",
                ));
            }
            if let Some(&other) = by_key.get(&peer.public_key.0) {
                return Err(self.err(
                    format!("{label}.public_key"),
                    format!(
                        "duplicate: the same key is already used by {}",
                        peer_label(other, &peers[other].name)
                    ),
                ));
            }
            if let Some(&other) = by_name.get(&peer.name) {
                return Err(self.err(
                    format!("{label}.name"),
                    format!(
                        "duplicate: {} has the same name",
                        peer_label(other, &peers[other].name)
                    ),
                ));
            }
            by_key.insert(peer.public_key.0, index);
            by_name.insert(peer.name.clone(), index);
            peers.push(peer);
        }
        if let Some(twice) = first_shared_prefix(peers.iter().map(PeerConfig::all_allowed_ips)) {
            let label = peer_label(twice.later, &peers[twice.later].name);
            let other_label = peer_label(twice.earlier, &peers[twice.earlier].name);
            return Err(self.err(
                format!("{label}.allowed_ips"),
                format!(
                    "{} is also routed to {other_label}; two peers cannot own the same prefix \
                     (a prefix inside another one is fine: the longest wins)",
                    twice.net
                ),
            ));
        }
        let has_v4_address = interface
            .addresses
            .iter()
            .any(|n| matches!(n, IpNet::V4(_)));
        if let Some((index, peer)) = peers.iter().enumerate().find(|(_, p)| {
            p.allowed_ips
                .iter()
                .any(|n| matches!(n, IpNet::V4(v4) if v4.prefix_len() == 0))
        }) {
            if !has_v4_address {
                return Err(self.err(
                    format!("{}.allowed_ips", peer_label(index, &peer.name)),
                    "0.0.0.0/0 sends this node's IPv4 traffic through the peer, which needs an \
                     IPv4 source address on the tunnel: add one to [interface] addresses, like \
                     \"10.99.0.2/32\" (and to this node's allowed_ips on the exit)",
                ));
            }
        }
        Ok(Config {
            file: self.file.to_owned(),
            interface,
            udp,
            rendezvous,
            tox,
            i2p,
            peers,
        })
    }

    fn interface(&self, raw: RawInterface) -> Result<InterfaceConfig, ConfigError> {
        let mut private_key_file = None;
        let private_key = match (raw.private_key, raw.private_key_file) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    "interface",
                    "set either private_key or private_key_file, not both",
                ))
            }
            (None, None) => {
                return Err(self.err("interface", "missing private_key_file (or private_key)"))
            }
            (Some(text), None) => PrivateKey::parse(&text)
                .map_err(|e| self.err("interface.private_key", e.to_string()))?,
            (None, Some(path)) => {
                let path = self.relative_to_config(&path);
                private_key_file = Some(path.clone());
                if let Some(running) = self
                    .running
                    .filter(|r| r.private_key_file.as_ref() == Some(&path))
                {
                    running.private_key.clone()
                } else {
                    self.check_private(&path, "interface.private_key_file")?;
                    let text = std::fs::read_to_string(&path).map_err(|e| {
                        self.err(
                            "interface.private_key_file",
                            format!("cannot read {}: {e}", path.display()),
                        )
                    })?;
                    PrivateKey::parse(&text).map_err(|e| {
                        self.err(
                            "interface.private_key_file",
                            format!("{}: {e}", path.display()),
                        )
                    })?
                }
            }
        };
        let name = raw
            .name
            .unwrap_or_else(|| DEFAULT_INTERFACE_NAME.to_owned());
        if name.is_empty()
            || name.len() > MAX_INTERFACE_NAME
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(self.err(
                "interface.name",
                format!(
                    "`{name}` is not a valid interface name \
                     (1-{MAX_INTERFACE_NAME} characters of a-z, A-Z, 0-9, -, _, .)"
                ),
            ));
        }
        let mtu = raw.mtu.unwrap_or(DEFAULT_MTU);
        if mtu < MIN_MTU {
            return Err(self.err(
                "interface.mtu",
                format!("{mtu} is below {MIN_MTU}, the minimum IPv6 requires"),
            ));
        }
        let addresses = self.each("interface.addresses", &raw.addresses, |text| {
            text.parse::<IpNet>().map_err(|_| {
                format!("`{text}` is not an address with prefix length, like 10.10.1.1/24")
            })
        })?;
        let control_socket = raw
            .control_socket
            .map(|p| self.relative_to_config(&p))
            .unwrap_or_else(|| default_control_socket(&name));
        let metrics_address = raw
            .metrics_address
            .map(|text| {
                let addr = text.parse::<SocketAddr>().map_err(|_| {
                    self.err(
                        "interface.metrics_address",
                        format!("`{text}` is not IP:PORT, like 127.0.0.1:9586"),
                    )
                })?;
                if !addr.ip().is_loopback() && !raw.metrics_allow_remote {
                    return Err(self.err(
                        "interface.metrics_address",
                        format!(
                            "`{text}` is not a loopback address: the metrics name every peer, \
                             its traffic and its paths to whoever connects. Use 127.0.0.1:{}, \
                             or set metrics_allow_remote = true",
                            addr.port()
                        ),
                    ));
                }
                Ok(addr)
            })
            .transpose()?;
        let fwmark = match raw.fwmark {
            None => DEFAULT_FWMARK,
            Some(0) => {
                return Err(self.err(
                    "interface.fwmark",
                    "0 is no mark: choose another number (the default is 30317)",
                ))
            }
            Some(mark) => mark,
        };
        let relay = raw.relay.unwrap_or(false);
        if raw.relay_rate_mbit.is_some() && !relay {
            return Err(self.err(
                "interface.relay_rate_mbit",
                "limits a relay, and this node offers none (set relay = true, or remove it)",
            ));
        }
        let relay_rate = match raw.relay_rate_mbit {
            None => DEFAULT_RELAY_RATE,
            Some(mbit @ 1..=MAX_RELAY_RATE_MBIT) => mbit * 125_000,
            Some(_) => {
                return Err(self.err(
                    "interface.relay_rate_mbit",
                    format!("Mbit/s per peer, from 1 to {MAX_RELAY_RATE_MBIT}"),
                ))
            }
        };
        let hosts_file = match raw.hosts_file {
            None => Some(PathBuf::from(DEFAULT_HOSTS_FILE)),
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(self.relative_to_config(&p)),
        };
        Ok(InterfaceConfig {
            private_key,
            private_key_file,
            user: raw.user,
            metrics_address,
            hosts_file,
            name,
            listen_port: raw.listen_port.unwrap_or(DEFAULT_LISTEN_PORT),
            mtu,
            addresses,
            control_socket,
            offload: raw.offload.unwrap_or(true),
            fwmark,
            relay: relay.then_some(relay_rate),
        })
    }

    fn tox(&self, raw: RawTox, interface: &str) -> Result<Option<ToxConfig>, ConfigError> {
        if !raw.enabled {
            return Ok(None);
        }
        let nodes = |field: &str, list: &[String]| -> Result<Vec<ToxNode>, ConfigError> {
            self.each(&format!("tox.{field}"), list, str::parse)
        };
        let mut bootstrap_nodes = nodes("bootstrap_nodes", &raw.bootstrap_nodes)?;
        let file_text = match raw.bootstrap_nodes_file {
            Some(file) => {
                let file = self.relative_to_config(&file);
                Some(std::fs::read_to_string(&file).map_err(|e| {
                    self.err(
                        "tox.bootstrap_nodes_file",
                        format!("cannot read {}: {e}", file.display()),
                    )
                })?)
            }
            // Neither list nor file: the public nodes shipped with veilmesh.
            None if bootstrap_nodes.is_empty() => {
                Some(veilmesh_tox::DEFAULT_BOOTSTRAP_NODES.to_owned())
            }
            None => None,
        };
        if let Some(text) = file_text {
            let lines: Vec<String> = veilmesh_tox::node_lines(&text).map(str::to_owned).collect();
            bootstrap_nodes.extend(nodes("bootstrap_nodes_file", &lines)?);
        }
        Ok(Some(ToxConfig {
            state_file: raw
                .state_file
                .map(|p| self.relative_to_config(&p))
                .unwrap_or_else(|| default_tox_state_file(interface)),
            bootstrap: bootstrap_nodes,
            udp: raw.udp.unwrap_or(true),
            local_discovery: raw.local_discovery,
            port_range: veilmesh_tox::DEFAULT_PORT_RANGE,
            tcp_relays: nodes("tcp_relays", &raw.tcp_relays)?,
            relay_port: raw.relay_port,
        }))
    }

    fn rendezvous(&self, raw: RawRendezvous) -> Result<Option<RendezvousSettings>, ConfigError> {
        if !raw.dht {
            return Ok(None);
        }
        for (i, node) in raw.bootstrap.iter().enumerate() {
            if host_and_port(node).is_none_or(|(_, port)| port == 0) {
                return Err(self.err(
                    format!("rendezvous.bootstrap[{i}]"),
                    format!("`{node}` is not HOST:PORT of a DHT node, like 203.0.113.10:6881"),
                ));
            }
        }
        Ok(Some(RendezvousSettings {
            bootstrap: raw.bootstrap,
            port: raw.port,
        }))
    }

    fn udp(&self, raw: RawUdp) -> Result<UdpSettings, ConfigError> {
        let stun_servers = self.each("udp.stun_servers", &raw.stun_servers, parse_endpoint)?;
        let punch_ttl = raw.punch_ttl.unwrap_or(crate::core::DEFAULT_PUNCH_TTL);
        if punch_ttl == 0 {
            return Err(self.err(
                "udp.punch_ttl",
                "must be at least 1 (hops to leave your own NAT; default 2)",
            ));
        }
        Ok(UdpSettings {
            enabled: raw.enabled.unwrap_or(true),
            stun_servers,
            punch_ttl,
        })
    }

    fn i2p(&self, raw: RawI2p, interface: &str) -> Result<Option<I2pConfig>, ConfigError> {
        if !raw.enabled {
            return Ok(None);
        }
        let sam = raw
            .sam
            .unwrap_or_else(|| vec![DEFAULT_SAM_BRIDGE.to_owned()]);
        if sam.is_empty() {
            return Err(self.err(
                "i2p.sam",
                format!("lists no SAM bridge (default: [\"{DEFAULT_SAM_BRIDGE}\"])"),
            ));
        }
        for (i, bridge) in sam.iter().enumerate() {
            // Datagrams go to the bridge's port - 1.
            if host_and_port(bridge).is_none_or(|(_, port)| port <= 1) {
                return Err(self.err(
                    format!("i2p.sam[{i}]"),
                    format!("`{bridge}` is not HOST:PORT of a SAM bridge, like 127.0.0.1:7656"),
                ));
            }
        }
        let tunnel = |field: &str, value: Option<u8>, default: u8, range: (u8, u8)| {
            let value = value.unwrap_or(default);
            if (range.0..=range.1).contains(&value) {
                Ok(value)
            } else {
                Err(self.err(
                    format!("i2p.{field}"),
                    format!("{value} is outside {}..={}", range.0, range.1),
                ))
            }
        };
        let lengths = (0, MAX_I2P_TUNNEL_LENGTH);
        let quantities = (1, MAX_I2P_TUNNEL_QUANTITY);
        let encryption_types = raw
            .encryption_types
            .unwrap_or_else(|| DEFAULT_I2P_ENCRYPTION.to_owned());
        if encryption_types.is_empty()
            || !encryption_types
                .split(',')
                .all(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()))
        {
            return Err(self.err(
                "i2p.encryption_types",
                format!("`{encryption_types}` is not a list of I2P encryption types like \"4\" or \"4,0\""),
            ));
        }
        Ok(Some(I2pConfig {
            bridges: sam,
            label: interface.to_owned(),
            key_file: raw
                .key_file
                .map(|p| self.relative_to_config(&p))
                .unwrap_or_else(|| default_i2p_key_file(interface)),
            options: SessionOptions {
                inbound_length: tunnel(
                    "inbound_length",
                    raw.inbound_length,
                    DEFAULT_I2P_TUNNEL_LENGTH,
                    lengths,
                )?,
                outbound_length: tunnel(
                    "outbound_length",
                    raw.outbound_length,
                    DEFAULT_I2P_TUNNEL_LENGTH,
                    lengths,
                )?,
                inbound_quantity: tunnel(
                    "inbound_quantity",
                    raw.inbound_quantity,
                    DEFAULT_I2P_TUNNEL_QUANTITY,
                    quantities,
                )?,
                outbound_quantity: tunnel(
                    "outbound_quantity",
                    raw.outbound_quantity,
                    DEFAULT_I2P_TUNNEL_QUANTITY,
                    quantities,
                )?,
                encryption_types,
                inbound_tags: match raw.inbound_tags {
                    None => veilmesh_i2p::sam::DEFAULT_INBOUND_TAGS,
                    Some(n) if (1..=MAX_I2P_INBOUND_TAGS).contains(&n) => n,
                    Some(n) => {
                        return Err(self.err(
                            "i2p.inbound_tags",
                            format!("{n} is outside 1..={MAX_I2P_INBOUND_TAGS}"),
                        ))
                    }
                },
            },
        }))
    }

    /// `enabled`: the transports this node runs, in default order.
    fn peer(
        &self,
        index: usize,
        raw: RawPeer,
        enabled: &[TransportKind],
    ) -> Result<PeerConfig, ConfigError> {
        let provisional = peer_label(index, raw.name.as_deref().unwrap_or(""));
        let public_key = PublicKey::parse(&raw.public_key)
            .map_err(|e| self.err(format!("{provisional}.public_key"), e.to_string()))?;
        // An unnamed peer is called by the start of its key.
        let name = raw.name.unwrap_or_else(|| {
            let hex: String = public_key.0[..4]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("peer-{hex}")
        });
        let label = peer_label(index, &name);
        if !is_dns_label(&name) {
            return Err(self.err(
                format!("{label}.name"),
                format!(
                    "`{name}` cannot be a host name (NAME.veil): use 1-63 letters, digits \
                     and inner hyphens"
                ),
            ));
        }
        let endpoint = raw
            .endpoint
            .map(|text| parse_endpoint(&text).map_err(|m| self.err(format!("{label}.endpoint"), m)))
            .transpose()?;
        let allowed_ips =
            self.each(&format!("{label}.allowed_ips"), &raw.allowed_ips, parse_net)?;
        let tox = raw
            .tox
            .map(|text| {
                text.parse::<ToxId>()
                    .map_err(|e| self.err(format!("{label}.tox"), format!("bad Tox ID: {e}")))
            })
            .transpose()?;
        let i2p = raw
            .i2p
            .map(|text| {
                veilmesh_i2p::parse_peer_address(&text)
                    .map_err(|m| self.err(format!("{label}.i2p"), m))
            })
            .transpose()?;
        let transports = match raw.transports {
            None => enabled.to_vec(),
            Some(list) => {
                let field = format!("{label}.transports");
                if list.is_empty() {
                    return Err(self.err(field, "is empty: the peer could never be reached"));
                }
                let mut kinds: Vec<TransportKind> = Vec::with_capacity(list.len());
                for text in &list {
                    let kind: TransportKind = text.parse().map_err(|m| self.err(&field, m))?;
                    if kinds.contains(&kind) {
                        return Err(self.err(&field, format!("lists {kind} twice")));
                    }
                    if !enabled.contains(&kind) {
                        return Err(self.err(
                            &field,
                            format!("lists {kind}, but [{kind}] is not enabled on this node"),
                        ));
                    }
                    let address_field = match kind {
                        TransportKind::Udp | TransportKind::Relay => None,
                        TransportKind::Tox => tox.is_none().then_some("tox"),
                        TransportKind::I2p => i2p.is_none().then_some("i2p"),
                    };
                    if let Some(missing) = address_field {
                        return Err(self.err(
                            &field,
                            format!("lists {kind}, but the peer has no `{missing}` address"),
                        ));
                    }
                    kinds.push(kind);
                }
                // An address for a transport the peer may not use would be
                // used anyway by something (a Tox friend request shows our
                // IP): refuse it rather than guess.
                for (kind, present, what) in [
                    (TransportKind::Tox, tox.is_some(), "tox ID"),
                    (TransportKind::Udp, endpoint.is_some(), "endpoint"),
                ] {
                    if present && !kinds.contains(&kind) {
                        let field = if kind == TransportKind::Tox {
                            "tox"
                        } else {
                            "endpoint"
                        };
                        return Err(self.err(
                            format!("{label}.{field}"),
                            format!(
                                "is set, but transports = [{}] excludes {kind}; remove the \
                                 {what} or add \"{kind}\" to transports",
                                kinds
                                    .iter()
                                    .map(|k| format!("\"{k}\""))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    }
                }
                kinds
            }
        };
        let allowed_destinations = raw
            .allowed_destinations
            .map(|list| self.each(&format!("{label}.allowed_destinations"), &list, parse_net))
            .transpose()?;
        let accept = raw
            .accept
            .map(|list| {
                self.each(&format!("{label}.accept"), &list, |text| {
                    text.trim().parse::<crate::core::accept::Rule>()
                })
            })
            .transpose()?;
        let exit = raw.exit.unwrap_or(false);
        let default_route = allowed_ips.iter().find(|net| net.prefix_len() == 0);
        match default_route {
            None if exit => {
                return Err(self.err(
                    format!("{label}.exit"),
                    "is true, but allowed_ips has neither 0.0.0.0/0 nor ::/0",
                ))
            }
            Some(net) if !exit && crate::core::spec::is_anonymous(&transports) => {
                return Err(self.err(
                    format!("{label}.allowed_ips"),
                    format!(
                        "{net} makes this I2P-only peer an exit (an outproxy for this node's \
                         traffic); set exit = true if that is meant (README: \"Exit nodes\")"
                    ),
                ))
            }
            _ => {}
        }
        let relay = raw.relay.unwrap_or(false);
        if relay && crate::core::spec::is_anonymous(&transports) {
            return Err(self.err(
                format!("{label}.relay"),
                "an I2P-only peer cannot relay: the peers reached through it would talk to it \
                 over UDP or Tox, and a relay never carries anonymous peers' traffic",
            ));
        }
        if relay && endpoint.is_none() && tox.is_none() {
            return Err(self.err(
                format!("{label}.relay"),
                "is true, but this node has no way to reach the peer first: give it an \
                 endpoint (or a Tox ID)",
            ));
        }
        Ok(PeerConfig {
            name,
            exit,
            relay,
            public_key,
            endpoint,
            tox,
            i2p,
            transports,
            allowed_ips,
            allowed_destinations,
            accept,
            persistent_keepalive: raw.persistent_keepalive.filter(|&s| s > 0),
        })
    }

    /// A secret readable by anyone but its owner is refused: it may already
    /// have leaked, and continuing would hide that.
    fn check_private(&self, path: &Path, field: &str) -> Result<(), ConfigError> {
        use std::os::unix::fs::PermissionsExt;
        let mode = match std::fs::metadata(path) {
            Ok(meta) => meta.permissions().mode(),
            // Unreadable files get their error from the read that follows.
            Err(_) => return Ok(()),
        };
        if mode & 0o077 != 0 {
            return Err(self.err(
                field,
                format!(
                    "{} is accessible by group or others (mode {:04o}); run `chmod 600 {}` \
                     and consider the key compromised if others could read it",
                    path.display(),
                    mode & 0o7777,
                    path.display()
                ),
            ));
        }
        Ok(())
    }

    fn relative_to_config(&self, path: &Path) -> PathBuf {
        match self.file.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }
}

fn peer_label(index: usize, name: &str) -> String {
    if name.is_empty() {
        format!("peer[{index}]")
    } else {
        format!("peer[{index}] \"{name}\"")
    }
}

pub fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// An endpoint written as `HOST:PORT` that could resolve: an IP socket
/// address, or a DNS name (dot-separated labels) and a port. Nothing is
/// looked up.
pub fn is_endpoint_syntax(text: &str) -> bool {
    if text.parse::<SocketAddr>().is_ok() {
        return true;
    }
    host_and_port(text).is_some_and(|(host, _)| {
        host.len() <= 253 && host.trim_end_matches('.').split('.').all(is_dns_label)
    })
}

/// `HOST:PORT` split, with a non-empty host and a numeric port; the host
/// is not resolved.
fn host_and_port(text: &str) -> Option<(&str, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (!host.is_empty()).then_some((host, port))
}

pub fn parse_endpoint(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = host_and_port(text) else {
        return Err(format!(
            "`{text}` is not HOST:PORT (e.g. 198.51.100.7:51820 or [2001:db8::7]:51820)"
        ));
    };
    let mut resolved = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{host}`: {e}"))?;
    resolved
        .next()
        .ok_or_else(|| format!("`{host}` resolves to no address"))
}

/// Accepts `10.0.0.0/8`, a bare address (taken as /32 or /128), and nets with
/// host bits set (masked, as WireGuard does).
fn parse_net(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("`{text}` is not an IP network like 192.168.50.0/24"))
}

/// A prefix two peers both claim: `earlier` and `later` in file order.
#[derive(Debug, PartialEq, Eq)]
struct SharedPrefix {
    net: IpNet,
    earlier: usize,
    later: usize,
}

/// The first prefix (in file order) that a peer claims after an earlier
/// peer did. Nested prefixes are no conflict: the longest one wins.
fn first_shared_prefix<P: IntoIterator<Item = IpNet>>(
    peers: impl IntoIterator<Item = P>,
) -> Option<SharedPrefix> {
    let mut owner: HashMap<IpNet, usize> = HashMap::new();
    for (peer, nets) in peers.into_iter().enumerate() {
        for net in nets {
            let net = net.trunc();
            match owner.get(&net) {
                Some(&earlier) if earlier != peer => {
                    return Some(SharedPrefix {
                        net,
                        earlier,
                        later: peer,
                    })
                }
                _ => {
                    owner.insert(net, peer);
                }
            }
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const KEY_A: &str = "YNNrUH4sD+QQ6SRvm6VWjqSbrhYmJsV7qY5vPHlAo0c=";
    const PUB_B: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
    const PUB_C: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/veilmesh/test.toml"))
    }

    fn with_peers(peers: &str) -> String {
        format!("[interface]\nprivate_key = \"{KEY_A}\"\n{peers}")
    }

    /// 10,000 peers, each with an endpoint and a subnet: start and every
    /// reload validate the whole file, so this must stay far below a
    /// second (it took 12-18 s when overlaps were checked pairwise). A
    /// loose bound: bench/scale.sh gives the number.
    #[test]
    fn ten_thousand_peers_load_and_validate_in_well_under_a_second() {
        use base64::Engine;
        let mut text = with_peers("");
        for i in 0..10_000u32 {
            let mut key = [7u8; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            let [_, _, hi, lo] = i.to_be_bytes();
            text += &format!(
                "[[peer]]\nname = \"p{i}\"\npublic_key = \"{}\"\nendpoint = \"10.{hi}.{lo}.1:51820\"\n\
                 allowed_ips = [\"172.{}.{}.0/24\"]\n",
                base64::engine::general_purpose::STANDARD.encode(key),
                16 + i / 256,
                i % 256
            );
        }
        let started = std::time::Instant::now();
        let config = parse(&text).unwrap();
        let took = started.elapsed();
        assert_eq!(config.peers.len(), 10_000);
        assert_eq!(config.peer_specs().len(), 10_000);
        println!("10,000 peers parsed and validated in {took:?}");
        assert!(took < std::time::Duration::from_secs(1), "{took:?}");
    }

    fn expect_error(text: &str, field: &str, needle: &str) {
        let err = parse(text).expect_err("config must be rejected");
        assert_eq!(err.file, Path::new("/etc/veilmesh/test.toml"));
        assert_eq!(err.field, field, "wrong field in: {err}");
        assert!(err.message.contains(needle), "`{needle}` not in: {err}");
        assert!(
            err.to_string().starts_with("/etc/veilmesh/test.toml: "),
            "{err}"
        );
    }

    #[test]
    fn full_config_parses_with_defaults() {
        let cfg = parse(&with_peers(&format!(
            "[[peer]]\nname = \"site-b\"\npublic_key = \"{PUB_B}\"\nendpoint = \"198.51.100.7:51820\"\n\
             allowed_ips = [\"192.168.50.0/24\"]\npersistent_keepalive = 25\n"
        )))
        .unwrap();
        assert_eq!(cfg.interface.name, "veil0");
        assert_eq!(cfg.interface.listen_port, 51820);
        assert_eq!(cfg.interface.mtu, 1420);
        assert_eq!(
            cfg.interface.control_socket,
            Path::new("/run/veilmesh/veil0.sock")
        );
        let p = &cfg.peers[0];
        assert_eq!(p.endpoint, Some("198.51.100.7:51820".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, Some(25));
        let all: Vec<IpNet> = p.all_allowed_ips().collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].prefix_len(), 128);
    }

    #[test]
    fn bad_base64_is_named() {
        expect_error(
            &with_peers("[[peer]]\nname = \"b\"\npublic_key = \"***\"\n"),
            "peer[0] \"b\".public_key",
            "not valid base64",
        );
    }

    #[test]
    fn wrong_key_length_is_named() {
        expect_error(
            &with_peers("[[peer]]\npublic_key = \"AAAA\"\n"),
            "peer[0].public_key",
            "decodes to 3 bytes, a key is 32",
        );
        expect_error(
            "[interface]\nprivate_key = \"AAAA\"\n",
            "interface.private_key",
            "3 bytes",
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse(&with_peers(
            "[[peer]]\npublic_key = \"x\"\nendpiont = \"1.2.3.4:5\"\n",
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown field `endpiont`"),
            "{err}"
        );
        let err = parse("[interface]\nprivate_key = \"x\"\nlisten = 1\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `listen`"), "{err}");
    }

    #[test]
    fn duplicate_peer_key_or_name_is_named() {
        expect_error(
            &with_peers(&format!(
                "[[peer]]\nname = \"b\"\npublic_key = \"{PUB_B}\"\n[[peer]]\nname = \"c\"\npublic_key = \"{PUB_B}\"\n"
            )),
            "peer[1] \"c\".public_key",
            "already used by peer[0] \"b\"",
        );
        expect_error(
            &with_peers(&format!(
                "[[peer]]\nname = \"b\"\npublic_key = \"{PUB_B}\"\n[[peer]]\nname = \"b\"\npublic_key = \"{PUB_C}\"\n"
            )),
            "peer[1] \"b\".name",
            "duplicate: peer[0] \"b\" has the same name",
        );
    }

    #[test]
    fn own_key_as_peer_is_rejected() {
        let own = PrivateKey::parse(KEY_A).unwrap().public_key();
        expect_error(
            &with_peers(&format!(
                "[[peer]]\nname = \"me\"\npublic_key = \"{own}\"\n"
            )),
            "peer[0] \"me\".public_key",
            "own public key",
        );
    }

    #[test]
    fn two_peers_may_not_own_the_same_prefix() {
        expect_error(
            &with_peers(&format!(
                "[[peer]]\nname = \"b\"\npublic_key = \"{PUB_B}\"\nallowed_ips = [\"192.168.50.0/24\"]\n\
                 [[peer]]\nname = \"c\"\npublic_key = \"{PUB_C}\"\nallowed_ips = [\"192.168.50.7/24\"]\n"
            )),
            "peer[1] \"c\".allowed_ips",
            "192.168.50.0/24 is also routed to peer[0] \"b\"",
        );
        // Nor claim another peer's mesh address.
        let b_mesh = PublicKey::parse(PUB_B).unwrap().mesh_address();
        expect_error(
            &with_peers(&format!(
                "[[peer]]\nname = \"b\"\npublic_key = \"{PUB_B}\"\n\
                 [[peer]]\nname = \"c\"\npublic_key = \"{PUB_C}\"\nallowed_ips = [\"{b_mesh}/128\"]\n"
            )),
            "peer[1] \"c\".allowed_ips",
            "also routed to",
        );
    }

    #[test]
    fn nested_prefixes_are_fine_and_the_longest_wins() {
        let cfg = parse(&with_peers(&format!(
            "[[peer]]\nname = \"b\"\npublic_key = \"{PUB_B}\"\nallowed_ips = [\"192.168.0.0/16\"]\n\
             [[peer]]\nname = \"c\"\npublic_key = \"{PUB_C}\"\nallowed_ips = [\"192.168.50.0/24\"]\n"
        )))
        .unwrap();
        assert_eq!(cfg.peers.len(), 2);
    }

    #[test]
    fn relay_peers_give_every_other_udp_peer_a_relay_path() {
        let b32 = format!("{}q.b32.i2p", "b".repeat(51));
        let pub_d = PrivateKey::parse(KEY_A).unwrap().public_key();
        let text = |r_extra: &str| {
            format!(
                "[interface]\nprivate_key = \"{}\"\nrelay = true\n[i2p]\nenabled = true\n\
                 [[peer]]\nname = \"r\"\npublic_key = \"{PUB_B}\"\nrelay = true\n{r_extra}\n\
                 [[peer]]\nname = \"c\"\npublic_key = \"{PUB_C}\"\n\
                 [[peer]]\nname = \"d\"\npublic_key = \"{pub_d}\"\ni2p = \"{b32}\"\ntransports = [\"i2p\"]\n",
                PrivateKey::generate().unwrap().to_base64()
            )
        };
        let cfg = parse(&text("endpoint = \"198.51.100.7:51820\"")).unwrap();
        assert!(cfg.interface.relay.is_some() && cfg.peers[0].relay);
        let specs = cfg.peer_specs();
        let relay_paths = |i: usize| -> Vec<PeerAddr> {
            specs[i]
                .paths
                .iter()
                .filter(|p| p.kind() == TransportKind::Relay)
                .cloned()
                .collect()
        };
        assert_eq!(relay_paths(0), [], "not through itself");
        assert_eq!(
            relay_paths(1),
            [PeerAddr::Relay(RelayAddr {
                relay: specs[0].public_key.0,
                peer: specs[1].public_key.0
            })]
        );
        assert_eq!(
            specs[1].transports,
            [TransportKind::Udp, TransportKind::Relay, TransportKind::I2p]
        );
        assert_eq!(relay_paths(2), [], "never for an anonymous peer");
        assert_eq!(specs[2].transports, [TransportKind::I2p]);
        expect_error(
            &text(&format!("i2p = \"{b32}\"\ntransports = [\"i2p\"]")),
            "peer[0] \"r\".relay",
            "cannot relay",
        );
        expect_error(&text(""), "peer[0] \"r\".relay", "no way to reach the peer");
    }

    #[test]
    fn a_relay_limits_each_peer_to_its_rate() {
        let relay = |extra: &str| format!("[interface]\nprivate_key = \"{KEY_A}\"\n{extra}\n");
        let cfg = parse(&relay("relay = true")).unwrap();
        assert_eq!(cfg.interface.relay, Some(DEFAULT_RELAY_RATE));
        let cfg = parse(&relay("relay = true\nrelay_rate_mbit = 400")).unwrap();
        assert_eq!(cfg.interface.relay, Some(50_000_000));
        for bad in ["0", "100001"] {
            expect_error(
                &relay(&format!("relay = true\nrelay_rate_mbit = {bad}")),
                "interface.relay_rate_mbit",
                "from 1 to 100000",
            );
        }
        expect_error(
            &relay("relay_rate_mbit = 400"),
            "interface.relay_rate_mbit",
            "offers none",
        );
    }

    #[test]
    fn a_peer_with_a_default_route_is_an_exit() {
        let exit = |interface: &str, body: &str| {
            format!(
                "[interface]\nprivate_key = \"{KEY_A}\"\n{interface}\n[i2p]\nenabled = true\n\
                 [[peer]]\nname = \"x\"\npublic_key = \"{PUB_B}\"\n{body}\n\
                 [[peer]]\nname = \"c\"\npublic_key = \"{PUB_C}\"\nallowed_ips = [\"10.2.0.0/16\"]\n"
            )
        };
        let v4 = "addresses = [\"10.99.0.2/32\"]";
        let cfg = parse(&exit(v4, "allowed_ips = [\"0.0.0.0/0\", \"::/0\"]")).unwrap();
        assert!(!cfg.peers[0].exit, "a UDP peer needs no flag");
        assert_eq!(cfg.interface.fwmark, DEFAULT_FWMARK);
        expect_error(
            &exit("", "allowed_ips = [\"0.0.0.0/0\"]"),
            "peer[0] \"x\".allowed_ips",
            "IPv4 source address",
        );
        assert!(parse(&exit("", "allowed_ips = [\"::/0\"]")).is_ok());
        expect_error(
            &exit(v4, "allowed_ips = [\"10.0.0.0/8\"]\nexit = true"),
            "peer[0] \"x\".exit",
            "neither 0.0.0.0/0 nor ::/0",
        );
        let b32 = format!("{}q.b32.i2p", "b".repeat(51));
        let anonymous =
            format!("i2p = \"{b32}\"\ntransports = [\"i2p\"]\nallowed_ips = [\"::/0\"]");
        expect_error(
            &exit(v4, &anonymous),
            "peer[0] \"x\".allowed_ips",
            "set exit = true if that is meant",
        );
        let cfg = parse(&exit(v4, &format!("{anonymous}\nexit = true"))).unwrap();
        assert!(cfg.peers[0].exit && cfg.peers[0].is_anonymous());
        expect_error(&exit("fwmark = 0", ""), "interface.fwmark", "no mark");
        let cfg = parse(&exit("fwmark = 51821", "")).unwrap();
        assert_eq!(cfg.interface.fwmark, 51821);
    }

    #[test]
    fn bad_endpoint_is_named() {
        for bad in ["198.51.100.7", "198.51.100.7:99999", ":51820", "[::1]:x"] {
            expect_error(
                &with_peers(&format!(
                    "[[peer]]\nname = \"b\"\npublic_key = \"{PUB_B}\"\nendpoint = \"{bad}\"\n"
                )),
                "peer[0] \"b\".endpoint",
                bad,
            );
        }
        let cfg = parse(&with_peers(&format!(
            "[[peer]]\npublic_key = \"{PUB_B}\"\nendpoint = \"[2001:db8::7]:51820\"\n"
        )))
        .unwrap();
        assert_eq!(
            cfg.peers[0].endpoint,
            Some("[2001:db8::7]:51820".parse().unwrap())
        );
    }

    #[test]
    fn unreadable_key_file_is_named() {
        expect_error(
            "[interface]\nprivate_key_file = \"/nonexistent/veil0.key\"\n",
            "interface.private_key_file",
            "cannot read /nonexistent/veil0.key",
        );
    }

    fn write_private(path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn group_or_world_readable_key_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("node.key");
        write_private(&key, KEY_A);
        for mode in [0o640, 0o604, 0o660] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = Config::parse(
                "[interface]\nprivate_key_file = \"node.key\"\n",
                &dir.path().join("v.toml"),
            )
            .unwrap_err();
            assert_eq!(err.field, "interface.private_key_file");
            assert!(err.message.contains(&format!("mode {mode:04o}")), "{err}");
            assert!(err.message.contains("chmod 600"), "{err}");
        }
    }

    #[test]
    fn key_file_is_read_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        write_private(&dir.path().join("node.key"), &format!("{KEY_A}\n"));
        let cfg = Config::parse(
            "[interface]\nprivate_key_file = \"node.key\"\n",
            &dir.path().join("veil0.toml"),
        )
        .unwrap();
        assert_eq!(cfg.interface.private_key.to_base64(), KEY_A);
    }

    #[test]
    fn interface_mistakes_are_named() {
        expect_error("[interface]\n", "interface", "missing private_key_file");
        expect_error(
            &format!("[interface]\nprivate_key = \"{KEY_A}\"\nprivate_key_file = \"k\"\n"),
            "interface",
            "not both",
        );
        expect_error(
            &format!("[interface]\nprivate_key = \"{KEY_A}\"\nname = \"a-very-long-interface\"\n"),
            "interface.name",
            "not a valid interface name",
        );
        expect_error(
            &format!("[interface]\nprivate_key = \"{KEY_A}\"\nmtu = 576\n"),
            "interface.mtu",
            "below 1280",
        );
        expect_error(
            &format!("[interface]\nprivate_key = \"{KEY_A}\"\naddresses = [\"10.10.1.1\"]\n"),
            "interface.addresses[0]",
            "prefix length",
        );
    }

    #[test]
    fn allowed_ips_are_normalised() {
        let cfg = parse(&with_peers(&format!(
            "[[peer]]\npublic_key = \"{PUB_B}\"\nallowed_ips = [\"192.168.50.7/24\", \"10.0.0.1\"]\n"
        )))
        .unwrap();
        assert_eq!(
            cfg.peers[0].allowed_ips,
            vec![
                "192.168.50.0/24".parse::<IpNet>().unwrap(),
                "10.0.0.1/32".parse().unwrap()
            ]
        );
        assert_eq!(cfg.peers[0].name, "peer-8520f009");
    }

    #[test]
    fn peer_names_must_work_as_host_names() {
        for bad in ["site b", "-b", "b-", "b.c", "ü"] {
            expect_error(
                &with_peers(&format!(
                    "[[peer]]\nname = \"{bad}\"\npublic_key = \"{PUB_B}\"\n"
                )),
                &format!("peer[0] \"{bad}\".name"),
                "cannot be a host name",
            );
        }
    }

    #[test]
    fn bad_tox_ids_and_nodes_are_named() {
        expect_error(
            &with_peers(&format!(
                "[[peer]]\nname = \"b\"\npublic_key = \"{PUB_B}\"\ntox = \"12AB\"\n"
            )),
            "peer[0] \"b\".tox",
            "bad Tox ID: a Tox ID is 76 hex characters, this has 4",
        );
        let checksum_off = format!("{}{}", "01".repeat(36), "0001");
        expect_error(
            &with_peers(&format!(
                "[[peer]]\nname = \"b\"\npublic_key = \"{PUB_B}\"\ntox = \"{checksum_off}\"\n"
            )),
            "peer[0] \"b\".tox",
            "checksum",
        );
        expect_error(
            &format!("[interface]\nprivate_key = \"{KEY_A}\"\n[tox]\nenabled = true\nbootstrap_nodes = [\"1.2.3.4:33445\"]\n"),
            "tox.bootstrap_nodes[0]",
            "HOST:PORT:DHT_PUBLIC_KEY",
        );
    }

    #[test]
    fn tox_defaults_to_the_shipped_bootstrap_nodes_only_when_none_are_given() {
        let base = format!("[interface]\nprivate_key = \"{KEY_A}\"\n[tox]\nenabled = true\n");
        let default = parse(&base).unwrap().tox.unwrap();
        assert!(default.bootstrap.len() >= 8);
        assert_eq!(default.state_file, Path::new("/var/lib/veilmesh/veil0.tox"));
        let key = "AB".repeat(32);
        let own = parse(&format!(
            "{base}bootstrap_nodes = [\"198.18.0.3:33445:{key}\"]\n"
        ))
        .unwrap();
        assert_eq!(
            own.tox.unwrap().bootstrap.len(),
            1,
            "the public list must not be added"
        );
    }

    #[test]
    fn garbage_toml_is_an_error_not_a_panic() {
        for text in [
            "",
            "[[[",
            "interface = 3",
            "\u{0}\u{1}",
            "[interface]\nmtu = \"big\"",
        ] {
            assert!(parse(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn i2p_section_has_safe_defaults() {
        let b32 = format!("{}.b32.i2p", "a".repeat(52));
        let text = format!(
            "[interface]\nprivate_key = \"{KEY_A}\"\n[i2p]\nenabled = true\n\
             [[peer]]\npublic_key = \"{PUB_B}\"\ni2p = \"{b32}\"\ntransports = [\"i2p\"]\n\
             [[peer]]\npublic_key = \"{PUB_C}\"\n"
        );
        let config = parse(&text).unwrap();
        let i2p = config.i2p.unwrap();
        assert_eq!(i2p.bridges, vec!["127.0.0.1:7656".to_owned()]);
        assert_eq!(i2p.key_file, Path::new("/var/lib/veilmesh/veil0.i2p"));
        assert_eq!(
            (i2p.options.inbound_length, i2p.options.outbound_length),
            (3, 3)
        );
        assert_eq!(i2p.options.encryption_types, "4");
        assert_eq!(i2p.options.inbound_tags, 4096);
        assert_eq!(config.peers[0].transports, vec![TransportKind::I2p]);
        assert_eq!(config.peers[0].i2p.unwrap().to_string(), b32);
        // Unrestricted peers may use every transport this node runs.
        assert_eq!(
            config.peers[1].transports,
            vec![TransportKind::Udp, TransportKind::I2p]
        );
    }

    #[test]
    fn udp_and_rendezvous_settings_parse_and_mistakes_are_named() {
        let with = |body: &str| format!("[interface]\nprivate_key = \"{KEY_A}\"\n{body}");
        let config = parse(&with(
            "[udp]\nstun_servers = [\"203.0.113.10:3478\"]\npunch_ttl = 3\n\
             [rendezvous]\ndht = true\nbootstrap = [\"dht.example:6881\"]\n",
        ))
        .unwrap();
        assert_eq!(
            config.udp.stun_servers,
            ["203.0.113.10:3478".parse().unwrap()]
        );
        assert_eq!(config.udp.punch_ttl, 3);
        let rendezvous = config.rendezvous.unwrap();
        assert_eq!(rendezvous.bootstrap, ["dht.example:6881"]);
        assert_eq!(rendezvous.port, 0);
        let defaults = parse(&with("")).unwrap();
        assert_eq!(defaults.udp, UdpSettings::default());
        assert_eq!(defaults.rendezvous, None);
        expect_error(&with("[udp]\npunch_ttl = 0"), "udp.punch_ttl", "at least 1");
        expect_error(
            &with("[udp]\nstun_servers = [\"nope\"]"),
            "udp.stun_servers[0]",
            "HOST:PORT",
        );
        for bad in ["dht.example", ":6881", "dht.example:0", "dht.example:x"] {
            expect_error(
                &with(&format!(
                    "[rendezvous]\ndht = true\nbootstrap = [\"{bad}\"]"
                )),
                "rendezvous.bootstrap[0]",
                "HOST:PORT",
            );
        }
    }

    #[test]
    fn i2p_mistakes_are_named() {
        let i2p = |body: &str| {
            format!("[interface]\nprivate_key = \"{KEY_A}\"\n[i2p]\nenabled = true\n{body}")
        };
        expect_error(&i2p("sam = [\"localhost\"]"), "i2p.sam[0]", "HOST:PORT");
        expect_error(&i2p("sam = [\"127.0.0.1:1\"]"), "i2p.sam[0]", "HOST:PORT");
        expect_error(&i2p("sam = []"), "i2p.sam", "no SAM bridge");
        expect_error(&i2p("inbound_length = 8"), "i2p.inbound_length", "0..=7");
        expect_error(
            &i2p("outbound_quantity = 0"),
            "i2p.outbound_quantity",
            "1..=16",
        );
        expect_error(&i2p("inbound_tags = 0"), "i2p.inbound_tags", "1..=65536");
        expect_error(
            &i2p("encryption_types = \"x\""),
            "i2p.encryption_types",
            "encryption types",
        );
        let peer = |body: &str| {
            with_peers(&format!(
                "[[peer]]\nname = \"b\"\npublic_key = \"{PUB_B}\"\n{body}"
            ))
        };
        expect_error(&peer("i2p = \"nope.b32.i2p\""), "peer[0] \"b\".i2p", "b32");
        expect_error(&peer("i2p = \"AAAA\""), "peer[0] \"b\".i2p", "destination");
        expect_error(
            &peer("transports = []"),
            "peer[0] \"b\".transports",
            "empty",
        );
        expect_error(
            &peer("transports = [\"udp\", \"udp\"]"),
            "peer[0] \"b\".transports",
            "twice",
        );
        expect_error(
            &peer("transports = [\"pigeon\"]"),
            "peer[0] \"b\".transports",
            "pigeon",
        );
        expect_error(
            &i2p(&format!(
                "[[peer]]\nname = \"b\"\npublic_key = \"{PUB_B}\"\ntransports = [\"i2p\"]"
            )),
            "peer[0] \"b\".transports",
            "no `i2p` address",
        );
        let b32 = format!("{}q.b32.i2p", "b".repeat(51));
        expect_error(
            &peer(&format!("i2p = \"{b32}\"\ntransports = [\"i2p\"]")),
            "peer[0] \"b\".transports",
            "[i2p] is not enabled",
        );
    }
    /// A valid Tox ID: key 0x01.., nospam 0xAABBCCDD, XOR checksum.
    pub(crate) fn tox_id() -> String {
        let mut bytes = vec![1u8; 32];
        bytes.extend_from_slice(&[0xAA, 0xBB, 0xCC, 0xDD]);
        let sum = [
            bytes.iter().step_by(2).fold(0, |a, b| a ^ b),
            bytes.iter().skip(1).step_by(2).fold(0, |a, b| a ^ b),
        ];
        bytes.extend_from_slice(&sum);
        bytes.iter().map(|b| format!("{b:02X}")).collect()
    }

    /// `join` of a token with a Tox ID, then the README's I2P-only recipe:
    /// the Tox ID would make this node befriend the peer, and a Tox friend
    /// sees our IP. Refused, naming the peer, the field and the fix.
    #[test]
    fn an_address_for_a_transport_the_peer_may_not_use_is_refused() {
        let b32 = format!("{}q.b32.i2p", "b".repeat(51));
        let base = format!(
            "[interface]\nprivate_key = \"{KEY_A}\"\n[tox]\nenabled = true\n[i2p]\nenabled = true\n\
             [[peer]]\nname = \"hidden\"\npublic_key = \"{PUB_B}\"\ni2p = \"{b32}\"\n"
        );
        let tox = tox_id();
        expect_error(
            &format!("{base}tox = \"{tox}\"\ntransports = [\"i2p\"]\n"),
            "peer[0] \"hidden\".tox",
            "remove the tox ID or add \"tox\" to transports",
        );
        expect_error(
            &format!("{base}endpoint = \"198.51.100.7:51820\"\ntransports = [\"i2p\"]\n"),
            "peer[0] \"hidden\".endpoint",
            "remove the endpoint or add \"udp\" to transports",
        );
        // Allowed, the same addresses are fine; an I2P-only peer is
        // anonymous and never a Tox friend.
        let ok = parse(&format!(
            "{base}tox = \"{tox}\"\nendpoint = \"198.51.100.7:51820\"\n\
             [[peer]]\nname = \"c\"\npublic_key = \"{PUB_C}\"\ni2p = \"{b32}\"\ntransports = [\"i2p\"]\n"
        ))
        .unwrap();
        assert!(!ok.peers[0].is_anonymous());
        assert!(ok.peers[1].is_anonymous());
        assert_eq!(ok.contacts(TransportKind::Tox).len(), 1);
    }

    #[test]
    fn udp_can_be_switched_off() {
        let with = |body: &str| format!("[interface]\nprivate_key = \"{KEY_A}\"\n{body}");
        let off = parse(&with(&format!(
            "[udp]\nenabled = false\n[i2p]\nenabled = true\n\
             [[peer]]\nname = \"b\"\npublic_key = \"{PUB_B}\"\ni2p = \"{}q.b32.i2p\"\n",
            "b".repeat(51)
        )))
        .unwrap();
        assert!(!off.udp.enabled);
        assert_eq!(off.peers[0].transports, [TransportKind::I2p]);
        assert!(off.peers[0].is_anonymous());
        expect_error(
            &with("[udp]\nenabled = false\n"),
            "udp.enabled",
            "no transport",
        );
        expect_error(
            &with(&format!(
                "[udp]\nenabled = false\n[tox]\nenabled = true\n\
                 [[peer]]\nname = \"b\"\npublic_key = \"{PUB_B}\"\ntransports = [\"udp\"]\n"
            )),
            "peer[0] \"b\".transports",
            "[udp] is not enabled",
        );
        expect_error(
            &with("[udp]\nenabled = false\n[rendezvous]\ndht = true\n"),
            "rendezvous.dht",
            "[udp] enabled = false",
        );
    }

    #[test]
    fn accept_rules_parse_and_mistakes_are_named() {
        let peer = |body: &str| {
            with_peers(&format!(
                "[[peer]]\nname = \"b\"\npublic_key = \"{PUB_B}\"\n{body}"
            ))
        };
        let cfg = parse(&peer(
            r#"accept = ["icmp", "tcp/22", "udp/53", "tcp/8000-8100"]"#,
        ))
        .unwrap();
        let rules: Vec<String> = cfg.peers[0]
            .accept
            .iter()
            .flatten()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(rules, ["icmp", "tcp/22", "udp/53", "tcp/8000-8100"]);
        assert_eq!(parse(&peer("")).unwrap().peers[0].accept, None);
        // An empty list accepts nothing but answers.
        assert_eq!(
            parse(&peer("accept = []")).unwrap().peers[0].accept,
            Some(vec![])
        );
        expect_error(
            &peer(r#"accept = ["icmp", "tcp/80-22"]"#),
            "peer[0] \"b\".accept[1]",
            "`tcp/80-22`: the range runs backwards",
        );
        expect_error(
            &peer(r#"accept = ["ssh"]"#),
            "peer[0] \"b\".accept[0]",
            "icmp",
        );
    }

    #[test]
    fn allowed_destinations_parse_and_mistakes_are_named() {
        let peer = |body: &str| {
            with_peers(&format!(
                "[[peer]]\nname = \"b\"\npublic_key = \"{PUB_B}\"\n{body}"
            ))
        };
        let cfg = parse(&peer(
            "allowed_destinations = [\"10.10.1.1\", \"192.168.10.0/24\"]",
        ))
        .unwrap();
        assert_eq!(
            cfg.peers[0].allowed_destinations,
            Some(vec![
                "10.10.1.1/32".parse().unwrap(),
                "192.168.10.0/24".parse().unwrap()
            ])
        );
        assert_eq!(
            parse(&peer("")).unwrap().peers[0].allowed_destinations,
            None
        );
        expect_error(
            &peer("allowed_destinations = [\"lan\"]"),
            "peer[0] \"b\".allowed_destinations[0]",
            "not an IP network",
        );
    }

    #[test]
    fn metrics_stay_local_unless_remote_access_is_asked_for() {
        let with = |body: &str| format!("[interface]\nprivate_key = \"{KEY_A}\"\n{body}\n");
        assert!(parse(&with("metrics_address = \"127.0.0.1:9586\"")).is_ok());
        assert!(parse(&with("metrics_address = \"[::1]:9586\"")).is_ok());
        expect_error(
            &with("metrics_address = \"0.0.0.0:9586\""),
            "interface.metrics_address",
            "metrics_allow_remote = true",
        );
        let remote = parse(&with(
            "metrics_address = \"198.51.100.7:9586\"\nmetrics_allow_remote = true",
        ))
        .unwrap();
        assert_eq!(
            remote.interface.metrics_address,
            Some("198.51.100.7:9586".parse().unwrap())
        );
    }
}
