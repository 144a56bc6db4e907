//! Invites, joins and peer names. Needs root.

mod common;

use common::*;

#[test]
fn two_nodes_join_each_others_invites_and_reach_each_other_by_name() {
    require_root();
    reap_stale();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = veth_pair("inv");
    let (hosts_a, hosts_b) = (NetnsHosts::new(&a), NetnsHosts::new(&b));
    let (fa, fb) = (
        NodeFiles::new(dir.path(), "a"),
        NodeFiles::new(dir.path(), "b"),
    );
    // No peers at all: everything below comes from invites. The hosts file
    // is the namespace's own /etc/hosts.
    fa.write_config("# alpha's own comment\nhosts_file = \"/etc/hosts\"", "");
    fb.write_config("hosts_file = \"/etc/hosts\"", "");
    let mut da = Daemon::start(&a, &fa);
    let _db = Daemon::start(&b, &fb);

    let invite = |ns: &Netns, files: &NodeFiles, name: &str, endpoint: &str| -> String {
        let out = ns.exec(&[
            BIN,
            "invite",
            "--config",
            files.config.to_str().unwrap(),
            "--name",
            name,
            "--endpoint",
            endpoint,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let token_a = invite(&a, &fa, "alpha", "198.18.0.1:51820");
    let token_b = invite(&b, &fb, "beta", "198.18.0.2:51820");
    println!("invite from alpha: {token_a}");

    // A corrupted token is refused and changes nothing.
    let before = std::fs::read_to_string(&fa.config).unwrap();
    let mut bad = token_b.clone();
    bad.replace_range(20..21, if &bad[20..21] == "x" { "y" } else { "x" });
    let out = a.exec(&[BIN, "join", &bad, "--config", fa.config.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("corrupted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&fa.config).unwrap(), before);

    for (ns, files, token) in [(&a, &fa, &token_b), (&b, &fb, &token_a)] {
        let out = ns.exec(&[
            BIN,
            "join",
            token,
            "--config",
            files.config.to_str().unwrap(),
        ]);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.contains("reloaded"),
            "{said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(std::fs::read_to_string(&fa.config)
        .unwrap()
        .contains("# alpha's own comment"));
    let hosts = std::fs::read_to_string(&hosts_a.file).unwrap();
    assert!(
        hosts.contains(&format!("{}\tbeta.veil", fb.mesh())),
        "{hosts}"
    );

    let (sent, got, out) = a.ping6("beta.veil", 3);
    assert_eq!((sent, got), (3, 3), "alpha -> beta.veil:\n{out}");
    let (sent, got, out) = b.ping6("alpha.veil", 3);
    assert_eq!((sent, got), (3, 3), "beta -> alpha.veil:\n{out}");
    println!("alpha <-> beta by name: ok");

    // Joining the same invite twice is refused.
    let out = a.exec(&[
        BIN,
        "join",
        &token_b,
        "--config",
        fa.config.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already peer `beta`"));

    // Shutdown takes the names out again and leaves the rest of the file.
    assert!(da.stop().success());
    let hosts = std::fs::read_to_string(&hosts_a.file).unwrap();
    assert_eq!(
        hosts, "127.0.0.1\tlocalhost\n",
        "names left behind:\n{hosts}"
    );
    drop(hosts_b);
}
