//! Thin syscall wrappers the libc and nix crates lack or wrap awkwardly:
//! leases, statx attributes, filesystem magic, xattrs, inode flags (the
//! immutable flag), signalfd, poll, file status flags, CPU affinity. One
//! function per syscall, each returning `io::Result`, each `unsafe` block
//! with the reason it holds.
//! NUMA calls live in [`crate::numa`].

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A timestamp in ns since the epoch, saturating (a file's owner may set
/// any time with `utimensat`; i64 ns end in 2262).
pub fn nanos(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// `F_SETSIG` (libc lacks it).
const F_SETSIG: libc::c_int = linux_raw_sys::general::F_SETSIG as libc::c_int;

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Deliver lease breaks on `fd` as `signal` (with `si_fd` set) instead of
/// SIGIO.
pub fn set_lease_signal(fd: BorrowedFd<'_>, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd with an integer argument.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), F_SETSIG, signal) }).map(drop)
}

/// Send `fd`'s signals (lease breaks) to this process (`F_SETOWN`).
/// `F_SETLEASE` makes the calling *thread* the owner, and the kernel finds
/// no task to signal once that thread exits (a pooled request thread):
/// the break is lost and the writer waits out lease-break-time. And a
/// lease taken again on an open file description another process leased
/// (the fence keeper's, adopted) keeps signalling that process. Both
/// measured on 6.18; `tests/fence_paths.rs` shows the first.
pub fn set_owner(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd with an integer argument; getpid cannot fail.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETOWN, libc::getpid()) }).map(drop)
}

/// Take a read lease. `EAGAIN`: someone holds the file open for writing.
pub fn set_read_lease(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd with an integer argument.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) }).map(drop)
}

/// Release the lease: a writer waiting on its break goes on.
pub fn release_lease(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd with an integer argument.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) }).map(drop)
}

/// The lease held on `fd`: `F_RDLCK`, or `F_UNLCK` when none is held or a
/// break is pending.
pub fn get_lease(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: fcntl on a valid fd.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETLEASE) })
}

/// What `fstatfs` says about the filesystem holding `fd`.
#[derive(Debug, Clone, Copy)]
pub struct FsInfo {
    /// `f_type`, the filesystem's magic number.
    pub magic: i64,
    /// Mounted read-only (`ST_RDONLY`).
    pub read_only: bool,
}

/// `fstatfs(fd)`.
pub fn fs_info(fd: BorrowedFd<'_>) -> io::Result<FsInfo> {
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: st is valid for writes.
    cvt(unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) })?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: vfs is valid for writes.
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut vfs) })?;
    Ok(FsInfo {
        magic: st.f_type as i64,
        read_only: vfs.f_flag & libc::ST_RDONLY != 0,
    })
}

/// Filesystems whose files cannot be fenced with a lease, by magic number,
/// with the name to report: network filesystems (another host can write),
/// FUSE (the server can change bytes behind the page cache) and pseudo
/// filesystems (contents made up on read).
pub fn unfenceable_fs(magic: i64) -> Option<&'static str> {
    Some(match magic {
        0x9fa0 => "procfs",
        0x6265_6572 => "sysfs",
        0x6462_6720 => "debugfs",
        0x7472_6163 => "tracefs",
        0x6573_5546 => "FUSE",
        0x6969 => "NFS",
        0xff53_4d42 => "CIFS",
        0xfe53_4d42 => "SMB2",
        0x517b => "SMB",
        0x00c3_6400 => "Ceph",
        0x0102_1997 => "9p",
        0x6e73_6673 => "nsfs",
        0x6367_7270 => "cgroup2",
        0x0027_e0eb => "cgroup",
        0x5346_4846 => "AFS",
        0x0bd0_0bd0 => "Lustre",
        0x4750_4653 => "GPFS",
        _ => return None,
    })
}

/// Filesystems that cannot be written by anyone, ever (no read-write
/// mount exists for them): their files need no fence.
pub fn never_writable_fs(magic: i64) -> Option<&'static str> {
    Some(match magic {
        0x7371_7368 => "squashfs",
        0xe0f5_e1e2 => "erofs",
        0x9660 => "iso9660",
        _ => return None,
    })
}

/// File attributes from `statx` that make a lease unnecessary.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatxAttrs {
    pub immutable: bool,
    pub verity: bool,
}

