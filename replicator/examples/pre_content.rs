//! Pre-content events (fanotify `FAN_PRE_ACCESS`) against the
//! `open(O_RDONLY|O_TRUNC)` window (issue 9). A measurement, not a test:
//! every answer below comes from the running kernel.
//!
//! `cargo run --release -p replicad-replicator --example pre_content` (root)
//!
//! `open(path, O_RDONLY|O_TRUNC)` truncates a file without breaking a read
//! lease; replicad sees it afterwards through inotify `IN_MODIFY`. Since
//! 6.14 a `FAN_CLASS_PRE_CONTENT` fanotify group can mark a file for
//! `FAN_PRE_ACCESS`, a permission event the writer waits on. This program
//! asks:
//!
//! 1. On which filesystems an inode mark for `FAN_PRE_ACCESS` is accepted,
//!    and with which errno it is refused (ext4 here, tmpfs, overlayfs, xfs
//!    and btrfs on loop devices when `mkfs.xfs`/`mkfs.btrfs` exist).
//! 2. Which operations raise the event, whether the operation waits for the
//!    answer (a listener that answers after 50 ms), what the listener sees
//!    of the file when the event comes (before or after the change), what
//!    the event carries (its range record), and what `FAN_DENY` does.
//! 3. What the mark costs a reader of the source: cached `read()`, an mmap
//!    touched page by page, open/close, and a cold `read()`, each against the
//!    same file without any mark, in the same run, interleaved.
//! 4. Whether the mark gets in the way of read leases, and what happens to
//!    a listener that opens the marked file itself, and to writers and
//!    readers when the listener stops answering or is killed.
//!
//! Everything it mounts (tmpfs, overlayfs, loop xfs/btrfs) is in a private
//! mount namespace, so no mount outlives the process, however it ends. Its
//! files live under /var/tmp/replicad-pre-content.PID (removed at exit; a
//! directory left by a killed run is removed by the next run). Every
//! fanotify group belongs to this process or to a child it kills (children
//! have `PR_SET_PDEATHSIG`); closing a group answers its pending events. A
//! watchdog ends the run if nothing progresses for 120 s.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// `FAN_PRE_ACCESS` from include/uapi/linux/fanotify.h (Linux 6.14+); the
/// libc crate (0.2.191) does not have it yet.
const FAN_PRE_ACCESS: u64 = 0x0010_0000;
/// `FAN_EVENT_INFO_TYPE_RANGE` from include/uapi/linux/fanotify.h (6.14+):
/// the record `struct fanotify_event_info_range { hdr; __u32 pad; __u64
/// offset; __u64 count; }` that pre-content events carry. Not in libc yet.
const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;
/// `sizeof(struct fanotify_event_info_range)`.
const RANGE_INFO_LEN: usize = 24;
/// `sizeof(struct fanotify_event_metadata)`.
const META_LEN: usize = 24;

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;
/// The probe files of part 2: 1 MiB of `b'a'`.
const SMALL: usize = MIB;
/// The reader-cost file of part 3.
const BIG: usize = 64 * MIB;
/// Listener answer delay of part 2's "does it wait" column.
const SLOW_ANSWER: Duration = Duration::from_millis(50);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let code = match args.get(1).map(String::as_str) {
        Some("--child-self-open") => child(args.get(2), false),
        Some("--child-hold") => child(args.get(2), true),
        _ => match run() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("pre_content: {e}");
                1
            }
        },
    };
    cleanup();
    std::process::exit(code);
}

// ---------------------------------------------------------------- helpers

fn errno_name(n: i32) -> &'static str {
    match n {
        libc::EINVAL => "EINVAL",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOSYS => "ENOSYS",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::EAGAIN => "EAGAIN",
        libc::EBUSY => "EBUSY",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EBADF => "EBADF",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        _ => "errno",
    }
}

/// "EINVAL (Invalid argument)".
fn describe(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => {
            let text = io::Error::from_raw_os_error(n).to_string();
            let text = text.split(" (os error").next().unwrap_or("").to_string();
            format!("{} ({text})", errno_name(n))
        }
        None => e.to_string(),
    }
}

fn os_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {}", describe(&e)))
}

fn ctx(what: impl std::fmt::Display, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {}", describe(&e)))
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s.get(s.len() / 2).copied().unwrap_or_default()
}

fn spread(v: &[Duration]) -> (Duration, Duration) {
    let lo = v.iter().min().copied().unwrap_or_default();
    let hi = v.iter().max().copied().unwrap_or_default();
    (lo, hi)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// "12.3 ms" or "45 µs".
fn human(d: Duration) -> String {
    if d >= Duration::from_millis(1) {
        format!("{:.2} ms", ms(d))
    } else {
        format!("{:.1} µs", us(d))
    }
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The filesystem a path is on, from statfs(2)'s magic.
fn fs_type(p: &Path) -> String {
    let Ok(c) = cpath(p) else {
        return "?".into();
    };
    let mut s = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: c is NUL-terminated and s is writable for one statfs.
    if unsafe { libc::statfs(c.as_ptr(), s.as_mut_ptr()) } != 0 {
        return "?".into();
    }
    // SAFETY: statfs returned 0, so it filled s.
    let magic = unsafe { s.assume_init() }.f_type as u64 & 0xffff_ffff;
    match magic {
        0xef53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794c_7630 => "overlay".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683e => "btrfs".into(),
        m => format!("magic {m:#x}"),
    }
}

fn write_file(path: &Path, len: usize, byte: u8) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| ctx(path.display(), e))?;
    let chunk = vec![byte; MIB.min(len)];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n])?;
        left -= n;
    }
    f.sync_all()
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(u64::MAX)
}

fn byte_at(path: &Path, off: u64) -> Option<u8> {
    let f = File::open(path).ok()?;
    let mut b = [0u8; 1];
    match f.read_at(&mut b, off) {
        Ok(1) => Some(b[0]),
        _ => None,
    }
}

// ----------------------------------------------- cleanup and the watchdog

struct CleanupState {
    base: PathBuf,
    /// In mount order; unmounted in reverse.
    mounts: Vec<PathBuf>,
}

fn cleanup_state() -> &'static Mutex<Option<CleanupState>> {
    static STATE: OnceLock<Mutex<Option<CleanupState>>> = OnceLock::new();
    STATE.get_or_init(|| Mutex::new(None))
}

