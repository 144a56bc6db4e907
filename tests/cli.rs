//! The command line as a user meets it.

mod common;

use common::*;

fn veilmesh(args: &[&str], stdin: &str) -> (bool, String, String) {
    run_with_stdin(BIN, args, stdin)
}

#[test]
fn genkey_pubkey_addr_chain() {
    let (ok, private, _) = veilmesh(&["genkey"], "");
    assert!(ok);
    assert_eq!(private.len(), 44);
    let (ok, public, _) = veilmesh(&["pubkey"], &format!("{private}\n"));
    assert!(ok);
    let (ok, addr, _) = veilmesh(&["addr", &public], "");
    assert!(ok);
    assert!(addr.starts_with("fd60:db4d:ddb5:"), "{addr}");
    let (ok, addr_stdin, _) = veilmesh(&["addr"], &public);
    assert!(ok);
    assert_eq!(addr, addr_stdin);
}

#[test]
fn pinned_address_vector_from_the_readme() {
    // RFC 7748 Alice's public key; README.md shows the same derivation by hand.
    let (ok, addr, _) = veilmesh(
        &["addr", "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="],
        "",
    );
    assert!(ok);
    assert_eq!(addr, "fd60:db4d:ddb5:ded5:a4e:fe1b:58bd:dc4f");
}

#[test]
fn keys_are_interchangeable_with_wireguard_tools() {
    let wg_key = must(&["wg", "genkey"]);
    // wireguard-tools is installed by scripts/install-deps.sh.
    let (ok, wg_pub, _) = run_with_stdin("wg", &["pubkey"], &wg_key);
    assert!(ok);
    let (ok, ours, _) = veilmesh(&["pubkey"], &wg_key);
    assert!(ok);
    assert_eq!(ours, wg_pub);
    // And a veilmesh key works with wg.
    let (_, private, _) = veilmesh(&["genkey"], "");
    let (_, public, _) = veilmesh(&["pubkey"], &private);
    let (_, wg_view, _) = run_with_stdin("wg", &["pubkey"], &private);
    assert_eq!(wg_view, public);
}

#[test]
fn bad_keys_on_the_command_line_are_explained() {
    let (ok, _, err) = veilmesh(&["pubkey"], "not a key");
    assert!(!ok);
    assert!(
        err.contains("private key on stdin") && err.contains("base64"),
        "{err}"
    );
    let (ok, _, err) = veilmesh(&["addr", "AAAA"], "");
    assert!(!ok);
    assert!(err.contains("3 bytes, a key is 32"), "{err}");
}

#[test]
fn up_with_a_bad_config_names_file_and_field_and_creates_nothing() {
    require_root();
    reap_stale();
    let ns = Netns::new("cli-bad");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("veil0.toml");
    std::fs::write(
        &path,
        "[interface]\nprivate_key = \"YNNrUH4sD+QQ6SRvm6VWjqSbrhYmJsV7qY5vPHlAo0c=\"\n\
         [[peer]]\nname = \"b\"\npublic_key = \"hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=\"\n\
         endpoint = \"198.51.100.7\"\n",
    )
    .unwrap();
    let out = ns.exec(&[BIN, "up", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}: peer[0] \"b\".endpoint", path.display())),
        "{err}"
    );
    assert!(!ns.has_link("veil0"));
}

#[test]
fn show_without_a_daemon_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let (ok, _, err) = veilmesh(&["show", "--socket", socket.to_str().unwrap()], "");
    assert!(!ok);
    assert!(err.contains("is `veilmesh up` running?"), "{err}");
}

#[test]
fn shipped_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("veil0.key");
    std::fs::write(&key, "YNNrUH4sD+QQ6SRvm6VWjqSbrhYmJsV7qY5vPHlAo0c=\n").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/veil0.toml.example"
    ))
    .unwrap()
    .replace("/etc/veilmesh/veil0.key", key.to_str().unwrap());
    let config = veilmesh::config::Config::parse(&example, &dir.path().join("veil0.toml")).unwrap();
    assert_eq!(config.peers.len(), 1);
    assert_eq!(config.interface.name, "veil0");
}

#[test]
fn man_page_and_completions_come_from_the_cli_definition() {
    let (ok, man, _) = veilmesh(&["manpage"], "");
    assert!(ok);
    assert!(
        man.contains(".TH veilmesh 8"),
        "{}",
        &man[..200.min(man.len())]
    );
    for sub in ["genkey", "pubkey", "addr", "up", "show", "reload"] {
        assert!(man.contains(sub), "man page lacks {sub}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let (ok, text, _) = veilmesh(&["completions", shell], "");
        assert!(ok && text.contains("reload"), "{shell} completions");
    }
}

/// `invite --transports i2p`: a token with this node's I2P address and no
/// IP, endpoint, Tox ID or host name; joined, the peer is I2P-only.
#[test]
fn an_anonymous_invite_shows_nothing_but_the_i2p_address() {
    use veilmesh::invite::Invite;
    let dir = tempfile::tempdir().unwrap();
    let files = NodeFiles::new(dir.path(), "a");
    // A destination as a bridge generates it (Ed25519 key certificate),
    // with its private part.
    let mut blob = vec![3u8; 384];
    blob.extend_from_slice(&[5, 0, 4, 0, 7, 0, 0]);
    blob.extend_from_slice(&[9u8; 288]);
    let key_file = files.dir.join("veil0.i2p");
    std::fs::write(&key_file, veilmesh_i2p::dest::I2P_BASE64.encode(&blob)).unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let tox_state = files.dir.join("veil0.tox");
    files.write_config(
        "",
        &format!(
            "[tox]\nenabled = true\nstate_file = \"{}\"\nbootstrap_nodes = []\ntcp_relays = [\"198.18.0.3:33446:{}\"]\n\
             [i2p]\nenabled = true\nkey_file = \"{}\"\n",
            tox_state.display(),
            "AB".repeat(32),
            key_file.display()
        ),
    );
    let config = files.config.to_str().unwrap();
    let (ok, token, err) = veilmesh(&["invite", "--config", config, "--transports", "i2p"], "");
    assert!(ok, "{err}");
    let invite = Invite::decode(&token).unwrap();
    assert_eq!(invite.transports, Some(vec!["i2p".to_owned()]));
    assert!(invite
        .i2p
        .as_deref()
        .is_some_and(|a| a.ends_with(".b32.i2p")));
    assert_eq!((invite.endpoint, invite.tox), (None, None));
    assert!(invite.name.starts_with("peer-"), "{}", invite.name);
    // No Tox identity was even created for it.
    assert!(!tox_state.exists());
    // An endpoint would show the IP: refused.
    let (ok, _, err) = veilmesh(
        &[
            "invite",
            "--config",
            config,
            "--transports",
            "i2p",
            "--endpoint",
            "198.18.0.1:51820",
        ],
        "",
    );
    assert!(!ok && err.contains("--endpoint"), "{err}");
    // Without --transports the token has everything this node runs.
    let (ok, token, err) = veilmesh(&["invite", "--config", config, "--name", "alpha"], "");
    assert!(ok, "{err}");
    let full = Invite::decode(&token).unwrap();
    assert!(full.tox.is_some() && full.i2p.is_some() && full.transports.is_none());
}
