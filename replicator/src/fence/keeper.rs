//! The fence keeper: a small process of its own that holds a duplicate of
//! every lease fd and every valid replica (a memfd's fd; a tmpfs replica's
//! path in the store and its inode, [`ReplicaPath`]: no open file), so
//! that no single replicad process that dies or stops lets a writer reach
//! a file while a replica of it is mapped.
//!
//! ```text
//!  daemon ── socketpair (SOCK_SEQPACKET) ── keeper (re-exec of replicad,
//!    │  Hold{source, leases, tmpfs replicas:       no threads, no runtime,
//!    │       (dev, ino, path)...}                   SCHED_FIFO, mlocked,
//!    │    + [lease fds, memfd replica fds]
//!    │  Drop{source}                                oom_score_adj -1000)
//!    │  Ping every PING
//!    │
//!  daemon killed (EOF): the keeper fences alone (orphaned)
//!    take every lease over (F_SETLEASE again: breaks now signal the keeper;
//!    EAGAIN means a writer is already waiting), watch every source for
//!    changes no break announces, listen on <run_dir>/keeper.sock;
//!    a break, a change: truncate that source's replicas, release its leases;
//!    a new daemon connects, says Adopt: every lease and replica is handed
//!    over (Hold messages, then Done); the keeper is that daemon's keeper.
//!    Nothing left to hold: exit.
//!  daemon silent longer than its deadline (stopped, hung), or the keeper
//!  told to stop (SIGTERM, SIGINT):
//!    truncate every replica it holds (immutable flag cleared first; the
//!    kernel unmaps them from every process: readers fall back to the
//!    file), then release every lease
//!    (any duplicate of the open file description may), then exit.
//! ```
//!
//! A lease belongs to the open file description, so while the keeper holds
//! its duplicate the lease outlives the daemon: a writer waits until the
//! keeper has truncated every replica. While the daemon runs it answers
//! breaks itself (the keeper only watches); when the keeper is lost the
//! daemon revokes everything (the keeper may have) and starts a new one.
//! The deadline is a third of `/proc/sys/fs/lease-break-time`, between
//! 0.5 and 5 s: the keeper acts before the kernel would break by force.
//! Truncating before releasing is what makes it safe for the keeper and a
//! daemon to act on the same source at once: whoever releases, the
//! replicas were cut first.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::socket::{self as socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};

use crate::model::SourceKey;
use crate::store::ReplicaPath;
use crate::sys;

/// The hidden first argument that makes `replicad` the keeper.
pub const KEEPER_ARG: &str = "--fence-keeper";
/// How often the daemon says it is alive.
pub const PING: Duration = Duration::from_millis(200);
/// The orphaned keeper's socket in the run directory.
pub const SOCKET_NAME: &str = "keeper.sock";
/// How long a handover may take, each message.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an orphaned keeper checks every lease, besides the signals.
const SCAN_EVERY: Duration = Duration::from_secs(1);

const HOLD: u8 = 1;
const DROP: u8 = 2;
const PINGED: u8 = 3;
const PONG: u8 = 4;
const ADOPT: u8 = 5;
const DONE: u8 = 6;
/// The daemon took over every handed source (the keeper's own watch can
/// go).
const ADOPTED: u8 = 7;
/// The keeper's lock in the run directory, held (`flock`) while it lives:
/// a daemon that finds it held knows a keeper still fences there.
pub const LOCK_NAME: &str = "keeper.lock";
const MESSAGE_LEN: usize = 24;
/// A `Hold` also carries the generation the daemon read under the lease.
const HOLD_LEN: usize = MESSAGE_LEN + 24;
/// Then its tmpfs replicas (their count in byte 2), each `dev`, `ino` (8
/// bytes each), the path's length (2) and bytes; the whole message at
/// most this long.
const MAX_HOLD: usize = 64 * 1024;
/// Byte 3 of a long `Hold`: its stamp is not known (zeros stand in).
const NO_STAMP: u8 = 1;

/// What a source's `fstat` said when its replicas were copied: size,
/// mtime and ctime (ns). A file whose stamp moved has changed.
pub type Stamp = (u64, i64, i64);

/// A parsed message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Msg {
    kind: u8,
    /// `Hold`: how many of its fds are leases.
    count: u8,
    key: SourceKey,
    stamp: Option<Stamp>,
    /// `Hold`: its tmpfs replicas, held by path.
    paths: Vec<ReplicaPath>,
}

/// A message: its kind, a small count, a source.
fn message(kind: u8, count: u8, key: SourceKey) -> [u8; MESSAGE_LEN] {
    let mut m = [0u8; MESSAGE_LEN];
    m[0] = kind;
    m[1] = count;
    m[8..16].copy_from_slice(&key.dev.to_le_bytes());
    m[16..24].copy_from_slice(&key.ino.to_le_bytes());
    m
}

/// A `Hold` of `key` whose first `leases` fds are leases, at `stamp`
/// (`None`: not known), with the tmpfs replicas `paths`. `EINVAL`: more
/// than 255 paths, or longer than [`MAX_HOLD`] in all.
fn hold_message(
    leases: u8,
    key: SourceKey,
    stamp: Option<Stamp>,
    paths: &[ReplicaPath],
) -> io::Result<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
    let mut m = Vec::with_capacity(HOLD_LEN);
    m.extend_from_slice(&message(HOLD, leases, key));
    m[2] = u8::try_from(paths.len()).map_err(|_| invalid())?;
    if stamp.is_none() {
        m[3] = NO_STAMP;
    }
    let stamp = stamp.unwrap_or_default();
    m.extend_from_slice(&stamp.0.to_le_bytes());
    m.extend_from_slice(&stamp.1.to_le_bytes());
    m.extend_from_slice(&stamp.2.to_le_bytes());
    for p in paths {
        let bytes = p.path.as_os_str().as_bytes();
        let len = u16::try_from(bytes.len()).map_err(|_| invalid())?;
        m.extend_from_slice(&p.dev.to_le_bytes());
        m.extend_from_slice(&p.ino.to_le_bytes());
        m.extend_from_slice(&len.to_le_bytes());
        m.extend_from_slice(bytes);
    }
    if m.len() > MAX_HOLD {
        return Err(invalid());
    }
    Ok(m)
}

