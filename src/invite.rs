//! Invites: a one-line token carrying what a peer needs to add this node,
//! and the config edit that `join` makes with it.
//!
//! Token: `veilmesh1-` + base64url(JSON || first 4 bytes of SHA-256(JSON)).
//! The checksum catches tokens cut or mangled in copy and paste; it is not
//! a signature (the Noise handshake authenticates the key). Unknown JSON
//! fields are ignored, so later versions can add transports.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{is_dns_label, is_endpoint_syntax, Config, ConfigError};
use crate::identity::PublicKey;
use veilmesh_transport::TransportKind;

const PREFIX: &str = "veilmesh1-";
const CHECKSUM_LEN: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    /// Suggested name for the inviting node.
    pub name: String,
    /// Its public key (base64).
    pub public_key: String,
    /// Its UDP endpoint, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Its Tox ID, when it runs the Tox transport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tox: Option<String>,
    /// Its I2P address (`.b32.i2p`), when it runs the I2P transport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub i2p: Option<String>,
    /// The transports the joining side may use to reach it, in order; the
    /// token then carries no address of any other (an I2P-only token has
    /// no IP, endpoint or Tox ID). None: every transport both run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transports: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InviteError {
    #[error("not a veilmesh invite (it should start with `{PREFIX}`)")]
    Prefix,
    #[error("the invite is corrupted: {0}")]
    Corrupted(String),
    #[error("the invite carries a bad {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn checksum(json: &[u8]) -> [u8; CHECKSUM_LEN] {
    let digest = Sha256::digest(json);
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&digest[..CHECKSUM_LEN]);
    out
}

impl Invite {
    pub fn encode(&self) -> String {
        let mut bytes = serde_json::to_vec(self).expect("an invite always serialises");
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum);
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    pub fn decode(token: &str) -> Result<Invite, InviteError> {
        let body = token
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(InviteError::Prefix)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| InviteError::Corrupted(format!("not base64url ({e})")))?;
        if bytes.len() <= CHECKSUM_LEN {
            return Err(InviteError::Corrupted("too short".into()));
        }
        let (json, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if checksum(json) != sum {
            return Err(InviteError::Corrupted(
                "checksum mismatch (was it cut or changed?)".into(),
            ));
        }
        let invite: Invite = serde_json::from_slice(json)
            .map_err(|e| InviteError::Corrupted(format!("unreadable contents ({e})")))?;
        invite.validate()?;
        Ok(invite)
    }

    fn validate(&self) -> Result<(), InviteError> {
        PublicKey::parse(&self.public_key).map_err(|e| InviteError::Invalid {
            field: "public key",
            reason: e.to_string(),
        })?;
        // Checked here, not only by the config after the join: the text
        // goes into the config file, and a token is network input.
        if let Some(endpoint) = self.endpoint.as_deref() {
            if !is_endpoint_syntax(endpoint) {
                return Err(InviteError::Invalid {
                    field: "endpoint",
                    reason: "not HOST:PORT (an IP address or a DNS name, and a port)".into(),
                });
            }
        }
        if let Some(tox) = &self.tox {
            tox.parse::<veilmesh_tox::ToxId>()
                .map_err(|e| InviteError::Invalid {
                    field: "Tox ID",
                    reason: e.to_string(),
                })?;
        }
        if let Some(i2p) = &self.i2p {
            veilmesh_i2p::parse_peer_address(i2p).map_err(|reason| InviteError::Invalid {
                field: "I2P address",
                reason,
            })?;
        }
        if let Some(list) = &self.transports {
            let kinds = parse_transports(list).map_err(|reason| InviteError::Invalid {
                field: "transports",
                reason,
            })?;
            // What the join would write must not be refused by the config:
            // no address for a transport it may not use.
            for (kind, present) in [
                (TransportKind::Udp, self.endpoint.is_some()),
                (TransportKind::Tox, self.tox.is_some()),
            ] {
                if present && !kinds.contains(&kind) {
                    return Err(InviteError::Invalid {
                        field: "transports",
                        reason: format!("the token carries a {kind} address but excludes {kind}"),
                    });
                }
            }
        }
        self.validate_name()
    }

    pub fn validate_name(&self) -> Result<(), InviteError> {
        if !is_dns_label(&self.name) {
            return Err(InviteError::Invalid {
                field: "name",
                reason: format!(
                    "`{}` (use 1-63 letters, digits and inner hyphens)",
                    self.name
                ),
            });
        }
        Ok(())
    }
}

/// Transport names in order, each once.
pub fn parse_transports(list: &[String]) -> Result<Vec<TransportKind>, String> {
    if list.is_empty() {
        return Err("no transport listed".into());
    }
    let mut kinds = Vec::with_capacity(list.len());
    for text in list {
        let kind: TransportKind = text.parse()?;
        if kinds.contains(&kind) {
            return Err(format!("{kind} listed twice"));
        }
        kinds.push(kind);
    }
    Ok(kinds)
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}: not valid TOML, so it cannot be edited: {1}")]
    Unparseable(String, String),
    #[error("this key is already peer `{0}` in the config")]
    AlreadyPeer(String),
    #[error("a peer named `{0}` exists already; choose another with --name")]
    NameTaken(String),
    #[error("the config would become invalid, so it was left alone: {0}")]
    WouldBreak(ConfigError),
}

