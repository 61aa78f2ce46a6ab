//! The explicit mapping API against a real kernel: no daemon, a fake daemon
//! that hands out memfd replicas, revokes by truncation (as replicad does),
//! concurrent readers during a revoke, and faults after the fallback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::*;
use replicad_client::{map_with, Backing, MapOptions};

fn opts(socket: &std::path::Path) -> MapOptions {
    MapOptions {
        socket: socket.to_path_buf(),
        node: None,
        timeout: Duration::from_secs(5),
    }
}

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

#[test]
fn no_daemon_maps_the_file_and_names_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(3 * page() + 17, 1);
    let p = write_file(dir.path(), "data", &data);
    let socket = dir.path().join("replicad.sock");
    let m = map_with(&p, &opts(&socket)).unwrap();
    assert_eq!(m.as_slice(), &data[..]);
    assert!(!m.on_replica());
    let Backing::File { reason } = m.backing() else {
        panic!("expected the file, got {:?}", m.backing());
    };
    assert!(reason.contains(&socket.display().to_string()), "{reason}");
    assert!(reason.contains("not reachable"), "{reason}");
    assert!(
        maps_line(m.as_ptr() as usize).ends_with(&p.display().to_string()),
        "{}",
        maps_line(m.as_ptr() as usize)
    );
}

#[test]
fn replica_then_revoke_reads_current_file_bytes() {
    let daemon = FakeDaemon::with_replicas();
    let len = 5 * page() + 100;
    let old = pattern(len, 2);
    let new = pattern(len, 3);
    let p = write_file(daemon.dir(), "data", &old);
    let m = map_with(&p, &opts(&daemon.socket)).unwrap();
    assert_eq!(
        m.backing(),
        &Backing::Replica {
            node: 0,
            generation: 1
        }
    );
    assert!(m.on_replica());
    assert_eq!(m.as_slice(), &old[..]);
    let line = maps_line(m.as_ptr() as usize);
    assert!(line.contains(&format!("/memfd:{REPLICA_NAME}")), "{line}");

    // A writer changes the source (the real daemon fences this until the
    // revoke; here we check the mapping really reads the replica meanwhile).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all_at(&new, 0)
        .unwrap();
    assert_eq!(first_mismatch(m.as_slice(), &old), None, "replica changed");

    // Revoke: truncate the replica to 0, as the daemon's fence thread does.
    daemon.revoke_all();
    // Compare through libc's memcmp first: the fault lands inside libc.
    assert!(
        m.as_slice() == &new[..],
        "after revoke: not the file's current bytes"
    );
    assert_eq!(first_mismatch(m.as_slice(), &new), None);
    assert!(!m.on_replica());
    assert_eq!(
        m.backing(),
        &Backing::Replica {
            node: 0,
            generation: 1
        }
    );
    let line = maps_line(m.as_ptr() as usize);
    assert!(line.ends_with(&p.display().to_string()), "{line}");
    // Later writes show through too: the range is the file's shared mapping.
    let newer = pattern(len, 4);
    std::fs::write(&p, &newer).unwrap();
    assert_eq!(first_mismatch(m.as_slice(), &newer), None);
    drop(m);
}

#[test]
fn fallback_reaches_an_unlinked_file_without_any_fd() {
    let daemon = FakeDaemon::with_replicas();
    let data = pattern(2 * page(), 5);
    let p = write_file(daemon.dir(), "gone", &data);
    let m = map_with(&p, &opts(&daemon.socket)).unwrap();
    assert!(m.on_replica());
    std::fs::remove_file(&p).unwrap();
    daemon.revoke_all();
    assert_eq!(first_mismatch(m.as_slice(), &data), None);
    assert!(!m.on_replica());
    let line = maps_line(m.as_ptr() as usize);
    assert!(line.ends_with("(deleted)"), "{line}");
}

