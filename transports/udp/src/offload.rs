//! UDP segmentation offload: many datagrams to one destination in one
//! `sendmsg` (UDP_SEGMENT, "GSO"), and many from one sender in one
//! `recvmsg` (UDP_GRO). Linux only, as the whole daemon is; the kernel
//! checks every segment as if sent alone.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::SocketAddr;
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

/// Room for one control message carrying an `int` (GRO) or `u16` (GSO).
const CONTROL_LEN: usize = 64;

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

/// One `recvmsg` into `buf`: the bytes, the sender, and the size of each
/// datagram in them (the last may be shorter; `len` when not coalesced).
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, usize)> {
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
    // SAFETY: the control buffer is the one the kernel filled, walked
    // with the libc macros within `msg_controllen`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                if size > 0 {
                    segment = size as usize;
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((len, from, segment.clamp(1, len.max(1))))
}

/// One `sendmsg` of `data` to `to`, cut by the kernel into datagrams of
/// `segment` bytes (the last may be shorter). At most `MAX_SEGMENTS`.
pub fn send_segments(fd: RawFd, to: &SockAddr, data: &[u8], segment: usize) -> io::Result<()> {
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
    if data.len() > segment {
        let segment = u16::try_from(segment)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
        // SAFETY: CMSG_SPACE of a u16 fits CONTROL_LEN; the header and
        // its data are written inside `control`.
        unsafe {
            let space = libc::CMSG_SPACE(size_of::<u16>() as u32) as usize;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
        }
    }
    // SAFETY: `msg` describes valid memory (above).
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