/// The tmpfs replicas of a long `Hold`: `count` records in `rest`, which
/// they must fill exactly.
fn parse_paths(mut rest: &[u8], count: u8) -> Option<Vec<ReplicaPath>> {
    use std::os::unix::ffi::OsStrExt;
    let mut paths = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let word = |at: usize| -> Option<u64> {
            let mut b = [0u8; 8];
            b.copy_from_slice(rest.get(at..at + 8)?);
            Some(u64::from_le_bytes(b))
        };
        let (dev, ino) = (word(0)?, word(8)?);
        let len = usize::from(u16::from_le_bytes([*rest.get(16)?, *rest.get(17)?]));
        let bytes = rest.get(18..18 + len)?;
        if bytes.is_empty() || bytes.contains(&0) {
            return None;
        }
        paths.push(ReplicaPath {
            path: PathBuf::from(std::ffi::OsStr::from_bytes(bytes)),
            dev,
            ino,
        });
        rest = &rest[18 + len..];
    }
    rest.is_empty().then_some(paths)
}

fn parse(m: &[u8]) -> Option<Msg> {
    if m.len() != MESSAGE_LEN && m.len() < HOLD_LEN {
        return None;
    }
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(m.get(at..at + 8)?);
        Some(b)
    };
    let long = m.len() >= HOLD_LEN;
    let stamp = if long && m[3] & NO_STAMP == 0 {
        Some((
            u64::from_le_bytes(word(24)?),
            i64::from_le_bytes(word(32)?),
            i64::from_le_bytes(word(40)?),
        ))
    } else {
        None
    };
    let paths = if long {
        parse_paths(&m[HOLD_LEN..], m[2])?
    } else {
        Vec::new()
    };
    Some(Msg {
        kind: m[0],
        count: m[1],
        key: SourceKey {
            dev: u64::from_le_bytes(word(8)?),
            ino: u64::from_le_bytes(word(16)?),
        },
        stamp,
        paths,
    })
}

/// How long the keeper waits for a word from the daemon before it takes
/// the daemon for dead (and the daemon for the keeper): a third of the
/// kernel's lease-break-time, 0.5 to 5 s.
pub fn deadline(proc: &replicad_procfs::ProcReader) -> Duration {
    let secs = proc.lease_break_time().unwrap_or(45);
    Duration::from_millis(secs.saturating_mul(1000) / 3)
        .clamp(Duration::from_millis(500), Duration::from_secs(5))
}

/// What the keeper holds for one source, and what a daemon that adopts it
/// is handed: the lease fds (the source's, then its overlay layers'), then
/// its valid replicas: memfds as read-write fds, tmpfs replicas by path.
#[derive(Debug)]
pub struct Handed {
    pub key: SourceKey,
    pub leases: Vec<OwnedFd>,
    /// memfd replicas (and tmpfs ones an fd store of an earlier version
    /// kept).
    pub replicas: Vec<OwnedFd>,
    /// tmpfs replicas: no open file, their path in the store and inode.
    pub paths: Vec<ReplicaPath>,
    /// The source's stamp when its replicas were copied, if known.
    pub stamp: Option<Stamp>,
}

impl Handed {
    fn from_message(m: Msg, mut fds: Vec<OwnedFd>) -> Option<Handed> {
        let n = usize::from(m.count);
        if m.kind != HOLD || n == 0 || fds.len() < n || (fds.len() == n && m.paths.is_empty()) {
            return None;
        }
        let replicas = fds.split_off(n);
        Some(Handed {
            key: m.key,
            leases: fds,
            replicas,
            paths: m.paths,
            stamp: m.stamp,
        })
    }

    /// How many replicas it holds.
    pub fn replica_count(&self) -> usize {
        self.replicas.len() + self.paths.len()
    }

    /// Cut every replica to nothing (the immutable flag cleared first, see
    /// [`sys::truncate_to_zero`] and [`ReplicaPath::truncate`]; one whose
    /// path names nothing or another file now is gone already).
    fn truncate_replicas(&self) {
        for r in &self.replicas {
            let _ = sys::truncate_to_zero(r.as_fd());
        }
        for p in &self.paths {
            match p.truncate() {
                Ok(true) => {}
                Ok(false) => eprintln!(
                    "replicad fence keeper: replica {} is gone from the store already \
                     (truncated by whoever removed it)",
                    p.path.display()
                ),
                Err(e) => eprintln!(
                    "replicad fence keeper: cannot truncate the replica {}: {e}; processes \
                     that map it keep its bytes (`chattr -i` and truncate it by hand)",
                    p.path.display()
                ),
            }
        }
    }

    /// Whether the source is no longer what its replicas copy (a change no
    /// break announced: `O_RDONLY|O_TRUNC`).
    fn changed(&self) -> bool {
        let (Some(stamp), Some(l)) = (self.stamp, self.leases.first()) else {
            return false;
        };
        nix::sys::stat::fstat(l).is_ok_and(|st| {
            let ns = sys::nanos;
            (
                st.st_size as u64,
                ns(st.st_mtime, st.st_mtime_nsec),
                ns(st.st_ctime, st.st_ctime_nsec),
            ) != stamp
        })
    }

