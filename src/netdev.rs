//! The TUN device and the kernel routes veilmesh owns.
//!
//! Routes are installed with iproute2's `ip`, as wg-quick does: it is on
//! every Linux host, its errors are the ones admins know, and it keeps
//! netlink details out of the daemon. Everything added is removed again on
//! drop; the kernel removes the TUN (and any route through it) when the
//! daemon's file descriptor closes, even after a crash.

use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use ipnet::{IpNet, Ipv6Net};
use tun_rs::{AsyncDevice, DeviceBuilder};

use crate::identity::{MESH_PREFIX, MESH_PREFIX_LEN};

/// Fails if a network interface of that name exists in this namespace.
pub fn ensure_absent(name: &str) -> anyhow::Result<()> {
    if Path::new("/sys/class/net").join(name).exists() {
        bail!(
            "interface {name} already exists: is another `veilmesh up` running for it? \
             Stop that one, or choose another [interface] name"
        );
    }
    Ok(())
}

pub fn mesh_prefix() -> Ipv6Net {
    let mut octets = [0u8; 16];
    octets[..6].copy_from_slice(&MESH_PREFIX);
    Ipv6Net::new(Ipv6Addr::from(octets), MESH_PREFIX_LEN).expect("48 is a valid prefix")
}

/// The virtual NIC as the event loop uses it: the kernel's TUN device
/// ([`NetDevice`]), or a test's packets in memory, so the loop's logic is
/// tested in-process without root.
#[allow(async_fn_in_trait)] // the event loop runs on one thread
pub trait Tun {
    fn name(&self) -> &str;
    /// Waits until a packet may be waiting for `try_recv`.
    async fn readable(&self) -> std::io::Result<()>;
    /// One packet into `buf`; `WouldBlock` when none waits (which re-arms
    /// `readable`).
    fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Hands one packet to the host.
    async fn send(&self, packet: &[u8]) -> std::io::Result<usize>;
    /// Makes the routes through the device exactly `wanted` (less what
    /// the mesh /48 covers).
    fn sync_routes(&mut self, wanted: Vec<IpNet>) -> anyhow::Result<()>;
}

impl Tun for NetDevice {
    fn name(&self) -> &str {
        &self.name
    }

    async fn readable(&self) -> std::io::Result<()> {
        self.tun.readable().await
    }

    fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.tun.try_recv(buf)
    }

    async fn send(&self, packet: &[u8]) -> std::io::Result<usize> {
        self.tun.send(packet).await
    }

    fn sync_routes(&mut self, wanted: Vec<IpNet>) -> anyhow::Result<()> {
        NetDevice::sync_routes(self, wanted)
    }
}

pub struct NetDevice {
    tun: AsyncDevice,
    name: String,
    routes: Vec<IpNet>,
}

impl NetDevice {
    /// Creates the TUN (call `ensure_absent` first) with the mesh address (/48) and `addresses`, then a
    /// route for every net in `routes` the mesh prefix does not cover.
    pub fn create(
        name: &str,
        mtu: u16,
        mesh_address: Ipv6Addr,
        addresses: &[IpNet],
        routes: impl IntoIterator<Item = IpNet>,
    ) -> anyhow::Result<NetDevice> {
        let tun = DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .ipv6(mesh_address, MESH_PREFIX_LEN)
            .build_async()
            .with_context(|| {
                format!("cannot create TUN device {name} (needs CAP_NET_ADMIN and /dev/net/tun)")
            })?;
        let mut device = NetDevice {
            tun,
            name: name.to_owned(),
            routes: Vec::new(),
        };
        quiet_ipv6_autoconfiguration(name);
        for net in addresses {
            let result = match net {
                IpNet::V4(n) => device.tun.add_address_v4(n.addr(), n.prefix_len()),
                IpNet::V6(n) => device.tun.add_address_v6(n.addr(), n.prefix_len()),
            };
            result.with_context(|| format!("cannot add address {net} to {name}"))?;
        }
        device.sync_routes(routes)?;
        tracing::info!(interface = name, %mesh_address, mtu, "TUN device up");
        Ok(device)
    }

    /// Makes the routes through this device exactly `wanted` (less what the
    /// mesh /48 already covers). New routes go in first; if one fails, the
    /// ones just added are taken out again and the old set stays.
    pub fn sync_routes(&mut self, wanted: impl IntoIterator<Item = IpNet>) -> anyhow::Result<()> {
        let mesh = IpNet::V6(mesh_prefix());
        let mut wanted: Vec<IpNet> = wanted.into_iter().filter(|n| !mesh.contains(n)).collect();
        wanted.sort();
        wanted.dedup();
        let mut added = Vec::new();
        for net in wanted.iter().filter(|n| !self.routes.contains(n)) {
            if let Err(error) = ip_route("add", *net, &self.name) {
                for undo in added {
                    let _ = ip_route("del", undo, &self.name);
                }
                return Err(error).with_context(|| {
                    format!(
                        "cannot add route {net} dev {}: another interface or VPN may own it",
                        self.name
                    )
                });
            }
            tracing::info!(route = %net, interface = %self.name, "route added");
            added.push(*net);
        }
        for net in self.routes.iter().filter(|n| !wanted.contains(n)) {
            match ip_route("del", *net, &self.name) {
                Ok(()) => tracing::info!(route = %net, interface = %self.name, "route removed"),
                Err(error) => tracing::warn!(route = %net, %error, "could not remove route"),
            }
        }
        self.routes = wanted;
        Ok(())
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        let _ = self.sync_routes([]);
        tracing::info!(interface = %self.name, "TUN device removed");
    }
}

fn ip_route(action: &str, net: IpNet, dev: &str) -> anyhow::Result<()> {
    let family = match net.addr() {
        IpAddr::V4(_) => "-4",
        IpAddr::V6(_) => "-6",
    };
    let output = Command::new("ip")
        .args([family, "route", action, &net.to_string(), "dev", dev])
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip route {action} {net}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A TUN has no router to solicit and no multicast listeners to report;
/// tell the kernel so (the data path still drops any that slip out first).
fn quiet_ipv6_autoconfiguration(name: &str) {
    for (knob, value) in [("router_solicitations", "0"), ("accept_ra", "0")] {
        let path = format!("/proc/sys/net/ipv6/conf/{name}/{knob}");
        if let Err(error) = std::fs::write(&path, value) {
            tracing::debug!(%path, %error, "could not set sysctl");
        }
    }
}
