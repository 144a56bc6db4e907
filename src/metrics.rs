//! Prometheus text exposition of `veilmesh show`, served on a local address
//! when `[interface] metrics_address` is set.

use std::fmt::Write as _;

use crate::control::DaemonStatus;

/// Label values are config text (peer names): escape what the format needs.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(status: &DaemonStatus) -> String {
    let mut out = String::new();
    let iface = label(&status.interface);
    let node = &status.node;
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP veilmesh_{name} {help}");
        let _ = writeln!(out, "# TYPE veilmesh_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(
                out,
                "veilmesh_{name}{{interface=\"{iface}\"{labels}}} {value}"
            );
        }
    };
    let per_peer = |f: &dyn Fn(&crate::core::PeerStatus) -> u64| -> Vec<(String, u64)> {
        node.peers
            .iter()
            .map(|p| (format!(",peer=\"{}\"", label(&p.name)), f(p)))
            .collect()
    };
    family(
        "peer_rx_bytes_total",
        "counter",
        "Bytes received from the peer.",
        per_peer(&|p| p.rx_bytes),
    );
    family(
        "peer_tx_bytes_total",
        "counter",
        "Bytes sent to the peer.",
        per_peer(&|p| p.tx_bytes),
    );
    family(
        "peer_handshakes_total",
        "counter",
        "Noise handshakes completed.",
        per_peer(&|p| p.counters.handshakes),
    );
    family(
        "peer_seconds_since_handshake",
        "gauge",
        "Age of the last handshake (absent before the first).",
        node.peers
            .iter()
            .filter_map(|p| {
                Some((
                    format!(",peer=\"{}\"", label(&p.name)),
                    p.seconds_since_handshake?,
                ))
            })
            .collect(),
    );
    let mut drops = Vec::new();
    for p in &node.peers {
        let c = &p.counters;
        for (reason, value) in [
            ("spoofed_source", c.spoofed_source),
            ("no_route", c.no_route),
            ("oversize", c.oversize),
            ("bad_packet", c.bad_packet),
            ("wrong_path", c.wrong_path),
            ("refused_destination", c.refused_destination),
            ("refused_source", c.refused_source),
            ("not_accepted", c.not_accepted),
        ] {
            drops.push((
                format!(",peer=\"{}\",reason=\"{reason}\"", label(&p.name)),
                value,
            ));
        }
    }
    family(
        "peer_dropped_packets_total",
        "counter",
        "Packets dropped for a peer, by reason.",
        drops,
    );
    family(
        "peer_path_info",
        "gauge",
        "The path in use to the peer (1), by transport and address.",
        node.peers
            .iter()
            .filter_map(|p| {
                let path = p.path.as_deref()?;
                let (transport, address) = path.split_once(' ').unwrap_or((path, ""));
                Some((
                    format!(
                        ",peer=\"{}\",transport=\"{}\",address=\"{}\"",
                        label(&p.name),
                        label(transport),
                        label(address)
                    ),
                    1,
                ))
            })
            .collect(),
    );
    let c = &node.counters;
    family(
        "dropped_packets_total",
        "counter",
        "Packets not attributable to a configured peer, by reason.",
        [
            ("unknown_peer_handshake", c.unknown_peer_handshakes),
            ("bad_packet", c.bad_packet),
            ("no_route", c.no_route),
            ("bad_tun_packet", c.bad_tun_packet),
            ("multicast", c.multicast_ignored),
            ("send_error", c.send_errors),
            ("rate_limited", c.rate_limited),
            ("unknown_sender", c.unknown_sender),
            ("relay_refused", c.relay_refused),
        ]
        .into_iter()
        .map(|(reason, v)| (format!(",reason=\"{reason}\""), v))
        .collect(),
    );
    family(
        "relayed_datagrams_total",
        "counter",
        "Datagrams this node forwarded between two of its peers (as their relay).",
        vec![(String::new(), c.relayed)],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{NodeCounters, NodeStatus, PeerCounters, PeerStatus};

    fn status(name: &str) -> DaemonStatus {
        DaemonStatus {
            interface: "veil0".into(),
            config_file: "/etc/veilmesh/veil0.toml".into(),
            transports: vec![],
            running: vec![],
            node: NodeStatus {
                public_key: "k".into(),
                mesh_address: "fd60:db4d:ddb5::1".parse().unwrap(),
                counters: NodeCounters {
                    unknown_peer_handshakes: 3,
                    ..Default::default()
                },
                peers: vec![PeerStatus {
                    paths: Vec::new(),
                    transports: vec!["udp".into()],
                    name: name.into(),
                    public_key: "p".into(),
                    mesh_address: "fd60:db4d:ddb5::2".parse().unwrap(),
                    allowed_ips: vec![],
                    path: Some("udp 198.18.0.2:51820".into()),
                    path_state: None,
                    seconds_since_handshake: Some(7),
                    rx_bytes: 1000,
                    tx_bytes: 2000,
                    accept: None,
                    counters: PeerCounters {
                        spoofed_source: 4,
                        handshakes: 2,
                        ..Default::default()
                    },
                }],
            },
        }
    }

    #[test]
    fn exposition_has_one_sample_per_line_with_labels() {
        let text = render(&status("site-b"));
        for line in [
            "veilmesh_peer_rx_bytes_total{interface=\"veil0\",peer=\"site-b\"} 1000",
            "veilmesh_peer_handshakes_total{interface=\"veil0\",peer=\"site-b\"} 2",
            "veilmesh_peer_seconds_since_handshake{interface=\"veil0\",peer=\"site-b\"} 7",
            "veilmesh_peer_dropped_packets_total{interface=\"veil0\",peer=\"site-b\",reason=\"spoofed_source\"} 4",
            "veilmesh_peer_path_info{interface=\"veil0\",peer=\"site-b\",transport=\"udp\",address=\"198.18.0.2:51820\"} 1",
            "veilmesh_dropped_packets_total{interface=\"veil0\",reason=\"unknown_peer_handshake\"} 3",
            "# TYPE veilmesh_peer_tx_bytes_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let text = render(&status("evil\"}\nname\\"));
        assert!(text.contains("peer=\"evil\\\"}\\nname\\\\\""), "{text}");
        // Still one sample per line: no raw newline got through.
        assert!(text
            .lines()
            .all(|l| l.starts_with('#') || l.starts_with("veilmesh_")));
    }
}
