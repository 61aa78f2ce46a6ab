//! `libreplicad_preload.so`: an `LD_PRELOAD` shim that moves a running
//! program's file mappings (its program and library text, the data files it
//! maps read-only) onto its NUMA node's replicas, without changing the
//! program.
//!
//! ```text
//!  constructor ── nothing we map in <run_dir>/replicas.set? no hello (yet)
//!       │
//!       ├── Hello{node?} ──> replicad ── reads /proc/<pid>/maps + pagemap
//!       │   <── Attached{ranges} + [replica fd, source fd] per file
//!       ▼
//!  for each range: same start, end, offset, dev, ino, perms in /proc/self/maps?
//!       spare = mmap(source)   rep = mmap(replica)   register(range, spare)
//!       mremap(rep -> range, MREMAP_FIXED)        (one atomic swap)
//!
//!  dlopen()  ─ the real one, then attach what it mapped (if the published
//!              replica set names any of it)
//!  dlclose() ─ the real one, then forget the ranges on replicas that the
//!              loader unmapped (their fallback entries and spares)
//!  mmap()    ─ the real one, then, for a read-only mapping of a file the
//!              published set shows a replica of on our node: Map{node} + fd
//!  munmap()  ─ the real one, then forget the ranges unmapped (and those a
//!              new mmap replaced): their fallback entries and spares
//!  mprotect(PROT_WRITE), pkey_mprotect(PROT_WRITE), mremap() ─ the file
//!              back first (as a revoke would, private pages carried),
//!              then the real one: what the program changes lives on the
//!              file's mapping
//!  sigaction(SIGBUS) / signal(SIGBUS) ─ once our handler is installed, the
//!              program's action becomes the one we chain to
//!  SIGBUS in a range after a revoke ─ mremap(spare -> range): the file again
//!
//!  thread "replicad-follow" (started after the constructor) ─ asleep in
//!              FUTEX_WAIT on the published set's seq; when the daemon
//!              changes the set and it shows a replica of something we map
//!              that is not on one: hello again (no set yet: inotify on its
//!              directory until one appears). See `follow`.
//!  unshare(), setns() ─ the watcher stopped and joined first (they want a
//!              single thread), then the real one; the next file mmap()
//!              or dlopen() starts it again, as in a child after fork()
//! ```
//!
//! Nothing here may break a program: no daemon, a refusal, a range that
//! changed, any error leaves the program on its own mappings, and with
//! `REPLICAD_DEBUG=1` the shim says why on stderr. The wrappers never block
//! on the shim's own locks (they skip instead), and never attach while the
//! shim itself is mapping (a thread-local guard).
//!
//! `REPLICAD_FOLLOW=0` keeps the watcher thread from starting: the program
//! then attaches only at start, on `mmap()` and on `dlopen()`.
//!
//! The shim believes only the real daemon (`replicad_client::trust`): in
//! a program the kernel marks `AT_SECURE` (set-user-ID, capabilities) it
//! reads no `REPLICAD_*` variable; it talks only to a daemon whose
//! `SO_PEERCRED` uid is root (or `REPLICAD_DAEMON_UID`), maps only replica
//! fds that are regular files open read-only on tmpfs or hugetlbfs owned by
//! that uid, falls back only to a file that is the one the range maps, and
//! reads only a published set that a trusted uid owns and no one else may
//! write.

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicUsize, Ordering};

mod attach;
mod follow;

/// Environment: print why the shim did or did not attach. Like every
/// `REPLICAD_*` variable, ignored under `AT_SECURE`.
pub const DEBUG_ENV: &str = "REPLICAD_DEBUG";
/// Environment: ask for this node's replicas instead of the CPUs' node.
pub const NODE_ENV: &str = "REPLICAD_NODE";
/// Environment: `1` turns the shim off (the program runs untouched).
pub const DISABLE_ENV: &str = "REPLICAD_DISABLE";
/// Environment: `0` keeps the shim from following the published set (no
/// watcher thread): replicas made after start are attached only by a later
/// `mmap()` or `dlopen()`.
pub const FOLLOW_ENV: &str = "REPLICAD_FOLLOW";

