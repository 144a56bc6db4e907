use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use veilmesh::config::{
    default_config_file, default_control_socket, Config, DEFAULT_INTERFACE_NAME,
};
use veilmesh::control;
use veilmesh::identity::{PrivateKey, PublicKey};
use veilmesh::invite::Invite;

/// Mesh VPN daemon: a TUN interface onto a private mesh of peers, each with a
/// stable IPv6 address in fd60:db4d:ddb5::/48 derived from its public key.
#[derive(Parser)]
#[command(name = "veilmesh", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a new private key (WireGuard base64 format).
    Genkey,
    /// Read a private key on stdin, print its public key.
    Pubkey,
    /// Print the mesh address of a public key.
    Addr {
        /// Public key in base64; read from stdin when absent.
        public_key: Option<String>,
    },
    /// Run the daemon in the foreground until SIGINT/SIGTERM.
    Up {
        /// Interface configuration file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// Log filter, e.g. `info`, `debug`, `veilmesh=trace`. RUST_LOG overrides.
        #[arg(long, default_value = "info")]
        log_level: String,
    },
    /// Show the running daemon's state: keys, peers, paths, counters.
    Show {
        /// Output JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Probe a peer through the running daemon, over the path in use (or
    /// every path with --all), and print which transport and endpoint
    /// answered and the round trip. Exits non-zero if nothing answers.
    Ping {
        /// The peer: its name, public key or mesh address.
        peer: String,
        /// Probe every path to the peer, not only the one in use.
        #[arg(long)]
        all: bool,
        /// Rounds of probes, a second apart.
        #[arg(short = 'n', long, default_value_t = 3)]
        count: u32,
        /// Seconds to wait for the answers of a round (at most 5).
        #[arg(long, default_value_t = 2.0)]
        timeout: f64,
        /// Output JSON (one report per round) instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// What works right now, per transport the daemon runs: UDP bound
    /// where, what the STUN servers see, the NAT type; Tox connected to
    /// its network (over UDP or TCP), friends online; the I2P session.
    /// Exits non-zero when a transport is down.
    Netcheck {
        /// Output JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Print this node's Tox ID (creating the Tox identity if needed),
    /// e.g. to put in a peer's config before the first start.
    ToxId {
        #[command(flatten)]
        file: ConfigFile,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Manpage,
    /// Print a one-line invite: this node's key, name, and its addresses
    /// on the transports it runs (UDP endpoint, Tox ID, I2P address).
    Invite {
        #[command(flatten)]
        file: ConfigFile,
        /// The UDP endpoint peers should use (HOST:PORT), when known.
        #[arg(long)]
        endpoint: Option<String>,
        /// The name peers should know this node by (default: the host name;
        /// for a token without udp, a name derived from the key).
        #[arg(long)]
        name: Option<String>,
        /// The transports the joining peer may use, in order, e.g. `i2p`:
        /// the token then carries no address of the others, and `join`
        /// restricts the peer to them. `--transports i2p` makes an
        /// anonymous token: no IP, endpoint, Tox ID or host name.
        #[arg(long, value_delimiter = ',')]
        transports: Option<Vec<String>>,
    },
    /// Add the node behind an invite as a peer (keeping the config's
    /// comments and layout) and reload the running daemon.
    Join {
        /// The token printed by `veilmesh invite` on the other node.
        token: String,
        #[command(flatten)]
        file: ConfigFile,
        /// Name for the new peer (default: the name in the invite).
        #[arg(long)]
        name: Option<String>,
    },
    /// Send the running daemon its config file again (read here, as the
    /// caller, from the path given or the interface's default; never from a
    /// path the daemon names). Unchanged peers keep their sessions; a bad
    /// config is refused. With only --socket, the daemon reads its own file
    /// (as SIGHUP does), with its own permissions.
    Reload {
        #[command(flatten)]
        file: ConfigFile,
        /// Control socket path (default: the config's control_socket).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Run a BitTorrent DHT server node in the foreground, e.g. as the
    /// bootstrap node of a private network's [rendezvous] DHT.
    DhtNode {
        /// IPv4 address to bind.
        #[arg(long, default_value = "0.0.0.0")]
        bind: std::net::Ipv4Addr,
        /// UDP port.
        #[arg(long, default_value_t = 6881)]
        port: u16,
        /// DHT nodes to join through (HOST:PORT); none: start a new network.
        #[arg(long)]
        bootstrap: Vec<String>,
    },
}

/// Which interface configuration file (default: /etc/veilmesh/veil0.toml).
#[derive(clap::Args)]
struct ConfigFile {
    /// The configuration file.
    #[arg(short, long, conflicts_with = "interface")]
    config: Option<PathBuf>,
    /// Interface name (uses /etc/veilmesh/NAME.toml).
    #[arg(short, long)]
    interface: Option<String>,
}

impl ConfigFile {
    fn given(&self) -> bool {
        self.config.is_some() || self.interface.is_some()
    }

    fn path(self) -> PathBuf {
        match (self.config, self.interface) {
            (Some(path), _) => path,
            (None, name) => default_config_file(name.as_deref().unwrap_or(DEFAULT_INTERFACE_NAME)),
        }
    }
}

/// Which running daemon to talk to (default: interface veil0).
#[derive(clap::Args)]
struct Target {
    /// Find the daemon through this interface configuration file.
    #[arg(short, long, conflicts_with_all = ["socket", "interface"])]
    config: Option<PathBuf>,
    /// Control socket path.
    #[arg(long, conflicts_with = "interface")]
    socket: Option<PathBuf>,
    /// Interface name (uses /run/veilmesh/NAME.sock).
    #[arg(short, long)]
    interface: Option<String>,
}

impl Target {
    fn control_socket(self) -> anyhow::Result<PathBuf> {
        Ok(match (self.config, self.socket, self.interface) {
            (Some(path), _, _) => Config::load(&path)?.interface.control_socket,
            (_, Some(socket), _) => socket,
            (_, _, Some(name)) => default_control_socket(&name),
            _ => default_control_socket(DEFAULT_INTERFACE_NAME),
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("veilmesh: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Genkey => {
            let key = PrivateKey::generate()
                .map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
            println!("{}", key.to_base64());
        }
        Command::Pubkey => {
            let key = PrivateKey::parse(&read_stdin()?).context("private key on stdin")?;
            println!("{}", key.public_key());
        }
        Command::Addr { public_key } => {
            let text = match public_key {
                Some(text) => text,
                None => read_stdin()?,
            };
            let key = PublicKey::parse(&text).context("public key")?;
            println!("{}", key.mesh_address());
        }
        Command::Up { config, log_level } => {
            init_logging(&log_level);
            let config = Config::load(&config)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            runtime.block_on(veilmesh::daemon::run(config))?;
        }
        Command::Show { json, target } => {
            let status = control::show(&target.control_socket()?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", control::render(&status));
            }
        }
        Command::Ping {
            peer,
            all,
            count,
            timeout,
            json,
            target,
        } => {
            let socket = target.control_socket()?;
            let timeout_ms = (timeout.clamp(0.01, 5.0) * 1000.0) as u64;
            let mut answered = false;
            let mut reports = Vec::new();
            for round in 0..count.max(1) {
                if round > 0 {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                let report = control::ping(&socket, &peer, all, timeout_ms)?;
                answered |= report.probes.iter().any(|p| p.rtt_ms.is_some());
                if !json {
                    print!("{}", control::render_ping(&report, timeout_ms));
                }
                reports.push(report);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            }
            if !answered {
                std::process::exit(1);
            }
        }
        Command::Netcheck { json, target } => {
            let checks = control::netcheck(&target.control_socket()?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                print!("{}", control::render_netcheck(&checks));
            }
            if checks.iter().any(|c| !c.up) {
                std::process::exit(1);
            }
        }
        Command::ToxId { file } => {
            let path = file.path();
            let config = Config::load(&path)?;
            let tox = config
                .tox
                .with_context(|| format!("{}: [tox] is not enabled", path.display()))?;
            println!(
                "{}",
                veilmesh_tox::load_or_create_identity(&tox.state_file)?
            );
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "veilmesh",
                &mut std::io::stdout(),
            );
        }
        Command::Manpage => {
            clap_mangen::Man::new(Cli::command())
                .section("8")
                .render(&mut std::io::stdout())
                .context("cannot write the man page")?;
        }
        Command::Invite {
            file,
            endpoint,
            name,
            transports,
        } => {
            let invite = make_invite(&file.path(), endpoint, name, transports)?;
            println!("{}", invite.encode());
        }
        Command::Join { token, file, name } => {
            let invite = Invite::decode(&token)?;
            let path = file.path();
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let name = name.unwrap_or_else(|| invite.name.clone());
            let updated = veilmesh::invite::add_peer(&text, &path, &invite, &name)?;
            std::fs::write(&path, updated)
                .with_context(|| format!("cannot write {}", path.display()))?;
            let socket = Config::load(&path)?.interface.control_socket;
            if std::os::unix::net::UnixStream::connect(&socket).is_err() {
                println!(
                    "added peer {name} to {}; the daemon is not running, so start it to connect",
                    path.display()
                );
                return Ok(());
            }
            control::reload(&socket, Some(&path))?;
            println!("added peer {name} to {} and reloaded", path.display());
        }
        Command::DhtNode {
            bind,
            port,
            bootstrap,
        } => {
            let mut builder = mainline::Dht::builder();
            builder.server_mode().bind_address(bind).port(port);
            if bootstrap.is_empty() {
                builder.no_bootstrap();
            } else {
                builder.bootstrap(&bootstrap);
            }
            let _dht = builder
                .build()
                .with_context(|| format!("cannot bind the DHT node to {bind}:{port}"))?;
            println!("DHT node on {bind}:{port}");
            loop {
                std::thread::park();
            }
        }
        Command::Reload { file, socket } => {
            let r = match socket {
                Some(socket) if !file.given() => control::reload(&socket, None)?,
                socket => {
                    let path = file.path();
                    let socket = match socket {
                        Some(socket) => socket,
                        None => Config::load(&path)?.interface.control_socket,
                    };
                    control::reload(&socket, Some(&path))?
                }
            };
            println!(
                "reloaded: {} added, {} removed, {} changed, {} unchanged",
                r.added.len(),
                r.removed.len(),
                r.changed.len(),
                r.unchanged.len()
            );
        }
    }
    Ok(())
}

/// The invite for this node: only the addresses of the transports the
/// joining peer may use (all this node runs, by default).
fn make_invite(
    config_file: &std::path::Path,
    endpoint: Option<String>,
    name: Option<String>,
    transports: Option<Vec<String>>,
) -> anyhow::Result<Invite> {
    use veilmesh_transport::TransportKind;
    let config = Config::load(config_file)?;
    let runs = |kind: &TransportKind| match kind {
        TransportKind::Udp => config.udp.enabled,
        TransportKind::Tox => config.tox.is_some(),
        TransportKind::I2p => config.i2p.is_some(),
        TransportKind::Relay => false,
    };
    let kinds = match &transports {
        Some(list) => veilmesh::invite::parse_transports(list)
            .map_err(|e| anyhow::anyhow!("--transports: {e}"))?,
        None => TransportKind::ALL.into_iter().filter(runs).collect(),
    };
    if let Some(kind) = kinds.iter().find(|k| !runs(k)) {
        anyhow::bail!(
            "--transports lists {kind}, but {kind} is not enabled in {}",
            config_file.display()
        );
    }
    let allows = |kind| kinds.contains(&kind);
    if let Some(endpoint) = &endpoint {
        if !allows(TransportKind::Udp) {
            anyhow::bail!(
                "--endpoint: the token excludes udp (--transports); it would show the peer this IP"
            );
        }
        veilmesh::config::parse_endpoint(endpoint)
            .map_err(|e| anyhow::anyhow!("--endpoint: {e}"))?;
    }
    let public_key = config.interface.private_key.public_key();
    let name = match name {
        Some(name) => name,
        // A host name can identify the machine: not in a token that hides it.
        None if !allows(TransportKind::Udp) => {
            let hex: String = public_key.0[..4]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("peer-{hex}")
        }
        None => {
            host_name_label().context("cannot derive a name from the host name; pass --name")?
        }
    };
    // The Tox ID rides along when this node runs Tox, so the joining
    // side can reach it without a UDP endpoint.
    let tox = match &config.tox {
        Some(tox) if allows(TransportKind::Tox) => {
            Some(veilmesh_tox::load_or_create_identity(&tox.state_file)?.to_string())
        }
        _ => None,
    };
    let i2p = match &config.i2p {
        Some(i2p) if allows(TransportKind::I2p) => {
            let address = veilmesh_i2p::address_in_key_file(&i2p.key_file)?;
            if address.is_none() && transports.is_some() {
                anyhow::bail!(
                    "{} holds no I2P destination yet: start the daemon once (it creates one \
                     through the SAM bridge), then invite",
                    i2p.key_file.display()
                );
            }
            address.map(|a| a.to_string())
        }
        _ => None,
    };
    let invite = Invite {
        name,
        public_key: public_key.to_base64(),
        endpoint,
        tox,
        i2p,
        transports,
    };
    invite
        .validate_name()
        .map_err(|e| anyhow::anyhow!("--name: {e}"))?;
    Ok(invite)
}

/// The host name as a DNS label, for a default invite name.
fn host_name_label() -> anyhow::Result<String> {
    let host = nix::unistd::gethostname()?.to_string_lossy().to_lowercase();
    let first = host.split('.').next().unwrap_or("");
    let label: String = first
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let label = label.trim_matches('-').chars().take(63).collect::<String>();
    anyhow::ensure!(
        veilmesh::config::is_dns_label(&label),
        "host name `{host}` gives no usable name"
    );
    Ok(label)
}

fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .take(4096)
        .read_to_string(&mut text)
        .context("cannot read stdin")?;
    Ok(text)
}

/// Under systemd (JOURNAL_STREAM set) journald adds timestamps itself.
/// Colours only on a terminal (and not with NO_COLOR): a log redirected to
/// a file stays plain text.
fn init_logging(level: &str) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}
