//! The fence keeper: a small process of its own that holds a duplicate of
//! every lease fd and every valid replica fd, so that no single replicad
//! process that dies or stops lets a writer reach a file while a replica
//! of it is mapped.
//!
//! ```text
//!  daemon ── socketpair (SOCK_SEQPACKET) ── keeper (re-exec of replicad,
//!    │  Hold{source, leases} + [lease fds,         no threads, no runtime,
//!    │        replica fds]                          SCHED_FIFO, mlocked,
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
//!    truncate every replica it holds (the kernel unmaps them from every
//!    process: readers fall back to the file), then release every lease
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
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::socket::{self as socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};

use crate::model::SourceKey;
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
const MESSAGE_LEN: usize = 24;
/// A `Hold` also carries the generation the daemon read under the lease.
const HOLD_LEN: usize = MESSAGE_LEN + 24;

/// What a source's `fstat` said when its replicas were copied: size,
/// mtime and ctime (ns). A file whose stamp moved has changed.
pub type Stamp = (u64, i64, i64);

/// A parsed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Msg {
    kind: u8,
    /// `Hold`: how many of its fds are leases.
    count: u8,
    key: SourceKey,
    stamp: Option<Stamp>,
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

/// A `Hold` of `key` whose first `leases` fds are leases, at `stamp`.
fn hold_message(leases: u8, key: SourceKey, stamp: Stamp) -> [u8; HOLD_LEN] {
    let mut m = [0u8; HOLD_LEN];
    m[..MESSAGE_LEN].copy_from_slice(&message(HOLD, leases, key));
    m[24..32].copy_from_slice(&stamp.0.to_le_bytes());
    m[32..40].copy_from_slice(&stamp.1.to_le_bytes());
    m[40..48].copy_from_slice(&stamp.2.to_le_bytes());
    m
}

