//! Test program: a program with its own SIGBUS handler, run under the
//! preload shim, which installs one too.
//!
//! `replicad-sigbus before|after|signal DATA SCRATCH_DIR`
//!
//! 1. `before`: install our handler (`sigaction`, `SA_SIGINFO`), then map
//!    DATA (plain `mmap`, `PROT_READ`, `MAP_PRIVATE`: the shim moves it onto
//!    the replica and installs its handler, keeping ours as the one to chain
//!    to). `after`: map first, install after (the shim's `sigaction` wrapper
//!    takes it). `signal`: as `after`, with `signal(2)` and a plain handler.
//! 2. Report: whether the mapping is on a replica, whether
//!    `sigaction(SIGBUS, NULL, &old)` reports our handler, whether the
//!    kernel's action (raw `rt_sigaction`) is someone else's (the shim's:
//!    chaining is really in play), which object held the kernel's action
//!    at start and holds it now (`dladdr`), and the data's words (all
//!    version 1).
//! 3. Wait for a line `check V` on stdin (the test runs a writer meanwhile,
//!    which revokes the replica), then check every word is version V: the
//!    shim's fallback worked with our handler installed, and our handler
//!    was never called for it.
//! 4. Map a scratch file of our own, truncate it, touch it: the fault is
//!    not a replica's, so the shim must chain it to our handler, which
//!    records the address and puts a zero page there.
//!
//! One JSON line per step; exit 0 only if everything held.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicUsize, Ordering};

include!("pattern.rs");

static CALLS: AtomicUsize = AtomicUsize::new(0);
static LAST_ADDR: AtomicUsize = AtomicUsize::new(0);
/// For the plain (`signal`) handler, which gets no address: the page to
/// patch.
static EXPECTED: AtomicUsize = AtomicUsize::new(0);

fn zero_page(addr: usize) {
    // SAFETY: puts a zero page over one page of our own mapping, so that
    // the faulting load completes.
    unsafe {
        libc::mmap(
            (addr & !(PAGE - 1)) as *mut libc::c_void,
            PAGE,
            libc::PROT_READ,
            libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel (or the shim, chaining) passes a valid siginfo.
    let addr = unsafe { (*info).si_addr() } as usize;
    LAST_ADDR.store(addr, Ordering::SeqCst);
    CALLS.fetch_add(1, Ordering::SeqCst);
    zero_page(addr);
}

extern "C" fn on_sigbus_plain(_sig: libc::c_int) {
    CALLS.fetch_add(1, Ordering::SeqCst);
    let addr = EXPECTED.load(Ordering::SeqCst);
    LAST_ADDR.store(addr, Ordering::SeqCst);
    zero_page(addr);
}

fn install(mode: &str) {
    if mode == "signal" {
        // SAFETY: a handler that only stores atomics and calls mmap.
        let old = unsafe { libc::signal(libc::SIGBUS, on_sigbus_plain as *const () as usize) };
        assert_ne!(old, libc::SIG_ERR, "signal(SIGBUS)");
        return;
    }
    // SAFETY: installing a handler that only stores atomics and calls mmap.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()),
            0,
            "sigaction(SIGBUS)"
        );
    }
}

fn ours(mode: &str) -> usize {
    if mode == "signal" {
        on_sigbus_plain as *const () as usize
    } else {
        on_sigbus as *const () as usize
    }
}

/// The handler the kernel holds for SIGBUS, asked without libc's wrapper
/// (nor the shim's).
fn kernel_handler() -> usize {
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let mut old = KernelSigaction {
        handler: 0,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: rt_sigaction with a null new action and a kernel-layout old
    // action of the right size (8-byte mask).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            libc::SIGBUS,
            std::ptr::null::<KernelSigaction>(),
            &mut old as *mut KernelSigaction,
            8usize,
        )
    };
    assert_eq!(rc, 0, "rt_sigaction");
    old.handler
}

/// The object holding `addr` (`dladdr`), or what the value means.
fn owner(addr: usize) -> String {
    match addr {
        0 => return "SIG_DFL".into(),
        1 => return "SIG_IGN".into(),
        _ => {}
    }
    // SAFETY: Dl_info is plain old data; all-zero is valid.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the address; info is valid.
    if unsafe { libc::dladdr(addr as *const libc::c_void, &mut info) } == 0
        || info.dli_fname.is_null()
    {
        return format!("{addr:#x} (unknown object)");
    }
    // SAFETY: dladdr returned a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(info.dli_fname) }
        .to_string_lossy()
        .into_owned()
}

fn maps_line(addr: usize) -> (String, String, u64) {
    let text = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let range: Vec<usize> = f
            .first()
            .map(|r| {
                r.split('-')
                    .filter_map(|s| usize::from_str_radix(s, 16).ok())
                    .collect()
            })
            .unwrap_or_default();
        if range.len() == 2 && range[0] <= addr && addr < range[1] && f.len() >= 5 {
            return (l.to_string(), f[3].to_string(), f[4].parse().unwrap_or(0));
        }
    }
    (String::new(), String::new(), 0)
}

