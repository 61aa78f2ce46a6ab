//! The fence keeper: a small process of its own that holds a duplicate of
//! every lease fd and every valid replica fd, so that no single replicad
//! process that dies or stops lets a writer reach a file while a replica
//! of it is mapped.
//!
//! ```text
//!  daemon ── socketpair (SOCK_SEQPACKET) ── keeper (re-exec of replicad,
//!    │  Hold{source} + [lease fd, replica fds]    no threads, no runtime,
//!    │  Drop{source}                               SCHED_FIFO, mlocked,
//!    │  Ping every PING                            oom_score_adj -1000)
//!    │
//!  daemon killed (EOF), or silent for longer than its deadline (stopped,
//!  hung), or the keeper told to stop (SIGTERM, SIGINT):
//!    keeper: truncate every replica it holds (the kernel unmaps them from
//!    every process: readers fall back to the file), then release every
//!    lease (any duplicate of the open file description may), then exit.
//! ```
//!
//! A lease belongs to the open file description, so while the keeper holds
//! its duplicate the lease outlives the daemon: a writer waits until the
//! keeper has truncated every replica. While the daemon runs it answers
//! breaks itself (the keeper only watches); when the keeper is lost the
//! daemon revokes everything (the keeper may have) and starts a new one.
//! The deadline is a third of `/proc/sys/fs/lease-break-time`, between
//! 0.5 and 5 s: the keeper acts before the kernel would break by force.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::SourceKey;
use crate::sys;

/// The hidden first argument that makes `replicad` the keeper.
pub const KEEPER_ARG: &str = "--fence-keeper";
/// How often the daemon says it is alive.
pub const PING: Duration = Duration::from_millis(200);

const HOLD: u8 = 1;
const DROP: u8 = 2;
const PINGED: u8 = 3;
const PONG: u8 = 4;
const MESSAGE_LEN: usize = 24;

fn message(kind: u8, key: SourceKey) -> [u8; MESSAGE_LEN] {
    let mut m = [0u8; MESSAGE_LEN];
    m[0] = kind;
    m[8..16].copy_from_slice(&key.dev.to_le_bytes());
    m[16..24].copy_from_slice(&key.ino.to_le_bytes());
    m
}

fn parse(m: &[u8]) -> Option<(u8, SourceKey)> {
    if m.len() != MESSAGE_LEN {
        return None;
    }
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b.copy_from_slice(m.get(r)?);
        Some(u64::from_le_bytes(b))
    };
    Some((
        m[0],
        SourceKey {
            dev: word(8..16)?,
            ino: word(16..24)?,
        },
    ))
}

/// How long the keeper waits for a word from the daemon before it takes
/// the daemon for dead (and the daemon for the keeper): a third of the
/// kernel's lease-break-time, 0.5 to 5 s.
pub fn deadline(proc: &replicad_procfs::ProcReader) -> Duration {
    let secs = proc.lease_break_time().unwrap_or(45);
    Duration::from_millis(secs.saturating_mul(1000) / 3)
        .clamp(Duration::from_millis(500), Duration::from_secs(5))
}

/// What the keeper holds for one source: the lease fd, then its replicas.
struct Held {
    key: SourceKey,
    fds: Vec<OwnedFd>,
}