fn cleanup() {
    let Some(state) = lock(cleanup_state()).take() else {
        return;
    };
    for m in state.mounts.iter().rev() {
        if let Ok(c) = cpath(m) {
            // SAFETY: c is NUL-terminated; a lazy unmount of our own mount.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _ = fs::remove_dir_all(&state.base);
}

fn add_mount(p: &Path) {
    if let Some(s) = lock(cleanup_state()).as_mut() {
        s.mounts.push(p.to_path_buf());
    }
}

static TICK_MS: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

/// The main thread made progress.
fn tick() {
    TICK_MS.store(epoch().elapsed().as_millis() as u64, Ordering::Relaxed);
}

fn start_watchdog() -> io::Result<()> {
    tick();
    thread::Builder::new()
        .name("watchdog".into())
        .spawn(|| loop {
            thread::sleep(Duration::from_secs(1));
            let now = epoch().elapsed().as_millis() as u64;
            if now.saturating_sub(TICK_MS.load(Ordering::Relaxed)) > 120_000 {
                eprintln!(
                    "pre_content: no progress for 120 s (an unanswered permission event?); \
                     cleaning up and exiting (exit closes every fanotify group)"
                );
                cleanup();
                std::process::exit(3);
            }
        })?;
    Ok(())
}

/// A directory of an earlier run that was killed (its pid is gone).
fn remove_stale() {
    let Ok(dir) = fs::read_dir("/var/tmp") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("replicad-pre-content."))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Lease breaks send SIGIO (the lease holder here sets no F_SETSIG); its
/// default action ends the process. Blocked in every thread (they inherit
/// the mask), taken with sigtimedwait by the lease-holder thread.
fn block_sigio() -> io::Result<()> {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: set is writable; sigemptyset initialises it, sigaddset and
    // pthread_sigmask read it initialised.
    let r = unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGIO);
        libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut())
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

fn sigio_set() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises set, sigaddset adds to it.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGIO);
        set.assume_init()
    }
}

/// Waits up to `timeout` for a pending SIGIO; true if one came.
fn wait_sigio(timeout: Duration) -> bool {
    let set = sigio_set();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: set and ts are initialised; a null siginfo is allowed.
    unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) == libc::SIGIO }
}

// ------------------------------------------------------------- fanotify