    /// Cut every replica to nothing (its immutable flag cleared first, see
    /// [`sys::truncate_to_zero`]), then release every lease: only then may
    /// a writer go on.
    pub fn revoke(&self) {
        self.truncate_replicas();
        for l in &self.leases {
            let _ = sys::release_lease(l.as_fd());
        }
    }

    /// Take every lease over: breaks signal this process from now on.
    /// `Err`: a writer holds or waits for the file (or the lease is gone).
    pub fn take_over(&self) -> io::Result<()> {
        for l in &self.leases {
            sys::set_lease_signal(l.as_fd(), super::fence_signal())?;
            sys::set_read_lease(l.as_fd())?;
            sys::set_owner(l.as_fd())?;
        }
        Ok(())
    }

    fn broken(&self) -> bool {
        self.leases
            .iter()
            .any(|l| sys::get_lease(l.as_fd()).ok() != Some(libc::F_RDLCK))
    }
}

/// An orphaned keeper's extras: the socket a new daemon connects to, and
/// the modify watch the daemon kept before.
struct Orphan {
    listener: Option<OwnedFd>,
    path: Option<PathBuf>,
    inotify: Option<Inotify>,
    watches: Vec<(WatchDescriptor, SourceKey)>,
    scanned: Instant,
}

impl Drop for Orphan {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct Keeper {
    proc: replicad_procfs::ProcReader,
    run_dir: Option<PathBuf>,
    held: Vec<Handed>,
    revoked: usize,
    /// systemd's fd store, when the daemon ran under systemd: what the
    /// keeper revokes alone leaves it too.
    store: Option<super::fdstore::FdStore>,
}

impl Keeper {
    fn revoke_where(&mut self, why: &str, mut pred: impl FnMut(&Handed) -> bool) {
        let mut i = 0;
        while i < self.held.len() {
            if pred(&self.held[i]) {
                let h = self.held.swap_remove(i);
                h.revoke();
                if let Some(store) = &self.store {
                    store.remove(h.key);
                }
                self.revoked += 1;
                eprintln!(
                    "replicad fence keeper: source {}:{}: {why}: {} replicas revoked, its lease \
                     released",
                    h.key.dev,
                    h.key.ino,
                    h.replica_count()
                );
            } else {
                i += 1;
            }
        }
    }

    /// The daemon is gone: fence alone, and wait for a new one.
    fn orphan(&mut self) -> Orphan {
        self.revoke_where("a writer was already there", |h| h.take_over().is_err());
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok();
        let mut watches = Vec::new();
        let mut unwatched = Vec::new();
        for h in &self.held {
            // Every lease fd: the source's, and its overlay layers' (a
            // layer written directly raises nothing on the overlay inode).
            for l in &h.leases {
                let path = self.proc.self_fd_path(l.as_raw_fd());
                match inotify
                    .as_ref()
                    .map(|i| i.add_watch(&path, super::watch::WATCHED))
                {
                    Some(Ok(wd)) => watches.push((wd, h.key)),
                    _ => unwatched.push(h.key),
                }
            }
        }
        // A source the watch cannot cover is not served alone.
        self.revoke_where("no modify watch could be set on it", |h| {
            unwatched.contains(&h.key)
        });
        let (listener, path) = match self.run_dir.as_deref().map(listen) {
            Some(Ok((fd, path))) => (Some(fd), Some(path)),
            Some(Err(e)) => {
                eprintln!("replicad fence keeper: no socket for a new daemon: {e}");
                (None, None)
            }
            None => (None, None),
        };
        if !self.held.is_empty() {
            eprintln!(
                "replicad fence keeper: the daemon is gone: fencing {} sources alone until a \
                 new replicad on {} takes them over",
                self.held.len(),
                self.run_dir
                    .as_deref()
                    .map_or_else(|| "?".into(), |d| d.display().to_string())
            );
        }
        // A break signalled to the dead daemon before the take-over, or a
        // change made before the watch, is caught here.
        self.revoke_where("a writer broke in", Handed::broken);
        self.revoke_where("it changed without a lease break", Handed::changed);
        Orphan {
            listener,
            path,
            inotify,
            watches,
            scanned: Instant::now(),
        }
    }

    /// Hand everything to the daemon on `conn`; `true` when it took it.
    fn hand_over(&mut self, conn: &OwnedFd) -> bool {
        // Breaks wait while this runs: bounded well inside lease-break-time.
        let limit = HANDOVER_TIMEOUT.min(deadline(&self.proc) / 2);
        let t =
            nix::sys::time::TimeVal::new(limit.as_secs() as i64, i64::from(limit.subsec_micros()));
        if socket::setsockopt(conn, sockopt::ReceiveTimeout, &t).is_err()
            || socket::setsockopt(conn, sockopt::SendTimeout, &t).is_err()
        {
            return false;
        }
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        match socket::getsockopt(conn, sockopt::PeerCredentials) {
            Ok(c) if c.uid() == me => {}
            _ => return false,
        }
        let mut buf = [0u8; MESSAGE_LEN];
        match sys::recv_with_fds(conn.as_fd(), &mut buf) {
            Ok(Some((n, _)))
                if buf
                    .get(..n)
                    .and_then(parse)
                    .is_some_and(|m| m.kind == ADOPT) => {}
            _ => return false,
        }
        for h in &self.held {
            let fds: Vec<BorrowedFd<'_>> = h
                .leases
                .iter()
                .chain(&h.replicas)
                .map(|f| f.as_fd())
                .collect();
            let sent = if h.stamp.is_none() && h.paths.is_empty() {
                sys::send_with_fds(
                    conn.as_fd(),
                    &message(HOLD, h.leases.len() as u8, h.key),
                    &fds,
                )
            } else {
                hold_message(h.leases.len() as u8, h.key, h.stamp, &h.paths)
                    .and_then(|m| sys::send_with_fds(conn.as_fd(), &m, &fds))
            };
            if sent.is_err() {
                return false;
            }
        }
        let done = message(
            DONE,
            0,
            SourceKey {
                dev: self.held.len() as u64,
                ino: 0,
            },
        );
        sys::send_with_fds(conn.as_fd(), &done, &[]).is_ok()
            && nix::fcntl::fcntl(
                conn,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .is_ok()
    }
}

/// Close every fd from 3 up but `keep` (what the daemon may have leaked
/// across exec).
fn close_all_but(keep: RawFd) {
    let close = |first: RawFd, last: libc::c_uint| {
        if let Ok(first) = libc::c_uint::try_from(first) {
            if first <= last {
                // SAFETY: close_range closes fds in the range; none of ours
                // is used but `keep`, which is outside it.
                unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
            }
        }
    };
    close(3, libc::c_uint::try_from(keep - 1).unwrap_or(0));
    close(keep + 1, libc::c_uint::MAX);
}

/// Take `<run_dir>/keeper.lock` for this process's life (retrying for 2 s:
/// a keeper being replaced may still be exiting).
fn take_lock(run_dir: &Path) -> io::Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    let path = run_dir.join(LOCK_NAME);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)?;
    let t0 = Instant::now();
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if t0.elapsed() < Duration::from_secs(2) => {
                file = f;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((_, e)) => {
                return Err(io::Error::other(format!(
                    "another fence keeper holds {} ({e}); stop it first",
                    path.display()
                )))
            }
        }
    }
}

