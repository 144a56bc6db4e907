//! Test harness: real network namespaces, veth links, bridges and real
//! veilmesh daemons. Everything created here is torn down on drop, also when
//! a test fails (panics unwind through the guards).
//!
//! Namespaces are named `vmt-<pid>-<role>`; leftovers of a test process that
//! was killed outright are removed by the next run (`reap_stale`).

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use veilmesh::control::{self, DaemonStatus};
use veilmesh::core::PeerStatus;
use veilmesh::identity::PrivateKey;

pub const BIN: &str = env!("CARGO_BIN_EXE_veilmesh");
const PREFIX: &str = "vmt-";

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, TUN devices); CI runs it as root"
    );
}

/// Runs a command, returning its output; panics only if it cannot start.
pub fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

/// Runs a command that must succeed.
pub fn must(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deletes namespaces left by test processes that no longer exist.
pub fn reap_stale() {
    let list = must(&["ip", "netns", "list"]);
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: i32 = rest
            .split('-')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if pid > 0 && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `role` must be unique within the test binary (tests run in parallel).
    pub fn new(role: &str) -> Netns {
        let name = format!("{PREFIX}{}-{role}", std::process::id());
        let _ = run(&["ip", "netns", "del", &name]);
        must(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // No namespace of ours may reach anything outside the test topology.
        ns.sysctl("net.ipv6.conf.all.accept_ra", "0");
        ns
    }

    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        must(&full)
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Starts a command in the namespace without waiting for it.
    pub fn spawn(&self, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {args:?}: {e}"))
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        let out = self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
        assert!(
            out.status.success(),
            "sysctl {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// ping; returns (transmitted, received, full output).
    pub fn ping(&self, args: &[&str]) -> (u32, u32, String) {
        let mut full = vec!["ping", "-n"];
        full.extend_from_slice(args);
        ping_result(self.exec(&full))
    }
}

/// Median RTT in ms of ping's reply lines.
pub fn rtt_median_ms(ping_output: &str) -> f64 {
    let mut rtts: Vec<f64> = ping_output
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect();
    rtts.sort_by(f64::total_cmp);
    rtts.get(rtts.len() / 2).copied().unwrap_or(f64::NAN)
}

/// (transmitted, received, full output) of a finished ping.
pub fn ping_result(out: Output) -> (u32, u32, String) {
    {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stats = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .map(|l| {
                let nums: Vec<u32> = l
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|w| w.parse().ok())
                    .collect();
                (
                    nums.first().copied().unwrap_or(0),
                    nums.get(1).copied().unwrap_or(0),
                )
            })
            .unwrap_or((0, 0));
        (stats.0, stats.1, text)
    }
}

impl Netns {
    /// `count` pings over IPv6, 0.2 s apart, each waiting up to 2 s.
    pub fn ping6(&self, target: &str, count: u32) -> (u32, u32, String) {
        let count = count.to_string();
        self.ping(&["-6", "-c", &count, "-i", "0.2", "-W", "2", target])
    }

    /// Runs `f` on a thread inside this namespace: sockets it opens
    /// belong to the namespace (and keep working once it returns them).
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.within_background(f)
            .join()
            .expect("thread inside the namespace panicked")
    }

    /// `within`, without waiting for `f`: join the handle for its result.
    pub fn within_background<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
    }

    pub fn has_link(&self, name: &str) -> bool {
        run(&["ip", "-n", &self.name, "link", "show", name])
            .status
            .success()
    }

    /// Reads a counter of an interface inside the namespace.
    pub fn link_stat(&self, link: &str, stat: &str) -> u64 {
        let out = self.exec(&["cat", &format!("/sys/class/net/{link}/statistics/{stat}")]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// A private /etc/hosts for one namespace: `ip netns exec` bind-mounts
/// /etc/netns/NAME/hosts over /etc/hosts. Removed on drop.
pub struct NetnsHosts {
    dir: PathBuf,
    pub file: PathBuf,
}

impl NetnsHosts {
    /// Create before starting anything in `ns` that should see it.
    pub fn new(ns: &Netns) -> NetnsHosts {
        let dir = Path::new("/etc/netns").join(&ns.name);
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hosts");
        fs::write(&file, "127.0.0.1\tlocalhost\n").unwrap();
        NetnsHosts { dir, file }
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Links two namespaces with a veth pair.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    must(&[
        "ip", "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// Two namespaces `TAG-a` (198.18.0.1) and `TAG-b` (198.18.0.2) on one veth.
pub fn veth_pair(tag: &str) -> (Netns, Netns) {
    let (a, b) = (
        Netns::new(&format!("{tag}-a")),
        Netns::new(&format!("{tag}-b")),
    );
    veth(&a, "eth0", &b, "eth0");
    a.ip(&["addr", "add", "198.18.0.1/24", "dev", "eth0"]);
    b.ip(&["addr", "add", "198.18.0.2/24", "dev", "eth0"]);
    (a, b)
}

/// Runs `program` with `stdin` written to it; (success, stdout trimmed, stderr).
pub fn run_with_stdin(program: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A bridge namespace hosts `br0`; `attach` plugs a host into it.
pub struct Bridge {
    pub ns: Netns,
    ports: usize,
}

impl Bridge {
    pub fn new(role: &str) -> Bridge {
        let ns = Netns::new(role);
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["link", "set", "br0", "up"]);
        Bridge { ns, ports: 0 }
    }

    /// Gives `host` an `eth0` on the bridge with `cidr`.
    pub fn attach(&mut self, host: &Netns, cidr: &str) {
        self.ports += 1;
        let port = format!("p{}", self.ports);
        veth(&self.ns, &port, host, "eth0");
        self.ns.ip(&["link", "set", &port, "master", "br0"]);
        host.ip(&["addr", "add", cidr, "dev", "eth0"]);
    }
}

/// A node's identity and files.
pub struct NodeFiles {
    pub key: PrivateKey,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
}

impl NodeFiles {
    pub fn new(dir: &Path, name: &str) -> NodeFiles {
        let key = PrivateKey::generate().expect("randomness");
        let dir = dir.join(name);
        fs::create_dir_all(&dir).unwrap();
        NodeFiles {
            config: dir.join("veil0.toml"),
            socket: dir.join("control.sock"),
            key,
            dir,
        }
    }

    pub fn public(&self) -> String {
        self.key.public_key().to_base64()
    }

    pub fn mesh(&self) -> Ipv6Addr {
        self.key.public_key().mesh_address()
    }

    /// Writes the config: `interface_extra` lines go into [interface],
    /// `peers` is appended verbatim.
    pub fn write_config(&self, interface_extra: &str, peers: &str) {
        let key_file = self.dir.join("veil0.key");
        fs::write(&key_file, format!("{}\n", self.key.to_base64())).unwrap();
        fs::set_permissions(
            &key_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        // Never the machine's real /etc/hosts: a private file unless the
        // test chooses one.
        let mut hosts = if interface_extra.contains("hosts_file") {
            String::new()
        } else {
            format!("hosts_file = \"{}\"\n", self.dir.join("hosts").display())
        };
        // Explicit, so a machine with the package's `veilmesh` user runs the
        // tests the same way; the privilege test sets its own.
        if !interface_extra.contains("user") {
            hosts += "user = \"root\"\n";
        }
        let text = format!(
            "[interface]\nprivate_key_file = \"{}\"\ncontrol_socket = \"{}\"\n{hosts}{interface_extra}\n{peers}",
            key_file.display(),
            self.socket.display()
        );
        fs::write(&self.config, text).unwrap();
    }

    /// A `[[peer]]` block describing this node.
    pub fn peer_block(&self, name: &str, endpoint: Option<&str>, allowed: &[&str]) -> String {
        let mut s = format!(
            "[[peer]]\nname = \"{name}\"\npublic_key = \"{}\"\n",
            self.public()
        );
        if let Some(e) = endpoint {
            s += &format!("endpoint = \"{e}\"\n");
        }
        if !allowed.is_empty() {
            let list: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
            s += &format!("allowed_ips = [{}]\n", list.join(", "));
        }
        s
    }
}

/// `veilmesh reload` as root, sending `config` (the file named on the
/// command line) to the daemon at `socket`.
pub fn reload_config(config: &Path, socket: &Path) -> Output {
    run(&[
        BIN,
        "reload",
        "--config",
        config.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
    ])
}

/// A running `veilmesh up`, killed on drop if still alive.
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon in `ns` and waits until its control socket answers.
    pub fn start(ns: &Netns, files: &NodeFiles) -> Daemon {
        Daemon::start_with_env(ns, files, &[])
    }

    pub fn start_with_env(ns: &Netns, files: &NodeFiles, env: &[(&str, &str)]) -> Daemon {
        let log = files.dir.join("daemon.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, BIN, "up", "--config"])
            .arg(&files.config)
            .args(["--log-level", "debug"])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start veilmesh");
        let mut daemon = Daemon {
            child,
            socket: files.socket.clone(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if control::show(&daemon.socket).is_ok() {
                return daemon;
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!(
                    "veilmesh exited at start ({status}):\n{}",
                    daemon.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "veilmesh did not answer in 10 s:\n{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn show(&self) -> DaemonStatus {
        control::show(&self.socket).expect("show")
    }

    /// The daemon's view of one peer, by name.
    pub fn peer(&self, name: &str) -> PeerStatus {
        self.show()
            .node
            .peers
            .into_iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no peer {name} in show"))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM and wait (at most 10 s) for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let _ = kill(self.pid(), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "veilmesh ignored SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash: nothing gets cleaned up.
    pub fn stop_hard(&mut self) -> ExitStatus {
        let _ = kill(self.pid(), Signal::SIGKILL);
        self.child.wait().expect("wait")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Pings `target` from `ns` once a second until it answers; returns the
/// time since `since`. Fails with the daemon's log after `limit`.
pub fn first_reply(
    ns: &Netns,
    target: &str,
    since: Instant,
    limit: Duration,
    daemon: &Daemon,
) -> Duration {
    loop {
        let (_, got, _) = ns.ping(&["-6", "-c", "1", "-W", "1", target]);
        if got == 1 {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "no reply from {target} within {limit:?}:\n{}",
            daemon.log_text()
        );
    }
}

/// iperf3 from `client` to a one-off server in `server` on `address`,
/// with `args` for the client; its JSON report, or the client's output
/// when it failed.
pub fn iperf_json(
    client: &Netns,
    server: &Netns,
    address: &str,
    args: &[&str],
) -> Result<serde_json::Value, String> {
    let mut listener = ChildGuard(server.spawn(&["iperf3", "-s", "-1", "-B", address]));
    std::thread::sleep(Duration::from_millis(500));
    let mut full = vec!["iperf3", "-c", address, "-J"];
    full.extend_from_slice(args);
    let out = client.exec(&full);
    let _ = listener.0.kill();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(text);
    }
    serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
}

/// iperf3 TCP from `client` to a server in `server` on `address`; returns
/// the received Mbit/s.
pub fn iperf_mbit(client: &Netns, server: &Netns, address: &str, seconds: u32) -> f64 {
    let report = iperf_json(client, server, address, &["-t", &seconds.to_string()])
        .unwrap_or_else(|e| panic!("iperf3 to {address} failed:\n{e}"));
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("iperf3 JSON has end.sum_received.bits_per_second")
        / 1e6
}

/// The Mbit/s of each one-second interval of an iperf3 report.
pub fn iperf_intervals(report: &serde_json::Value) -> Vec<f64> {
    report["intervals"]
        .as_array()
        .map(|intervals| {
            intervals
                .iter()
                .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
                .map(|bits| bits / 1e6)
                .collect()
        })
        .unwrap_or_default()
}

/// tox-bootstrapd in `ns`: a DHT node on 33445/udp and a TCP relay on
/// 33446. Killed on drop.
pub struct Bootstrapd {
    _child: ChildGuard,
    pub public_key: String,
}

impl Bootstrapd {
    pub fn start(ns: &Netns, dir: &std::path::Path) -> Bootstrapd {
        let conf = dir.join("bootstrapd.conf");
        std::fs::write(
            &conf,
            format!(
                "port = 33445\nkeys_file_path = \"{0}/bootstrapd.keys\"\npid_file_path = \"{0}/bootstrapd.pid\"\n\
                 enable_ipv6 = false\nenable_ipv4_fallback = true\nenable_lan_discovery = false\n\
                 enable_tcp_relay = true\ntcp_relay_ports = [33446]\nenable_motd = false\nbootstrap_nodes = ()\n",
                dir.display()
            ),
        )
        .unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "tox-bootstrapd", "--config"])
            .arg(&conf)
            .args(["--foreground", "--log-backend", "stdout"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("tox-bootstrapd (toxcore-utils) is installed by scripts/install-deps.sh");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let public_key = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| l.split("Public Key: ").nth(1).map(|k| k.trim().to_owned()))
            .expect("tox-bootstrapd printed no public key");
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Bootstrapd {
            _child: ChildGuard(child),
            public_key,
        }
    }
}

/// A child process killed (and reaped) on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node's Tox ID, as `veilmesh tox-id` prints it.
pub fn tox_id(ns: &Netns, files: &NodeFiles) -> String {
    let out = ns.exec(&[BIN, "tox-id", "--config", files.config.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `veilmesh netcheck` against the daemon of `files`: (exit success,
/// stdout and stderr).
pub fn veilmesh_netcheck(files: &NodeFiles) -> (bool, String) {
    let socket = files.socket.to_str().unwrap();
    success_and_text(&run(&[BIN, "netcheck", "--socket", socket]))
}

/// (exit success, stdout then stderr) of a finished command.
pub fn success_and_text(out: &Output) -> (bool, String) {
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `veilmesh ping PEER EXTRA...` against the daemon of `files`: (exit
/// success, stdout).
pub fn veilmesh_ping(files: &NodeFiles, peer: &str, extra: &[&str]) -> (bool, String) {
    let socket = files.socket.to_str().unwrap();
    let mut args = vec![BIN, "ping", peer, "--socket", socket, "-n", "1"];
    args.extend_from_slice(extra);
    success_and_text(&run(&args))
}