fn fanotify_group(class: libc::c_uint) -> io::Result<OwnedFd> {
    let event_flags = (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as libc::c_uint;
    // SAFETY: fanotify_init takes two flag words and returns a new fd or -1.
    let fd = unsafe {
        libc::fanotify_init(
            class | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK | libc::FAN_REPORT_TID,
            event_flags,
        )
    };
    if fd < 0 {
        return Err(os_err("fanotify_init"));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fanotify_mark(group: RawFd, flags: libc::c_uint, mask: u64, path: &Path) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: c is a NUL-terminated path that outlives the call.
    let r = unsafe { libc::fanotify_mark(group, flags, mask, libc::AT_FDCWD, c.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One parsed event.
struct RawEvent {
    mask: u64,
    fd: RawFd,
    /// The thread id (the groups are made with `FAN_REPORT_TID`).
    pid: i32,
    range: Option<(u64, u64)>,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_ne_bytes(a)
}

/// Parses what read(2) gave: `struct fanotify_event_metadata` (event_len
/// u32 @0, vers u8 @4, reserved @5, metadata_len u16 @6, mask u64 @8, fd
/// i32 @16, pid i32 @20) followed by info records (type u8, pad u8, len
/// u16).
fn parse_events(b: &[u8]) -> Vec<RawEvent> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + META_LEN <= b.len() {
        let event_len = u32_at(b, off) as usize;
        let meta_len = u16_at(b, off + 6) as usize;
        if event_len < META_LEN || off + event_len > b.len() || meta_len < META_LEN {
            break;
        }
        let mut range = None;
        let mut i = off + meta_len;
        while i + 4 <= off + event_len {
            let info_type = b[i];
            let len = u16_at(b, i + 2) as usize;
            if len < 4 || i + len > off + event_len {
                break;
            }
            if info_type == FAN_EVENT_INFO_TYPE_RANGE && len >= RANGE_INFO_LEN {
                range = Some((u64_at(b, i + 8), u64_at(b, i + 16)));
            }
            i += len;
        }
        out.push(RawEvent {
            mask: u64_at(b, off + 8),
            fd: u32_at(b, off + 16) as i32,
            pid: u32_at(b, off + 20) as i32,
            range,
        });
        off += event_len;
    }
    out
}

/// The flags argument of the open(2)/openat(2) that thread `tid` is
/// blocked in: /proc/TID/syscall is "NR ARG0 ARG1 ..." (x86_64 numbers).
fn open_flags_of(tid: i32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{tid}/syscall")).ok()?;
    let mut f = text.split_whitespace();
    let nr: i64 = f.next()?.parse().ok()?;
    let args: Vec<u64> = f
        .filter_map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .collect();
    match nr {
        n if n == libc::SYS_openat => args.get(2).copied(),
        n if n == libc::SYS_open => args.get(1).copied(),
        _ => None,
    }
}

fn respond(group: RawFd, fd: RawFd, response: u32) {
    let r = libc::fanotify_response { fd, response };
    // SAFETY: r is a plain struct; write reads exactly its size.
    unsafe {
        libc::write(
            group,
            (&r as *const libc::fanotify_response).cast(),
            std::mem::size_of::<libc::fanotify_response>(),
        )
    };
}

/// What the listener saw of one event.
#[derive(Clone, Copy)]
struct Seen {
    at: Instant,
    mask: u64,
    pid: i32,
    range: Option<(u64, u64)>,
    /// st_size of the event's fd when the event came.
    size: u64,
    /// The byte at `Control::probe_off`, read through the event's fd
    /// (None: past the end of the file).
    byte: Option<u8>,
    /// The open flags of the thread that raised the event, when it is
    /// blocked in open(2)/openat(2) (from /proc/TID/syscall).
    open_flags: Option<u64>,
}

#[derive(Default)]
struct Control {
    stop: AtomicBool,
    delay_us: AtomicU64,
    deny: AtomicBool,
    log: AtomicBool,
    probe_off: AtomicU64,
    events: AtomicU64,
    seen: Mutex<Vec<Seen>>,
}

/// A `FAN_CLASS_PRE_CONTENT` group and a thread answering its events.
struct Listener {
    group: Arc<OwnedFd>,
    mask: u64,
    ctl: Arc<Control>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Listener {
    /// A `FAN_CLASS_PRE_CONTENT` group whose marks ask for `FAN_PRE_ACCESS`.
    fn start() -> io::Result<Listener> {
        Listener::start_with(libc::FAN_CLASS_PRE_CONTENT, FAN_PRE_ACCESS)
    }

    fn start_with(class: libc::c_uint, mask: u64) -> io::Result<Listener> {
        let group = Arc::new(fanotify_group(class)?);
        let ctl = Arc::new(Control::default());
        let (g, c) = (Arc::clone(&group), Arc::clone(&ctl));
        let thread = thread::Builder::new()
            .name("fanotify".into())
            .spawn(move || serve(g.as_raw_fd(), &c))?;
        Ok(Listener {
            group,
            mask,
            ctl,
            thread: Some(thread),
        })
    }

    fn mark(&self, path: &Path) -> io::Result<()> {
        fanotify_mark(self.group.as_raw_fd(), libc::FAN_MARK_ADD, self.mask, path)
            .map_err(|e| ctx(format!("mark {:#x} on {}", self.mask, path.display()), e))
    }

    /// A filesystem mark (every file of the fs under `path`).
    fn mark_fs(&self, path: &Path) -> io::Result<()> {
        fanotify_mark(
            self.group.as_raw_fd(),
            libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
            self.mask,
            path,
        )
        .map_err(|e| ctx(format!("filesystem mark on {}", path.display()), e))
    }

    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *lock(&self.ctl.seen))
    }

    fn log(&self, on: bool) {
        self.ctl.log.store(on, Ordering::SeqCst);
    }

    fn delay(&self, d: Duration) {
        self.ctl
            .delay_us
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }

    fn deny(&self, on: bool) {
        self.ctl.deny.store(on, Ordering::SeqCst);
    }

    fn probe_at(&self, off: u64) {
        self.ctl.probe_off.store(off, Ordering::SeqCst);
    }

    fn events(&self) -> u64 {
        self.ctl.events.load(Ordering::SeqCst)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The group's fd closes with the last Arc: its marks go with it.
    }
}

fn serve(group: RawFd, ctl: &Control) {
    let mut buf = vec![0u8; 64 * 1024];
    while !ctl.stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: group,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
            continue;
        }
        // SAFETY: buf is writable for its whole length.
        let n = unsafe { libc::read(group, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        for ev in parse_events(&buf[..n as usize]) {
            // SAFETY: the kernel opened this fd for us in the event; no
            // one else has it. FAN_NOFD (-1) is never wrapped.
            let file = (ev.fd >= 0).then(|| File::from(unsafe { OwnedFd::from_raw_fd(ev.fd) }));
            if ctl.log.load(Ordering::SeqCst) {
                let mut seen = Seen {
                    at: Instant::now(),
                    mask: ev.mask,
                    pid: ev.pid,
                    range: ev.range,
                    size: u64::MAX,
                    byte: None,
                    open_flags: open_flags_of(ev.pid),
                };
                if let Some(f) = &file {
                    seen.size = f.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
                    let mut b = [0u8; 1];
                    if let Ok(1) = f.read_at(&mut b, ctl.probe_off.load(Ordering::SeqCst)) {
                        seen.byte = Some(b[0]);
                    }
                }
                lock(&ctl.seen).push(seen);
            }
            ctl.events.fetch_add(1, Ordering::SeqCst);
            let delay = ctl.delay_us.load(Ordering::SeqCst);
            if delay > 0 {
                thread::sleep(Duration::from_micros(delay));
            }
            if ev.fd >= 0 {
                let answer = if ctl.deny.load(Ordering::SeqCst) {
                    libc::FAN_DENY
                } else {
                    libc::FAN_ALLOW
                };
                respond(group, ev.fd, answer);
            }
            drop(file);
        }
    }
}

// -------------------------------------------------- children (part 4)

/// `--child-self-open PATH`: a single-threaded listener that marks PATH
/// and then opens it itself. `--child-hold PATH`: a listener that reads
/// events and never answers. Both die with their parent.
fn child(path: Option<&String>, hold: bool) -> i32 {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let Some(path) = path.map(PathBuf::from) else {
        println!("error: no path");
        return 2;
    };
    let group = match fanotify_group(libc::FAN_CLASS_PRE_CONTENT) {
        Ok(g) => g,
        Err(e) => {
            println!("error {e}");
            return 1;
        }
    };
    if let Err(e) = fanotify_mark(group.as_raw_fd(), libc::FAN_MARK_ADD, FAN_PRE_ACCESS, &path) {
        println!("error mark: {}", describe(&e));
        return 1;
    }
    println!("ready");
    let _ = io::stdout().flush();
    if !hold {
        let t = Instant::now();
        match File::open(&path) {
            Ok(f) => {
                println!("opened {}", t.elapsed().as_micros());
                let _ = io::stdout().flush();
                let t = Instant::now();
                let mut b = [0u8; 1];
                match f.read_at(&mut b, 0) {
                    Ok(_) => println!("read {}", t.elapsed().as_micros()),
                    Err(e) => println!("failed read: {}", describe(&e)),
                }
            }
            Err(e) => println!("failed open: {}", describe(&e)),
        }
        let _ = io::stdout().flush();
        return 0;
    }
    let until = Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 16 * 1024];
    let mut held: Vec<OwnedFd> = Vec::new();
    while Instant::now() < until {
        let mut pfd = libc::pollfd {
            fd: group.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
            continue;
        }
        // SAFETY: buf is writable for its whole length.
        let n = unsafe { libc::read(group.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        for ev in parse_events(&buf[..n as usize]) {
            if ev.fd >= 0 {
                // SAFETY: the event's fd is ours alone; kept, never answered.
                held.push(unsafe { OwnedFd::from_raw_fd(ev.fd) });
            }
            println!("event pid {}", ev.pid);
            let _ = io::stdout().flush();
        }
    }
    0
}

struct ChildProc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl ChildProc {
    fn spawn(mode: &str, path: &Path) -> io::Result<ChildProc> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg(mode)
            .arg(path)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("child without stdout"))?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(ChildProc { child, lines })
    }

    fn wait_line(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let until = Instant::now() + timeout;
        loop {
            let left = until.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return Some(l),
                Ok(l) if l.starts_with("error") => {
                    println!("    child: {l}");
                    return None;
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// State letter and wchan from /proc.
    fn state(&self) -> String {
        let pid = self.child.id();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        let wchan = fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        let stack = fs::read_to_string(format!("/proc/{pid}/stack"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.contains("fanotify") || l.contains("fsnotify"))
                    .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
            })
            .unwrap_or_default();
        format!("state {state}, wchan {wchan}, stack {stack}")
    }

    /// SIGKILL; how long until it was reaped.
    fn kill(mut self) -> Duration {
        let t = Instant::now();
        let _ = self.child.kill();
        let _ = self.child.wait();
        t.elapsed()
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------- filesystems (part 1)

fn mount(src: &str, target: &Path, fstype: &str, data: &str) -> io::Result<()> {
    fs::create_dir_all(target)?;
    let (s, t, f, d) = (
        CString::new(src)?,
        cpath(target)?,
        CString::new(fstype)?,
        CString::new(data)?,
    );
    // SAFETY: all four are NUL-terminated strings that outlive the call.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, d.as_ptr().cast()) };
    if r != 0 {
        return Err(os_err(&format!("mount -t {fstype} {}", target.display())));
    }
    add_mount(target);
    Ok(())
}

fn sh(cmd: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ctx(cmd, e))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd} {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn which(cmd: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(cmd).exists())
}

/// A loop filesystem: a sparse image on the `img` tmpfs, `mkfs`, `mount -o
/// loop` (autoclear: the loop device goes with the mount).
fn loop_fs(base: &Path, img_dir: &Path, fstype: &str) -> io::Result<PathBuf> {
    let mkfs = format!("mkfs.{fstype}");
    if !which(&mkfs) {
        return Err(io::Error::other(format!("{mkfs} not installed")));
    }
    let img = img_dir.join(format!("{fstype}.img"));
    File::create(&img)?.set_len(400 * MIB as u64)?;
    let img_s = img.to_string_lossy().to_string();
    match fstype {
        "xfs" => sh(&mkfs, &["-q", "-f", &img_s])?,
        "btrfs" => sh(&mkfs, &["-q", "-f", &img_s])?,
        _ => sh(&mkfs, &["-q", "-F", &img_s])?,
    }
    let dir = base.join(fstype);
    fs::create_dir_all(&dir)?;
    sh("mount", &["-o", "loop", &img_s, &dir.to_string_lossy()])?;
    add_mount(&dir);
    Ok(dir)
}

/// Where files are made and operated on (`op_dir`), and where the mark
/// goes (`mark_dir`; the same but for the overlay's upper layer case).
struct Target {
    label: String,
    op_dir: PathBuf,
    mark_dir: PathBuf,
}

impl Target {
    fn plain(label: String, dir: PathBuf) -> Target {
        Target {
            label,
            op_dir: dir.clone(),
            mark_dir: dir,
        }
    }
}

fn setup(base: &Path) -> (Vec<Target>, Vec<(String, String)>) {
    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    let ext4 = base.join("root");
    if fs::create_dir_all(&ext4).is_ok() {
        targets.push(Target::plain(
            format!("{} (the root fs)", fs_type(&ext4)),
            ext4,
        ));
    }
    let tmpfs = base.join("tmpfs");
    match mount("tmpfs", &tmpfs, "tmpfs", "size=256m") {
        Ok(()) => targets.push(Target::plain(fs_type(&tmpfs), tmpfs)),
        Err(e) => skipped.push(("tmpfs".into(), e.to_string())),
    }
    let ovl = base.join("ovl");
    let (lower, upper, work, merged) = (
        ovl.join("lower"),
        ovl.join("upper"),
        ovl.join("work"),
        ovl.join("merged"),
    );
    let ovl_ok = [&lower, &upper, &work]
        .iter()
        .try_for_each(fs::create_dir_all)
        .and_then(|()| write_file(&lower.join("in-lower"), SMALL, b'a'))
        .and_then(|()| {
            mount(
                "overlay",
                &merged,
                "overlay",
                &format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lower.display(),
                    upper.display(),
                    work.display()
                ),
            )
        });
    match ovl_ok {
        Ok(()) => {
            targets.push(Target::plain(
                format!("{} (merged dir)", fs_type(&merged)),
                merged.clone(),
            ));
            targets.push(Target {
                label: format!(
                    "overlay upper layer ({}): mark on the upper file, operations through the merged path",
                    fs_type(&upper)
                ),
                op_dir: merged,
                mark_dir: upper,
            });
        }
        Err(e) => skipped.push(("overlayfs".into(), e.to_string())),
    }
    let img = base.join("img");
    match mount("tmpfs", &img, "tmpfs", "size=1g") {
        Ok(()) => {
            for fstype in ["xfs", "btrfs"] {
                match loop_fs(base, &img, fstype) {
                    Ok(dir) => targets.push(Target::plain(
                        format!("{} (loop device on a tmpfs image)", fs_type(&dir)),
                        dir,
                    )),
                    Err(e) => skipped.push((fstype.into(), e.to_string())),
                }
            }
        }
        Err(e) => skipped.push(("xfs, btrfs".into(), e.to_string())),
    }
    (targets, skipped)
}

fn part1(base: &Path, targets: &[Target], skipped: &[(String, String)]) -> Vec<bool> {
    println!("\n== 1. Can a FAN_CLASS_PRE_CONTENT group mark a file for FAN_PRE_ACCESS? ==");
    println!("   (inode mark, FAN_MARK_ADD, on a regular file; the fs type is statfs(2)'s)");
    let mut ok = Vec::new();
    for t in targets {
        let name = "q1";
        let res = write_file(&t.op_dir.join(name), PAGE, b'a').and_then(|()| {
            let g = fanotify_group(libc::FAN_CLASS_PRE_CONTENT)?;
            fanotify_mark(
                g.as_raw_fd(),
                libc::FAN_MARK_ADD,
                FAN_PRE_ACCESS,
                &t.mark_dir.join(name),
            )
        });
        let text = match &res {
            Ok(()) => "accepted".to_string(),
            Err(e) => format!("refused: {}", describe(e)),
        };
        println!("   {:<60} {text}", t.label);
        ok.push(res.is_ok());
    }
    for (fs, why) in skipped {
        println!("   {fs:<60} not tried: {why}");
    }
    // The class matters too, and the mark type.
    let probe = base.join("root").join("q1");
    for (label, class) in [
        (
            "FAN_CLASS_CONTENT group, ext4 file",
            libc::FAN_CLASS_CONTENT,
        ),
        ("FAN_CLASS_NOTIF group, ext4 file", libc::FAN_CLASS_NOTIF),
    ] {
        let res = fanotify_group(class)
            .and_then(|g| fanotify_mark(g.as_raw_fd(), libc::FAN_MARK_ADD, FAN_PRE_ACCESS, &probe));
        let text = match res {
            Ok(()) => "accepted".into(),
            Err(e) => format!("refused: {}", describe(&e)),
        };
        println!("   {label:<60} {text}");
    }
    tick();
    ok
}

// --------------------------------------------------- operations (part 2)

#[derive(Clone, Copy, PartialEq)]
enum Op {
    OpenRdTrunc,
    OpenWrTrunc,
    Truncate,
    Ftruncate,
    FtruncateMid,
    PunchHole,
    Write,
    Read,
    ReadOldFd,
    OpenRd,
    OpenWr,
    Mmap,
    MmapTouch,
}

const OPS: [Op; 13] = [
    Op::OpenRdTrunc,
    Op::OpenWrTrunc,
    Op::Truncate,
    Op::Ftruncate,
    Op::FtruncateMid,
    Op::PunchHole,
    Op::Write,
    Op::Read,
    Op::ReadOldFd,
    Op::OpenRd,
    Op::OpenWr,
    Op::Mmap,
    Op::MmapTouch,
];

/// What an operation changes, to tell whether the listener saw the file
/// before or after the change.
enum Change {
    Size(u64),
    Byte(u64, u8),
    Nothing,
}

const MID: u64 = 300_000;
const HOLE: u64 = 64 * 1024;
const WRITE_AT: u64 = 8192;

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::OpenRdTrunc => "open(O_RDONLY|O_TRUNC)",
            Op::OpenWrTrunc => "open(O_WRONLY|O_TRUNC)",
            Op::Truncate => "truncate(path, 0)",
            Op::Ftruncate => "ftruncate(fd, 0)",
            Op::FtruncateMid => "ftruncate(fd, 300000)",
            Op::PunchHole => "fallocate(PUNCH_HOLE, 64K@64K)",
            Op::Write => "pwrite(4K @ 8K)",
            Op::Read => "pread(4K @ 8K), page cached",
            Op::ReadOldFd => "pread, fd opened before the mark",
            Op::OpenRd => "open(O_RDONLY)",
            Op::OpenWr => "open(O_WRONLY)",
            Op::Mmap => "mmap(1 MiB, PROT_READ, MAP_SHARED)",
            Op::MmapTouch => "touch 256 pages of a mapping",
        }
    }

    /// The fd the operation needs: its open flags, and whether it is
    /// opened before the mark.
    fn fd(self) -> Option<(i32, bool)> {
        match self {
            Op::Ftruncate | Op::FtruncateMid | Op::Write => Some((libc::O_WRONLY, false)),
            Op::PunchHole => Some((libc::O_RDWR, false)),
            Op::Read | Op::Mmap | Op::MmapTouch => Some((libc::O_RDONLY, false)),
            Op::ReadOldFd => Some((libc::O_RDONLY, true)),
            _ => None,
        }
    }

    fn change(self) -> Change {
        match self {
            Op::OpenRdTrunc | Op::OpenWrTrunc | Op::Truncate | Op::Ftruncate => Change::Size(0),
            Op::FtruncateMid => Change::Size(MID),
            Op::PunchHole => Change::Byte(HOLE, 0),
            Op::Write => Change::Byte(WRITE_AT, b'w'),
            _ => Change::Nothing,
        }
    }

    fn run(self, path: &Path, p: &Prepared) -> io::Result<()> {
        let fd = || {
            p.file
                .as_ref()
                .ok_or_else(|| io::Error::other("no fd prepared"))
        };
        match self {
            Op::OpenRdTrunc => {
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_TRUNC)
                    .open(path)?;
            }
            Op::OpenWrTrunc => {
                OpenOptions::new().write(true).truncate(true).open(path)?;
            }
            Op::Truncate => {
                let c = cpath(path)?;
                // SAFETY: c is a NUL-terminated path.
                if unsafe { libc::truncate(c.as_ptr(), 0) } != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Op::Ftruncate => fd()?.set_len(0)?,
            Op::FtruncateMid => fd()?.set_len(MID)?,
            Op::PunchHole => {
                let f = fd()?;
                // SAFETY: fallocate on an fd we own, with plain integers.
                let r = unsafe {
                    libc::fallocate(
                        f.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        HOLE as libc::off_t,
                        HOLE as libc::off_t,
                    )
                };
                if r != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Op::Write => {
                fd()?.write_at(&[b'w'; PAGE], WRITE_AT)?;
            }
            Op::Read | Op::ReadOldFd => {
                let mut b = [0u8; PAGE];
                fd()?.read_at(&mut b, WRITE_AT)?;
            }
            Op::OpenRd => {
                File::open(path)?;
            }
            Op::OpenWr => {
                OpenOptions::new().write(true).open(path)?;
            }
            Op::Mmap => {
                Map::new(fd()?, SMALL)?;
            }
            Op::MmapTouch => {
                let m = p
                    .map
                    .as_ref()
                    .ok_or_else(|| io::Error::other("no mapping prepared"))?;
                std::hint::black_box(m.touch());
            }
        }
        Ok(())
    }
}

/// A read-only shared mapping of a whole file.
struct Map {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Map {
    fn new(f: &File, len: usize) -> io::Result<Map> {
        // SAFETY: a fresh read-only mapping of an fd we own; the kernel
        // picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Map { ptr, len })
    }

    /// Reads one byte of every page (a page fault each, unless mapped
    /// around).
    fn touch(&self) -> u64 {
        let mut sum = 0u64;
        for off in (0..self.len).step_by(PAGE) {
            // SAFETY: off < len, inside the mapping, which is readable.
            sum += u64::from(unsafe { std::ptr::read_volatile(self.ptr.cast::<u8>().add(off)) });
        }
        sum
    }

    /// Resident pages (mincore).
    fn resident(&self) -> usize {
        let mut vec = vec![0u8; self.len.div_ceil(PAGE)];
        // SAFETY: ptr/len is our mapping; vec has one byte per page.
        if unsafe { libc::mincore(self.ptr, self.len, vec.as_mut_ptr()) } != 0 {
            return usize::MAX;
        }
        vec.iter().filter(|b| **b & 1 != 0).count()
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: ptr/len is a mapping we made and no one else holds.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

struct Prepared {
    file: Option<File>,
    map: Option<Map>,
}

/// The mark part 2 puts on its files.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// `FAN_CLASS_PRE_CONTENT`, `FAN_PRE_ACCESS`: what the issue asks about.
    PreAccess,
    /// `FAN_CLASS_CONTENT`, `FAN_OPEN_PERM`: the older open-time
    /// permission event, for comparison.
    OpenPerm,
}

impl Kind {
    fn listener(self) -> io::Result<Listener> {
        match self {
            Kind::PreAccess => Listener::start(),
            Kind::OpenPerm => Listener::start_with(libc::FAN_CLASS_CONTENT, libc::FAN_OPEN_PERM),
        }
    }
}

/// A fresh 1 MiB file, a listener with the mark on it, and the fd (and
/// mapping) the operation needs, opened before or after the mark.
fn prepare(t: &Target, kind: Kind, op: Op, tag: &str) -> io::Result<(PathBuf, Listener, Prepared)> {
    let name = format!("op-{tag}");
    let path = t.op_dir.join(&name);
    let _ = fs::remove_file(&path);
    write_file(&path, SMALL, b'a')?;
    let l = kind.listener()?;
    let open = |flags: i32| {
        OpenOptions::new()
            .read(flags != libc::O_WRONLY)
            .write(flags != libc::O_RDONLY)
            .open(&path)
    };
    let mut p = Prepared {
        file: None,
        map: None,
    };
    if let Some((flags, true)) = op.fd() {
        p.file = Some(open(flags)?);
    }
    l.mark(&t.mark_dir.join(&name))?;
    if let Some((flags, false)) = op.fd() {
        p.file = Some(open(flags)?);
    }
    if op == Op::MmapTouch {
        if let Some(f) = &p.file {
            p.map = Some(Map::new(f, SMALL)?);
        }
    }
    Ok((path, l, p))
}

fn describe_events(ev: &[Seen], pid: i32) -> String {
    if ev.is_empty() {
        return "none".into();
    }
    let mut parts: Vec<(String, usize)> = Vec::new();
    for e in ev {
        let mut s = match e.range {
            Some((o, 0)) => format!("range {o}+0"),
            Some((o, c)) => format!("range {o}+{c}"),
            None => "no range".into(),
        };
        if e.mask == libc::FAN_OPEN_PERM {
            s = "FAN_OPEN_PERM".into();
        } else if e.mask != FAN_PRE_ACCESS {
            s.push_str(&format!(" mask {:#x}", e.mask));
        }
        if let Some(f) = e.open_flags {
            s.push_str(&format!(", opener's flags {}", open_flags_name(f)));
        }
        if e.pid != pid {
            s.push_str(&format!(" pid {}", e.pid));
        }
        match parts.last_mut() {
            Some((last, n)) if *last == s => *n += 1,
            _ => parts.push((s, 1)),
        }
    }
    parts
        .iter()
        .map(|(s, n)| {
            if *n > 1 {
                format!("{n}x {s}")
            } else {
                s.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn open_flags_name(f: u64) -> String {
    let f = f as i32;
    let mut s = match f & libc::O_ACCMODE {
        libc::O_RDONLY => "O_RDONLY",
        libc::O_WRONLY => "O_WRONLY",
        _ => "O_RDWR",
    }
    .to_string();
    for (bit, name) in [(libc::O_TRUNC, "O_TRUNC"), (libc::O_CREAT, "O_CREAT")] {
        if f & bit != 0 {
            s.push('|');
            s.push_str(name);
        }
    }
    s
}

/// Whether the listener saw the file before or after the change.
fn when_seen(change: &Change, e: &Seen) -> &'static str {
    match *change {
        Change::Size(n) if e.size == SMALL as u64 => {
            if n == SMALL as u64 {
                "?"
            } else {
                "before"
            }
        }
        Change::Size(n) if e.size == n => "AFTER",
        Change::Byte(_, after) if e.byte == Some(after) => "AFTER",
        Change::Byte(..) if e.byte == Some(b'a') => "before",
        Change::Nothing => "-",
        _ => "?",
    }
}

fn changed(change: &Change, path: &Path) -> Option<bool> {
    match *change {
        Change::Size(n) => Some(file_len(path) == n),
        Change::Byte(off, after) => Some(byte_at(path, off) == Some(after)),
        Change::Nothing => None,
    }
}

fn part2(t: &Target, kind: Kind, ops: &[Op]) -> io::Result<()> {
    println!("\n-- {} --", t.label);
    println!(
        "   {:<36} {:<38} {:<8} {:>10} {:>10} {:<5}  with FAN_DENY",
        "operation", "events (range offset+count)", "seen", "answer 0", "answer 50ms", "waits"
    );
    let pid = std::process::id() as i32;
    for &op in ops {
        // Pass 1: answer at once, log what the listener sees.
        let (path, l, p) = prepare(t, kind, op, "fast")?;
        l.probe_at(match op.change() {
            Change::Byte(off, _) => off,
            _ => 0,
        });
        l.take();
        l.log(true);
        let t0 = Instant::now();
        let res = op.run(&path, &p);
        let fast = t0.elapsed();
        let ev = l.take();
        drop(p);
        drop(l);
        tick();
        let seen = ev
            .iter()
            .map(|e| when_seen(&op.change(), e))
            .collect::<Vec<_>>()
            .join(",");
        // Pass 2: answer after 50 ms.
        let (path2, l, p) = prepare(t, kind, op, "slow")?;
        l.delay(SLOW_ANSWER);
        let t0 = Instant::now();
        let _ = op.run(&path2, &p);
        let slow = t0.elapsed();
        drop(p);
        drop(l);
        tick();
        // Pass 3: deny.
        let (path3, l, p) = prepare(t, kind, op, "deny")?;
        l.deny(true);
        let denied = op.run(&path3, &p);
        drop(p);
        drop(l);
        let deny = match (&denied, changed(&op.change(), &path3)) {
            (Ok(()), Some(true)) => "not refused, file CHANGED".into(),
            (Ok(()), Some(false)) => "not refused, file unchanged".into(),
            (Ok(()), None) => "not refused".into(),
            (Err(e), Some(c)) => format!(
                "{}, file {}",
                errno_name(e.raw_os_error().unwrap_or(0)),
                if c { "CHANGED anyway" } else { "unchanged" }
            ),
            (Err(e), None) => errno_name(e.raw_os_error().unwrap_or(0)).to_string(),
        };
        for p in [&path, &path2, &path3] {
            let _ = fs::remove_file(p);
        }
        tick();
        let status = match res {
            Ok(()) => String::new(),
            Err(e) => format!(" (failed: {})", describe(&e)),
        };
        // Without an event these calls take microseconds: 45 ms or more
        // is the listener's 50 ms answer.
        let waits = if slow >= SLOW_ANSWER * 9 / 10 {
            "yes"
        } else {
            "no"
        };
        println!(
            "   {:<36} {:<38} {:<8} {:>10} {:>10} {:<5}  {deny}{status}",
            op.name(),
            describe_events(&ev, pid),
            if seen.is_empty() { "-".into() } else { seen },
            human(fast),
            human(slow),
            waits,
        );
    }
    Ok(())
}

/// `open(O_RDONLY|O_TRUNC)` under a `FAN_PRE_ACCESS` filesystem mark
/// (FAN_MARK_FILESYSTEM), with a pread as the control.
fn fs_mark_check(t: &Target) -> io::Result<()> {
    let path = t.op_dir.join("fs-mark");
    write_file(&path, SMALL, b'a')?;
    let l = Listener::start()?;
    l.mark_fs(&t.mark_dir)?;
    l.log(true);
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_TRUNC)
        .open(&path)?;
    let trunc = l.take().len();
    let truncated = file_len(&path) == 0;
    let g = File::open(&path)?;
    let mut b = [0u8; 1];
    let _ = g.read_at(&mut b, 0);
    let read = l.take().len();
    drop(l);
    drop(g);
    let _ = fs::remove_file(&path);
    println!(
        "   {}: with a FAN_PRE_ACCESS filesystem mark instead, open(O_RDONLY|O_TRUNC) raised {trunc} \
         event(s) (file truncated: {truncated}); a pread on the same fs raised {read} (the control)",
        t.label
    );
    tick();
    Ok(())
}

// ------------------------------------------------- reader cost (part 3)

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    NoMark,
    Marked,
    OtherMarked,
    OpenPerm,
}

const VARIANTS: [Variant; 4] = [
    Variant::NoMark,
    Variant::Marked,
    Variant::OtherMarked,
    Variant::OpenPerm,
];

fn read_all(path: &Path, buf: &mut [u8]) -> io::Result<u64> {
    let mut f = File::open(path)?;
    let mut total = 0u64;
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

fn mmap_touch(path: &Path) -> io::Result<u64> {
    let f = File::open(path)?;
    let m = Map::new(&f, BIG)?;
    Ok(m.touch())
}

const OPENS: u32 = 1000;

fn open_close(path: &Path) -> io::Result<()> {
    for _ in 0..OPENS {
        File::open(path)?;
    }
    Ok(())
}

/// Drops the file's pages (fadvise DONTNEED on a clean, synced file) and
/// returns how many stayed resident (mincore).
fn evict(path: &Path) -> io::Result<usize> {
    let f = File::open(path)?;
    f.sync_all()?;
    for _ in 0..3 {
        // SAFETY: fadvise on an fd we own, whole file.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let left = Map::new(&f, BIG)?.resident();
        if left == 0 {
            return Ok(0);
        }
    }
    Map::new(&f, BIG).map(|m| m.resident())
}

struct Samples {
    time: Vec<Duration>,
    events: Vec<u64>,
}

fn samples(n: usize) -> Vec<Samples> {
    (0..n)
        .map(|_| Samples {
            time: Vec::new(),
            events: Vec::new(),
        })
        .collect()
}

/// "3.20 ms (2.79–8.67)".
fn cell(x: &Samples) -> String {
    let (lo, hi) = spread(&x.time);
    let m = median(&x.time);
    if m >= Duration::from_millis(1) {
        format!("{:.2} ms ({:.2}–{:.2})", ms(m), ms(lo), ms(hi))
    } else {
        format!("{:.1} µs ({:.1}–{:.1})", us(m), us(lo), us(hi))
    }
}

fn part3(dir: &Path) -> io::Result<()> {
    const ROUNDS: usize = 9;
    const COLD_ROUNDS: usize = 7;
    let big = dir.join("reader-64m");
    let other = dir.join("other-file");
    write_file(&big, BIG, b'r')?;
    write_file(&other, PAGE, b'o')?;
    let mut buf = vec![0u8; MIB];
    read_all(&big, &mut buf)?;
    println!(
        "\n== 3. Cost to readers of the source ({}, 64 MiB file, page cached unless cold) ==",
        fs_type(dir)
    );
    println!(
        "   medians of {ROUNDS} rounds (cold: {COLD_ROUNDS}) and their range; the variants \
         interleaved, their order rotated each round; the listener (a thread of this process) \
         answers FAN_ALLOW at once. Columns: no mark at all; a FAN_PRE_ACCESS mark on the file \
         read; a FAN_PRE_ACCESS mark on another file of the same fs only; a FAN_OPEN_PERM mark \
         (part 5) on the file read. 'ev': events answered during one operation"
    );
    let names = [
        "read() 1 MiB chunks, open..close",
        "read() 64 KiB chunks, open..close",
        "mmap + 1 byte per 4 KiB page",
        "open+close, per open (x1000)",
    ];
    let mut s: Vec<Vec<Samples>> = (0..names.len()).map(|_| samples(VARIANTS.len())).collect();
    let start = |v: Variant| -> io::Result<Option<Listener>> {
        let (l, on) = match v {
            Variant::NoMark => return Ok(None),
            Variant::Marked => (Listener::start()?, &big),
            Variant::OtherMarked => (Listener::start()?, &other),
            Variant::OpenPerm => (
                Listener::start_with(libc::FAN_CLASS_CONTENT, libc::FAN_OPEN_PERM)?,
                &big,
            ),
        };
        l.mark(on)?;
        Ok(Some(l))
    };
    let events = |l: &Option<Listener>| l.as_ref().map_or(0, Listener::events);
    for round in 0..ROUNDS {
        for k in 0..VARIANTS.len() {
            let vi = (k + round) % VARIANTS.len();
            let l = start(VARIANTS[vi])?;
            for (oi, per_variant) in s.iter_mut().enumerate() {
                let before = events(&l);
                let t0 = Instant::now();
                match oi {
                    0 | 1 => {
                        let chunk = if oi == 0 { MIB } else { 64 * 1024 };
                        let n = read_all(&big, &mut buf[..chunk])?;
                        if n != BIG as u64 {
                            return Err(io::Error::other(format!("read {n} bytes of {BIG}")));
                        }
                    }
                    2 => {
                        std::hint::black_box(mmap_touch(&big)?);
                    }
                    _ => open_close(&big)?,
                }
                let mut d = t0.elapsed();
                if oi == 3 {
                    d /= OPENS;
                }
                per_variant[vi].time.push(d);
                per_variant[vi].events.push(events(&l) - before);
            }
            drop(l);
            tick();
        }
    }
    // Cold reads: no mark against the FAN_PRE_ACCESS mark, the file's
    // pages dropped before each.
    let mut cold = samples(2);
    let mut resident = 0;
    for round in 0..COLD_ROUNDS {
        for k in 0..2 {
            let vi = (k + round) % 2;
            resident = resident.max(evict(&big)?);
            let l = start(VARIANTS[vi])?;
            let before = events(&l);
            let t0 = Instant::now();
            read_all(&big, &mut buf)?;
            cold[vi].time.push(t0.elapsed());
            cold[vi].events.push(events(&l) - before);
            drop(l);
            tick();
        }
    }
    println!(
        "   {:<34} {:>25} {:>25} {:>5} {:>5} {:>25} {:>5} {:>25} {:>5} {:>4}",
        "operation",
        "no mark",
        "FAN_PRE_ACCESS mark",
        "ratio",
        "ev",
        "other file marked",
        "ratio",
        "FAN_OPEN_PERM mark",
        "ratio",
        "ev"
    );
    let row = |name: &str, cols: &[Samples]| {
        let base = median(&cols[0].time).as_secs_f64();
        let ratio = |x: &Samples| format!("{:.2}", median(&x.time).as_secs_f64() / base);
        let ev = |x: &Samples| x.events.iter().copied().max().unwrap_or(0).to_string();
        let opt = |i: usize, f: &dyn Fn(&Samples) -> String| cols.get(i).map_or("-".into(), f);
        println!(
            "   {:<34} {:>25} {:>25} {:>5} {:>5} {:>25} {:>5} {:>25} {:>5} {:>4}",
            name,
            cell(&cols[0]),
            cell(&cols[1]),
            ratio(&cols[1]),
            ev(&cols[1]),
            opt(2, &cell),
            opt(2, &ratio),
            opt(3, &cell),
            opt(3, &ratio),
            opt(3, &ev),
        );
    };
    for (name, cols) in names.iter().zip(&s) {
        row(name, cols);
    }
    row("cold read() 1 MiB chunks", &cold);
    let added = |x: &Samples, base: &Samples| {
        let ev = x.events.iter().copied().max().unwrap_or(0).max(1) as f64;
        (us(median(&x.time)) - us(median(&base.time))) / ev
    };
    println!(
        "   added per event (marked − no mark, over the events): read() 1 MiB chunks {:.1} µs, \
         64 KiB chunks {:.1} µs, cold {:.1} µs; FAN_OPEN_PERM per open {:.1} µs",
        added(&s[0][1], &s[0][0]),
        added(&s[1][1], &s[1][0]),
        added(&cold[1], &cold[0]),
        us(median(&s[3][3].time)) - us(median(&s[3][0].time)),
    );
    println!(
        "   (open+close: events per 1000 opens. Cold: pages still resident after fadvise \
         DONTNEED, at most: {resident} of {})",
        BIG / PAGE
    );
    let _ = fs::remove_file(&big);
    let _ = fs::remove_file(&other);
    Ok(())
}

// ------------------------------------------ leases, listeners (part 4)

fn setlease(f: &File, kind: i32) -> io::Result<()> {
    // SAFETY: fcntl F_SETLEASE on an fd we own, with an integer argument.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, kind) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn getlease(f: &File) -> i32 {
    // SAFETY: fcntl F_GETLEASE on an fd we own.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLEASE) }
}

fn lease_name(k: i32) -> &'static str {
    match k {
        libc::F_RDLCK => "F_RDLCK",
        libc::F_WRLCK => "F_WRLCK",
        libc::F_UNLCK => "F_UNLCK",
        _ => "?",
    }
}

fn part4(dir: &Path) -> io::Result<()> {
    println!(
        "\n== 4. Read leases, and the listener itself ({}) ==",
        fs_type(dir)
    );
    let path = dir.join("lease");
    // (a) A read lease on a marked file, through an fd opened after the mark.
    write_file(&path, SMALL, b'a')?;
    {
        let l = Listener::start()?;
        l.mark(&path)?;
        l.log(true);
        let f = File::open(&path)?;
        let opened = l.take().len();
        let res = setlease(&f, libc::F_RDLCK);
        println!(
            "   F_SETLEASE F_RDLCK on a marked file (fd opened after the mark, its open raised {opened} event): {}, F_GETLEASE {}",
            match &res {
                Ok(()) => "taken".to_string(),
                Err(e) => describe(e),
            },
            lease_name(getlease(&f))
        );
        let _ = setlease(&f, libc::F_UNLCK);
    }
    tick();
    // (b) Who comes first for each writer: the event or the lease break.
    println!(
        "   a lease holder (fd and lease taken before the mark; it releases on SIGIO), a listener \
         answering after 20 ms; times from the start of the writer's call:"
    );
    println!(
        "   {:<26} {:<34} {:<26} {:>14}",
        "writer", "event at (file size then)", "lease break (SIGIO) at", "call returned"
    );
    for op in [Op::OpenWr, Op::Truncate, Op::OpenRdTrunc] {
        write_file(&path, SMALL, b'a')?;
        while wait_sigio(Duration::ZERO) {}
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let holder_path = path.clone();
        let holder = thread::spawn(move || -> Option<Instant> {
            let f = match File::open(&holder_path)
                .and_then(|f| setlease(&f, libc::F_RDLCK).map(|()| f))
            {
                Ok(f) => f,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return None;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let broke = wait_sigio(Duration::from_secs(1)).then(Instant::now);
            let _ = setlease(&f, libc::F_UNLCK);
            broke
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| io::Error::other("lease holder did not start"))??;
        let l = Listener::start()?;
        l.mark(&path)?;
        l.delay(Duration::from_millis(20));
        l.log(true);
        let p = Prepared {
            file: None,
            map: None,
        };
        let t0 = Instant::now();
        let res = op.run(&path, &p);
        let ret = t0.elapsed();
        let broke = holder.join().ok().flatten();
        let ev = l.take();
        drop(l);
        let evs = if ev.is_empty() {
            "none".to_string()
        } else {
            ev.iter()
                .map(|e| {
                    format!(
                        "+{:.1} ms ({} B)",
                        ms(e.at.saturating_duration_since(t0)),
                        e.size
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let brk = match broke {
            Some(b) => format!("+{:.1} ms", ms(b.saturating_duration_since(t0))),
            None => "none (lease not broken)".into(),
        };
        println!(
            "   {:<26} {:<34} {:<26} {:>11.1} ms{}",
            op.name(),
            evs,
            brk,
            ms(ret),
            match res {
                Ok(()) => String::new(),
                Err(e) => format!(" (failed: {})", describe(&e)),
            }
        );
        tick();
    }
    // (c) The listener opens the file it marked, from its only thread.
    write_file(&path, SMALL, b'a')?;
    {
        let c = ChildProc::spawn("--child-self-open", &path)?;
        let wait = Duration::from_millis(1500);
        if c.wait_line("ready", Duration::from_secs(5)).is_none() {
            println!("   self-open child did not start");
        } else if let Some(l) = c.wait_line("opened", wait) {
            print!(
                "   a single-threaded listener and its own marked file: open() returned ({l} µs)"
            );
            if let Some(l) = c.wait_line("read", wait) {
                println!("; read() returned ({l} µs)");
            } else {
                let state = c.state();
                let took = c.kill();
                println!(
                    "; read() still blocked after 1.5 s, waiting for its own answer ({state}); \
                     SIGKILL reaped it in {}",
                    human(took)
                );
            }
        } else {
            let state = c.state();
            let took = c.kill();
            println!(
                "   a single-threaded listener opening its own marked file: still blocked after 1.5 s \
                 ({state}); SIGKILL reaped it in {}",
                human(took)
            );
        }
    }
    tick();
    // (d) A listener that never answers, then is killed.
    write_file(&path, SMALL, b'a')?;
    {
        let c = ChildProc::spawn("--child-hold", &path)?;
        if c.wait_line("ready", Duration::from_secs(5)).is_none() {
            println!("   holding child did not start");
        } else {
            let (tx, rx) = mpsc::channel::<(&'static str, Instant, io::Result<()>)>();
            type Call = fn(&Path) -> io::Result<()>;
            let calls: [(&'static str, Call); 2] = [
                ("truncate(2)", |p| {
                    let c = cpath(p)?;
                    // SAFETY: c is a NUL-terminated path.
                    if unsafe { libc::truncate(c.as_ptr(), 0) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                }),
                ("open(O_RDONLY) + pread", |p| {
                    let mut b = [0u8; 1];
                    File::open(p)?.read_at(&mut b, 0).map(drop)
                }),
            ];
            for (name, call) in calls {
                let (tx, p) = (tx.clone(), path.clone());
                thread::spawn(move || {
                    let r = call(&p);
                    let _ = tx.send((name, Instant::now(), r));
                });
            }
            drop(tx);
            thread::sleep(Duration::from_millis(1000));
            let early: Vec<_> = rx.try_iter().collect();
            let size_before_kill = file_len(&path);
            let state = c.state();
            let t_kill = Instant::now();
            let reaped = c.kill();
            let mut late = Vec::new();
            while let Ok(x) = rx.recv_timeout(Duration::from_secs(5)) {
                late.push(x);
            }
            println!(
                "   a listener that reads events and never answers: after 1 s, {} of 2 calls \
                 (truncate(2); open(O_RDONLY) + pread) had returned{}; file size \
                 {size_before_kill} B; the listener was {state}",
                early.len(),
                early
                    .iter()
                    .map(|(n, _, _)| format!(" ({n})"))
                    .collect::<String>()
            );
            for (name, at, r) in late {
                println!(
                    "     after SIGKILL of the listener (reaped in {}): {name} returned {} later: {}",
                    human(reaped),
                    human(at.saturating_duration_since(t_kill)),
                    match r {
                        Ok(()) => "allowed".to_string(),
                        Err(e) => describe(&e),
                    }
                );
            }
            println!("     file size afterwards {} B", file_len(&path));
        }
    }
    let _ = fs::remove_file(&path);
    tick();
    Ok(())
}

// ------------------------------------------------------------------ run

fn run() -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(io::Error::other(
            "run as root: fanotify permission events need CAP_SYS_ADMIN, and it mounts",
        ));
    }
    // A private mount namespace, before any thread exists (unshare of the
    // mount namespace needs a single-threaded caller): no mount of ours
    // can outlive the process.
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(os_err("unshare(CLONE_NEWNS)"));
    }
    // SAFETY: a propagation change: null source, type and data are allowed;
    // "/" is NUL-terminated.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(os_err("mount --make-rprivate /"));
    }
    block_sigio()?;
    remove_stale();
    let base = PathBuf::from(format!(
        "/var/tmp/replicad-pre-content.{}",
        std::process::id()
    ));
    fs::create_dir_all(&base).map_err(|e| ctx(base.display(), e))?;
    *lock(cleanup_state()) = Some(CleanupState {
        base: base.clone(),
        mounts: Vec::new(),
    });
    start_watchdog()?;
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "pre_content: kernel {}, {} CPUs, load average {} at start",
        release.trim(),
        thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    let (targets, skipped) = setup(&base);
    let ok = part1(&base, &targets, &skipped);
    println!(
        "\n== 2. Which operations raise FAN_PRE_ACCESS, and does the caller wait? ==\n   \
         a fresh 1 MiB file per row and pass, marked; 'seen': the file as the listener found it \
         when the event came (size through the event's fd, or the changed byte), 'before' or \
         'AFTER' the operation's change; 'answer 0' / 'answer 50ms': how long the call took with \
         the listener answering FAN_ALLOW at once / after 50 ms; last column: the call with the \
         listener answering FAN_DENY, and the file afterwards"
    );
    for (t, ok) in targets.iter().zip(&ok) {
        if *ok {
            part2(t, Kind::PreAccess, &OPS)?;
        }
    }
    // Is it the mark or the hook? A filesystem mark, on the loop
    // filesystems only (on / it would stop every reader on the machine).
    for t in targets.iter().filter(|t| t.label.contains("loop")) {
        fs_mark_check(t)?;
    }
    let root = base.join("root");
    part3(&root)?;
    part4(&root)?;
    println!(
        "\n== 5. For comparison: FAN_OPEN_PERM (FAN_CLASS_CONTENT, not a pre-content event) ==\n   \
         the same rows, an inode mark for FAN_OPEN_PERM; 'opener's flags': the open flags the \
         listener read from /proc/TID/syscall while the opener waited (FAN_REPORT_TID)"
    );
    for t in &targets {
        part2(
            t,
            Kind::OpenPerm,
            &[
                Op::OpenRdTrunc,
                Op::OpenWrTrunc,
                Op::OpenRd,
                Op::Truncate,
                Op::Read,
            ],
        )?;
    }
    println!("\npre_content: load average {} at the end", loadavg());
    Ok(())
}
