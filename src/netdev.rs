//! The TUN device and the kernel routes veilmesh owns.
//!
//! Routes are installed with iproute2's `ip`, as wg-quick does: it is on
//! every Linux host, its errors are the ones admins know, and it keeps
//! netlink details out of the daemon. Everything added is removed again on
//! drop; the kernel removes the TUN (and any route through it) when the
//! daemon's file descriptor closes, even after a crash.

use std::io::IoSlice;
use std::net::Ipv6Addr;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use ipnet::{IpNet, Ipv6Net};
use tun_rs::{AsyncDevice, DeviceBuilder};

pub use crate::core::batch::TunSink;

use crate::exit::{exit_families, ExitRouting, Family};
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

/// Room before each packet in the batch buffers: the virtio-net header
/// goes there on a device with offload.
pub const TUN_HEADROOM: usize = tun_rs::VIRTIO_NET_HDR_LEN;
/// Packets one batched write or read holds at most.
pub const TUN_BATCH: usize = 64;

/// Packets from one read of the TUN: with offload, a TCP or UDP
/// super-packet (up to 64 KB) cut into MTU-sized packets, checksums done.
pub struct TunReads {
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    count: usize,
}

impl TunReads {
    /// For packets of up to `mtu` bytes.
    pub fn new(mtu: usize) -> TunReads {
        TunReads {
            original: vec![0u8; TUN_HEADROOM + 65_535],
            bufs: vec![vec![0u8; TUN_HEADROOM + mtu.max(1280)]; TUN_READ_BATCH],
            sizes: vec![0; TUN_READ_BATCH],
            count: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn packet(&self, i: usize) -> &[u8] {
        &self.bufs[i][TUN_HEADROOM..TUN_HEADROOM + self.sizes[i]]
    }
}

/// Packets on their way to the TUN, each after `TUN_HEADROOM` in a
/// buffer of its own: the core decrypts straight into them, and a
/// device with offload coalesces TCP segments of one flow into one write
/// (GRO), which needs room for the whole super-packet in the first.
pub struct TunWrites {
    bufs: Vec<PacketBuf>,
    count: usize,
}

/// A buffer of fixed capacity holding one packet (after the headroom).
/// Not a `Vec` cut to the packet's length: growing a `Vec` back for the
/// next packet zeroes up to 64 KB each time (14 % of the daemon's CPU at
/// full speed, measured).
pub struct PacketBuf {
    data: Vec<u8>,
    len: usize,
}

impl PacketBuf {
    fn new(capacity: usize) -> PacketBuf {
        PacketBuf {
            data: vec![0u8; capacity],
            len: 0,
        }
    }
}

impl AsRef<[u8]> for PacketBuf {
    fn as_ref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl AsMut<[u8]> for PacketBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

/// What tun-rs's GRO needs to coalesce packets into the first of a flow.
impl tun_rs::ExpandBuffer for PacketBuf {
    fn buf_capacity(&self) -> usize {
        self.data.len()
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        if new_len > self.data.len() {
            // tun-rs checks the capacity first; should it not, grow.
            self.data.resize(new_len, value);
        } else if new_len > self.len {
            self.data[self.len..new_len].fill(value);
        }
        self.len = new_len;
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        let end = self.len + src.len();
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        self.data[self.len..end].copy_from_slice(src);
        self.len = end;
    }
}

impl Default for TunWrites {
    fn default() -> Self {
        TunWrites::new()
    }
}

impl TunWrites {
    pub fn new() -> TunWrites {
        TunWrites {
            bufs: (0..TUN_BATCH)
                .map(|_| PacketBuf::new(TUN_HEADROOM + crate::core::BUFFER_SIZE))
                .collect(),
            count: 0,
        }
    }

    pub fn is_full(&self) -> bool {
        self.count == self.bufs.len()
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The packets, each after `TUN_HEADROOM`.
    fn packets(&mut self) -> &mut [PacketBuf] {
        &mut self.bufs[..self.count]
    }

    fn clear(&mut self) {
        self.count = 0;
    }
}

impl TunSink for TunWrites {
    /// Where the next packet goes (`BUFFER_SIZE` bytes), unless full.
    fn space(&mut self) -> Option<&mut [u8]> {
        let buf = self.bufs.get_mut(self.count)?;
        Some(&mut buf.data[TUN_HEADROOM..])
    }

    /// The packet of `len` bytes at the start of `space` joins the batch.
    fn commit(&mut self, len: usize) {
        if let Some(buf) = self.bufs.get_mut(self.count) {
            buf.len = (TUN_HEADROOM + len).min(buf.data.len());
            self.count += 1;
        }
    }
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

    /// The packets of one read into `reads` (how many; `WouldBlock` when
    /// none waits). Without offload, one packet.
    fn try_recv_batch(&mut self, reads: &mut TunReads) -> std::io::Result<usize> {
        reads.count = 0;
        let n = self.try_recv(&mut reads.bufs[0][TUN_HEADROOM..])?;
        reads.sizes[0] = n;
        reads.count = 1;
        Ok(1)
    }

    /// Hands the batch to the host and empties it. Without offload, one
    /// write per packet.
    async fn send_batch(&mut self, writes: &mut TunWrites) -> std::io::Result<()> {
        let mut result = Ok(());
        for buf in writes.packets() {
            if let Err(error) = self.send(&buf.as_ref()[TUN_HEADROOM..]).await {
                result = Err(error);
            }
        }
        writes.clear();
        result
    }
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

    /// With offload every write starts with a virtio-net header: a zero
    /// one says "one whole packet, checksum done".
    async fn send(&self, packet: &[u8]) -> std::io::Result<usize> {
        if self.offload {
            let header = [0u8; TUN_HEADROOM];
            let parts = [IoSlice::new(&header), IoSlice::new(packet)];
            return self.tun.send_vectored(&parts).await;
        }
        self.tun.send(packet).await
    }

    fn sync_routes(&mut self, wanted: Vec<IpNet>) -> anyhow::Result<()> {
        NetDevice::sync_routes(self, wanted)
    }

    fn try_recv_batch(&mut self, reads: &mut TunReads) -> std::io::Result<usize> {
        reads.count = 0;
        let n = self.tun.try_recv_multiple(
            &mut reads.original,
            &mut reads.bufs,
            &mut reads.sizes,
            TUN_HEADROOM,
        )?;
        reads.count = n;
        Ok(n)
    }

    async fn send_batch(&mut self, writes: &mut TunWrites) -> std::io::Result<()> {
        let result = self
            .tun
            .send_multiple(&mut self.gro, writes.packets(), TUN_HEADROOM)
            .await
            .map(drop);
        writes.clear();
        result
    }
}

/// Packets one TUN read yields at most: a 64 KB super-packet of the
/// smallest MSS.
const TUN_READ_BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;

pub struct NetDevice {
    tun: AsyncDevice,
    name: String,
    /// Routes in the main table (an exit's default routes are in `exit`).
    routes: Vec<IpNet>,
    exit: ExitRouting,
    /// Reads and writes carry a virtio-net header (TSO/GRO).
    offload: bool,
    gro: tun_rs::GROTable,
}

impl NetDevice {
    /// Creates the TUN (call `ensure_absent` first) with the mesh address (/48) and `addresses`, then a
    /// route for every net in `routes` the mesh prefix does not cover; a
    /// default route (an exit's) goes in the table `exit` manages.
    /// With `offload`, reads may be TCP/UDP super-packets and writes are
    /// coalesced (virtio-net headers, TSO/GRO); a kernel that refuses gets
    /// a plain device, said once in the log.
    pub fn create(
        name: &str,
        mtu: u16,
        mesh_address: Ipv6Addr,
        addresses: &[IpNet],
        routes: impl IntoIterator<Item = IpNet>,
        offload: bool,
        exit: ExitRouting,
    ) -> anyhow::Result<NetDevice> {
        let build = |offload: bool| {
            DeviceBuilder::new()
                .name(name)
                .mtu(mtu)
                .ipv6(mesh_address, MESH_PREFIX_LEN)
                .offload(offload)
                .build_async()
        };
        let built = match build(offload) {
            Err(error) if offload => {
                tracing::warn!(%error, "TUN offload refused: one packet per read and write");
                build(false)
            }
            other => other,
        };
        let tun = built.with_context(|| {
            format!("cannot create TUN device {name} (needs CAP_NET_ADMIN and /dev/net/tun)")
        })?;
        let offload = tun.tcp_gso();
        let mut device = NetDevice {
            tun,
            name: name.to_owned(),
            routes: Vec::new(),
            exit,
            offload,
            gro: tun_rs::GROTable::new(),
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
        tracing::info!(interface = name, %mesh_address, mtu, offload, "TUN device up");
        Ok(device)
    }

    /// Makes the routes through this device exactly `wanted` (less what the
    /// mesh /48 already covers). New routes go in first; if one fails, the
    /// ones just added are taken out again and the old set stays.
    pub fn sync_routes(&mut self, wanted: impl IntoIterator<Item = IpNet>) -> anyhow::Result<()> {
        let mesh = IpNet::V6(mesh_prefix());
        let wanted: Vec<IpNet> = wanted.into_iter().collect();
        self.exit.sync(&exit_families(&wanted), &self.name)?;
        let mut wanted: Vec<IpNet> = wanted
            .into_iter()
            .filter(|n| n.prefix_len() > 0 && !mesh.contains(n))
            .collect();
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
    let family = Family::of(&net).flag();
    ip(&[family, "route", action, &net.to_string(), "dev", dev]).map(drop)
}

/// Runs iproute2's `ip` with `args`; its output, or its error message.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
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

#[cfg(test)]
mod tests {
    use super::*;
    use tun_rs::ExpandBuffer;

    #[test]
    fn a_write_buffer_holds_exactly_the_committed_packet() {
        let mut writes = TunWrites::new();
        let space = writes.space().unwrap();
        assert_eq!(space.len(), crate::core::BUFFER_SIZE);
        space[..3].copy_from_slice(b"abc");
        writes.commit(3);
        let space = writes.space().unwrap();
        assert_eq!(
            space.len(),
            crate::core::BUFFER_SIZE,
            "the next slot is whole"
        );
        space[0] = b'x';
        writes.commit(1);
        let packets = writes.packets();
        assert_eq!(&packets[0].as_ref()[TUN_HEADROOM..], b"abc");
        assert_eq!(&packets[1].as_ref()[TUN_HEADROOM..], b"x");
        writes.clear();
        // A slot used before offers its whole capacity again.
        assert_eq!(writes.space().unwrap().len(), crate::core::BUFFER_SIZE);
    }

    #[test]
    fn a_packet_buffer_grows_and_shrinks_as_gro_asks() {
        let mut buf = PacketBuf::new(8);
        buf.buf_extend_from_slice(b"abc");
        buf.buf_resize(5, 7);
        assert_eq!(buf.as_ref(), &[b'a', b'b', b'c', 7, 7]);
        buf.buf_resize(2, 0);
        assert_eq!(buf.as_ref(), b"ab");
        buf.buf_extend_from_slice(b"0123456789");
        assert_eq!(
            buf.as_ref(),
            b"ab0123456789",
            "beyond the capacity it grows"
        );
        assert_eq!(buf.buf_capacity(), 12);
    }
}