/// `statx(fd, "", AT_EMPTY_PATH)` attributes.
pub fn statx_attrs(fd: BorrowedFd<'_>) -> io::Result<StatxAttrs> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid empty C string and st is valid for writes.
    cvt(unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BASIC_STATS,
            &mut st,
        )
    })?;
    let has = |attr: u64| st.stx_attributes_mask & attr != 0 && st.stx_attributes & attr != 0;
    Ok(StatxAttrs {
        immutable: has(libc::STATX_ATTR_IMMUTABLE as u64),
        verity: has(libc::STATX_ATTR_VERITY as u64),
    })
}

/// `FS_IMMUTABLE_FL`, `chattr +i`: no open for writing, `truncate(2)`,
/// `fallocate`, unlink, rename, xattr or mode change, root included.
pub const FS_IMMUTABLE_FL: libc::c_int = linux_raw_sys::general::FS_IMMUTABLE_FL as libc::c_int;

/// `ioctl(FS_IOC_GETFLAGS)`: the inode flags `lsattr` shows. Any fd of the
/// file will do, a read-only one too.
pub fn inode_flags(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int (the kernel's size, whatever
    // the ioctl number says) to the valid pointer given.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) })?;
    Ok(flags)
}

/// `ioctl(FS_IOC_SETFLAGS)`. Changing the immutable flag needs
/// `CAP_LINUX_IMMUTABLE`; any fd of the file will do, a read-only one too.
pub fn set_inode_flags(fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: FS_IOC_SETFLAGS reads one int from the valid pointer given.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) }).map(drop)
}

/// Whether the file behind `fd` has `FS_IMMUTABLE_FL`.
pub fn is_immutable(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(inode_flags(fd)? & FS_IMMUTABLE_FL != 0)
}

/// Set `FS_IMMUTABLE_FL` on the file behind `fd` (tmpfs has it from Linux
/// 6.0), unless it is set already.
pub fn set_immutable(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = inode_flags(fd)?;
    if flags & FS_IMMUTABLE_FL == 0 {
        set_inode_flags(fd, flags | FS_IMMUTABLE_FL)?;
    }
    Ok(())
}

