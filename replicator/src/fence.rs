//! The write fence: a read lease on each source, and the thread that hears
//! writers arrive.
//!
//! A read lease (`F_SETLEASE F_RDLCK` on an `O_RDONLY` fd) is refused while
//! anyone holds the file open for writing, and while it is held the kernel
//! blocks the next write-open or truncate until we release it. Breaks arrive
//! as a realtime signal ([`fence_signal`], `si_fd` = the lease fd) read from
//! a `signalfd` by a dedicated thread, so they never wait behind copy work.
//! If the realtime queue overflows the kernel sends `SIGIO` instead, without
//! the fd; the thread then reports [`FenceEvent::Overflow`] and the engine
//! checks every lease.
//!
//! Both signals must be blocked in every thread of the process, so
//! [`prepare`] runs first thing in `main`, before any thread starts.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::list::{FenceKind, SourceKey};
use crate::{sys, Error, Result};

/// The realtime signal lease breaks arrive on.
pub fn fence_signal() -> libc::c_int {
    libc::SIGRTMIN() + 4
}

/// Block the fence signals in the calling thread; call before starting any
/// thread, so every thread inherits the mask and breaks reach the signalfd.
pub fn prepare() -> io::Result<()> {
    sys::block_signals(&[fence_signal(), libc::SIGIO])
}

/// Whether [`prepare`] ran in this thread.
pub fn prepared() -> bool {
    sys::signal_blocked(fence_signal()) && sys::signal_blocked(libc::SIGIO)
}

/// How writes to the file behind `fd` can be kept out, or why they cannot.
pub fn fence_kind(fd: BorrowedFd<'_>, path: &Path) -> Result<FenceKind> {
    let fs = sys::fs_info(fd).map_err(|e| Error::io(path, e))?;
    if let Some(name) = sys::unfenceable_fs(fs.magic) {
        return Err(Error::Unfenceable {
            path: path.to_path_buf(),
            reason: format!(
                "it is on {name}, where contents can change without a local write \
                 (or are made up on read), so no lease can fence it"
            ),
        });
    }
    if fs.read_only {
        return Ok(FenceKind::ReadOnlyMount);
    }
    let attrs = sys::statx_attrs(fd).map_err(|e| Error::io(path, e))?;
    if attrs.immutable {
        return Ok(FenceKind::Immutable);
    }
    if attrs.verity {
        return Ok(FenceKind::Verity);
    }
    Ok(FenceKind::Lease)
}

/// Take a read lease on `fd`, breaks to arrive as [`fence_signal`].
pub fn take_lease(fd: BorrowedFd<'_>, path: &Path, key: SourceKey) -> Result<()> {
    let refused = |reason: String| Error::Unfenceable {
        path: path.to_path_buf(),
        reason,
    };
    sys::set_lease_signal(fd, fence_signal())
        .map_err(|e| refused(format!("F_SETSIG failed: {e}")))?;
    match sys::set_read_lease(fd) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
            let writers = writers_of(key);
            let who = if writers.is_empty() {
                String::from("another process")
            } else {
                writers
                    .iter()
                    .map(|(pid, comm)| format!("pid {pid} ({comm})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            Err(refused(format!(
                "it is open for writing by {who}; a write fence needs every writer \
                 gone: close the writer and retry"
            )))
        }
        Err(e) => Err(refused(format!(
            "the filesystem refused a read lease ({e}); files there cannot be replicated"
        ))),
    }
}

/// Processes holding the file open for writing (fds or writable shared
/// mappings), for error messages. Best effort: unreadable entries are
/// skipped.
pub fn writers_of(key: SourceKey) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if holds_for_write(pid, key) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            found.push((pid, comm.trim().to_string()));
        }
    }
    found
}

fn holds_for_write(pid: u32, key: SourceKey) -> bool {
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            let Ok(meta) = std::fs::metadata(fd.path()) else {
                continue;
            };
            if meta.dev() != key.dev || meta.ino() != key.ino {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
                .unwrap_or(0);
            if flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
                return true;
            }
        }
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() >= 5
            && f[1].starts_with("rw")
            && f[1].ends_with('s')
            && f[4].parse::<u64>().ok() == Some(key.ino)
    })
}

/// What the fence thread reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceEvent {
    /// A writer broke the lease on this fd; `at` is when the signal was read.
    Break { fd: RawFd, at: Instant },
    /// The realtime queue overflowed: some break's fd is unknown.
    Overflow { at: Instant },
}

/// The running fence thread.
#[derive(Debug)]
pub struct FenceThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl FenceThread {
    /// Start the thread; `on_event` runs on it for every break.
    pub fn spawn<F>(on_event: F) -> io::Result<FenceThread>
    where
        F: Fn(FenceEvent) + Send + 'static,
    {
        if !prepared() {
            return Err(io::Error::other(
                "the fence signals are not blocked: call fence::prepare() before starting threads",
            ));
        }
        let rt = fence_signal();
        let sfd = signalfd(&[rt, libc::SIGIO])?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("replicad-fence".into())
            .spawn(move || run(sfd, rt, &stop2, on_event))?;
        Ok(FenceThread {
            stop,
            handle: Some(handle),
        })
    }

    /// Stop the thread and wait for it.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for FenceThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A non-blocking signalfd for `signals` (which must be blocked).
fn signalfd(signals: &[libc::c_int]) -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain old data; sigemptyset initializes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t for these calls.
    unsafe {
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
    }
    // SAFETY: set is initialized; -1 asks for a new signalfd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Read one pending signal; `None` when none is pending.
fn read_signal(sfd: BorrowedFd<'_>) -> io::Result<Option<libc::signalfd_siginfo>> {
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
    Ok(Some(info))
}

fn run<F: Fn(FenceEvent)>(sfd: OwnedFd, rt: libc::c_int, stop: &AtomicBool, on_event: F) {
    while !stop.load(Ordering::SeqCst) {
        if !wait_readable(sfd.as_fd(), 100) {
            continue;
        }
        loop {
            match read_signal(sfd.as_fd()) {
                Ok(Some(info)) => {
                    let at = Instant::now();
                    if info.ssi_signo as libc::c_int == rt {
                        on_event(FenceEvent::Break {
                            fd: info.ssi_fd,
                            at,
                        });
                    } else {
                        on_event(FenceEvent::Overflow { at });
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("fence signalfd read failed: {e}");
                    break;
                }
            }
        }
    }
}

/// poll(2) for readability with a timeout in milliseconds.
fn wait_readable(fd: BorrowedFd<'_>, timeout_ms: libc::c_int) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    rc > 0 && pfd.revents & libc::POLLIN != 0
}