fn dev_str(dev: u64) -> String {
    format!("{:02x}:{:02x}", libc::major(dev), libc::minor(dev))
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Words of the mapping that are not `version`'s, and the first one.
fn check(base: *const u64, pages: usize, version: u64) -> (u64, String) {
    let mut bad = 0;
    let mut first = String::new();
    for p in 0..pages {
        for w in 0..WORDS {
            // SAFETY: inside the mapping.
            let v = unsafe { std::ptr::read_volatile(base.add(p * WORDS + w)) };
            if v != word(version, p as u64, w as u64) {
                bad += 1;
                if first.is_empty() {
                    first = format!("page {p} word {w}: {v:#018x}, want version {version}");
                }
            }
        }
    }
    (bad, first)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 || !["before", "after", "signal"].contains(&args[1].as_str()) {
        eprintln!("usage: replicad-sigbus before|after|signal DATA SCRATCH_DIR");
        std::process::exit(2);
    }
    let (mode, data, scratch) = (args[1].as_str(), &args[2], &args[3]);
    let mut ok = true;
    let owner_at_start = owner(kernel_handler());

    if mode == "before" {
        install(mode);
    }
    let f = std::fs::File::open(data).expect("open data");
    let meta = f.metadata().expect("fstat data");
    let size = meta.len() as usize;
    // SAFETY: a read-only private mapping of the file we hold open.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap data");
    drop(f);
    if mode != "before" {
        install(mode);
    }
    // What the program sees of its action, through libc (and the shim).
    // SAFETY: a null new action and a valid old one.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) };
    let reports_ours = rc == 0
        && old.sa_sigaction == ours(mode)
        && (mode == "signal" || old.sa_flags & libc::SA_SIGINFO != 0);
    let kernel_now = kernel_handler();
    let kernel_is_ours = kernel_now == ours(mode);
    let (line, dev, ino) = maps_line(p as usize);
    let on_replica = (dev, ino) != (dev_str(meta.dev()), meta.ino()) && ino != 0;
    let pages = size / PAGE;
    let (bad1, first1) = check(p as *const u64, pages, 1);
    println!(
        "{{\"step\":\"attached\",\"mode\":{},\"on_replica\":{on_replica},\"maps\":{},\"sigaction_reports_ours\":{reports_ours},\"old_handler\":\"{:#x}\",\"kernel_handler_is_ours\":{kernel_is_ours},\"kernel_owner_at_start\":{},\"kernel_owner\":{},\"bad_words\":{bad1},\"first_bad\":{}}}",
        json_str(mode),
        json_str(&line),
        old.sa_sigaction,
        json_str(&owner_at_start),
        json_str(&owner(kernel_now)),
        json_str(&first1)
    );
    let _ = std::io::stdout().flush();
    ok &= reports_ours && bad1 == 0;

    // 3. After the test's writer: the new bytes, through the fallback.
    let mut input = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut input)
        .expect("stdin");
    let version: u64 = input
        .trim()
        .strip_prefix("check ")
        .and_then(|v| v.parse().ok())
        .expect("a line `check V` on stdin");
    let calls_before = CALLS.load(Ordering::SeqCst);
    let (bad2, first2) = check(p as *const u64, pages, version);
    let calls_revoke = CALLS.load(Ordering::SeqCst) - calls_before;
    let (line2, _, _) = maps_line(p as usize);
    println!(
        "{{\"step\":\"revoked\",\"version\":{version},\"bad_words\":{bad2},\"first_bad\":{},\"handler_calls\":{calls_revoke},\"maps\":{}}}",
        json_str(&first2),
        json_str(&line2)
    );
    let _ = std::io::stdout().flush();
    ok &= bad2 == 0 && calls_revoke == 0;

    // 4. A fault of our own: a scratch file cut short under its mapping.
    let path = std::path::Path::new(scratch).join(format!("own-{}", std::process::id()));
    std::fs::write(&path, vec![0xa5u8; 2 * PAGE]).expect("scratch file");
    let g = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open scratch");
    // SAFETY: a read-only shared mapping of the scratch file.
    let q = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            2 * PAGE,
            libc::PROT_READ,
            libc::MAP_SHARED,
            g.as_raw_fd(),
            0,
        )
    };
    assert_ne!(q, libc::MAP_FAILED, "mmap scratch");
    let target = q as usize + PAGE + 24;
    EXPECTED.store(target, Ordering::SeqCst);
    g.set_len(0).expect("truncate scratch");
    let calls_before = CALLS.load(Ordering::SeqCst);
    // SAFETY: inside the mapping; the page is beyond the file's end now, so
    // this load faults and our handler puts a zero page there.
    let v = unsafe { std::ptr::read_volatile(target as *const u8) };
    let calls_own = CALLS.load(Ordering::SeqCst) - calls_before;
    let addr = LAST_ADDR.load(Ordering::SeqCst);
    let addr_ok = addr == target;
    println!(
        "{{\"step\":\"own_fault\",\"handler_calls\":{calls_own},\"si_addr_ok\":{addr_ok},\"value\":{v}}}"
    );
    let _ = std::fs::remove_file(&path);
    ok &= calls_own == 1 && addr_ok && v == 0;
    std::process::exit(if ok { 0 } else { 1 });
}