/// The keeper process's whole life. `sock` is its end of the socketpair.
/// Returns the exit code.
pub fn run(sock: RawFd) -> i32 {
    // SAFETY: the daemon passed this fd to us at exec, for us alone.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let proc = replicad_procfs::ProcReader::default();
    let failed = sys::harden_self(&proc.self_path(""));
    if !failed.is_empty() {
        eprintln!(
            "replicad fence keeper: running without {}",
            failed.join(", ")
        );
    }
    // SIGTERM and SIGINT (systemd stopping the unit, a shell) come through
    // a signalfd: revoke everything before going.
    let stop = match sys::block_signals(&[libc::SIGTERM, libc::SIGINT])
        .and_then(|()| sys::signalfd(&[libc::SIGTERM, libc::SIGINT]))
    {
        Ok(fd) => Some(fd),
        Err(e) => {
            eprintln!("replicad fence keeper: no signalfd ({e}): SIGTERM kills without a revoke");
            None
        }
    };
    let mut held: Vec<Held> = Vec::new();
    let mut last = Instant::now();
    let mut buf = [0u8; 64];
    let why = loop {
        let limit = deadline(&proc);
        let ready = match &stop {
            Some(s) => sys::wait_readable_any(&[sock.as_fd(), s.as_fd()], 100),
            None => sys::wait_readable_any(&[sock.as_fd()], 100),
        };
        if let Some(s) = &stop {
            if ready > 0 && matches!(sys::read_signal(s.as_fd()), Ok(Some(_))) {
                break "told to stop";
            }
        }
        if ready > 0 {
            match sys::recv_with_fds(sock.as_fd(), &mut buf) {
                Ok(None) => break "the daemon is gone",
                Ok(Some((n, fds))) => {
                    last = Instant::now();
                    match buf.get(..n).and_then(parse) {
                        Some((HOLD, key)) if !fds.is_empty() => {
                            held.retain(|h| h.key != key);
                            held.push(Held { key, fds });
                        }
                        Some((DROP, key)) => held.retain(|h| h.key != key),
                        // Answer, so that the daemon sees a stopped keeper.
                        Some((PINGED, key)) => {
                            let _ = sys::send_with_fds(sock.as_fd(), &message(PONG, key), &[]);
                        }
                        _ => {}
                    }
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break "the daemon's socket failed",
            }
        }
        if last.elapsed() > limit {
            break "the daemon stopped answering";
        }
    };
    let replicas: usize = held.iter().map(|h| h.fds.len().saturating_sub(1)).sum();
    // Every replica first: only then may any writer go on.
    for h in &held {
        for r in h.fds.iter().skip(1) {
            let _ = sys::truncate_to_zero(r.as_fd());
        }
    }
    for h in &held {
        if let Some(lease) = h.fds.first() {
            let _ = sys::release_lease(lease.as_fd());
        }
    }
    if !held.is_empty() {
        eprintln!(
            "replicad fence keeper: {why}: {replicas} replicas of {} sources revoked, \
             their leases released",
            held.len()
        );
    }
    0
}

/// The daemon's side: the keeper process and the socket to it.
#[derive(Debug)]
pub struct KeeperLink {
    exe: PathBuf,
    state: Mutex<Option<(OwnedFd, Child)>>,
    /// A message did not reach it: what it holds may be incomplete.
    broken: std::sync::atomic::AtomicBool,
    /// When it last answered a ping.
    answered: Mutex<Instant>,
}

impl KeeperLink {
    /// Start a keeper: `exe` (replicad itself) run with [`KEEPER_ARG`].
    pub fn start(exe: PathBuf) -> io::Result<KeeperLink> {
        let link = KeeperLink {
            exe,
            state: Mutex::new(None),
            broken: std::sync::atomic::AtomicBool::new(false),
            answered: Mutex::new(Instant::now()),
        };
        link.respawn()?;
        Ok(link)
    }

    /// Start a new keeper (the old one, if any, is killed and reaped).
    pub fn respawn(&self) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, mut child)) = state.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
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
            .stdin(std::process::Stdio::null())
            .spawn()?;
        drop(theirs);
        *state = Some((ours, child));
        self.broken
            .store(false, std::sync::atomic::Ordering::SeqCst);
        *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        Ok(())
    }

    /// Whether the keeper has exited (it does after it revoked and released
    /// everything it held).
    pub fn exited(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .as_mut()
            .is_none_or(|(_, c)| !matches!(c.try_wait(), Ok(None)))
    }

    /// The keeper's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, c)| c.id())
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

    /// Hold these fds of `key`: the lease fd first, then every valid
    /// replica (replacing what the keeper held for it).
    pub fn hold(
        &self,
        key: SourceKey,
        lease: BorrowedFd<'_>,
        replicas: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        let mut fds = Vec::with_capacity(1 + replicas.len());
        fds.push(lease);
        fds.extend_from_slice(replicas);
        self.send(&message(HOLD, key), &fds)
    }

    /// Stop holding `key` (revoked, or gone from the list).
    pub fn release(&self, key: SourceKey) -> io::Result<()> {
        self.send(&message(DROP, key), &[])
    }

    /// Say the daemon lives, and check the keeper does: `Err` when it
    /// exited, missed a message, or has not answered for `silence`
    /// (stopped, hung).
    pub fn ping(&self, silence: Duration) -> io::Result<()> {
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::other("a message to it was not delivered"));
        }
        self.send(&message(PINGED, SourceKey { dev: 0, ino: 0 }), &[])?;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some((sock, child)) = state.as_mut() else {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        };
        if !matches!(child.try_wait(), Ok(None)) {
            return Err(io::Error::other("it exited"));
        }
        let mut buf = [0u8; MESSAGE_LEN];
        while let Ok(Some((n, _))) = sys::recv_with_fds(sock.as_fd(), &mut buf) {
            if buf.get(..n).and_then(parse).is_some_and(|(k, _)| k == PONG) {
                *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            }
        }
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
    /// released everything already): close the socket and reap it.
    pub fn stop(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((sock, mut child)) = state.take() {
            drop(sock);
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(2) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = child.kill();
            let _ = child.wait();
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
        assert_eq!(parse(&message(HOLD, key)), Some((HOLD, key)));
        assert_eq!(parse(&[1, 2, 3]), None);
        let d = deadline(&replicad_procfs::ProcReader::new("/nonexistent"));
        assert_eq!(d, Duration::from_secs(5));
    }
}