/// The daemon answered our hello: `NODE` is ours, the wrappers attach.
static ACTIVE: AtomicBool = AtomicBool::new(false);
static NODE: AtomicU32 = AtomicU32::new(0);
static DEBUG: AtomicBool = AtomicBool::new(false);
/// A `dlopen` went straight to the real one (its caller's search path
/// mattered): attach what it loaded at the next chance.
static PENDING: AtomicBool = AtomicBool::new(false);

static REAL_DLOPEN: AtomicUsize = AtomicUsize::new(0);
static REAL_DLCLOSE: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGACTION: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGNAL: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread is inside the shim: its own mmap calls must not attach.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// The thread (tid) that holds the map lock, 0 when none: see [`MapLock`].
static MAP_LOCK: AtomicI32 = AtomicI32::new(0);

/// Held around the program's own `mmap`, `munmap`, `mremap` and
/// `mprotect`, and, in a process with more than one thread, around each
/// check-and-swap of a range by the shim: a swap checks the range against a
/// fresh read of our maps and moves the replica over it (`MREMAP_FIXED`),
/// and another thread must not unmap the range and map something else there
/// in between. (It did: a reader that maps and unmaps its file every round
/// got replica pages at a shifted offset when the watcher's swap landed
/// over its next mapping.) A spin lock on the holder's tid, not a Mutex: a
/// fork child clears it (the holder is not there), a thread that holds it
/// takes it again for free (a signal handler's mmap, the shim's own calls),
/// and a hold is one maps read and a few syscalls.
pub(crate) struct MapLock(bool);

impl MapLock {
    pub(crate) fn take() -> MapLock {
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        if MAP_LOCK.load(Ordering::Acquire) == me {
            return MapLock(false);
        }
        while MAP_LOCK
            .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
        MapLock(true)
    }

    /// After `fork()`, in the child: the holder, if any, was another thread.
    pub(crate) fn reset() {
        MAP_LOCK.store(0, Ordering::Release);
    }
}

impl Drop for MapLock {
    fn drop(&mut self) {
        if self.0 {
            MAP_LOCK.store(0, Ordering::Release);
        }
    }
}

/// Run `f` marked busy, unless this thread already is (then `None`).
/// Panics never cross into the program.
fn guarded<T>(f: impl FnOnce() -> T) -> Option<T> {
    let entered = BUSY.try_with(|b| !b.replace(true)).unwrap_or(false);
    if !entered {
        return None;
    }
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok();
    let _ = BUSY.try_with(|b| b.set(false));
    out
}

/// Print a line on stderr when `REPLICAD_DEBUG` is set.
fn debug_line(msg: std::fmt::Arguments<'_>) {
    if !DEBUG.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let line = format!("replicad-preload[{pid}]: {msg}\n");
    // SAFETY: writing our own buffer to fd 2; a short write only loses text.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
}

macro_rules! debug {
    ($($t:tt)*) => { $crate::debug_line(format_args!($($t)*)) };
}
pub(crate) use debug;

/// The next definition of `name` after this object (libc's).
fn next_symbol(cache: &AtomicUsize, name: &CStr) -> usize {
    let f = cache.load(Ordering::Relaxed);
    if f != 0 {
        return f;
    }
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    cache.store(f, Ordering::Relaxed);
    f
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;

extern "C" fn init() {
    // SAFETY: registers a handler that only stores an atomic (what a fork
    // child may do).
    unsafe { libc::pthread_atfork(None, None, Some(map_lock_after_fork)) };
    guarded(attach::init);
    guarded(follow::start);
}

extern "C" fn map_lock_after_fork() {
    MapLock::reset();
}

// ---- mmap -------------------------------------------------------------

/// `mmap(2)` for the program: the kernel's, then, for a read-only mapping of
/// a file with a replica on our node, the swap onto the replica.
///
/// # Safety
/// As `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: libc::size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    let lock = MapLock::take();
    let p = attach::raw_mmap(addr, len, prot, flags, fd, off);
    if p != libc::MAP_FAILED {
        // Whatever the shim had moved onto a replica there is gone.
        replicad_client::shim::forget(p as usize, len);
    }
    drop(lock);
    if p != libc::MAP_FAILED && fd >= 0 && flags & libc::MAP_ANONYMOUS == 0 {
        // A file mapping (never an allocator's): the watcher again, if an
        // unshare() or a fork() left us without one.
        // SAFETY: errno is thread-local; starting must not change it.
        let errno = unsafe { *libc::__errno_location() };
        guarded(follow::start);
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = errno };
    }
    if p != libc::MAP_FAILED
        && fd >= 0
        && flags & libc::MAP_ANONYMOUS == 0
        && prot & libc::PROT_READ != 0
        && prot & libc::PROT_WRITE == 0
        && ACTIVE.load(Ordering::Relaxed)
    {
        // SAFETY: errno is thread-local; the attempt must not change what
        // the program sees of it.
        let errno = unsafe { *libc::__errno_location() };
        guarded(|| {
            if PENDING.swap(false, Ordering::Relaxed) {
                attach::after_dlopen();
            }
            attach::on_mmap(p as usize, len, prot, flags, fd, off);
        });
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = errno };
    }
    p
}

