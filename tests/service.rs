//! Running as a systemd service.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::*;

#[test]
fn systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "service") {
            // Point ExecStart/ExecReload at the binary under test: verify
            // checks that the executable exists.
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("/usr/bin/veilmesh", BIN);
            let copy = dir.path().join(path.file_name().unwrap());
            std::fs::write(&copy, text).unwrap();
            let out = run(&["systemd-analyze", "verify", copy.to_str().unwrap()]);
            let said = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{}: {said}", path.display());
            let unit = path.file_name().unwrap().to_str().unwrap();
            let complaints: Vec<&str> = said
                .lines()
                .filter(|l| l.contains(unit.trim_end_matches(".service")))
                .collect();
            assert!(complaints.is_empty(), "{unit}: {complaints:?}");
        }
    }
}

#[test]
fn daemon_tells_systemd_when_the_tun_is_up_and_when_it_stops() {
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::new("sd");
    let files = NodeFiles::new(dir.path(), "n");
    files.write_config("listen_port = 0", "");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut daemon = Daemon::start_with_env(
        &ns,
        &files,
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );

    let mut buf = [0u8; 1024];
    let n = notify.recv(&mut buf).expect("READY=1 within 10 s");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.contains("READY=1"), "{message}");
    assert!(message.contains("STATUS=running on veil0"), "{message}");
    assert!(ns.has_link("veil0"), "READY came before the TUN existed");

    assert!(daemon.stop().success());
    let n = notify.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
}

#[test]
fn prometheus_metrics_are_served_on_the_configured_address() {
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = veth_pair("mx");
    let (fa, fb) = (
        NodeFiles::new(dir.path(), "a"),
        NodeFiles::new(dir.path(), "b"),
    );
    fa.write_config(
        "metrics_address = \"127.0.0.1:9586\"",
        &fb.peer_block("b", Some("198.18.0.2:51820"), &[]),
    );
    fb.write_config("", &fa.peer_block("a", Some("198.18.0.1:51820"), &[]));
    let _da = Daemon::start(&a, &fa);
    let _db = Daemon::start(&b, &fb);
    let (_, got, out) = a.ping6(&fb.mesh().to_string(), 2);
    assert_eq!(got, 2, "{out}");

    let scrape = a.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:9586/metrics",
    ]);
    let text = String::from_utf8_lossy(&scrape.stdout);
    assert!(
        scrape.status.success(),
        "{}",
        String::from_utf8_lossy(&scrape.stderr)
    );
    assert!(
        text.contains("veilmesh_peer_handshakes_total{interface=\"veil0\",peer=\"b\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("veilmesh_peer_path_info{interface=\"veil0\",peer=\"b\",transport=\"udp\",address=\"198.18.0.2:51820\"} 1"),
        "{text}"
    );
    let rx: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("veilmesh_peer_rx_bytes_total{interface=\"veil0\",peer=\"b\"} ")
        })
        .and_then(|v| v.parse().ok())
        .expect("rx bytes sample");
    assert!(rx > 0);
    let other = a.exec(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://127.0.0.1:9586/",
    ]);
    assert_eq!(String::from_utf8_lossy(&other.stdout), "404");

    // Connections that say nothing hold a slot each, a few at most: the
    // rest are closed at once.
    let closed_at_once = a.within(|| {
        use std::io::Read;
        let idle: Vec<std::net::TcpStream> = (0..20)
            .map(|_| std::net::TcpStream::connect("127.0.0.1:9586").unwrap())
            .collect();
        idle.into_iter()
            .filter_map(|mut s| {
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                matches!(s.read(&mut [0u8; 16]), Ok(0)).then_some(())
            })
            .count()
    });
    assert!(
        closed_at_once >= 10,
        "only {closed_at_once} of 20 idle connections closed"
    );
}