#[test]
fn eight_readers_during_revoke_never_crash_or_misread() {
    let daemon = FakeDaemon::with_replicas();
    let len = 16 * page() + 7;
    let data = Arc::new(pattern(len, 6));
    let p = write_file(daemon.dir(), "hot", &data);
    let rounds = 12;
    let mut bytes_read = 0usize;
    for round in 0..rounds {
        let m = Arc::new(map_with(&p, &opts(&daemon.socket)).unwrap());
        assert!(m.on_replica(), "round {round}: {:?}", m.backing());
        let stop = Arc::new(AtomicBool::new(false));
        let start = Arc::new(Barrier::new(9));
        let total = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (0..8)
            .map(|t| {
                let (m, stop, start, data, total) = (
                    m.clone(),
                    stop.clone(),
                    start.clone(),
                    data.clone(),
                    total.clone(),
                );
                std::thread::spawn(move || {
                    start.wait();
                    let s = m.as_slice();
                    let mut passes = 0usize;
                    // Each thread starts on another page so that several
                    // fault on different and on the same pages at once.
                    let off = (t * 2 * page()) % len;
                    while !stop.load(Ordering::Relaxed) || passes < 3 {
                        for k in 0..len {
                            let i = (off + k) % len;
                            // SAFETY: i < len; the mapping outlives the thread.
                            let b = unsafe { std::ptr::read_volatile(s.as_ptr().add(i)) };
                            if b != data[i] {
                                return Err(format!(
                                    "thread {t}: byte {i} is {b}, want {}",
                                    data[i]
                                ));
                            }
                        }
                        passes += 1;
                    }
                    total.fetch_add(passes * len, Ordering::Relaxed);
                    Ok(passes)
                })
            })
            .collect();
        start.wait();
        std::thread::sleep(Duration::from_micros(200 * (round as u64 % 5)));
        daemon.revoke_all();
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().expect("reader panicked").unwrap();
        }
        assert!(!m.on_replica(), "round {round}: still on the replica");
        bytes_read += total.load(Ordering::Relaxed);
    }
    eprintln!("{rounds} rounds, {bytes_read} bytes checked, no wrong byte");
}

const CHILD_ENV: &str = "REPLICAD_TEST_CHILD";

/// Run this test binary's `test` again in a child with `CHILD_ENV=scenario`;
/// kill it if it runs past 60 s (a looping handler).
fn run_child(test: &str, scenario: &str) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, scenario)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "child {scenario} still running after 60 s (handler loop?)\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (status, text)
}

/// In a child: map through a replica, revoke, fall back, shrink the
/// original to one page and touch the third page.
fn child_fall_back_then_touch_beyond_end() -> ! {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit; only affects this child (no core file).
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    let daemon = FakeDaemon::with_replicas();
    let data = pattern(4 * page(), 7);
    let p = write_file(daemon.dir(), "shrinks", &data);
    let m = map_with(&p, &opts(&daemon.socket)).unwrap();
    assert!(m.on_replica());
    daemon.revoke_all();
    assert_eq!(first_mismatch(m.as_slice(), &data), None);
    assert!(!m.on_replica());
    eprintln!("CHILD fell back");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(page() as u64)
        .unwrap();
    let addr = m.as_ptr() as usize + 2 * page() + 5;
    TOUCHED.store(addr, Ordering::SeqCst);
    eprintln!("CHILD touching beyond end");
    // SAFETY: addr is inside the live mapping; past the file's new end it
    // raises SIGBUS, which is the point.
    let b = unsafe { std::ptr::read_volatile(addr as *const u8) };
    eprintln!(
        "CHILD read {b} past the end; handler calls {}",
        HANDLER_CALLS.load(Ordering::SeqCst)
    );
    drop(m);
    std::process::exit(0);
}

static TOUCHED: AtomicUsize = AtomicUsize::new(0);
static HANDLER_CALLS: AtomicUsize = AtomicUsize::new(0);
static HANDLER_ADDR: AtomicUsize = AtomicUsize::new(0);

/// The program's own SA_SIGINFO handler: counts, checks the address, and
/// fixes the fault with an anonymous page so the read completes.
extern "C" fn program_siginfo_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    HANDLER_CALLS.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the kernel passed a valid siginfo.
    let addr = unsafe { (*info).si_addr() } as usize;
    HANDLER_ADDR.store(addr, Ordering::SeqCst);
    let page_start = addr & !(4096 - 1);
    // SAFETY: replaces one page of the test's own mapping with zeros.
    unsafe {
        libc::mmap(
            page_start as *mut libc::c_void,
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
}

/// The program's own plain handler: says so and exits 42.
extern "C" fn program_plain_handler(_sig: libc::c_int) {
    let msg = b"PLAIN HANDLER CALLED\n";
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(42);
    }
}