/// `mmap64` is `mmap` on 64-bit Linux.
///
/// # Safety
/// As `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: libc::size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: same contract.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

/// `munmap(2)` for the program: the kernel's, then the shim forgets the
/// ranges it had moved onto replicas there (their SIGBUS-table entries and
/// spare mappings), so that nothing is left behind and a new mapping at
/// the same address is never taken for the old one.
///
/// # Safety
/// As `munmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: libc::size_t) -> c_int {
    let _lock = MapLock::take();
    // SAFETY: the munmap syscall with the caller's arguments; libc's
    // syscall() sets errno and returns -1 on failure.
    let rc = unsafe { libc::syscall(libc::SYS_munmap, addr, len) } as c_int;
    if rc == 0 {
        replicad_client::shim::forget(addr as usize, len);
    }
    rc
}

/// `mprotect(2)` for the program: making a range the shim moved onto a
/// replica writable puts the file back first, so that what the program
/// writes there (a private copy) lives on the file's mapping, which no
/// revoke takes away.
///
/// # Safety
/// As `mprotect(2)`.
#[no_mangle]
pub unsafe extern "C" fn mprotect(addr: *mut c_void, len: libc::size_t, prot: c_int) -> c_int {
    let _lock = MapLock::take();
    if prot & libc::PROT_WRITE != 0 {
        replicad_client::shim::fall_back(addr as usize, len);
    }
    // SAFETY: the mprotect syscall with the caller's arguments; libc's
    // syscall() sets errno and returns -1 on failure.
    unsafe { libc::syscall(libc::SYS_mprotect, addr, len, prot as libc::c_long) as c_int }
}

/// `pkey_mprotect(2)` for the program: as [`mprotect`], with a protection
/// key.
///
/// # Safety
/// As `pkey_mprotect(2)`.
#[no_mangle]
pub unsafe extern "C" fn pkey_mprotect(
    addr: *mut c_void,
    len: libc::size_t,
    prot: c_int,
    pkey: c_int,
) -> c_int {
    let _lock = MapLock::take();
    if prot & libc::PROT_WRITE != 0 {
        replicad_client::shim::fall_back(addr as usize, len);
    }
    // SAFETY: the pkey_mprotect syscall with the caller's arguments;
    // libc's syscall() sets errno and returns -1 on failure.
    unsafe {
        libc::syscall(
            libc::SYS_pkey_mprotect,
            addr,
            len,
            prot as libc::c_long,
            pkey as libc::c_long,
        ) as c_int
    }
}

/// `mremap(2)` for the program: a range the shim moved onto a replica goes
/// back to the file before the program moves or resizes it (the replica's
/// way back covers the range as it was).
///
/// `mremap` is variadic in C (the new address comes only with
/// `MREMAP_FIXED`); on x86_64 and aarch64 a variadic argument travels in the
/// same register as a fixed one, and `new_addr` is only read with that
/// flag, as the kernel does.
///
/// # Safety
/// As `mremap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: libc::size_t,
    new_len: libc::size_t,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    let _lock = MapLock::take();
    replicad_client::shim::fall_back(old as usize, old_len);
    let target = if flags & libc::MREMAP_FIXED != 0 {
        new_addr
    } else {
        std::ptr::null_mut()
    };
    // SAFETY: the mremap syscall with the caller's arguments; libc's
    // syscall() sets errno and returns -1 (MAP_FAILED) on failure.
    let p = unsafe {
        libc::syscall(
            libc::SYS_mremap,
            old,
            old_len,
            new_len,
            flags as libc::c_long,
            target,
        ) as *mut c_void
    };
    if p != libc::MAP_FAILED {
        // The old range is gone (moved), or now the file's again: forget it.
        replicad_client::shim::forget(old as usize, old_len);
        replicad_client::shim::forget(p as usize, new_len);
    }
    p
}