fn proc_status_field(pid: nix::unistd::Pid, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

#[test]
fn daemon_drops_to_an_unprivileged_user_and_keeps_only_net_admin() {
    use std::os::unix::fs::PermissionsExt;
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    // The dropped daemon must reach its own socket directory to remove it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (a, b) = veth_pair("pv");
    let (mut fa, fb) = (
        NodeFiles::new(dir.path(), "a"),
        NodeFiles::new(dir.path(), "b"),
    );
    std::fs::set_permissions(&fa.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A socket directory that does not exist yet: the daemon creates it,
    // root's, so its unprivileged self cannot replace another's socket.
    fa.socket = fa.dir.join("run/control.sock");
    // Tox runs (towards an address where nothing answers): its thread must
    // start only after the drop. Its state directory is the daemon user's.
    let tox_dir = fa.dir.join("tox");
    std::fs::create_dir(&tox_dir).unwrap();
    nix::unistd::chown(&tox_dir, Some(65534.into()), Some(65534.into())).unwrap();
    let user = format!(
        "user = \"nobody\"\n\n[tox]\nenabled = true\nstate_file = \"{}/veil0.tox\"\n\
         bootstrap_nodes = [\"198.18.0.2:33445:{}\"]\n",
        tox_dir.display(),
        "AB".repeat(32)
    );
    let user = user.as_str();
    fa.write_config(user, &fb.peer_block("b", Some("198.18.0.2:51820"), &[]));
    fb.write_config("", &fa.peer_block("a", Some("198.18.0.1:51820"), &[]));

    // A key file others can read is refused before anything is set up.
    let key = fa.dir.join("veil0.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = a.exec(&[BIN, "up", "--config", fa.config.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("accessible by group or others (mode 0640)"),
        "{err}"
    );
    assert!(!a.has_link("veil0"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    let mut da = Daemon::start(&a, &fa);
    let _db = Daemon::start(&b, &fb);
    let pid = da.pid();
    let uids = proc_status_field(pid, "Uid");
    assert!(uids.split_whitespace().all(|u| u == "65534"), "Uid: {uids}");
    let gids = proc_status_field(pid, "Gid");
    assert!(gids.split_whitespace().all(|g| g == "65534"), "Gid: {gids}");
    // CAP_NET_ADMIN is bit 12.
    for set in ["CapEff", "CapPrm", "CapBnd", "CapAmb"] {
        assert_eq!(proc_status_field(pid, set), "0000000000001000", "{set}");
    }
    assert_eq!(proc_status_field(pid, "NoNewPrivs"), "1");
    // The network-facing thread started after the drop, not before.
    let log = da.log_text();
    let dropped = log.find("dropped privileges").expect("no drop in the log");
    let tox_up = log
        .find("tox transport running")
        .expect("tox did not start");
    assert!(dropped < tox_up, "Tox started as root:\n{log}");
    let socket_dir = std::fs::metadata(fa.socket.parent().unwrap()).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((socket_dir.uid(), socket_dir.mode() & 0o777), (0, 0o700));
    // Whatever the socket's permissions, only root and the daemon's own
    // user are served.
    std::fs::set_permissions(
        fa.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&fa.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let socket = fa.socket.to_str().unwrap();
    let out = run(&[
        "setpriv",
        "--reuid=65533",
        "--regid=65533",
        "--clear-groups",
        BIN,
        "show",
        "--socket",
        socket,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("refused"), "{err}");
    std::fs::set_permissions(
        fa.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let (_, got, out) = a.ping6(&fb.mesh().to_string(), 2);
    assert_eq!(got, 2, "{out}");

    // Reload as root: the unprivileged daemon still installs the new route.
    fa.write_config(
        user,
        &fb.peer_block("b", Some("198.18.0.2:51820"), &["192.168.77.0/24"]),
    );
    let out = reload_config(&fa.config, &fa.socket);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(a
        .ip(&["route", "show", "192.168.77.0/24"])
        .contains("veil0"));
    // Another instance's config is not this daemon's to load.
    let out = reload_config(&fb.config, &fa.socket);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not "), "{err}");

    assert!(da.stop().success(), "{}", da.log_text());
    assert!(!a.has_link("veil0"));
    assert!(
        !a.ip(&["route", "show"]).contains("192.168.77.0"),
        "route left behind"
    );
    // The dropped daemon cannot remove its socket from root's directory;
    // nothing answers there any more, and the next start replaces it.
    assert!(
        std::os::unix::net::UnixStream::connect(&fa.socket).is_err(),
        "the control socket still answers"
    );
}

#[test]
fn keys_never_reach_the_logs_even_at_trace_level() {
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = veth_pair("lg");
    let (fa, fb) = (
        NodeFiles::new(dir.path(), "a"),
        NodeFiles::new(dir.path(), "b"),
    );
    fa.write_config("", &fb.peer_block("b", Some("198.18.0.2:51820"), &[]));
    fb.write_config("", &fa.peer_block("a", Some("198.18.0.1:51820"), &[]));
    let trace = [("RUST_LOG", "trace")];
    let mut da = Daemon::start_with_env(&a, &fa, &trace);
    let mut db = Daemon::start_with_env(&b, &fb, &trace);
    let (_, got, out) = a.ping6(&fb.mesh().to_string(), 3);
    assert_eq!(got, 3, "{out}");
    let _ = run(&[BIN, "reload", "--socket", fa.socket.to_str().unwrap()]);
    assert!(da.stop().success() && db.stop().success());
    for daemon in [&da, &db] {
        let log = daemon.log_text();
        assert!(
            log.contains("TRACE") || log.contains("DEBUG"),
            "not a verbose log:\n{log}"
        );
        for key in [&fa.key, &fb.key] {
            assert!(
                !log.contains(&key.to_base64()),
                "a private key is in the log"
            );
        }
    }
}
