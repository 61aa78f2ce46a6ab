//! Following the published set: a running program moves onto replicas made
//! after it started (`replicactl replicate`, a new generation after a
//! write, a daemon that started later), at no CPU cost while nothing
//! changes.
//!
//! ```text
//!  thread "replicad-follow" (256 KiB stack, every signal but the faults
//!  blocked, started after the constructor's hello)
//!   loop:
//!     set open and not retired?
//!       no:  inotify(<socket dir>: IN_CREATE | IN_MOVED_TO; or its parent,
//!            for the directory), open it again (trust checks), else
//!            poll(inotify, stop eventfd) ─ asleep until something appears
//!       yes: s = seq; s not yet looked at?  one /proc/self/maps read:
//!            a private read-only file mapping, not on a replica, not
//!            declined, that the set shows a replica of for us? hello
//!            FUTEX_WAIT(low half of seq, s)  ─ asleep until the daemon
//!            changes the set (see replicad_wire::published)
//! ```
//!
//! The thread never holds a shim lock while it sleeps and only tries them:
//! a busy shim is tried again a little later. A wrapper that skipped its
//! attach because the shim was busy (the watcher holding it, often) says
//! so, and the watcher looks at our maps again before it sleeps. `unshare()` and `setns()`
//! fail in a process with more than one thread (user and mount namespaces
//! want a single one), so their wrappers [`stop`] and join it first; the
//! next file `mmap()` or `dlopen()` of the program starts it again, as in
//! a child after `fork()` (where it does not exist).

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use replicad_wire::published::Reader;

use crate::{attach, debug, guarded};

/// The thread's name (at most 15 bytes: the kernel's `comm`).
pub const THREAD_NAME: &std::ffi::CStr = c"replicad-follow";
/// Its stack: a hello keeps its buffers on the heap; room for a debug
/// build's frames (decoding an answer) too.
const STACK: usize = 256 << 10;
/// Longest sleep: a lost wake (none is expected) costs at most this.
const WAIT: Duration = Duration::from_secs(60);
/// A busy shim (another thread attaching) is tried again after this ...
const BUSY_NAP: Duration = Duration::from_millis(20);
/// ... this many times in a row, then after [`WAIT`] (a fork child whose
/// parent held the lock at the fork never gets it).
const BUSY_TRIES: u32 = 50;

/// The constructor decided to follow: where the published set lives.
static SET_PATH: OnceLock<PathBuf> = OnceLock::new();
/// The seq the constructor checked our maps at, with its reader: the
/// first thread need not look again.
static CHECKED: Mutex<Option<(usize, u64)>> = Mutex::new(None);
/// A watcher runs in this process.
static RUNNING: AtomicBool = AtomicBool::new(false);
/// Asked to end ([`stop`]).
static STOP: AtomicBool = AtomicBool::new(false);
/// The seq word it sleeps on (0: none), for [`stop`] to wake.
static WAITING_ON: AtomicUsize = AtomicUsize::new(0);
/// The eventfd its polls also wake on (made once, never closed while a
/// [`stop`] may write to it) and its inotify fd, -1 when none: closed in a
/// fork child, where they are only copies.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static INOTIFY_FD: AtomicI32 = AtomicI32::new(-1);
/// The watcher's pthread, with the pid that started it (a fork child has a
/// copy of the parent's handle, for a thread it does not have).
static HANDLE: Mutex<Option<(u32, libc::pthread_t)>> = Mutex::new(None);
/// The watcher's thread function returned (it is about to end).
static FINISHED: AtomicBool = AtomicBool::new(false);
/// What the thread starts with: the set's path and the wake eventfd.
static START: Mutex<Option<(PathBuf, i32)>> = Mutex::new(None);
static ATFORK: AtomicBool = AtomicBool::new(false);

/// Follow the set at `path` in this process from now on; `checked` is the
/// reader and seq the caller just looked at our maps against.
pub(crate) fn enable(path: PathBuf, checked: Option<(&'static Reader, u64)>) {
    if let Ok(mut c) = CHECKED.lock() {
        *c = checked.map(|(r, s)| (r as *const Reader as usize, s));
    }
    if SET_PATH.set(path).is_err() {
        return;
    }
    if !ATFORK.swap(true, Ordering::Relaxed) {
        // SAFETY: registers a handler that only stores atomics and closes
        // fds (async-signal-safe, as a fork child requires).
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_child)) };
    }
}

