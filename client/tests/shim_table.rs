//! The fallback table as the preload shim uses it, against the real kernel:
//! a replica moved over a range the program mapped falls back on revoke;
//! a range the program unmapped and reused is never overwritten by the
//! spare (its fault goes to the program's handler); the program's SIGBUS
//! action is kept and reported. Each scenario runs in a child process,
//! since the SIGBUS handler is process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use replicad_client::shim;

const CHILD_ENV: &str = "REPLICAD_TEST_SHIM_CHILD";

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

fn run_child(test: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "child failed: {:?}\n{text}",
        out.status
    );
    text
}

fn map(fd: &OwnedFd, len: usize, at: usize) -> usize {
    let flags = libc::MAP_PRIVATE | if at != 0 { libc::MAP_FIXED } else { 0 };
    // SAFETY: maps our own fd read-only; MAP_FIXED only over our own range.
    let p = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len,
            libc::PROT_READ,
            flags,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    p as usize
}

fn file_id(fd: &OwnedFd) -> (u32, u32, u64) {
    // SAFETY: all-zero stat is valid; fd is live.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
    (libc::major(st.st_dev), libc::minor(st.st_dev), st.st_ino)
}

/// What the shim does: the program's range at `start`, a spare of the
/// source, the replica moved over the range.
fn swap_in(source: &OwnedFd, replica: &OwnedFd, start: usize, len: usize) -> usize {
    let spare = map(source, len, 0);
    let rep = map(replica, len, 0);
    let (major, minor, ino) = file_id(replica);
    let slot = shim::register(start, len, spare, major, minor, ino).unwrap();
    // SAFETY: moves our replica mapping over our own range.
    let moved = unsafe {
        libc::mremap(
            rep as *mut libc::c_void,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            start as *mut libc::c_void,
        )
    };
    assert_eq!(moved as usize, start);
    let _ = slot;
    spare
}

fn read_all(addr: usize, len: usize) -> Vec<u8> {
    // SAFETY: addr..addr+len is a live mapping of ours.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec()
}

static PROGRAM_CALLS: AtomicUsize = AtomicUsize::new(0);

/// The program's handler: counts and maps a zero page over the fault.
extern "C" fn program_handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    PROGRAM_CALLS.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the kernel passed a valid siginfo.
    let addr = unsafe { (*info).si_addr() } as usize & !(4096 - 1);
    // SAFETY: replaces one page of the test's own mapping with zeros.
    unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            4096,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
}

#[test]
fn a_swapped_range_falls_back_and_a_reused_one_is_left_to_the_program() {
    if std::env::var_os(CHILD_ENV).is_none() {
        let out = run_child("a_swapped_range_falls_back_and_a_reused_one_is_left_to_the_program");
        assert!(out.contains("CHILD DONE"), "{out}");
        return;
    }
    let len = 4 * page();
    let old = pattern(len, 1);
    let source = memfd("source");
    std::fs::File::from(source.try_clone().unwrap())
        .set_len(0)
        .unwrap();
    write_fd(&source, &old);
    let (replica, _) = replica_copy(&source);

    // The program's own mapping, then the swap.
    let start = map(&source, len, 0);
    let spare = swap_in(&source, &replica, start, len);
    assert!(
        maps_line(start).contains(REPLICA_NAME),
        "{}",
        maps_line(start)
    );
    assert!(shim::live_at(start));
    assert!(shim::is_spare(spare));
    assert_eq!(read_all(start, len), old);
    let (live, fallbacks) = shim::counts();
    assert_eq!((live, fallbacks), (1, 0));

    // Revoke: truncate the replica; the next touch falls back to the
    // source through the spare.
    std::fs::File::from(replica.try_clone().unwrap())
        .set_len(0)
        .unwrap();
    assert_eq!(read_all(start, len), old);
    assert!(maps_line(start).contains("source"), "{}", maps_line(start));
    assert_eq!(shim::counts(), (0, 1));
    // The fallen range is done: live_at frees it so it can attach again.
    assert!(!shim::live_at(start));

    // The program's SIGBUS handler, installed after ours: kept, reported.
    // SAFETY: all-zero sigaction is valid.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = program_handler as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: valid pointers.
    assert!(unsafe { shim::program_sigaction(&act, std::ptr::null_mut()) });
    // SAFETY: all-zero sigaction is valid.
    let mut old_act: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    assert!(unsafe { shim::program_sigaction(std::ptr::null(), &mut old_act) });
    assert_eq!(old_act.sa_sigaction, program_handler as *const () as usize);
    assert_eq!(old_act.sa_flags & libc::SA_SIGINFO, libc::SA_SIGINFO);

    // A second range swapped in, then the program unmaps it and maps
    // another file there, which it shrinks: that fault is the program's.
    let (replica2, _) = replica_copy(&source);
    let start2 = map(&source, len, 0);
    let spare2 = swap_in(&source, &replica2, start2, len);
    let other = memfd("other");
    write_fd(&other, &pattern(len, 9));
    map(&other, len, start2);
    std::fs::File::from(other.try_clone().unwrap())
        .set_len(0)
        .unwrap();
    // Also revoke the replica: were the spare moved, it would read `old`.
    std::fs::File::from(replica2.try_clone().unwrap())
        .set_len(0)
        .unwrap();
    let got = read_all(start2, page());
    assert_eq!(PROGRAM_CALLS.load(Ordering::SeqCst), 1);
    assert!(
        got.iter().all(|b| *b == 0),
        "the spare was moved over a range the program reused"
    );
    assert!(
        maps_line(spare2).contains("source"),
        "spare gone: {}",
        maps_line(spare2)
    );
    // The stale slot is freed (and its spare unmapped) when asked about.
    assert!(!shim::live_at(start2));
    assert!(!shim::is_spare(spare2));
    eprintln!("CHILD DONE");
    std::process::exit(0);
}