fn parse(m: &[u8]) -> Option<Msg> {
    if m.len() != MESSAGE_LEN && m.len() != HOLD_LEN {
        return None;
    }
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(m.get(at..at + 8)?);
        Some(b)
    };
    let stamp = if m.len() == HOLD_LEN {
        Some((
            u64::from_le_bytes(word(24)?),
            i64::from_le_bytes(word(32)?),
            i64::from_le_bytes(word(40)?),
        ))
    } else {
        None
    };
    Some(Msg {
        kind: m[0],
        count: m[1],
        key: SourceKey {
            dev: u64::from_le_bytes(word(8)?),
            ino: u64::from_le_bytes(word(16)?),
        },
        stamp,
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
/// its valid replicas (read-write fds).
#[derive(Debug)]
pub struct Handed {
    pub key: SourceKey,
    pub leases: Vec<OwnedFd>,
    pub replicas: Vec<OwnedFd>,
    /// The source's stamp when its replicas were copied, if known.
    pub stamp: Option<Stamp>,
}

impl Handed {
    fn from_message(m: Msg, mut fds: Vec<OwnedFd>) -> Option<Handed> {
        let n = usize::from(m.count);
        if m.kind != HOLD || n == 0 || fds.len() <= n {
            return None;
        }
        let replicas = fds.split_off(n);
        Some(Handed {
            key: m.key,
            leases: fds,
            replicas,
            stamp: m.stamp,
        })
    }

    /// Whether the source is no longer what its replicas copy (a change no
    /// break announced: `O_RDONLY|O_TRUNC`).
    fn changed(&self) -> bool {
        let (Some(stamp), Some(l)) = (self.stamp, self.leases.first()) else {
            return false;
        };
        nix::sys::stat::fstat(l).is_ok_and(|st| {
            let ns = |s: i64, n: i64| s * 1_000_000_000 + n;
            (
                st.st_size as u64,
                ns(st.st_mtime, st.st_mtime_nsec),
                ns(st.st_ctime, st.st_ctime_nsec),
            ) != stamp
        })
    }

    /// Cut every replica to nothing, then release every lease: only then
    /// may a writer go on.
    pub fn revoke(&self) {
        for r in &self.replicas {
            let _ = sys::truncate_to_zero(r.as_fd());
        }
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
}

impl Keeper {
    fn revoke_where(&mut self, why: &str, mut pred: impl FnMut(&Handed) -> bool) {
        let mut i = 0;
        while i < self.held.len() {
            if pred(&self.held[i]) {
                let h = self.held.swap_remove(i);
                h.revoke();
                self.revoked += 1;
                eprintln!(
                    "replicad fence keeper: source {}:{}: {why}: {} replicas revoked, its lease \
                     released",
                    h.key.dev,
                    h.key.ino,
                    h.replicas.len()
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
        if let Some(ino) = &inotify {
            for h in &self.held {
                if let Some(l) = h.leases.first() {
                    let path = self.proc.self_fd_path(l.as_raw_fd());
                    if let Ok(wd) = ino.add_watch(&path, super::watch::WATCHED) {
                        watches.push((wd, h.key));
                    }
                }
            }
        }
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
        let t = nix::sys::time::TimeVal::new(HANDOVER_TIMEOUT.as_secs() as i64, 0);
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
            let m = hold_message(h.leases.len() as u8, h.key, h.stamp.unwrap_or_default());
            let sent = if h.stamp.is_some() {
                sys::send_with_fds(conn.as_fd(), &m, &fds)
            } else {
                sys::send_with_fds(conn.as_fd(), &m[..MESSAGE_LEN], &fds)
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
    let proc = replicad_procfs::ProcReader::default();
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
    };
    let mut link = Some(sock);
    let mut orphan: Option<Orphan> = None;
    let mut last = Instant::now();
    let mut buf = [0u8; 64];
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
                                if let Some(h) = Handed::from_message(m, fds) {
                                    k.held.retain(|h| h.key != m.key);
                                    k.held.push(h);
                                }
                            }
                            Some(m) if m.kind == DROP => k.held.retain(|h| h.key != m.key),
                            // Answer, so that the daemon sees a stopped keeper.
                            Some(m) if m.kind == PINGED => {
                                let _ =
                                    sys::send_with_fds(l.as_fd(), &message(PONG, 0, m.key), &[]);
                            }
                            _ => {}
                        }
                    }
                }
            }
            if link.is_some() && last.elapsed() > deadline(&k.proc) {
                break 'life "the daemon stopped answering";
            }
            continue;
        }
        let Some(o) = orphan.as_mut() else {
            break 'life "no daemon";
        };
        // Alone: a break or a change revokes that source.
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
            o.scanned = Instant::now();
            k.revoke_where("a writer broke in", Handed::broken);
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
        if let Some(l) = &o.listener {
            if let Ok(fd) = socket::accept4(l.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 just returned this fd, owned by nobody else.
                let conn = unsafe { OwnedFd::from_raw_fd(fd) };
                if k.hand_over(&conn) {
                    eprintln!(
                        "replicad fence keeper: a new daemon took over {} sources",
                        k.held.len()
                    );
                    link = Some(conn);
                    orphan = None;
                    last = Instant::now();
                    continue;
                }
                eprintln!("replicad fence keeper: a connection that did not take over was closed");
            }
        }
        if k.held.is_empty() {
            break 'life "nothing is left to fence";
        }
    };
    drop(orphan);
    let replicas: usize = k.held.iter().map(|h| h.replicas.len()).sum();
    // Every replica first: only then may any writer go on.
    for h in &k.held {
        for r in &h.replicas {
            let _ = sys::truncate_to_zero(r.as_fd());
        }
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

    fn kill(self) {
        match self {
            Peer::Child(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Peer::Adopted(pid) => {
                if is_keeper(pid) {
                    // SAFETY: a signal to the keeper process we were linked to.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
        }
    }
}

/// Whether `pid` runs a fence keeper (its argv[1]), not a recycled pid.
fn is_keeper(pid: u32) -> bool {
    let cmdline = replicad_procfs::ProcReader::default()
        .pid_dir(pid)
        .join("cmdline");
    std::fs::read(cmdline).is_ok_and(|c| {
        c.split(|&b| b == 0)
            .nth(1)
            .is_some_and(|a| a == KEEPER_ARG.as_bytes())
    })
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
}

impl KeeperLink {
    fn new(exe: PathBuf, run_dir: PathBuf, state: Option<(OwnedFd, Peer)>) -> KeeperLink {
        KeeperLink {
            exe,
            run_dir,
            state: Mutex::new(state),
            broken: std::sync::atomic::AtomicBool::new(false),
            answered: Mutex::new(Instant::now()),
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
        if !path.exists() {
            return Ok(None);
        }
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        match socket::connect(fd.as_raw_fd(), &UnixAddr::new(&path)?) {
            Ok(()) => {}
            Err(nix::errno::Errno::ECONNREFUSED) | Err(nix::errno::Errno::ENOENT) => {
                let _ = std::fs::remove_file(&path);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        let creds = socket::getsockopt(&fd, sockopt::PeerCredentials)?;
        // SAFETY: geteuid cannot fail.
        if creds.uid() != unsafe { libc::geteuid() } {
            return Err(io::Error::other(format!(
                "{} is held by uid {}, not by us: not a keeper of ours",
                path.display(),
                creds.uid()
            )));
        }
        let pid = creds.pid() as u32;
        match Self::take_over(&fd) {
            Ok(handed) => Ok(Some((
                KeeperLink::new(exe, run_dir, Some((fd, Peer::Adopted(pid)))),
                handed,
            ))),
            Err(e) => {
                // What it holds cannot be taken over: have it revoke
                // everything (truncate, then release) and go.
                if is_keeper(pid) {
                    // SAFETY: a signal to the keeper we just talked to.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                }
                Err(e)
            }
        }
    }

    /// Ask the keeper on `fd` for everything, and take it.
    fn take_over(fd: &OwnedFd) -> io::Result<Vec<Handed>> {
        let t = nix::sys::time::TimeVal::new(HANDOVER_TIMEOUT.as_secs() as i64, 0);
        socket::setsockopt(fd, sockopt::ReceiveTimeout, &t)?;
        sys::send_with_fds(
            fd.as_fd(),
            &message(ADOPT, 0, SourceKey { dev: 0, ino: 0 }),
            &[],
        )?;
        let mut handed = Vec::new();
        let mut buf = [0u8; HOLD_LEN];
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
            drop(sock);
            peer.kill();
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

    /// Hold these fds of `key`, whose replicas copy the file at `stamp`:
    /// its lease fds (the source's first, then its overlay layers'), then
    /// every valid replica (replacing what the keeper held for it).
    pub fn hold(
        &self,
        key: SourceKey,
        stamp: Stamp,
        leases: &[BorrowedFd<'_>],
        replicas: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        if leases.is_empty() || leases.len() > usize::from(u8::MAX) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut fds = Vec::with_capacity(leases.len() + replicas.len());
        fds.extend_from_slice(leases);
        fds.extend_from_slice(replicas);
        self.send(&hold_message(leases.len() as u8, key, stamp), &fds)
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
                    Peer::Adopted(pid) => !is_keeper(*pid),
                };
                if gone {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            peer.kill();
        }
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
        let m = parse(&hold_message(3, key, (1 << 20, -5, i64::MAX))).unwrap();
        assert_eq!(
            (m.kind, m.count, m.key, m.stamp),
            (HOLD, 3, key, Some((1 << 20, -5, i64::MAX)))
        );
        assert_eq!(parse(&[0u8; 47]), None);
        assert_eq!(parse(&[1, 2, 3]), None);
        let d = deadline(&replicad_procfs::ProcReader::new("/nonexistent"));
        assert_eq!(d, Duration::from_secs(5));
    }
}