extern "C" fn after_fork_child() {
    RUNNING.store(false, Ordering::Relaxed);
    STOP.store(false, Ordering::Relaxed);
    WAITING_ON.store(0, Ordering::Relaxed);
    for fd in [&WAKE_FD, &INOTIFY_FD] {
        let fd = fd.swap(-1, Ordering::Relaxed);
        if fd >= 0 {
            // SAFETY: our own fd, copied from the parent's watcher, which
            // does not exist here.
            unsafe { libc::close(fd) };
        }
    }
}

/// Start the watcher if the constructor enabled it and none runs (cheap
/// when one does). Called marked busy ([`guarded`]).
pub(crate) fn start() {
    if RUNNING.load(Ordering::Acquire) {
        return;
    }
    let Some(path) = SET_PATH.get() else {
        return;
    };
    let Ok(mut handle) = HANDLE.try_lock() else {
        return;
    };
    if RUNNING.load(Ordering::Acquire) {
        return;
    }
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    if let Some((was, h)) = handle.take() {
        if was == pid {
            // Still ours (it ended on its own): not started again.
            *handle = Some((was, h));
            return;
        }
        // The parent's thread: joining or detaching it here would touch a
        // thread this process does not have; the handle is dropped.
    }
    let mut wake_fd = WAKE_FD.load(Ordering::SeqCst);
    if wake_fd < 0 {
        // SAFETY: eventfd has no memory arguments; the result is checked.
        wake_fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake_fd < 0 {
            debug!(
                "follow: no eventfd ({}): not following",
                std::io::Error::last_os_error()
            );
            return;
        }
        wake_fd = out_of_the_way(wake_fd);
        WAKE_FD.store(wake_fd, Ordering::SeqCst);
    }
    STOP.store(false, Ordering::Release);
    // Asynchronous signals stay with the program's threads: the new one
    // inherits this mask; faults stay deliverable (blocked, they kill).
    // SAFETY: sigset_t is plain data, filled by sigfillset.
    let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sigsets; pthread_sigmask changes only this thread's
    // mask, restored below.
    unsafe {
        libc::sigfillset(&mut mask);
        for sig in [libc::SIGBUS, libc::SIGSEGV, libc::SIGILL, libc::SIGFPE] {
            libc::sigdelset(&mut mask, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &mask, &mut old);
    }
    if let Ok(mut start) = START.lock() {
        *start = Some((path.clone(), wake_fd));
    }
    FINISHED.store(false, Ordering::Release);
    let spawned = spawn_raw();
    // SAFETY: restores the mask read above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    match spawned {
        Ok(t) => {
            *handle = Some((pid, t));
            RUNNING.store(true, Ordering::Release);
        }
        Err(e) => debug!("cannot start the thread that follows the published set: {e}"),
    }
}

/// A bare pthread for the watcher, not a `std::thread`: std's start-up
/// allocates in the new thread (its handle, TLS destructors), and glibc
/// makes a new malloc arena for a thread's first allocation (a 128 MiB
/// reservation, trimmed). The watcher allocates only once there is work,
/// so a short program that never sees the set change pays for neither:
/// `python3 -c pass` measured +0.24 ms with std's thread.
fn spawn_raw() -> std::io::Result<libc::pthread_t> {
    // SAFETY: pthread_attr_t is plain data, set up by pthread_attr_init.
    let mut attr: libc::pthread_attr_t = unsafe { std::mem::zeroed() };
    // SAFETY: attr is ours; init before use, destroy after.
    unsafe {
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstacksize(&mut attr, STACK);
    }
    // SAFETY: pthread_t is plain data, written by pthread_create.
    let mut t: libc::pthread_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid attr and an entry point of the right signature that
    // takes no argument.
    let rc = unsafe { libc::pthread_create(&mut t, &attr, watcher_main, std::ptr::null_mut()) };
    // SAFETY: attr was initialized above.
    unsafe { libc::pthread_attr_destroy(&mut attr) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(t)
}

extern "C" fn watcher_main(_: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: PR_SET_NAME with a NUL-terminated name of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, THREAD_NAME.as_ptr(), 0, 0, 0) };
    let start = START.lock().ok().and_then(|mut s| s.take());
    if let Some((path, wake_fd)) = start {
        // A panic must not unwind out of an extern "C" function.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&path, wake_fd)));
    }
    FINISHED.store(true, Ordering::Release);
    std::ptr::null_mut()
}

