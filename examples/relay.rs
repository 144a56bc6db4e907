//! A TUN <-> UDP relay with no crypto, one packet per system call: the
//! per-packet floor that bench/run.sh measures veilmesh against (what a
//! userspace tunnel costs on this machine before any encryption).
//!
//!     relay NAME ADDRESS/PREFIX LISTEN_PORT PEER_IP:PORT
//!
//! Not part of veilmesh: it authenticates and encrypts nothing.

use anyhow::Context;
use std::net::{Ipv4Addr, SocketAddr};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, name, address, port, peer] = args.as_slice() else {
        anyhow::bail!("usage: relay NAME ADDRESS/PREFIX LISTEN_PORT PEER_IP:PORT");
    };
    let (ip, prefix) = address.split_once('/').context("ADDRESS/PREFIX")?;
    let ip: Ipv4Addr = ip.parse()?;
    let prefix: u8 = prefix.parse()?;
    let peer: SocketAddr = peer.parse()?;
    let tun = tun_rs::DeviceBuilder::new()
        .name(name)
        .ipv4(ip, prefix, None)
        .mtu(1420)
        .build_async()?;
    let socket = tokio::net::UdpSocket::bind(("0.0.0.0", port.parse::<u16>()?)).await?;
    socket.connect(peer).await?;
    let (mut from_tun, mut from_net) = (vec![0u8; 65_536], vec![0u8; 65_536]);
    loop {
        tokio::select! {
            n = tun.recv(&mut from_tun) => {
                let _ = socket.send(&from_tun[..n?]).await;
            }
            n = socket.recv(&mut from_net) => {
                let Ok(n) = n else { continue };
                let _ = tun.send(&from_net[..n]).await;
            }
        }
    }
}
