//! `SOCK_SEQPACKET` messages with file descriptors (`SCM_RIGHTS`), and the
//! peer's credentials (`SO_PEERCRED`). Blocking or not depends on the fd;
//! the daemon drives the same calls from its event loop.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

/// Most fds a request carries (the daemon reads no more).
pub const MAX_FDS: usize = 4;
/// Most fds one message may carry (one below the kernel's `SCM_MAX_FD`
/// of 253): an attach answer carries two per source.
pub const MAX_MESSAGE_FDS: usize = 252;

/// One received packet.
#[derive(Debug)]
pub struct Packet {
    /// The bytes (at most the buffer's length).
    pub data: Vec<u8>,
    /// The packet was longer than the buffer and was cut (`MSG_TRUNC`):
    /// `len` holds its real length.
    pub truncated: bool,
    /// The packet's real length.
    pub len: usize,
    /// fds that rode along (closed on drop unless taken).
    pub fds: Vec<OwnedFd>,
}

/// The peer's pid, uid and gid as the kernel saw them at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A `sockaddr_un` for `path` and its length.
fn unix_addr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is too long for a unix socket",
                path.display()
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// A new `SOCK_SEQPACKET` unix socket, close-on-exec (and non-blocking if
/// asked).
fn seqpacket(nonblocking: bool) -> io::Result<OwnedFd> {
    let flags = libc::SOCK_SEQPACKET
        | libc::SOCK_CLOEXEC
        | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connect to a `SOCK_SEQPACKET` socket at `path`, with send and receive
/// time-outs so that a wedged daemon never hangs the caller.
pub fn connect(path: &Path, timeout: Duration) -> io::Result<OwnedFd> {
    let (addr, len) = unix_addr(path)?;
    let fd = seqpacket(false)?;
    set_timeout(fd.as_raw_fd(), libc::SO_RCVTIMEO, timeout)?;
    set_timeout(fd.as_raw_fd(), libc::SO_SNDTIMEO, timeout)?;
    // SAFETY: addr is a valid sockaddr_un and len does not exceed its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A non-blocking `SOCK_SEQPACKET` socket bound at `path` and listening
/// with `backlog`. The caller removes a stale socket file first.
pub fn listen(path: &Path, backlog: libc::c_int) -> io::Result<OwnedFd> {
    let (addr, len) = unix_addr(path)?;
    let fd = seqpacket(true)?;
    // SAFETY: addr is a valid sockaddr_un of at least `len` bytes.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Accept one connection, close-on-exec and non-blocking.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: accept4 on a listening socket; no address wanted.
    let c = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if c < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(c) })
}

/// Bound how long a read from `sock` blocks (`SO_RCVTIMEO`).
pub fn set_recv_timeout(sock: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    set_timeout(sock.as_raw_fd(), libc::SO_RCVTIMEO, timeout)
}

fn set_timeout(fd: RawFd, opt: libc::c_int, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: tv is a valid timeval and the length matches it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Send one packet with `fds` attached.
pub fn send(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_MESSAGE_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many fds for one message",
        ));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let fd_bytes = std::mem::size_of_val(raw.as_slice()) as u32;
    let space = if raw.is_empty() {
        0
    } else {
        // SAFETY: CMSG_SPACE is a pure computation.
        unsafe { libc::CMSG_SPACE(fd_bytes) as usize }
    };
    // u64 elements keep the buffer aligned for cmsghdr.
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes, enough for one cmsg
        // holding raw.len() fds; CMSG_FIRSTHDR is non-null for that size.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                raw.len(),
            );
        }
    }
    loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let rc = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if rc >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receive one packet of at most `max` bytes. A longer packet is consumed
/// whole and reported `truncated`. An orderly close reads as `Ok(None)`.
pub fn recv(sock: BorrowedFd<'_>, max: usize) -> io::Result<Option<Packet>> {
    recv_fds(sock, max, MAX_FDS)
}

/// [`recv`] with room for `max_fds` fds (at most [`MAX_MESSAGE_FDS`]); the
/// kernel closes any beyond that.
pub fn recv_fds(sock: BorrowedFd<'_>, max: usize, max_fds: usize) -> io::Result<Option<Packet>> {
    let max_fds = max_fds.clamp(1, MAX_MESSAGE_FDS);
    let mut data = vec![0u8; max];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space =
        unsafe { libc::CMSG_SPACE((max_fds * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let rc = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut msg,
                libc::MSG_CMSG_CLOEXEC | libc::MSG_TRUNC,
            )
        };
        if rc >= 0 {
            break rc as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control; CMSG_FIRSTHDR/NXTHDR walk it
    // within msg_controllen, and each SCM_RIGHTS payload holds fds that are
    // now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = payload / std::mem::size_of::<RawFd>();
                let base = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(base.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    let truncated = msg.msg_flags & libc::MSG_TRUNC != 0 || n > max;
    data.truncate(n.min(max));
    Ok(Some(Packet {
        data,
        truncated,
        len: n,
        fds,
    }))
}

/// `SO_PEERPIDFD` (Linux 6.5; not in every libc crate version).
const SO_PEERPIDFD: libc::c_int = 77;

/// A pidfd of the process at the other end of a unix socket: the one the
/// kernel recorded at connect (`SO_PEERPIDFD`) or, on kernels before 6.5,
/// one opened now from `pid` (`pidfd_open`).
pub fn peer_pidfd(sock: BorrowedFd<'_>, pid: u32) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 && fd >= 0 {
        // SAFETY: the kernel returned a new pidfd that nobody else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    // SAFETY: plain syscall; the result is checked.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

/// Whether the process behind a pidfd still runs (signal 0 through the
/// pidfd: no pid lookup, so no recycled pid answers for it).
pub fn pidfd_alive(pidfd: BorrowedFd<'_>) -> bool {
    // SAFETY: plain syscall on a pidfd we hold; signal 0 sends nothing.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd() as libc::c_long,
            0 as libc::c_long,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_long,
        )
    };
    // EPERM means it exists but we may not signal it (never for root).
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The credentials of the process at the other end of a unix socket.
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<PeerCred> {
    // SAFETY: ucred is plain old data; all-zero is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid as u32,
        uid: cred.uid,
        gid: cred.gid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two fds socketpair writes.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn packet_with_fd_arrives_whole() {
        let (a, b) = pair();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"hello").unwrap();
        send(a.as_fd(), b"abc", &[f.as_fd()]).unwrap();
        let p = recv(b.as_fd(), 16).unwrap().unwrap();
        assert_eq!(p.data, b"abc");
        assert!(!p.truncated);
        assert_eq!(p.fds.len(), 1);
        let mut g = std::fs::File::from(p.fds.into_iter().next().unwrap());
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
    }

    #[test]
    fn oversized_packet_is_reported_truncated() {
        let (a, b) = pair();
        send(a.as_fd(), &[7u8; 100], &[]).unwrap();
        send(a.as_fd(), b"next", &[]).unwrap();
        let p = recv(b.as_fd(), 10).unwrap().unwrap();
        assert!(p.truncated);
        assert_eq!(p.len, 100);
        // The rest of the big packet is gone; the next one is intact.
        assert_eq!(recv(b.as_fd(), 10).unwrap().unwrap().data, b"next");
    }

    #[test]
    fn close_reads_as_none_and_peer_cred_is_ours() {
        let (a, b) = pair();
        let cred = peer_cred(b.as_fd()).unwrap();
        assert_eq!(cred.pid, std::process::id());
        drop(a);
        assert!(recv(b.as_fd(), 10).unwrap().is_none());
    }
}