fn write_fd(fd: &OwnedFd, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::from(fd.try_clone().unwrap());
    f.write_all_at(bytes, 0).unwrap();
}

#[test]
fn a_partly_unmapped_range_keeps_its_way_back_for_the_rest() {
    if std::env::var_os(CHILD_ENV).is_none() {
        let out = run_child("a_partly_unmapped_range_keeps_its_way_back_for_the_rest");
        assert!(out.contains("CHILD DONE"), "{out}");
        return;
    }
    let page = page();
    let len = 4 * page;
    let old = pattern(len, 3);
    let source = memfd("source");
    write_fd(&source, &old);
    let (replica, _) = replica_copy(&source);
    let start = map(&source, len, 0);
    let spare = swap_in(&source, &replica, start, len);
    assert_eq!(shim::counts(), (1, 0));

    // The program unmaps the second page; the munmap wrapper tells the
    // table. The first page and the last two stay on the replica, each
    // part with its own way back.
    // SAFETY: unmaps one page of our own mapping.
    let rc = unsafe { libc::munmap((start + page) as *mut libc::c_void, page) };
    assert_eq!(rc, 0);
    shim::forget(start + page, page);
    assert_eq!(shim::counts().0, 2, "head and tail entries");
    assert!(shim::live_at(start));
    assert!(shim::live_at(start + 2 * page));
    assert!(shim::is_spare(spare));
    assert!(shim::is_spare(spare + 2 * page));
    // The spare's page under the hole is gone; the rest is still there.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let holds = |addr: usize| {
        maps.lines().any(|l| {
            let (a, b) = l
                .split_whitespace()
                .next()
                .unwrap()
                .split_once('-')
                .unwrap();
            let (a, b) = (
                usize::from_str_radix(a, 16).unwrap(),
                usize::from_str_radix(b, 16).unwrap(),
            );
            a <= addr && addr < b
        })
    };
    assert!(
        !holds(spare + page),
        "the spare under the hole is still mapped"
    );
    assert!(holds(spare) && holds(spare + 2 * page));

    // Revoke: both parts fall back to the file's bytes.
    std::fs::File::from(replica.try_clone().unwrap())
        .set_len(0)
        .unwrap();
    assert_eq!(read_all(start, page), old[..page]);
    assert_eq!(read_all(start + 2 * page, 2 * page), old[2 * page..]);
    assert_eq!(shim::counts(), (0, 2));
    eprintln!("CHILD DONE");
    std::process::exit(0);
}

#[test]
fn falling_back_on_purpose_puts_the_file_back_at_once() {
    if std::env::var_os(CHILD_ENV).is_none() {
        let out = run_child("falling_back_on_purpose_puts_the_file_back_at_once");
        assert!(out.contains("CHILD DONE"), "{out}");
        return;
    }
    let len = 2 * page();
    let old = pattern(len, 4);
    let source = memfd("source");
    write_fd(&source, &old);
    let (replica, _) = replica_copy(&source);
    let start = map(&source, len, 0);
    swap_in(&source, &replica, start, len);
    assert!(
        maps_line(start).contains(REPLICA_NAME),
        "{}",
        maps_line(start)
    );
    // What the mprotect(PROT_WRITE) and mremap wrappers do first.
    shim::fall_back(start + page(), 1);
    assert!(maps_line(start).contains("source"), "{}", maps_line(start));
    assert_eq!(shim::counts(), (0, 1));
    // A revoke now changes nothing for this range.
    std::fs::File::from(replica.try_clone().unwrap())
        .set_len(0)
        .unwrap();
    assert_eq!(read_all(start, len), old);
    assert_eq!(shim::counts(), (0, 1));
    eprintln!("CHILD DONE");
    std::process::exit(0);
}
