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
            let text = std::fs::read_to_string(&path).unwrap().replace("/usr/bin/veilmesh", BIN);
            let copy = dir.path().join(path.file_name().unwrap());
            std::fs::write(&copy, text).unwrap();
            let out = run(&["systemd-analyze", "verify", copy.to_str().unwrap()]);
            let said = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{}: {said}", path.display());
            let unit = path.file_name().unwrap().to_str().unwrap();
            let complaints: Vec<&str> = said.lines().filter(|l| l.contains(unit.trim_end_matches(".service"))).collect();
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
    notify.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut daemon = Daemon::start_with_env(&ns, &files, &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]);

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