/// `config_text` with a `[[peer]]` for `invite` appended, keeping comments
/// and layout. The result is validated as a whole before it is returned.
pub fn add_peer(
    config_text: &str,
    file: &Path,
    invite: &Invite,
    name: &str,
) -> Result<String, JoinError> {
    let mut doc: toml_edit::DocumentMut =
        config_text.parse().map_err(|e: toml_edit::TomlError| {
            JoinError::Unparseable(file.display().to_string(), e.to_string())
        })?;
    if let Some(peers) = doc.get("peer").and_then(|p| p.as_array_of_tables()) {
        for peer in peers.iter() {
            let peer_name = peer.get("name").and_then(|v| v.as_str()).unwrap_or("");
            if peer
                .get("public_key")
                .and_then(|v| v.as_str())
                .map(str::trim)
                == Some(invite.public_key.trim())
            {
                return Err(JoinError::AlreadyPeer(peer_name.to_owned()));
            }
            if peer_name == name {
                return Err(JoinError::NameTaken(name.to_owned()));
            }
        }
    }
    let mut table = toml_edit::Table::new();
    table["name"] = toml_edit::value(name);
    table["public_key"] = toml_edit::value(invite.public_key.trim());
    if let Some(endpoint) = &invite.endpoint {
        table["endpoint"] = toml_edit::value(endpoint.as_str());
    }
    if let Some(tox) = &invite.tox {
        table["tox"] = toml_edit::value(tox.as_str());
    }
    if let Some(i2p) = &invite.i2p {
        table["i2p"] = toml_edit::value(i2p.as_str());
    }
    if let Some(transports) = &invite.transports {
        let list: toml_edit::Array = transports.iter().map(String::as_str).collect();
        table["transports"] = toml_edit::value(list);
    }
    table
        .decor_mut()
        .set_prefix(format!("\n# added by `veilmesh join` ({name})\n"));
    match doc.get_mut("peer").and_then(|p| p.as_array_of_tables_mut()) {
        Some(peers) => peers.push(table),
        None => {
            let mut peers = toml_edit::ArrayOfTables::new();
            peers.push(table);
            doc.insert("peer", toml_edit::Item::ArrayOfTables(peers));
        }
    }
    let text = doc.to_string();
    Config::parse(&text, file).map_err(JoinError::WouldBreak)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
    const OWN: &str = "YNNrUH4sD+QQ6SRvm6VWjqSbrhYmJsV7qY5vPHlAo0c=";

    fn invite() -> Invite {
        Invite {
            name: "alpha".into(),
            public_key: KEY.into(),
            endpoint: Some("198.18.0.1:51820".into()),
            tox: None,
            i2p: None,
            transports: None,
        }
    }

    #[test]
    fn tokens_round_trip_and_are_one_url_safe_line() {
        let token = invite().encode();
        assert!(token.starts_with(PREFIX));
        assert!(
            token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)),
            "{token}"
        );
        assert_eq!(Invite::decode(&format!("  {token}\n")).unwrap(), invite());
    }

    #[test]
    fn corrupted_tokens_are_rejected_with_a_reason() {
        let token = invite().encode();
        assert_eq!(Invite::decode("hello"), Err(InviteError::Prefix));
        let cut = &token[..token.len() - 5];
        assert!(matches!(
            Invite::decode(cut),
            Err(InviteError::Corrupted(_))
        ));
        let mut changed: Vec<char> = token.chars().collect();
        let i = PREFIX.len() + 12;
        changed[i] = if changed[i] == 'A' { 'B' } else { 'A' };
        let err = Invite::decode(&changed.into_iter().collect::<String>()).unwrap_err();
        assert!(err.to_string().contains("corrupted"), "{err}");
    }

    #[test]
    fn join_appends_a_peer_and_keeps_comments() {
        let text = format!("# my node\n[interface]\nprivate_key = \"{OWN}\" # keep me\n");
        let out = add_peer(
            &text,
            Path::new("/etc/veilmesh/veil0.toml"),
            &invite(),
            "alpha",
        )
        .unwrap();
        assert!(out.starts_with("# my node\n[interface]\n"));
        assert!(out.contains("# keep me"));
        let cfg = Config::parse(&out, Path::new("x.toml")).unwrap();
        assert_eq!(cfg.peers[0].name, "alpha");
        assert_eq!(
            cfg.peers[0].endpoint,
            Some("198.18.0.1:51820".parse().unwrap())
        );
        assert!(
            matches!(add_peer(&out, Path::new("x"), &invite(), "other"), Err(JoinError::AlreadyPeer(n)) if n == "alpha")
        );
        let mut second = invite();
        second.public_key = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=".into();
        assert!(matches!(
            add_peer(&out, Path::new("x"), &second, "alpha"),
            Err(JoinError::NameTaken(_))
        ));
    }

    #[test]
    fn join_refuses_to_produce_a_broken_config() {
        // Our own key as a peer would be rejected by the config checks.
        let own_pub = crate::identity::PrivateKey::parse(OWN)
            .unwrap()
            .public_key()
            .to_base64();
        let text = format!("[interface]\nprivate_key = \"{OWN}\"\n");
        let me = Invite {
            name: "me".into(),
            public_key: own_pub,
            endpoint: None,
            tox: None,
            i2p: None,
            transports: None,
        };
        assert!(matches!(
            add_peer(&text, Path::new("x"), &me, "me"),
            Err(JoinError::WouldBreak(_))
        ));
    }

    #[test]
    fn tox_ids_travel_in_invites_and_land_in_the_config() {
        let id = crate::config::tests::tox_id();
        let with_tox = Invite {
            tox: Some(id.clone()),
            ..invite()
        };
        let decoded = Invite::decode(&with_tox.encode()).unwrap();
        assert_eq!(decoded, with_tox);
        let text = format!("[interface]\nprivate_key = \"{OWN}\"\n");
        let out = add_peer(&text, Path::new("x.toml"), &decoded, "alpha").unwrap();
        let cfg = Config::parse(&out, Path::new("x.toml")).unwrap();
        assert_eq!(cfg.peers[0].tox.map(|t| t.to_string()), Some(id));
        // A mangled Tox ID inside an intact token is refused too.
        let bad = Invite {
            tox: Some(format!("{}01", "00".repeat(37))),
            ..invite()
        };
        let err = Invite::decode(&bad.encode()).unwrap_err();
        assert!(err.to_string().contains("Tox ID"), "{err}");
    }

    /// The endpoint is the one free-text field of a token and goes into
    /// the config file. 256 quotes in a row once overflowed a counter in
    /// the TOML writer (a panic in debug builds, found by the fuzzer).
    #[test]
    fn an_endpoint_that_is_not_host_and_port_is_refused() {
        for good in [
            "198.51.100.7:51820",
            "[2001:db8::7]:51820",
            "vpn.example.org:51820",
        ] {
            let ok = Invite {
                endpoint: Some(good.into()),
                ..invite()
            };
            assert_eq!(Invite::decode(&ok.encode()), Ok(ok), "{good}");
        }
        let quotes = format!("{}:1", "'".repeat(300));
        for bad in [
            quotes.as_str(),
            "vpn example:1",
            "host:port",
            ":51820",
            "a\"b:1",
            "x\n:1",
        ] {
            let token = Invite {
                endpoint: Some(bad.into()),
                ..invite()
            }
            .encode();
            let err = Invite::decode(&token).unwrap_err();
            assert!(err.to_string().contains("endpoint"), "{bad:?}: {err}");
        }
    }

    /// An anonymous token: an I2P address and `transports = ["i2p"]`, no
    /// endpoint, no Tox ID; join writes exactly that.
    #[test]
    fn an_i2p_only_invite_carries_no_ip_and_joins_as_i2p_only() {
        let b32 = format!("{}q.b32.i2p", "b".repeat(51));
        let hidden = Invite {
            endpoint: None,
            i2p: Some(b32.clone()),
            transports: Some(vec!["i2p".into()]),
            ..invite()
        };
        let token = hidden.encode();
        let decoded = Invite::decode(&token).unwrap();
        assert_eq!(decoded, hidden);
        let text = format!("[interface]\nprivate_key = \"{OWN}\"\n[i2p]\nenabled = true\n");
        let out = add_peer(&text, Path::new("x.toml"), &decoded, "alpha").unwrap();
        let cfg = Config::parse(&out, Path::new("x.toml")).unwrap();
        let peer = &cfg.peers[0];
        assert_eq!(peer.transports, [TransportKind::I2p]);
        assert!(peer.is_anonymous());
        assert_eq!((peer.endpoint, peer.tox), (None, None));
        assert_eq!(peer.i2p.map(|a| a.to_string()), Some(b32));
        // A node without I2P cannot take it: refused, config untouched.
        let plain = format!("[interface]\nprivate_key = \"{OWN}\"\n");
        assert!(matches!(
            add_peer(&plain, Path::new("x.toml"), &decoded, "alpha"),
            Err(JoinError::WouldBreak(_))
        ));
        // A token claiming I2P only but carrying an endpoint is refused.
        let mixed = Invite {
            endpoint: Some("198.18.0.1:51820".into()),
            ..hidden
        };
        let err = Invite::decode(&mixed.encode()).unwrap_err();
        assert!(err.to_string().contains("transports"), "{err}");
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(text in ".{0,200}") {
            let _ = Invite::decode(&text);
            let _ = Invite::decode(&format!("{PREFIX}{text}"));
        }

        #[test]
        fn any_truncation_is_rejected(cut in 1usize..40) {
            let token = invite().encode();
            prop_assert!(Invite::decode(&token[..token.len() - cut]).is_err());
        }
    }
}