/// End the watcher and wait until its thread is gone (before a call that
/// needs this process single-threaded). The next [`start`] begins again.
pub(crate) fn stop() {
    if !RUNNING.load(Ordering::Acquire) {
        return;
    }
    let mut handle = HANDLE.lock().unwrap_or_else(|p| p.into_inner());
    let Some((pid, h)) = handle.take() else {
        RUNNING.store(false, Ordering::Release);
        return;
    };
    // SAFETY: getpid has no preconditions.
    if pid != unsafe { libc::getpid() } as u32 {
        RUNNING.store(false, Ordering::Release);
        return;
    }
    STOP.store(true, Ordering::SeqCst);
    // A wake that comes between its check of STOP and its sleep is lost:
    // wake again until it is gone (at most a hello's time-outs).
    while !FINISHED.load(Ordering::Acquire) {
        wake();
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: our own joinable thread, joined once (the handle was taken).
    unsafe { libc::pthread_join(h, std::ptr::null_mut()) };
    // Drain the wakes: the next watcher starts asleep-able.
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let mut n: u64 = 0;
        // SAFETY: an 8-byte read into a live value from our (non-blocking)
        // eventfd.
        unsafe { libc::read(fd, (&mut n as *mut u64).cast(), 8) };
    }
    STOP.store(false, Ordering::Release);
    RUNNING.store(false, Ordering::Release);
}

/// Wake the watcher wherever it sleeps.
fn wake() {
    let addr = WAITING_ON.load(Ordering::SeqCst);
    if addr != 0 {
        // SAFETY: FUTEX_WAKE only looks the address up; it is a word of a
        // published set, mapped for the process's life. Shared: the
        // watcher sleeps on it as the daemon's wakes find it.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                addr,
                libc::FUTEX_WAKE,
                i32::MAX,
                0usize,
                0usize,
                0u32,
            )
        };
    }
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: an 8-byte write from a live value to our eventfd.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// The watcher's loop (see the module doc).
fn run(path: &Path, wake_fd: i32) {
    let mut seen = CHECKED.lock().ok().and_then(|mut c| c.take());
    let mut busy = 0u32;
    while !stopping() {
        if !attach::set_open() && !exists(path) {
            // No set (no daemon yet): wait for one without allocating.
            seen = None;
            wait_for_set(path, wake_fd);
            continue;
        }
        let reader = match guarded(attach::watched_set) {
            Some(Ok(Some(r))) => r,
            Some(Ok(None)) => {
                seen = None;
                wait_for_set(path, wake_fd);
                continue;
            }
            Some(Err(attach::Busy)) | None => {
                nap_busy(&mut busy, wake_fd);
                continue;
            }
        };
        let Some(word) = reader.seq_word() else {
            return;
        };
        let seq = word.load(Ordering::Relaxed);
        let key = (reader as *const Reader as usize, seq);
        if attach::take_missed() || seen != Some(key) {
            match guarded(attach::follow) {
                Some(Ok(())) => seen = Some(key),
                Some(Err(attach::Busy)) | None => {
                    nap_busy(&mut busy, wake_fd);
                    continue;
                }
            }
            if attach::missed_pending() {
                // A wrapper skipped its attach while we held the shim.
                nap_busy(&mut busy, wake_fd);
                continue;
            }
            busy = 0;
        }
        let addr = word as *const AtomicU64 as usize;
        WAITING_ON.store(addr, Ordering::SeqCst);
        if !stopping() {
            futex_wait(addr, seq as u32, WAIT);
        }
        WAITING_ON.store(0, Ordering::SeqCst);
    }
}

/// The shim was busy: try again soon, or, after many tries, later.
fn nap_busy(busy: &mut u32, wake_fd: i32) {
    *busy = busy.saturating_add(1);
    let nap = if *busy < BUSY_TRIES { BUSY_NAP } else { WAIT };
    poll_in(&[wake_fd], nap);
}