/// Clear `FS_IMMUTABLE_FL` on the file behind `fd` if it is set, so that
/// the file can be opened for writing, truncated and unlinked. A file
/// system without inode flags (`ENOTTY`, `EOPNOTSUPP`) has none to clear.
pub fn clear_immutable(fd: BorrowedFd<'_>) -> io::Result<()> {
    match inode_flags(fd) {
        Ok(flags) if flags & FS_IMMUTABLE_FL != 0 => set_inode_flags(fd, flags & !FS_IMMUTABLE_FL),
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `fsetxattr(fd, name, value, 0)`.
pub fn set_xattr(fd: BorrowedFd<'_>, name: &str, value: &[u8]) -> io::Result<()> {
    let name = c_name(name)?;
    // SAFETY: name is NUL-terminated; value is valid for value.len() bytes.
    cvt(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

/// `fgetxattr(fd, name)`: `None` when the attribute is absent.
pub fn get_xattr(fd: BorrowedFd<'_>, name: &str) -> io::Result<Option<Vec<u8>>> {
    let name = c_name(name)?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: name is NUL-terminated; buf is valid for buf.len() bytes.
    let n = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENODATA) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

/// Block `signals` in the calling thread (and threads it starts later).
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    let set = sigset(signals);
    // SAFETY: set is initialized; the old set is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Whether `signal` is blocked in the calling thread.
pub fn signal_blocked(signal: libc::c_int) -> bool {
    // SAFETY: sigset_t is plain old data; pthread_sigmask fills it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a null new set only reads the current mask into `set`.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set) };
    // SAFETY: set was filled by pthread_sigmask.
    rc == 0 && unsafe { libc::sigismember(&set, signal) } == 1
}

/// A signal set holding `signals`.
fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain old data; sigemptyset initializes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t for these calls.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// A non-blocking, close-on-exec `signalfd` for `signals` (which must be
/// blocked in every thread for it to see them).
pub fn signalfd(signals: &[libc::c_int]) -> io::Result<OwnedFd> {
    let set = sigset(signals);
    // SAFETY: set is initialized; -1 asks for a new signalfd.
    let fd = cvt(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What one signal read from a signalfd says: its number and, for a lease
/// break, the fd the lease sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalInfo {
    pub signo: libc::c_int,
    pub fd: libc::c_int,
}

/// Read one pending signal from a signalfd; `None` when none is pending.
pub fn read_signal(sfd: BorrowedFd<'_>) -> io::Result<Option<SignalInfo>> {
    // SAFETY: signalfd_siginfo is plain old data; all-zero is a valid value.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: info is valid for writes of `size` bytes.
    let n = unsafe {
        libc::read(
            sfd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(err),
        };
    }
    if n as usize != size {
        return Ok(None);
    }
    Ok(Some(SignalInfo {
        signo: info.ssi_signo as libc::c_int,
        fd: info.ssi_fd,
    }))
}

/// poll(2) `fds` for readability, `timeout_ms` at most; how many are
/// readable (0 on time-out or error).
pub fn wait_readable_any(fds: &[BorrowedFd<'_>], timeout_ms: libc::c_int) -> usize {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: pfds holds pfds.len() valid pollfd entries.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if rc <= 0 {
        return 0;
    }
    pfds.iter()
        .filter(|p| p.revents & libc::POLLIN != 0)
        .count()
}

/// The file status flags of `fd` (`F_GETFL`: access mode, `O_PATH`, ...).
pub fn status_flags(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: fcntl F_GETFL on a valid fd.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })
}

/// The CPUs `pid` may run on, by `sched_getaffinity` (a syscall, where
/// the status file is a page of text to format and parse). `None` if the
/// call fails (no such pid, or more CPUs than a `cpu_set_t` holds).
pub fn affinity(pid: u32) -> Option<Vec<u32>> {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is valid for writes of the size given.
    let rc = unsafe {
        libc::sched_getaffinity(
            pid as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        )
    };
    if rc != 0 {
        return None;
    }
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads the set for cpu < its size.
    Some(
        (0..max)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .map(|c| c as u32)
            .collect(),
    )
}

/// Most fds one [`send_with_fds`] carries (the kernel's `SCM_MAX_FD`
/// is 253).
pub const MAX_SEND_FDS: usize = 250;

/// Send one packet on a `SOCK_SEQPACKET` socket with `fds` riding along
/// (`SCM_RIGHTS`).
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_SEND_FDS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let bytes = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8).max(1)];
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` bytes, enough for one
        // header with `bytes` of data (CMSG_SPACE above).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast(), raw.len());
        }
    }
    // SAFETY: msg and everything it points at live across the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receive one packet (at most `buf.len()` bytes) and the fds that ride
/// along. `Ok(None)`: the peer closed the socket.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let bytes = MAX_SEND_FDS * std::mem::size_of::<libc::c_int>();
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg points at live buffers of the sizes given.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel just wrote into
    // `cbuf`, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<libc::c_int>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((n as usize, fds)))
}

/// Clear the immutable flag (see [`clear_immutable`]), then
/// `ftruncate(fd, 0)`: how every replica is cut. `fd` must be open for
/// writing. The truncate is tried even when the flag cannot be cleared
/// (the kernel checks the flag at open, not at `ftruncate` of a
/// description already open for writing, on 6.18); the error is the
/// truncate's, or else the clear's.
pub fn truncate_to_zero(fd: BorrowedFd<'_>) -> io::Result<()> {
    let cleared = clear_immutable(fd);
    nix::unistd::ftruncate(fd, 0)?;
    cleared.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("truncated, but its immutable flag cannot be cleared: {e}"),
        )
    })
}

/// Let a child inherit `fd` across exec (clears `FD_CLOEXEC`).
pub fn inheritable(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl F_SETFD on a valid fd with an integer argument.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) }).map(drop)
}

/// The open-file limit after [`raise_nofile`]: soft and hard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft: u64,
    pub hard: u64,
    /// The soft limit before.
    pub was: u64,
}

/// Raise `RLIMIT_NOFILE`'s soft limit to its hard limit; as root (with
/// `CAP_SYS_RESOURCE`) first raise the hard limit to `fs.nr_open`, the
/// kernel's most. What cannot be raised stays as it was (no error: the
/// caller reports the limit it got).
pub fn raise_nofile(nr_open: Option<u64>) -> io::Result<NofileLimit> {
    let set = |soft: u64, hard: u64| {
        let l = libc::rlimit {
            rlim_cur: soft as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        // SAFETY: a valid rlimit struct for the call's duration.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) == 0 }
    };
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // rlim_t is u64 here, not on every target.
    #[allow(clippy::unnecessary_cast)]
    let (was, mut hard) = (l.rlim_cur as u64, l.rlim_max as u64);
    if let Some(max) = nr_open.filter(|&m| m > hard) {
        if set(max, max) {
            hard = max;
        }
    }
    let soft = if set(hard, hard) { hard } else { was };
    Ok(NofileLimit { soft, hard, was })
}

/// Run the calling thread at `SCHED_FIFO` priority 1: ahead of every
/// ordinary thread (busy readers), behind every other real-time one.
pub fn realtime_thread() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler on the calling thread (0) with a valid param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Best effort for a process that must not be delayed or killed first:
/// `SCHED_FIFO` priority 1, all memory locked, `oom_score_adj` -1000.
/// Returns what failed, for a log line.
pub fn harden_self(proc_self: &std::path::Path) -> Vec<String> {
    let mut failed = Vec::new();
    if let Err(e) = realtime_thread() {
        failed.push(format!("SCHED_FIFO: {e}"));
    }
    // SAFETY: mlockall with valid flags.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        failed.push(format!("mlockall: {}", io::Error::last_os_error()));
    }
    if let Err(e) = std::fs::write(proc_self.join("oom_score_adj"), "-1000") {
        failed.push(format!("oom_score_adj: {e}"));
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn xattr_round_trip_on_tmpfs_or_skip() {
        let f = tempfile::tempfile_in("/dev/shm").unwrap();
        match set_xattr(f.as_fd(), "trusted.replicad.test", b"1:2") {
            Ok(()) => {
                assert_eq!(
                    get_xattr(f.as_fd(), "trusted.replicad.test").unwrap(),
                    Some(b"1:2".to_vec())
                );
                assert_eq!(get_xattr(f.as_fd(), "trusted.replicad.none").unwrap(), None);
            }
            Err(e) => eprintln!("SKIP xattr_round_trip: trusted xattrs need CAP_SYS_ADMIN: {e}"),
        }
    }

    /// tmpfs (Linux 6.0+) takes the immutable flag: root cannot then open
    /// the file for writing or unlink it; cleared, it truncates and
    /// unlinks; `truncate_to_zero` clears it itself.
    #[test]
    fn immutable_flag_on_tmpfs_or_skip() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return eprintln!("SKIP immutable_flag_on_tmpfs: CAP_LINUX_IMMUTABLE needs root");
        }
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"bytes").unwrap();
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert!(!is_immutable(f.as_fd()).unwrap());
        // A file without the flag: nothing to clear.
        clear_immutable(f.as_fd()).unwrap();
        set_immutable(f.as_fd()).unwrap();
        set_immutable(f.as_fd()).unwrap();
        assert!(is_immutable(f.as_fd()).unwrap());
        let e = std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        let e = std::fs::remove_file(&path).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        // Cleared through a read-only fd.
        let ro = std::fs::File::open(&path).unwrap();
        clear_immutable(ro.as_fd()).unwrap();
        assert!(!is_immutable(f.as_fd()).unwrap());
        set_immutable(f.as_fd()).unwrap();
        truncate_to_zero(f.as_fd()).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 0);
        assert!(!is_immutable(f.as_fd()).unwrap());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn proc_is_unfenceable() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let info = fs_info(f.as_fd()).unwrap();
        assert_eq!(unfenceable_fs(info.magic), Some("procfs"));
        let t = tempfile::tempfile().unwrap();
        assert_eq!(unfenceable_fs(fs_info(t.as_fd()).unwrap().magic), None);
    }

    #[test]
    fn only_read_only_filesystems_are_never_writable() {
        assert_eq!(never_writable_fs(0x7371_7368), Some("squashfs"));
        assert_eq!(never_writable_fs(0xe0f5_e1e2), Some("erofs"));
        assert_eq!(never_writable_fs(0x9660), Some("iso9660"));
        let t = tempfile::tempfile().unwrap();
        assert_eq!(never_writable_fs(fs_info(t.as_fd()).unwrap().magic), None);
        // tmpfs and ext4 (writable filesystems, even when mounted ro).
        assert_eq!(never_writable_fs(0x0102_1994), None);
        assert_eq!(never_writable_fs(0xef53), None);
    }

    #[test]
    fn plain_file_is_not_immutable() {
        let t = tempfile::tempfile().unwrap();
        let a = statx_attrs(t.as_fd()).unwrap();
        assert!(!a.immutable && !a.verity);
    }
}
