//! UDP segmentation offload: many datagrams to one destination in one
//! `sendmsg` (UDP_SEGMENT, "GSO"), and many from one sender in one
//! `recvmsg` (UDP_GRO). Linux only, as the whole daemon is; the kernel
//! checks every segment as if sent alone.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;

use socket2::SockAddr;

/// Segments per `sendmsg` the kernel takes (UDP_MAX_SEGMENTS).
pub const MAX_SEGMENTS: usize = 64;
/// Bytes per `sendmsg`: all segments together are one UDP payload to the
/// kernel, at most 65,507 bytes over IPv4.
pub const MAX_SEND_BYTES: usize = 65_507;

/// How many `segment`-byte datagrams one `sendmsg` may carry.
pub fn segments_per_send(segment: usize) -> usize {
    (MAX_SEND_BYTES / segment.max(1)).clamp(1, MAX_SEGMENTS)
}

/// Room for the control messages of one call: GRO's `int` or GSO's `u16`,
/// and a packet-info structure (at most 40 bytes with its header).
const CONTROL_LEN: usize = 96;

/// Has the kernel say, for every datagram, the local address it was sent
/// to (IPV6_RECVPKTINFO, which covers IPv4 on a dual-stack socket too, or
/// IP_PKTINFO): a host with several addresses then answers from the one
/// the peer used, as its NAT expects. False if the kernel refuses.
pub fn enable_packet_info(fd: RawFd, ipv6: bool) -> bool {
    let on: libc::c_int = 1;
    let (level, name) = if ipv6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    // SAFETY: a valid socket and a pointer to a c_int of the size passed.
    let result = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    result == 0
}

/// What one `recv` got: the bytes, the sender, each datagram's size (the
/// last may be shorter; the whole length when not coalesced), and the
/// local address it was sent to, if the kernel said.
pub struct Read {
    pub len: usize,
    pub from: SocketAddr,
    pub segment: usize,
    pub local: Option<IpAddr>,
}

/// Turns on UDP_GRO: from then on every read must go through `recv`,
/// which reports the segment size. False if the kernel refuses.
pub fn enable_gro(fd: RawFd) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and a pointer to a c_int of the size passed.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    result == 0
}

/// One `recvmsg` into `buf`.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<Read> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut from = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut control = [0u8; CONTROL_LEN];
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives the
    // call and its length matches the memory it points to.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = from.as_mut_ptr().cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL_LEN as _;
    // SAFETY: `msg` describes valid, writable memory (above).
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = n as usize;
    // SAFETY: the kernel wrote `msg_namelen` bytes of a socket address.
    let from = unsafe { SockAddr::new(from.assume_init(), msg.msg_namelen) };
    let from = from
        .as_socket()
        .ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
    let mut segment = len;
    let mut local = None;
    // SAFETY: the control buffer is the one the kernel filled, walked
    // with the libc macros within `msg_controllen`; each payload is read
    // as the type its level and type say.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (libc::SOL_UDP, libc::UDP_GRO) => {
                    let size = std::ptr::read_unaligned(data.cast::<libc::c_int>());
                    if size > 0 {
                        segment = size as usize;
                    }
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                    local = Some(Ipv6Addr::from(info.ipi6_addr.s6_addr).to_canonical());
                }
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                    let addr = u32::from_be(info.ipi_spec_dst.s_addr);
                    local = Some(IpAddr::V4(Ipv4Addr::from(addr)));
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Read {
        len,
        from,
        segment: segment.clamp(1, len.max(1)),
        local,
    })
}

/// One `sendmsg` of `data` to `to`, cut by the kernel into datagrams of
/// `segment` bytes (the last may be shorter; none when `data` is one
/// datagram), at most `MAX_SEGMENTS`, from our address `source` if given.
pub fn send_segments(
    fd: RawFd,
    to: &SockAddr,
    data: &[u8],
    segment: usize,
    source: Option<IpAddr>,
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut control = [0u8; CONTROL_LEN];
    // SAFETY: as in `recv`; the kernel only reads through these pointers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = to.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = to.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let mut used = 0;
    let mut add = |level: libc::c_int, kind: libc::c_int, payload: &[u8]| {
        // SAFETY: both control messages together (at most 16 + 40 bytes)
        // fit CONTROL_LEN; each header and payload is written inside
        // `control`, at the offset CMSG_SPACE of the ones before gives.
        unsafe {
            let cmsg = control.as_mut_ptr().add(used).cast::<libc::cmsghdr>();
            std::ptr::write_unaligned(
                cmsg,
                libc::cmsghdr {
                    cmsg_len: libc::CMSG_LEN(payload.len() as u32) as _,
                    cmsg_level: level,
                    cmsg_type: kind,
                },
            );
            let data = libc::CMSG_DATA(cmsg);
            std::ptr::copy_nonoverlapping(payload.as_ptr(), data, payload.len());
            used += libc::CMSG_SPACE(payload.len() as u32) as usize;
        }
    };
    if data.len() > segment {
        let segment = u16::try_from(segment)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
        add(libc::SOL_UDP, libc::UDP_SEGMENT, &segment.to_ne_bytes());
    }
    match (source, to.is_ipv6()) {
        // A dual-stack socket takes IPv4 sources as IPv4-mapped addresses.
        (Some(source), true) => {
            let v6 = match source {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: v6.octets(),
                },
                ipi6_ifindex: 0,
            };
            add(libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, as_bytes(&info));
        }
        (Some(IpAddr::V4(v4)), false) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(v4).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            add(libc::IPPROTO_IP, libc::IP_PKTINFO, as_bytes(&info));
        }
        _ => {}
    }
    if used > 0 {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = used as _;
    }
    // SAFETY: `msg` describes valid memory (above).
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The bytes of a plain C structure, for a control message.
fn as_bytes<T: Copy>(value: &T) -> &[u8] {
    // SAFETY: T is a plain-old-data libc structure; its bytes are read
    // only while `value` is borrowed.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

/// What a refused segmented send says about GSO.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The device cannot segment (EIO: no checksum offload on the route):
    /// GSO off for good on this socket.
    Unsupported,
    /// Not this send (EINVAL: a segment larger than the route's MTU, or a
    /// kernel without UDP_SEGMENT): send these one by one.
    NotThis,
    /// An error the datagrams would get one by one too.
    Other,
}

pub fn refusal(error: &std::io::Error) -> Refusal {
    match error.raw_os_error() {
        Some(libc::EIO) => Refusal::Unsupported,
        Some(libc::EINVAL) => Refusal::NotThis,
        _ => Refusal::Other,
    }
}