/// Whether a keeper holds `<run_dir>/keeper.lock` now.
fn lock_held(run_dir: &Path) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    let Ok(file) = std::fs::File::open(run_dir.join(LOCK_NAME)) else {
        return false;
    };
    // Taken and dropped at once: only whether someone else holds it.
    matches!(
        Flock::lock(file, FlockArg::LockExclusiveNonblock),
        Err((_, nix::errno::Errno::EWOULDBLOCK))
    )
}

/// Listen on `<run_dir>/keeper.sock` (root-only: the run dir is 0700, the
/// socket 0600, and a peer of another uid is refused).
fn listen(run_dir: &Path) -> io::Result<(OwnedFd, PathBuf)> {
    let path = run_dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&path);
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(&path)?;
    socket::bind(fd.as_raw_fd(), &addr)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    socket::listen(
        &fd,
        socket::Backlog::new(4).unwrap_or(socket::Backlog::MAXCONN),
    )?;
    Ok((fd, path))
}

/// The keeper process's whole life. `sock` is its end of the socketpair,
/// `run_dir` the daemon's run directory (where an orphaned keeper listens
/// for the next daemon). Returns the exit code.
pub fn run(sock: RawFd, run_dir: Option<PathBuf>) -> i32 {
    // SAFETY: the daemon passed this fd to us at exec, for us alone.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // Every message waiting is read in one go, until it would block.
    if let Err(e) = nix::fcntl::fcntl(
        &sock,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    ) {
        eprintln!("replicad fence keeper: cannot make its socket non-blocking: {e}");
        return 1;
    }
    // Nothing else of the daemon's is ours to keep open (fds it leaked
    // across exec would hold open file descriptions we do not manage).
    close_all_but(sock.as_raw_fd());
    // Cutting a replica opens it: keep fds back for that.
    crate::store::reserve_fds();
    let proc = replicad_procfs::ProcReader::default();
    // One keeper per run directory, and a daemon can tell one lives.
    let _lock = match run_dir.as_deref().map(take_lock) {
        Some(Err(e)) => {
            eprintln!("replicad fence keeper: {e}");
            return 1;
        }
        Some(Ok(lock)) => Some(lock),
        None => None,
    };
    let failed = sys::harden_self(&proc.self_path(""));
    if !failed.is_empty() {
        eprintln!(
            "replicad fence keeper: running without {}",
            failed.join(", ")
        );
    }
    // SIGTERM and SIGINT (systemd stopping the unit, a shell) come through
    // a signalfd: revoke everything before going. So do lease breaks once
    // the keeper fences alone.
    let stops = [libc::SIGTERM, libc::SIGINT];
    let all = [
        libc::SIGTERM,
        libc::SIGINT,
        super::fence_signal(),
        libc::SIGIO,
    ];
    let signals = match sys::block_signals(&all).and_then(|()| sys::signalfd(&all)) {
        Ok(fd) => Some(fd),
        Err(e) => {
            eprintln!(
                "replicad fence keeper: no signalfd ({e}): SIGTERM kills without a revoke, and \
                 alone it finds breaks only by checking every lease each second"
            );
            None
        }
    };
    let mut k = Keeper {
        proc,
        run_dir,
        held: Vec::new(),
        revoked: 0,
        store: super::fdstore::FdStore::from_env(),
    };
    let mut link = Some(sock);
    let mut orphan: Option<Orphan> = None;
    let mut last = Instant::now();
    let mut buf = vec![0u8; MAX_HOLD];
    let why = 'life: loop {
        // Signals: a stop always; breaks only matter when alone.
        let mut fds: Vec<BorrowedFd<'_>> = Vec::with_capacity(4);
        if let Some(s) = &signals {
            fds.push(s.as_fd());
        }
        if let Some(l) = &link {
            fds.push(l.as_fd());
        }
        if let Some(o) = &orphan {
            if let Some(l) = &o.listener {
                fds.push(l.as_fd());
            }
            if let Some(i) = &o.inotify {
                fds.push(i.as_fd());
            }
        }
        sys::wait_readable_any(&fds, 100);
        drop(fds);
        let mut breaks = Vec::new();
        let mut overflow = false;
        if let Some(s) = &signals {
            while let Ok(Some(info)) = sys::read_signal(s.as_fd()) {
                if stops.contains(&info.signo) {
                    break 'life "told to stop";
                }
                if info.signo == libc::SIGIO {
                    overflow = true;
                } else {
                    breaks.push(info.fd);
                }
            }
        }
        if let Some(l) = &link {
            loop {
                match sys::recv_with_fds(l.as_fd(), &mut buf) {
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted =>
                    {
                        break
                    }
                    // EOF, or ECONNRESET (it died with our answers unread):
                    // the daemon is gone.
                    Ok(None) | Err(_) => {
                        link = None;
                        orphan = None;
                        let o = k.orphan();
                        if k.held.is_empty() {
                            break 'life "the daemon is gone, and nothing is left to fence";
                        }
                        orphan = Some(o);
                        break;
                    }
                    Ok(Some((n, fds))) => {
                        last = Instant::now();
                        match buf.get(..n).and_then(parse) {
                            Some(m) if m.kind == HOLD => {
                                let key = m.key;
                                if let Some(h) = Handed::from_message(m, fds) {
                                    k.held.retain(|h| h.key != key);
                                    k.held.push(h);
                                }
                            }
                            Some(m) if m.kind == DROP => k.held.retain(|h| h.key != m.key),
                            // Answer, so that the daemon sees a stopped keeper.
                            Some(m) if m.kind == PINGED => {
                                let _ =
                                    sys::send_with_fds(l.as_fd(), &message(PONG, 0, m.key), &[]);
                            }
                            // The new daemon watches everything itself now.
                            Some(m) if m.kind == ADOPTED => orphan = None,
                            _ => {}
                        }
                    }
                }
            }
            if link.is_some() && last.elapsed() > deadline(&k.proc) {
                break 'life "the daemon stopped answering";
            }
        }
        let Some(o) = orphan.as_mut() else {
            continue;
        };
        let alone = link.is_none();
        if alone {
            // A break or a lease gone revokes that source. (While a new
            // daemon adopts, breaks are its own: it took the leases over.)
            let fds: Vec<RawFd> = breaks;
            let unknown = fds.iter().any(|fd| {
                !k.held
                    .iter()
                    .any(|h| h.leases.iter().any(|l| l.as_raw_fd() == *fd))
            });
            k.revoke_where("a writer broke in", |h| {
                h.leases.iter().any(|l| fds.contains(&l.as_raw_fd()))
            });
            if overflow || unknown || o.scanned.elapsed() > SCAN_EVERY {
                k.revoke_where("a writer broke in", Handed::broken);
            }
        }
        // A change no break announces, alone and until the new daemon's
        // own watch is on (it says Adopted).
        if o.scanned.elapsed() > SCAN_EVERY {
            o.scanned = Instant::now();
            k.revoke_where("it changed without a lease break", Handed::changed);
        }
        if let Some(ino) = &o.inotify {
            if let Ok(events) = ino.read_events() {
                let lost = events
                    .iter()
                    .any(|e| e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW));
                let changed: Vec<SourceKey> = events
                    .iter()
                    .filter_map(|e| o.watches.iter().find(|(wd, _)| *wd == e.wd).map(|w| w.1))
                    .collect();
                k.revoke_where("it changed without a lease break", |h| {
                    lost || changed.contains(&h.key)
                });
            }
        }
        if let Some(l) = o.listener.as_ref().filter(|_| alone) {
            if let Ok(fd) = socket::accept4(l.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 just returned this fd, owned by nobody else.
                let conn = unsafe { OwnedFd::from_raw_fd(fd) };
                if k.hand_over(&conn) {
                    eprintln!(
                        "replicad fence keeper: a new daemon took over {} sources",
                        k.held.len()
                    );
                    link = Some(conn);
                    // No second daemon: the socket goes; the watch stays
                    // until the new one says it adopted everything.
                    o.listener = None;
                    if let Some(p) = o.path.take() {
                        let _ = std::fs::remove_file(p);
                    }
                    last = Instant::now();
                    continue;
                }
                eprintln!("replicad fence keeper: a connection that did not take over was closed");
            }
        }
        if alone && k.held.is_empty() {
            break 'life "nothing is left to fence";
        }
    };
    drop(orphan);
    let replicas: usize = k.held.iter().map(Handed::replica_count).sum();
    // Every replica first: only then may any writer go on.
    for h in &k.held {
        h.truncate_replicas();
    }
    for h in &k.held {
        for l in &h.leases {
            let _ = sys::release_lease(l.as_fd());
        }
    }
    if !k.held.is_empty() || k.revoked > 0 {
        eprintln!(
            "replicad fence keeper: {why}: {replicas} replicas of {} sources revoked, \
             their leases released; exiting",
            k.held.len()
        );
    }
    0
}