// ---- unshare / setns --------------------------------------------------

/// Stop the watcher thread (a new user or mount namespace wants this
/// process single-threaded), keeping the program's errno.
fn single_threaded() {
    // SAFETY: errno is thread-local.
    let errno = unsafe { *libc::__errno_location() };
    guarded(follow::stop);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// `unshare(2)` for the program: the shim's watcher thread is stopped and
/// joined first (`CLONE_NEWUSER` fails with `EINVAL` in a process with more
/// than one thread); the next file `mmap()` or `dlopen()` starts it again.
///
/// # Safety
/// As `unshare(2)`.
#[no_mangle]
pub unsafe extern "C" fn unshare(flags: c_int) -> c_int {
    single_threaded();
    // SAFETY: the unshare syscall with the caller's argument; libc's
    // syscall() sets errno and returns -1 on failure.
    unsafe { libc::syscall(libc::SYS_unshare, flags as libc::c_long) as c_int }
}

/// `setns(2)` for the program: as [`unshare`] (a user namespace wants a
/// single thread, a mount namespace an unshared filesystem context).
///
/// # Safety
/// As `setns(2)`.
#[no_mangle]
pub unsafe extern "C" fn setns(fd: c_int, nstype: c_int) -> c_int {
    single_threaded();
    // SAFETY: the setns syscall with the caller's arguments; libc's
    // syscall() sets errno and returns -1 on failure.
    unsafe { libc::syscall(libc::SYS_setns, fd as libc::c_long, nstype as libc::c_long) as c_int }
}

// ---- sigaction / signal ----------------------------------------------

/// `sigaction(2)`: SIGBUS, once our handler is installed, sets and reports
/// the program's action (the one faults that are not ours go to).
///
/// # Safety
/// As `sigaction(2)`.
#[no_mangle]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    // SAFETY: the caller passes null or valid pointers.
    if sig == libc::SIGBUS && unsafe { replicad_client::shim::program_sigaction(act, old) } {
        return 0;
    }
    let real = next_symbol(&REAL_SIGACTION, c"sigaction");
    if real == 0 {
        // SAFETY: errno is thread-local.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    }
    type Sigaction =
        unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;
    // SAFETY: RTLD_NEXT's sigaction has this signature.
    let f = unsafe { std::mem::transmute::<usize, Sigaction>(real) };
    // SAFETY: the caller's arguments, unchanged.
    unsafe { f(sig, act, old) }
}

/// `signal(2)` (BSD semantics, as glibc's): SIGBUS as in [`sigaction`].
///
/// # Safety
/// As `signal(2)`.
#[no_mangle]
pub unsafe extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    if sig == libc::SIGBUS && replicad_client::shim::handler_installed() {
        // SAFETY: all-zero is a valid sigaction.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = handler;
        act.sa_flags = libc::SA_RESTART;
        // SAFETY: act.sa_mask is a valid sigset to fill.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: both point at live values.
        if unsafe { replicad_client::shim::program_sigaction(&act, &mut old) } {
            return old.sa_sigaction;
        }
    }
    let real = next_symbol(&REAL_SIGNAL, c"signal");
    if real == 0 {
        return libc::SIG_ERR;
    }
    type Signal = unsafe extern "C" fn(c_int, libc::sighandler_t) -> libc::sighandler_t;
    // SAFETY: RTLD_NEXT's signal has this signature.
    let f = unsafe { std::mem::transmute::<usize, Signal>(real) };
    // SAFETY: the caller's arguments, unchanged.
    unsafe { f(sig, handler) }
}