fn install_program_handler(handler: usize, siginfo: bool) {
    // SAFETY: sigaction is plain old data; all-zero is valid.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = handler;
    act.sa_flags = if siginfo { libc::SA_SIGINFO } else { 0 };
    // SAFETY: act is a valid sigaction for SIGBUS.
    let rc = unsafe { libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
}

/// Set SIGBUS to `SIG_DFL` or `SIG_IGN` (Rust's std installs its own
/// SIGBUS handler for stack overflows, so a test binary starts with one).
fn set_plain_action(action: libc::sighandler_t) {
    // SAFETY: setting a plain disposition has no preconditions.
    assert_ne!(unsafe { libc::signal(libc::SIGBUS, action) }, libc::SIG_ERR);
}

#[test]
fn fault_past_shrunk_end_after_fallback_kills_by_sigbus_once() {
    if std::env::var(CHILD_ENV).as_deref() == Ok("default") {
        set_plain_action(libc::SIG_DFL);
        child_fall_back_then_touch_beyond_end();
    }
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let (status, out) = run_child(
        "fault_past_shrunk_end_after_fallback_kills_by_sigbus_once",
        "default",
    );
    assert!(out.contains("CHILD touching beyond end"), "{out}");
    assert!(!out.contains("past the end"), "child survived: {out}");
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}\n{out}");
}

#[test]
fn fault_past_shrunk_end_with_sigbus_ignored_still_kills() {
    // The kernel forces the default action for an ignored fault; so do we.
    if std::env::var(CHILD_ENV).as_deref() == Ok("ignored") {
        set_plain_action(libc::SIG_IGN);
        child_fall_back_then_touch_beyond_end();
    }
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let (status, out) = run_child(
        "fault_past_shrunk_end_with_sigbus_ignored_still_kills",
        "ignored",
    );
    assert!(out.contains("CHILD touching beyond end"), "{out}");
    assert!(!out.contains("past the end"), "child survived: {out}");
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}\n{out}");
}

#[test]
fn fault_past_shrunk_end_with_rusts_own_handler_kills_by_sigbus() {
    // The action a Rust program starts with: std's stack-overflow handler,
    // which resets to the default for a fault outside a guard page.
    if std::env::var(CHILD_ENV).as_deref() == Ok("rust-std") {
        child_fall_back_then_touch_beyond_end();
    }
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let (status, out) = run_child(
        "fault_past_shrunk_end_with_rusts_own_handler_kills_by_sigbus",
        "rust-std",
    );
    assert!(!out.contains("past the end"), "child survived: {out}");
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}\n{out}");
}

#[test]
fn fault_past_shrunk_end_goes_to_the_programs_siginfo_handler() {
    if std::env::var(CHILD_ENV).as_deref() == Ok("siginfo") {
        install_program_handler(program_siginfo_handler as *const () as usize, true);
        child_fall_back_then_touch_beyond_end();
    }
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let (status, out) = run_child(
        "fault_past_shrunk_end_goes_to_the_programs_siginfo_handler",
        "siginfo",
    );
    assert_eq!(status.code(), Some(0), "{status:?}\n{out}");
    assert!(
        out.contains("CHILD read 0 past the end; handler calls 1"),
        "{out}"
    );
}

#[test]
fn fault_past_shrunk_end_goes_to_the_programs_plain_handler() {
    if std::env::var(CHILD_ENV).as_deref() == Ok("plain") {
        install_program_handler(program_plain_handler as *const () as usize, false);
        child_fall_back_then_touch_beyond_end();
    }
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let (status, out) = run_child(
        "fault_past_shrunk_end_goes_to_the_programs_plain_handler",
        "plain",
    );
    assert_eq!(status.code(), Some(42), "{status:?}\n{out}");
    assert_eq!(out.matches("PLAIN HANDLER CALLED").count(), 1, "{out}");
}

#[test]
fn sigbus_outside_replicas_still_reaches_the_default_action() {
    // A SIGBUS sent by kill(), not a fault, with the default action: the
    // process dies by SIGBUS as it would without replicad.
    if std::env::var(CHILD_ENV).as_deref() == Ok("sent") {
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid rlimit for this child.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
        set_plain_action(libc::SIG_DFL);
        let daemon = FakeDaemon::with_replicas();
        let p = write_file(daemon.dir(), "x", &pattern(page(), 8));
        let m = map_with(&p, &opts(&daemon.socket)).unwrap();
        assert!(m.on_replica());
        eprintln!("CHILD raising");
        // SAFETY: raise is fine here.
        unsafe { libc::raise(libc::SIGBUS) };
        eprintln!("CHILD survived raise");
        std::process::exit(0);
    }
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let (status, out) = run_child(
        "sigbus_outside_replicas_still_reaches_the_default_action",
        "sent",
    );
    assert!(out.contains("CHILD raising"), "{out}");
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}\n{out}");
}