/// The keeper process behind a link: one this daemon started, or one it
/// adopted from a daemon that died (not our child: known by its pid).
#[derive(Debug)]
enum Peer {
    Child(Child),
    Adopted(u32),
}

impl Peer {
    fn pid(&self) -> u32 {
        match self {
            Peer::Child(c) => c.id(),
            Peer::Adopted(pid) => *pid,
        }
    }

    fn kill(self, run_dir: &Path) {
        match self {
            Peer::Child(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Peer::Adopted(pid) => {
                if is_keeper(pid, run_dir) {
                    // SAFETY: a signal to the keeper process we were linked to.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
        }
    }
}

/// Whether `pid` runs the fence keeper of `run_dir` (its argv[1] and
/// argv[3]), not a recycled pid or another instance's keeper.
fn is_keeper(pid: u32, run_dir: &Path) -> bool {
    let cmdline = replicad_procfs::ProcReader::default()
        .pid_dir(pid)
        .join("cmdline");
    std::fs::read(cmdline).is_ok_and(|c| {
        let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
        args.get(1) == Some(&KEEPER_ARG.as_bytes())
            && args.get(3) == Some(&run_dir.as_os_str().as_encoded_bytes())
    })
}

/// The keepers of `run_dir` running now (one, unless something is wrong).
fn keepers_of(run_dir: &Path) -> Vec<u32> {
    replicad_procfs::ProcReader::default()
        .pids()
        .unwrap_or_default()
        .into_iter()
        .filter(|&p| is_keeper(p, run_dir))
        .collect()
}

/// Wait up to `limit` for the lock of `run_dir` to be free (no keeper).
fn wait_lock_free(run_dir: &Path, limit: Duration) -> bool {
    let t0 = Instant::now();
    while lock_held(run_dir) {
        if t0.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// End the keeper of `run_dir` that cannot be taken over: SIGTERM (and
/// SIGCONT, should it be stopped) has it truncate every replica it holds,
/// release every lease and exit. One that does not exit within 5 s has its
/// replicas truncated through `/proc/<pid>/fd` and is killed. `Err`: a
/// keeper still holds the lock after that.
fn end_keeper(run_dir: &Path) -> io::Result<()> {
    for pid in keepers_of(run_dir) {
        // SAFETY: signals to the keeper of our own run directory.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
            libc::kill(pid as libc::pid_t, libc::SIGCONT);
        }
    }
    if wait_lock_free(run_dir, Duration::from_secs(5)) {
        return Ok(());
    }
    for pid in keepers_of(run_dir) {
        truncate_replicas_of(pid, run_dir);
        // SAFETY: as above; it ignored SIGTERM for 5 s.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    if wait_lock_free(run_dir, Duration::from_secs(2)) {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "a fence keeper still holds {} and neither answers nor exits; stop it \
         (pids: {:?}) before starting replicad",
        run_dir.join(LOCK_NAME).display(),
        keepers_of(run_dir)
    )))
}

/// Truncate every replica `pid` holds open (its replicad memfds, and its
/// fds of files in `run_dir` that carry a replica's identity xattr: not
/// the log or lock files beside them), clearing each one's immutable flag
/// first, before it is killed: a lease dies with it, and no replica it
/// fenced may keep its bytes.
fn truncate_replicas_of(pid: u32, run_dir: &Path) {
    // The tmpfs replicas it holds by path: every replica in the node
    // stores (what it did not hold is not fenced either).
    truncate_store_replicas(run_dir);
    let proc = replicad_procfs::ProcReader::default();
    let Ok(Some(fds)) = proc.fds(pid) else {
        return;
    };
    for fd in fds {
        let path = proc.fd_path(pid, fd);
        let Ok(target) = std::fs::read_link(&path) else {
            continue;
        };
        let memfd = target
            .as_os_str()
            .as_encoded_bytes()
            .starts_with(b"/memfd:replicad:");
        if !memfd && !target.starts_with(run_dir) {
            continue;
        }
        // Read-only first: an immutable replica cannot be opened for
        // writing until its flag is cleared.
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&path)
        else {
            continue;
        };
        let replica = f.metadata().is_ok_and(|m| m.is_file())
            && (memfd
                || sys::get_xattr(f.as_fd(), crate::store::XATTR_SOURCE)
                    .is_ok_and(|v| v.is_some()));
        if !replica {
            continue;
        }
        let _ = sys::clear_immutable(f.as_fd());
        if let Ok(w) = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(proc.self_fd_path(f.as_raw_fd()))
        {
            let _ = w.set_len(0);
        }
    }
}

/// Truncate every replica in the node stores `<run_dir>/node<N>` (regular
/// files that carry a replica's identity xattr), by path: a keeper that
/// must be killed holds its tmpfs replicas so.
fn truncate_store_replicas(run_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return;
    };
    let nodes: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("node")?.parse().ok())
        .collect();
    for (_, at) in crate::store::replicas_in(run_dir, &nodes) {
        if let Err(e) = at.revoke() {
            tracing::warn!("{e}");
        }
    }
}