// ---- dlopen -----------------------------------------------------------
//
// glibc's dlopen resolves names relative to its caller (the caller's
// RPATH/RUNPATH, $ORIGIN, namespace), found from its return address. A
// wrapper that calls the real dlopen would make the shim the caller. So
// `dlopen` is a trampoline: it asks `dlopen_route` whether the caller can
// matter; if not, it jumps to `dlopen_wrapped` (which calls the real one
// and attaches what was loaded); if so, it jumps straight to the real
// dlopen with the caller's return address untouched, and the attach
// happens at the next wrapped call.

/// `dlopen(3)`: the trampoline described above.
///
/// # Safety
/// As `dlopen(3)`.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn dlopen(_file: *const c_char, _flags: c_int) -> *mut c_void {
    core::arch::naked_asm!(
        "push rdi",
        "push rsi",
        "sub rsp, 8",
        // The caller's return address, for dlopen_route.
        "mov rdx, [rsp + 24]",
        "call {route}",
        "add rsp, 8",
        "pop rsi",
        "pop rdi",
        "test rax, rax",
        "jz 2f",
        "jmp {wrapped}",
        "2:",
        "jmp qword ptr [rip + {real}]",
        route = sym dlopen_route,
        wrapped = sym dlopen_wrapped,
        real = sym REAL_DLOPEN,
    )
}

/// 1: call through [`dlopen_wrapped`]; 0: jump to the real dlopen (which
/// is resolved here first).
#[cfg(target_arch = "x86_64")]
extern "C" fn dlopen_route(file: *const c_char, _flags: c_int, caller: usize) -> usize {
    let real = next_symbol(&REAL_DLOPEN, c"dlopen");
    if real == 0 {
        // Let the wrapper fail the call cleanly.
        return 1;
    }
    let busy = BUSY.try_with(|b| b.get()).unwrap_or(true);
    if busy || !ACTIVE.load(Ordering::Relaxed) {
        return 0;
    }
    let wrap = guarded(|| attach::caller_independent(file, caller)).unwrap_or(false);
    if !wrap {
        PENDING.store(true, Ordering::Relaxed);
    }
    usize::from(wrap)
}

#[cfg(target_arch = "x86_64")]
extern "C" fn dlopen_wrapped(file: *const c_char, flags: c_int) -> *mut c_void {
    let real = REAL_DLOPEN.load(Ordering::Relaxed);
    if real == 0 {
        return std::ptr::null_mut();
    }
    type Dlopen = unsafe extern "C" fn(*const c_char, c_int) -> *mut c_void;
    // SAFETY: RTLD_NEXT's dlopen has this signature.
    let f = unsafe { std::mem::transmute::<usize, Dlopen>(real) };
    // SAFETY: the caller's arguments, unchanged.
    let handle = unsafe { f(file, flags) };
    if !handle.is_null() {
        // SAFETY: errno is thread-local.
        let errno = unsafe { *libc::__errno_location() };
        guarded(|| {
            follow::start();
            if ACTIVE.load(Ordering::Relaxed) {
                PENDING.store(false, Ordering::Relaxed);
                attach::after_dlopen();
            }
        });
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = errno };
    }
    handle
}

/// `dlclose(3)`: the real one, then the shim forgets the ranges it had
/// moved onto replicas that the loader unmapped (it unmaps without our
/// `munmap`): their entries and spare mappings would stay for good, and a
/// library loaded again at the same address would be taken for one
/// already on a replica.
///
/// # Safety
/// As `dlclose(3)`.
#[no_mangle]
pub unsafe extern "C" fn dlclose(handle: *mut c_void) -> c_int {
    let real = next_symbol(&REAL_DLCLOSE, c"dlclose");
    if real == 0 {
        return -1;
    }
    type Dlclose = unsafe extern "C" fn(*mut c_void) -> c_int;
    // SAFETY: RTLD_NEXT's dlclose has this signature.
    let f = unsafe { std::mem::transmute::<usize, Dlclose>(real) };
    // SAFETY: the caller's argument, unchanged.
    let rc = unsafe { f(handle) };
    if rc == 0 {
        // SAFETY: errno is thread-local.
        let errno = unsafe { *libc::__errno_location() };
        guarded(attach::after_dlclose);
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = errno };
    }
    rc
}
