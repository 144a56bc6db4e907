//! Two daemons reachable only over Tox: no UDP endpoints, bootstrapped to a
//! local tox-bootstrapd (Debian's toxcore-utils), LAN discovery off. Needs
//! root.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// tox-bootstrapd in `ns`: a DHT node on 33445/udp and a TCP relay on
/// 33446. Killed on drop.
struct Bootstrapd {
    child: Child,
    pub public_key: String,
}

impl Bootstrapd {
    fn start(ns: &Netns, dir: &std::path::Path) -> Bootstrapd {
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
        Bootstrapd { child, public_key }
    }
}

impl Drop for Bootstrapd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_nodes_reach_each_other_over_tox_only() {
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    let mut br = Bridge::new("tx-br");
    let (a, b, r) = (Netns::new("tx-a"), Netns::new("tx-b"), Netns::new("tx-r"));
    br.attach(&a, "198.18.0.1/24");
    br.attach(&b, "198.18.0.2/24");
    br.attach(&r, "198.18.0.3/24");
    let bootstrapd = Bootstrapd::start(&r, dir.path());
    let (fa, fb) = (
        NodeFiles::new(dir.path(), "a"),
        NodeFiles::new(dir.path(), "b"),
    );
    let tox_section = |files: &NodeFiles| {
        format!(
            "\n[tox]\nenabled = true\nstate_file = \"{}\"\nbootstrap_nodes = [\"198.18.0.3:33445:{}\"]\nlocal_discovery = false\n",
            files.dir.join("veil0.tox").display(),
            bootstrapd.public_key
        )
    };
    // Identities first: each config needs the other's Tox ID.
    fa.write_config("", &tox_section(&fa));
    fb.write_config("", &tox_section(&fb));
    let tox_id = |ns: &Netns, files: &NodeFiles| {
        let out = ns.exec(&[BIN, "tox-id", "--config", files.config.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let (id_a, id_b) = (tox_id(&a, &fa), tox_id(&b, &fb));
    assert_eq!(id_a.len(), 76);
    assert_eq!(tox_id(&a, &fa), id_a, "the Tox ID must be stable");

    let peer = |files: &NodeFiles, name: &str, id: &str| {
        format!("{}tox = \"{id}\"\n", files.peer_block(name, None, &[]))
    };
    fa.write_config("", &(tox_section(&fa) + &peer(&fb, "b", &id_b)));
    fb.write_config("", &(tox_section(&fb) + &peer(&fa, "a", &id_a)));
    let started = Instant::now();
    let mut da = Daemon::start(&a, &fa);
    let _db = Daemon::start(&b, &fb);

    let b_mesh = fb.mesh().to_string();
    loop {
        let (_, got, _) = a.ping(&["-6", "-c", "1", "-W", "1", &b_mesh]);
        if got == 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no reply over Tox within 90 s:\n{}",
            da.log_text()
        );
    }
    println!(
        "first ping reply over Tox {:.1} s after start",
        started.elapsed().as_secs_f64()
    );
    let (sent, got, out) = a.ping(&["-6", "-c", "10", "-i", "0.2", "-W", "2", &b_mesh]);
    assert!(got >= 9, "over Tox: {got}/{sent}\n{out}");
    println!(
        "ping -6 over Tox: {got}/{sent}, {}",
        out.lines().last().unwrap_or("")
    );

    let status = da.show();
    let to_b = status.node.peers.iter().find(|p| p.name == "b").unwrap();
    assert!(
        to_b.path.as_deref().unwrap_or("").starts_with("tox "),
        "{:?}",
        to_b.path
    );
    assert!(
        matches!(
            to_b.path_state.as_deref(),
            Some("friend UDP" | "friend TCP")
        ),
        "{:?}",
        to_b.path_state
    );
    assert!(
        status
            .transports
            .iter()
            .any(|t| t.contains(&format!("tox ID {id_a}"))),
        "{:?}",
        status.transports
    );
    assert!(da.stop().success());
    assert_eq!(tox_id(&a, &fa), id_a, "the Tox ID changed across a restart");
}