/// `FUTEX_WAIT` (shared) on the low half of the word at `addr` while it
/// holds `val`, for at most `limit`.
fn futex_wait(addr: usize, val: u32, limit: Duration) {
    let ts = libc::timespec {
        tv_sec: limit.as_secs() as libc::time_t,
        tv_nsec: limit.subsec_nanos() as libc::c_long,
    };
    // SAFETY: the low half of a published set's word (little-endian), in
    // a mapping that lives as long as the process; a valid timespec. Any
    // outcome (woken, value changed, timed out, interrupted) returns.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            addr,
            libc::FUTEX_WAIT,
            val,
            &ts as *const libc::timespec,
            0usize,
            0u32,
        )
    };
}

/// Sleep until one of `fds` is readable or `limit` passed.
fn poll_in(fds: &[i32], limit: Duration) {
    // On the stack: the watcher allocates nothing before it first sleeps.
    let mut pfds = [libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    }; 2];
    for (p, &fd) in pfds.iter_mut().zip(fds) {
        p.fd = fd;
    }
    let n = fds.len().min(pfds.len());
    let ms = limit.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: a live array of at least `n` pollfds.
    unsafe { libc::poll(pfds.as_mut_ptr(), n as libc::nfds_t, ms) };
}

/// No set to follow (no daemon yet, or it stopped): sleep until something
/// is created or renamed in its directory (or the directory appears), then
/// return for the caller to try the path again.
fn wait_for_set(path: &Path, wake_fd: i32) {
    // SAFETY: inotify_init1 has no memory arguments; the result is checked.
    let ino = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if ino < 0 {
        poll_in(&[wake_fd], WAIT);
        return;
    }
    let ino = out_of_the_way(ino);
    INOTIFY_FD.store(ino, Ordering::SeqCst);
    let mask = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ONLYDIR;
    let armed = path.parent().is_some_and(|dir| {
        add_watch(ino, dir, mask) || dir.parent().is_some_and(|up| add_watch(ino, up, mask))
    });
    // Armed first, then looked: a set renamed in between is not missed.
    let appeared = exists(path) && matches!(guarded(attach::watched_set), Some(Ok(Some(_))));
    if !appeared && !stopping() {
        if !armed {
            debug!(
                "follow: cannot watch for {} to appear: looking again in {} s",
                path.display(),
                WAIT.as_secs()
            );
        }
        poll_in(&[ino, wake_fd], WAIT);
    }
    INOTIFY_FD.store(-1, Ordering::SeqCst);
    // SAFETY: our own inotify fd.
    unsafe { libc::close(ino) };
}

/// `fd` moved to a high number (64 below the soft open-file limit, or
/// above), so that a program that closes fds it does not know of (a
/// `closefrom()`) is unlikely to have one of its own there when the shim
/// uses or closes this one. `fd` itself when that fails.
fn out_of_the_way(fd: i32) -> i32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur < 256 {
        return fd;
    }
    let want = (lim.rlim_cur.min(1 << 20) - 64) as libc::c_int;
    // SAFETY: F_DUPFD_CLOEXEC of our own fd; the result is checked.
    let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, want) };
    if high < 0 {
        return fd;
    }
    // SAFETY: our own fd, now duplicated.
    unsafe { libc::close(fd) };
    high
}

fn add_watch(ino: i32, dir: &Path, mask: u32) -> bool {
    // SAFETY: a NUL-terminated path that lives for the call.
    with_c_path(dir, |p| unsafe {
        libc::inotify_add_watch(ino, p, mask) >= 0
    })
}

/// Whether something exists at `path`: a look that allocates nothing,
/// before the open that would (see [`spawn_raw`]).
fn exists(path: &Path) -> bool {
    // SAFETY: a NUL-terminated path that lives for the call.
    with_c_path(path, |p| unsafe { libc::access(p, libc::F_OK) == 0 })
}

/// `f` of `path` NUL-terminated in a buffer on the stack, as poll_in's
/// fds (a path longer than PATH_MAX fails in the kernel anyway); false
/// when it does not fit or holds a NUL.
fn with_c_path(path: &Path, f: impl FnOnce(*const libc::c_char) -> bool) -> bool {
    let mut buf = [0u8; libc::PATH_MAX as usize];
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= buf.len() || bytes.contains(&0) {
        return false;
    }
    buf[..bytes.len()].copy_from_slice(bytes);
    f(buf.as_ptr().cast())
}
