//! Test program: private changes a program makes in replica-backed text
//! survive a revoke, as they do without replicad.
//!
//! `replicad-private MEM_FILE PKEY_FILE`: map each file whole,
//! `PROT_READ|PROT_EXEC`, `MAP_PRIVATE` (under the shim, on its replica),
//! and touch every page. Then:
//! - MEM_FILE: write `0xcc` at page 1, byte 7, through `/proc/self/mem`
//!   (a debugger's breakpoint: the mapping stays read-only);
//! - PKEY_FILE: the same breakpoint, then `pkey_mprotect` page 3 writable
//!   (with a fresh protection key, or -1 where the CPU has none) and write
//!   `0x90` at its byte 11.
//!
//! Prints `{"ready":..., "mem_on_replica":..., "pkey_on_replica":...}`,
//! waits for a line on stdin (the test writes both files meanwhile), then
//! prints what each range reads now: its page-1 breakpoint byte, the first
//! byte of page 1 (a private page keeps the bytes it was copied from),
//! page 2 (never written: the file's bytes now), and for PKEY_FILE page
//! 3's bytes 0 and 11; and whether each range is still on a replica.
//!
//! `replicad-private fork FILE`: map FILE as above, then fork; the parent
//! writes a breakpoint at page 2, byte 7, the child at page 1, byte 7,
//! each through its own `/proc/self/mem`. Each prints `{"who", "pid",
//! "on_replica"}`; after a line on stdin (the parent's; it tells the child
//! through a pipe) each prints its breakpoint byte now and whether it is
//! still on a replica, and the parent waits for the child.
//!
//! `replicad-private liar SOCKET FILE AT LEN`: a client that lies: sends
//! `Map` of FILE saying its fallback table is a heap buffer of its own (1
//! MiB of private pages) and that it mapped FILE at AT for LEN bytes;
//! prints the answer's kind and holds on until stdin closes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use serde_json::json;

const PAGE: usize = 4096;

// glibc's (2.27+); the `libc` crate does not declare them. The shim
// interposes `pkey_mprotect` as it does `mprotect`.
extern "C" {
    fn pkey_alloc(flags: libc::c_uint, access: libc::c_uint) -> libc::c_int;
    fn pkey_mprotect(
        addr: *mut libc::c_void,
        len: libc::size_t,
        prot: libc::c_int,
        pkey: libc::c_int,
    ) -> libc::c_int;
}

fn map(path: &str) -> (usize, usize) {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a private read-only mapping of a file we opened; the fd may
    // be closed afterwards.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap {path}");
    let p = p as usize;
    for i in (0..len).step_by(PAGE) {
        // SAFETY: inside the mapping.
        unsafe { std::ptr::read_volatile((p + i) as *const u8) };
    }
    (p, len)
}

/// Whether the maps line holding `addr` names a file other than `path`
/// (the replica).
fn on_replica(addr: usize, path: &str) -> bool {
    let maps = replicad_procfs::ProcReader::default()
        .self_maps_text()
        .unwrap();
    maps.lines().any(|l| {
        let range = l.split_whitespace().next().unwrap_or("");
        let (s, e) = range.split_once('-').unwrap_or(("0", "0"));
        let (s, e) = (
            usize::from_str_radix(s, 16).unwrap_or(0),
            usize::from_str_radix(e, 16).unwrap_or(0),
        );
        s <= addr && addr < e && !l.ends_with(path) && l.contains('/')
    })
}

fn byte(addr: usize) -> u8 {
    // SAFETY: inside one of our mappings (a SIGBUS here is the shim's to
    // fix; without it, the test fails loudly).
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

fn num(s: &str) -> u64 {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap(),
        None => s.parse().unwrap(),
    }
}