/// Whether the other end of `sock` closed (the keeper exited).
fn hung_up(sock: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    rc > 0 && p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
}

/// Connect to the keeper socket at `path`; `None` when nobody listens.
fn connect(path: &Path) -> io::Result<Option<OwnedFd>> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    match socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?) {
        Ok(()) => Ok(Some(fd)),
        Err(nix::errno::Errno::ECONNREFUSED) | Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The daemon's side: the keeper process and the socket to it.
#[derive(Debug)]
pub struct KeeperLink {
    exe: PathBuf,
    run_dir: PathBuf,
    state: Mutex<Option<(OwnedFd, Peer)>>,
    /// A message did not reach it: what it holds may be incomplete.
    broken: std::sync::atomic::AtomicBool,
    /// When it last answered a ping.
    answered: Mutex<Instant>,
    /// When the daemon last pinged it: a longer gap than the silence
    /// allowed means the daemon itself did not run (stopped, starved).
    pinged: Mutex<Option<Instant>>,
}

impl KeeperLink {
    fn new(exe: PathBuf, run_dir: PathBuf, state: Option<(OwnedFd, Peer)>) -> KeeperLink {
        KeeperLink {
            exe,
            run_dir,
            state: Mutex::new(state),
            broken: std::sync::atomic::AtomicBool::new(false),
            answered: Mutex::new(Instant::now()),
            pinged: Mutex::new(None),
        }
    }

    /// Start a keeper: `exe` (replicad itself) run with [`KEEPER_ARG`].
    pub fn start(exe: PathBuf, run_dir: PathBuf) -> io::Result<KeeperLink> {
        let link = KeeperLink::new(exe, run_dir, None);
        link.respawn()?;
        Ok(link)
    }

    /// Take over the keeper a dead daemon left fencing on `run_dir`, with
    /// everything it holds. `Ok(None)`: there is none (no socket, or
    /// nobody listening: a stale socket is removed).
    pub fn adopt(exe: PathBuf, run_dir: PathBuf) -> io::Result<Option<(KeeperLink, Vec<Handed>)>> {
        let path = run_dir.join(SOCKET_NAME);
        // A keeper that lives (it holds the lock) is adopted, or waited for:
        // an orphan listens within moments; one still linked to a stopped
        // daemon gives up after its deadline and exits. Only when no keeper
        // lives is what systemd stored safe to use (no other process may
        // release a lease on the same open file descriptions).
        let wait = deadline(&replicad_procfs::ProcReader::default()) * 2 + Duration::from_secs(1);
        let t0 = Instant::now();
        loop {
            if let Some(fd) = connect(&path)? {
                return match Self::adopt_on(exe, run_dir.clone(), fd) {
                    Ok(adopted) => Ok(Some(adopted)),
                    Err(e) => {
                        tracing::warn!(
                            run_dir = %run_dir.display(),
                            "cannot take over the fence keeper there: {e}; it is told to revoke \
                             everything and go"
                        );
                        end_keeper(&run_dir)?;
                        Ok(None)
                    }
                };
            }
            if !lock_held(&run_dir) {
                let _ = std::fs::remove_file(&path);
                return Ok(None);
            }
            if t0.elapsed() > wait {
                tracing::warn!(
                    run_dir = %run_dir.display(),
                    "a fence keeper holds {} but does not hand over; it is told to revoke \
                     everything and go",
                    run_dir.join(LOCK_NAME).display()
                );
                end_keeper(&run_dir)?;
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn adopt_on(
        exe: PathBuf,
        run_dir: PathBuf,
        fd: OwnedFd,
    ) -> io::Result<(KeeperLink, Vec<Handed>)> {
        let creds = socket::getsockopt(&fd, sockopt::PeerCredentials)?;
        // SAFETY: geteuid cannot fail.
        if creds.uid() != unsafe { libc::geteuid() } {
            return Err(io::Error::other(format!(
                "{} is held by uid {}, not by us: not a keeper of ours",
                run_dir.join(SOCKET_NAME).display(),
                creds.uid()
            )));
        }
        let pid = creds.pid() as u32;
        if !is_keeper(pid, &run_dir) {
            return Err(io::Error::other(format!(
                "pid {pid} on {} is not this run directory's fence keeper",
                run_dir.join(SOCKET_NAME).display()
            )));
        }
        let handed = Self::take_over(&fd)?;
        Ok((
            KeeperLink::new(exe, run_dir, Some((fd, Peer::Adopted(pid)))),
            handed,
        ))
    }

    /// Ask the keeper on `fd` for everything, and take it.
    fn take_over(fd: &OwnedFd) -> io::Result<Vec<Handed>> {
        let limit = HANDOVER_TIMEOUT.min(deadline(&replicad_procfs::ProcReader::default()) / 2);
        let t =
            nix::sys::time::TimeVal::new(limit.as_secs() as i64, i64::from(limit.subsec_micros()));
        socket::setsockopt(fd, sockopt::ReceiveTimeout, &t)?;
        sys::send_with_fds(
            fd.as_fd(),
            &message(ADOPT, 0, SourceKey { dev: 0, ino: 0 }),
            &[],
        )?;
        let mut handed = Vec::new();
        let mut buf = vec![0u8; MAX_HOLD];
        loop {
            let Some((n, fds)) = sys::recv_with_fds(fd.as_fd(), &mut buf)? else {
                return Err(io::Error::other(
                    "the keeper closed the socket mid-handover",
                ));
            };
            match buf.get(..n).and_then(parse) {
                Some(m) if m.kind == HOLD => {
                    if let Some(h) = Handed::from_message(m, fds) {
                        handed.push(h);
                    }
                }
                Some(m) if m.kind == DONE => {
                    if m.key.dev != handed.len() as u64 {
                        return Err(io::Error::other(format!(
                            "the keeper said {} sources and handed {}",
                            m.key.dev,
                            handed.len()
                        )));
                    }
                    break;
                }
                _ => {}
            }
        }
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        Ok(handed)
    }

    /// Start a new keeper (the old one, if any, is killed, and reaped if
    /// it is our child).
    pub fn respawn(&self) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((sock, peer)) = state.take() {
            // Killed first: seeing EOF, a live keeper would take every lease
            // over again, on descriptions we already released.
            peer.kill(&self.run_dir);
            drop(sock);
        }
        let (ours, theirs) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        sys::inheritable(theirs.as_fd())?;
        // Ours never blocks: a stopped keeper must not stall the daemon (a
        // full socket is an error, and the link thread replaces it).
        nix::fcntl::fcntl(
            &ours,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let child = Command::new(&self.exe)
            .arg(KEEPER_ARG)
            .arg(theirs.as_raw_fd().to_string())
            .arg(&self.run_dir)
            .stdin(std::process::Stdio::null())
            .spawn()?;
        drop(theirs);
        *state = Some((ours, Peer::Child(child)));
        self.broken
            .store(false, std::sync::atomic::Ordering::SeqCst);
        *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        Ok(())
    }

    /// Whether the keeper has exited (it does after it revoked and released
    /// everything it held).
    pub fn exited(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match state.as_mut() {
            None => true,
            Some((_, Peer::Child(c))) => !matches!(c.try_wait(), Ok(None)),
            Some((sock, Peer::Adopted(_))) => hung_up(sock.as_fd()),
        }
    }

    /// The keeper's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, p)| p.pid())
    }

    fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some((sock, _)) = state.as_ref() else {
            return Err(io::Error::from_raw_os_error(libc::EPIPE));
        };
        let sent = sys::send_with_fds(sock.as_fd(), data, fds);
        if sent.is_err() {
            self.broken.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        sent
    }

    /// Hold these of `key`, whose replicas copy the file at `stamp`: its
    /// lease fds (the source's first, then its overlay layers'), then
    /// every valid replica, memfds by fd, tmpfs replicas by path
    /// (replacing what the keeper held for it).
    pub fn hold(
        &self,
        key: SourceKey,
        stamp: Stamp,
        leases: &[BorrowedFd<'_>],
        replicas: &[BorrowedFd<'_>],
        paths: &[ReplicaPath],
    ) -> io::Result<()> {
        if leases.is_empty() || leases.len() > usize::from(u8::MAX) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut fds = Vec::with_capacity(leases.len() + replicas.len());
        fds.extend_from_slice(leases);
        fds.extend_from_slice(replicas);
        let m = hold_message(leases.len() as u8, key, Some(stamp), paths)?;
        self.send(&m, &fds)
    }

    /// Stop holding `key` (revoked, or gone from the list).
    pub fn release(&self, key: SourceKey) -> io::Result<()> {
        self.send(&message(DROP, 0, key), &[])
    }

    /// Say the daemon lives, and check the keeper does: `Err` when it
    /// exited, missed a message, or has not answered for `silence`
    /// (stopped, hung).
    pub fn ping(&self, silence: Duration) -> io::Result<()> {
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::other("a message to it was not delivered"));
        }
        self.send(&message(PINGED, 0, SourceKey { dev: 0, ino: 0 }), &[])?;
        // A daemon that was stopped itself (SIGSTOP, a stalled machine)
        // asked nothing meanwhile: its silence is not the keeper's, which
        // gets a whole `silence` from this ping (a CI run found a keeper
        // declared lost the moment its daemon was continued).
        let now = Instant::now();
        let last = self
            .pinged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(now);
        if last.is_some_and(|t| now.duration_since(t) > silence) {
            *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = now;
        }
        if self.exited() {
            return Err(io::Error::other("it exited"));
        }
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some((sock, _)) = state.as_ref() else {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        };
        let mut buf = [0u8; MESSAGE_LEN];
        loop {
            match sys::recv_with_fds(sock.as_fd(), &mut buf) {
                Ok(Some((n, _))) => {
                    if buf.get(..n).and_then(parse).is_some_and(|m| m.kind == PONG) {
                        *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                    }
                }
                Ok(None) => return Err(io::Error::other("it closed its socket")),
                Err(_) => break,
            }
        }
        drop(state);
        let quiet = self
            .answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        if quiet > silence {
            return Err(io::Error::other(format!(
                "it has not answered for {quiet:?}"
            )));
        }
        Ok(())
    }

    /// Stop the keeper without a revoke of its own (the daemon revoked and
    /// released everything already): close the socket (the keeper, holding
    /// nothing, exits) and reap it.
    pub fn stop(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((sock, mut peer)) = state.take() {
            drop(sock);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(2) {
                let gone = match &mut peer {
                    Peer::Child(c) => matches!(c.try_wait(), Ok(Some(_))),
                    Peer::Adopted(pid) => !is_keeper(*pid, &self.run_dir),
                };
                if gone {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            peer.kill(&self.run_dir);
        }
    }

    /// Tell the keeper every handed source is taken over (its own modify
    /// watch, kept until now, can go).
    pub fn adopted(&self) {
        let _ = self.send(&message(ADOPTED, 0, SourceKey { dev: 0, ino: 0 }), &[]);
    }

    /// A word to the keeper, so that it does not take a daemon busy adopting
    /// for a stopped one (the link thread pings only once started).
    pub fn nudge(&self) {
        let _ = self.send(&message(PINGED, 0, SourceKey { dev: 0, ino: 0 }), &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let key = SourceKey {
            dev: 7,
            ino: 1 << 40,
        };
        let m = parse(&message(DROP, 0, key)).unwrap();
        assert_eq!((m.kind, m.count, m.key, m.stamp), (DROP, 0, key, None));
        let m = parse(&hold_message(3, key, Some((1 << 20, -5, i64::MAX)), &[]).unwrap()).unwrap();
        assert_eq!(
            (m.kind, m.count, m.key, m.stamp, m.paths),
            (HOLD, 3, key, Some((1 << 20, -5, i64::MAX)), Vec::new())
        );
        // tmpfs replicas ride along by path, with and without a stamp.
        let paths = vec![
            ReplicaPath {
                path: PathBuf::from("/run/replicad/node0/1-2-g3"),
                dev: 40,
                ino: u64::MAX,
            },
            ReplicaPath {
                path: PathBuf::from("/run/replicad/node1/1-2-g3"),
                dev: 41,
                ino: 7,
            },
        ];
        for stamp in [Some((4096, 1, 2)), None] {
            let bytes = hold_message(1, key, stamp, &paths).unwrap();
            let m = parse(&bytes).unwrap();
            assert_eq!((m.kind, m.count, m.stamp), (HOLD, 1, stamp));
            assert_eq!(m.paths, paths);
            // Cut short, or with a byte too many: no message.
            assert_eq!(parse(&bytes[..bytes.len() - 1]), None);
            let mut long = bytes.clone();
            long.push(0);
            assert_eq!(parse(&long), None);
        }
        let huge = ReplicaPath {
            path: PathBuf::from("x".repeat(MAX_HOLD)),
            dev: 0,
            ino: 0,
        };
        assert!(hold_message(1, key, None, &[huge]).is_err());
        assert_eq!(parse(&[0u8; 47]), None);
        assert_eq!(parse(&[1, 2, 3]), None);
        let d = deadline(&replicad_procfs::ProcReader::new("/nonexistent"));
        assert_eq!(d, Duration::from_secs(5));
    }
}