fn liar(socket: &str, file: &str, at: u64, len: u64) {
    use replicad_client::proto::{Request, Response};
    use std::os::fd::AsFd;
    let heap = vec![1u8; 1 << 20];
    let f = std::fs::File::open(file).unwrap();
    let answer = replicad_client::request(
        std::path::Path::new(socket),
        &Request::Map {
            node: Some(0),
            table: heap.as_ptr() as u64,
            at,
            len,
        },
        &[f.as_fd()],
        std::time::Duration::from_secs(5),
    );
    let kind = match answer {
        Ok((Response::Mapped { .. }, _)) => "mapped".to_string(),
        other => format!("{other:?}"),
    };
    println!("{}", json!({ "answer": kind }));
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
    drop(heap);
}

fn fork_both(file: &str) {
    let (m, _) = map(file);
    let mut pipe = [0i32; 2];
    // SAFETY: a fresh pipe into a two-int array.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: this program is single-threaded: the child may do anything.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    let (who, at) = if pid == 0 {
        ("child", m + PAGE + 7)
    } else {
        ("parent", m + 2 * PAGE + 7)
    };
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(replicad_procfs::ProcReader::default().self_path("mem"))
        .unwrap();
    mem.write_at(&[0xcc], at as u64).unwrap();
    println!(
        "{}",
        json!({"who": who, "pid": std::process::id(), "on_replica": on_replica(m, file)})
    );
    let mut b = [0u8; 1];
    if pid == 0 {
        // SAFETY: reading one byte into our buffer from the pipe's end.
        unsafe { libc::read(pipe[0], b.as_mut_ptr().cast(), 1) };
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).unwrap();
        // SAFETY: one byte from our buffer into the pipe.
        unsafe { libc::write(pipe[1], b.as_ptr().cast(), 1) };
    }
    println!(
        "{}",
        json!({"who": who, "after": true, "breakpoint": byte(at), "on_replica": on_replica(m, file)})
    );
    if pid == 0 {
        std::process::exit(0);
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args[1] == "fork" {
        fork_both(&args[2]);
        return;
    }
    if args[1] == "liar" {
        liar(&args[2], &args[3], num(&args[4]), num(&args[5]));
        return;
    }
    let (mem_file, pkey_file) = (&args[1], &args[2]);
    let (m, _) = map(mem_file);
    let (k, _) = map(pkey_file);
    let mem_on = on_replica(m, mem_file);
    let pkey_on = on_replica(k, pkey_file);
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(replicad_procfs::ProcReader::default().self_path("mem"))
        .unwrap();
    mem.write_at(&[0xcc], (m + PAGE + 7) as u64).unwrap();
    mem.write_at(&[0xcc], (k + PAGE + 7) as u64).unwrap();
    // SAFETY: plain syscalls wrappers; the key is freed at exit.
    let pkey = unsafe { pkey_alloc(0, 0) };
    // SAFETY: page 3 of our own mapping.
    let rc = unsafe {
        pkey_mprotect(
            (k + 3 * PAGE) as *mut libc::c_void,
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            pkey,
        )
    };
    assert_eq!(rc, 0, "pkey_mprotect: {}", std::io::Error::last_os_error());
    // SAFETY: the page was just made writable.
    unsafe { std::ptr::write_volatile((k + 3 * PAGE + 11) as *mut u8, 0x90) };
    println!(
        "{}",
        json!({
            "ready": true,
            "mem_on_replica": mem_on,
            "pkey_on_replica": pkey_on,
            "pkey_on_replica_after_mprotect": on_replica(k, pkey_file),
            "pkey": pkey,
        })
    );
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
    println!(
        "{}",
        json!({
            "mem": {
                "breakpoint": byte(m + PAGE + 7),
                "page1": byte(m + PAGE),
                "page2": byte(m + 2 * PAGE),
                "on_replica": on_replica(m, mem_file),
            },
            "pkey": {
                "breakpoint": byte(k + PAGE + 7),
                "page1": byte(k + PAGE),
                "page2": byte(k + 2 * PAGE),
                "page3": byte(k + 3 * PAGE),
                "written": byte(k + 3 * PAGE + 11),
                "on_replica": on_replica(k, pkey_file),
            },
        })
    );
}
