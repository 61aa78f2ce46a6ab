//! Test program: what a client can and cannot get from replicad, asked
//! with the raw protocol (no shim logic in between).
//!
//! `replicad-probe open FILE`: try to open FILE read-only.
//!
//! `replicad-probe hello [--map FILE]... [--extra-field] [--with-fd FILE]
//! [--try-writes]`: map each FILE (plain `mmap`, `PROT_READ`, `MAP_PRIVATE`),
//! then send a Hello on `$REPLICAD_SOCKET` (or, with `--extra-field`, a
//! Hello carrying a `"pid"` field; with `--with-fd`, a Hello with an fd
//! riding along) and report the answer: every range, and whether it lies
//! inside one of our own `/proc/self/maps` lines. With `--try-writes`, also
//! what happens when we try to write through each fd that came back
//! (`write`, `pwrite`, `ftruncate`, a writable shared `mmap`, reopening
//! `/proc/self/fd/N` for writing). Refused as root: root may reopen any
//! file for writing, system libraries included, and a write-open breaks
//! every replicad lease on the file.
//!
//! `replicad-probe replicate-pid PID`: send ReplicatePid, report the answer.
//!
//! `replicad-probe mprotect FILE`: map FILE `MAP_SHARED` and `MAP_PRIVATE`
//! read-only (the shim moves them onto the replica), report whether each
//! is on a replica and what `mprotect(PROT_READ|PROT_WRITE)` does; write a
//! byte into the private one (a private copy: neither the replica nor the
//! file may change).
//!
//! `replicad-probe hold FILE`: map FILE read-only and private, print a line,
//! and keep it until stdin closes.
//!
//! `replicad-probe inherit FILE EXE ARGS...`: connect to the daemon, fork;
//! this process execs EXE (which runs with other credentials, e.g.
//! set-user-ID, and maps FILE), while the child, holding the connected
//! socket, asks Hello on it until the answer names FILE, is a refusal, or
//! 3 s pass, and reports whether it got a range of FILE and could read
//! FILE's bytes through an fd that came back.
//!
//! `replicad-probe unshare FILE`: whether the shim's watcher thread
//! ("replicad-follow") runs, what `unshare(CLONE_NEWUSER)` returns (0 or
//! the errno), whether the thread runs after it, and after an `mmap` of
//! FILE.
//!
//! `replicad-probe fork FILE`: whether the watcher thread runs, then, in a
//! forked child, whether it runs there before and after an `mmap` of FILE.
//!
//! Every command prints one JSON line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use replicad_client::proto::{self, Request, Response};
use replicad_client::sock;
use serde_json::{json, Value};

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn map_ro(path: &str, flags: libc::c_int) -> (usize, usize) {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a read-only mapping of a file we hold open.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            flags,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap {path}");
    (p as usize, len)
}

/// Our maps lines as (start, end, dev "maj:min", ino, text).
fn own_maps() -> Vec<(u64, u64, String, u64, String)> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (s, e) = f.first()?.split_once('-')?;
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
                f.get(3)?.to_string(),
                f.get(4)?.parse().ok()?,
                l.to_string(),
            ))
        })
        .collect()
}

fn dev_str(dev: u64) -> String {
    format!("{:02x}:{:02x}", libc::major(dev), libc::minor(dev))
}

fn socket() -> PathBuf {
    replicad_client::socket_path()
}

/// One raw exchange on `conn`: bytes out (with fds), the answer back.
fn exchange(
    conn: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(Response, Vec<OwnedFd>), String> {
    sock::send(conn, bytes, fds).map_err(|e| format!("send: {e}"))?;
    let packet = sock::recv_fds(conn, proto::MAX_RESPONSE + 1, sock::MAX_MESSAGE_FDS)
        .map_err(|e| format!("recv: {e}"))?
        .ok_or("the daemon closed the connection")?;
    let resp = Response::decode(&packet.data).map_err(|e| format!("decode: {e}"))?;
    Ok((resp, packet.fds))
}

fn connect() -> OwnedFd {
    sock::connect(&socket(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket().display()))
}

/// What writing through `fd` does: each attempt's errno (0: it worked).
fn write_attempts(fd: BorrowedFd<'_>) -> Value {
    let raw = fd.as_raw_fd();
    // SAFETY: write(2) of one byte from a valid buffer.
    let w = unsafe { libc::write(raw, b"x".as_ptr().cast(), 1) };
    let write = if w < 0 { errno() } else { 0 };
    // SAFETY: pwrite(2) of one byte from a valid buffer.
    let w = unsafe { libc::pwrite(raw, b"x".as_ptr().cast(), 1, 0) };
    let pwrite = if w < 0 { errno() } else { 0 };
    // SAFETY: ftruncate on an fd we hold; the result is checked.
    let t = unsafe { libc::ftruncate(raw, 1) };
    let ftruncate = if t < 0 { errno() } else { 0 };
    // SAFETY: a writable shared mapping attempt; unmapped if it worked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            raw,
            0,
        )
    };
    let mmap_shared_rw = if p == libc::MAP_FAILED {
        errno()
    } else {
        // SAFETY: the mapping just made.
        unsafe { libc::munmap(p, 4096) };
        0
    };
    let reopen = match std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/self/fd/{raw}"))
    {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    };
    // SAFETY: F_GETFL on a live fd.
    let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    json!({
        "fd": raw,
        "file": std::fs::read_link(format!("/proc/self/fd/{raw}")).map(|p| p.display().to_string()).unwrap_or_default(),
        "accmode_rdonly": fl >= 0 && fl & libc::O_ACCMODE == libc::O_RDONLY,
        "write": write, "pwrite": pwrite, "ftruncate": ftruncate,
        "mmap_shared_rw": mmap_shared_rw, "reopen_wronly": reopen,
    })
}

fn describe(resp: &Response, fds: &[OwnedFd], try_writes: bool) -> Value {
    let maps = own_maps();
    match resp {
        Response::Attached {
            node,
            sources,
            ranges,
            skipped,
        } => {
            let ranges: Vec<Value> = ranges
                .iter()
                .map(|r| {
                    let inside = maps
                        .iter()
                        .any(|(s, e, _, _, _)| *s <= r.start && r.end <= *e);
                    json!({
                        "start": r.start, "end": r.end, "dev": r.dev, "ino": r.ino,
                        "perms": r.perms, "source": r.source, "inside_own_maps": inside,
                    })
                })
                .collect();
            json!({
                "answer": "attached", "node": node, "sources": sources, "ranges": ranges,
                "skipped": skipped, "fds": fds.len(),
                "writes": if try_writes {
                    fds.iter().map(|f| write_attempts(f.as_fd())).collect::<Vec<_>>()
                } else {
                    Vec::new()
                },
            })
        }
        Response::Original { reason } => json!({"answer": "original", "reason": reason}),
        Response::Error { kind, message } => {
            json!({"answer": "error", "kind": format!("{kind:?}"), "message": message})
        }
        other => json!({"answer": "other", "debug": format!("{other:?}")}),
    }
}

fn hello(args: &[String]) -> Value {
    let mut held = Vec::new();
    let mut extra = false;
    let mut with_fd = None;
    let mut try_writes = false;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--map" => {
                held.push(map_ro(&args[i + 1], libc::MAP_PRIVATE));
                i += 1;
            }
            "--extra-field" => extra = true,
            "--try-writes" => {
                if unsafe_geteuid() == 0 {
                    eprintln!("replicad-probe: --try-writes as root would open files for writing");
                    std::process::exit(2);
                }
                try_writes = true;
            }
            "--with-fd" => {
                with_fd = Some(std::fs::File::open(&args[i + 1]).unwrap());
                i += 1;
            }
            other => panic!("unknown hello option {other}"),
        }
        i += 1;
    }
    let bytes = if extra {
        let mut b = proto::MAGIC.to_vec();
        b.extend_from_slice(&proto::VERSION.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(br#"{"op":"hello","node":null,"pid":1}"#);
        b
    } else {
        Request::Hello {
            node: None,
            table: 0,
        }
        .encode()
    };
    let conn = connect();
    let fds: Vec<BorrowedFd<'_>> = with_fd.iter().map(|f| f.as_fd()).collect();
    match exchange(conn.as_fd(), &bytes, &fds) {
        Ok((resp, fds)) => describe(&resp, &fds, try_writes),
        Err(e) => json!({"answer": "none", "error": e}),
    }
}

fn replicate_pid(pid: u32) -> Value {
    let conn = connect();
    let req = Request::ReplicatePid {
        pid,
        nodes: proto::NodeSelection::All,
    };
    match exchange(conn.as_fd(), &req.encode(), &[]) {
        Ok((resp, fds)) => {
            let mut v = describe(&resp, &fds, false);
            v["fds"] = json!(fds.len());
            v
        }
        Err(e) => json!({"answer": "none", "error": e}),
    }
}

fn on_replica(addr: usize, path: &str) -> (bool, String) {
    let meta = std::fs::metadata(path).unwrap();
    let want = (dev_str(meta.dev()), meta.ino());
    let maps = own_maps();
    let Some((_, _, dev, ino, line)) = maps
        .iter()
        .find(|(s, e, ..)| *s as usize <= addr && addr < *e as usize)
    else {
        return (false, String::new());
    };
    ((dev.clone(), *ino) != want && *ino != 0, line.clone())
}

fn mprotect(path: &str) -> Value {
    let mut out = json!({});
    for (name, flags) in [("shared", libc::MAP_SHARED), ("private", libc::MAP_PRIVATE)] {
        let (p, len) = map_ro(path, flags);
        let (replica, line) = on_replica(p, path);
        // SAFETY: mprotect of our own mapping.
        let rc = unsafe {
            libc::mprotect(
                p as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        let err = if rc == 0 { 0 } else { errno() };
        let mut wrote = false;
        if rc == 0 && flags == libc::MAP_PRIVATE {
            // SAFETY: the mapping is now writable; a private copy of one page.
            unsafe { std::ptr::write_volatile(p as *mut u8, 0x5a) };
            wrote = true;
        }
        out[name] = json!({
            "on_replica": replica, "maps": line, "mprotect_rw_errno": err, "wrote": wrote,
        });
    }
    out
}

fn hold(path: &str) -> Value {
    let (p, _) = map_ro(path, libc::MAP_PRIVATE);
    println!(
        "{}",
        json!({"held": path, "pid": std::process::id(), "uid": unsafe_geteuid(), "addr": p})
    );
    let _ = std::io::stdout().flush();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    json!({"released": path})
}

/// Whether a thread of ours is named `name` (waiting up to `wait`).
fn has_thread(name: &str, wait: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        let found = std::fs::read_dir("/proc/self/task").unwrap().any(|t| {
            let comm = t.unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|c| c.trim() == name)
        });
        if found || t0.elapsed() >= wait {
            return found;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn unshare(path: &str) -> Value {
    let before = has_thread("replicad-follow", Duration::from_secs(2));
    // SAFETY: unshare has no memory arguments.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
    let unshare = if rc == 0 { 0 } else { errno() };
    let after = has_thread("replicad-follow", Duration::ZERO);
    let _mapped = map_ro(path, libc::MAP_PRIVATE);
    let after_mmap = has_thread("replicad-follow", Duration::from_secs(2));
    json!({"follow_before": before, "unshare": unshare, "follow_after_unshare": after,
           "follow_after_mmap": after_mmap})
}

fn fork_child(path: &str) -> Value {
    let parent = has_thread("replicad-follow", Duration::from_secs(2));
    let mut p = [0; 2];
    // SAFETY: p has room for two fds.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    // SAFETY: the child only reads /proc, maps a file and writes a pipe.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        let before = has_thread("replicad-follow", Duration::ZERO);
        let _mapped = map_ro(path, libc::MAP_PRIVATE);
        let after = has_thread("replicad-follow", Duration::from_secs(2));
        let out = [u8::from(before), u8::from(after)];
        // SAFETY: a 2-byte write from a live buffer to our pipe.
        unsafe {
            libc::write(p[1], out.as_ptr().cast(), 2);
            libc::_exit(0);
        }
    }
    let mut got = [0u8; 2];
    // SAFETY: a 2-byte read into a live buffer from our pipe.
    let n = unsafe {
        libc::close(p[1]);
        libc::read(p[0], got.as_mut_ptr().cast(), 2)
    };
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    json!({"follow_parent": parent, "read": n, "follow_child_at_fork": got[0] == 1,
           "follow_child_after_mmap": got[1] == 1})
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

fn inherit(file: &str, exe: &str, exe_args: &[String]) -> ! {
    let conn = connect();
    let target_ino = std::fs::metadata(file).map(|m| m.ino()).unwrap_or(0);
    // A pipe whose write end closes on exec: the child learns the exec
    // happened when it reads EOF.
    let mut p = [0; 2];
    // SAFETY: p has room for two fds.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are ours.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    let _ = std::io::stdout().flush();
    // SAFETY: this program is single-threaded here; the child only uses
    // its own copies of memory and fds.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid > 0 {
        // The parent: become EXE, keeping the pid the daemon knows the
        // connection by.
        drop(rd);
        let err = std::process::Command::new(exe)
            .args(exe_args)
            .env_remove("LD_PRELOAD")
            .exec();
        panic!("exec {exe}: {err}");
    }
    drop(wr);
    let mut f = std::fs::File::from(rd);
    let mut buf = [0u8; 1];
    let _ = f.read(&mut buf);
    let t0 = Instant::now();
    let mut report = json!({"answer": "none"});
    let mut leaked_bytes = 0usize;
    let mut ranges_of_file = 0usize;
    while t0.elapsed() < Duration::from_secs(3) {
        match exchange(
            conn.as_fd(),
            &Request::Hello {
                node: None,
                table: 0,
            }
            .encode(),
            &[],
        ) {
            Ok((resp, fds)) => {
                if let Response::Attached { ranges, .. } = &resp {
                    let hits: Vec<_> = ranges.iter().filter(|r| r.ino == target_ino).collect();
                    ranges_of_file = hits.len();
                    for r in &hits {
                        for fd in [2 * r.source as usize, 2 * r.source as usize + 1] {
                            if let Some(fd) = fds.get(fd) {
                                let mut b = vec![0u8; 4096];
                                // SAFETY: pread into our own buffer.
                                let n = unsafe {
                                    libc::pread(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len(), 0)
                                };
                                if n > 0 {
                                    leaked_bytes += n as usize;
                                }
                            }
                        }
                    }
                }
                report = describe(&resp, &fds, false);
                if ranges_of_file > 0 || matches!(resp, Response::Error { .. }) {
                    break;
                }
            }
            Err(e) => {
                report = json!({"answer": "none", "error": e});
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "{}",
        json!({"inherit": true, "ranges_of_file": ranges_of_file, "leaked_bytes": leaked_bytes, "last": report})
    );
    let _ = std::io::stdout().flush();
    std::process::exit(0);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = match args.get(1).map(String::as_str) {
        Some("open") => {
            let r = std::fs::File::open(&args[2]);
            json!({"opened": r.is_ok(), "errno": r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)})
        }
        Some("hello") => hello(&args[2..]),
        Some("replicate-pid") => replicate_pid(args[2].parse().expect("pid")),
        Some("mprotect") => mprotect(&args[2]),
        Some("hold") => hold(&args[2]),
        Some("unshare") => unshare(&args[2]),
        Some("fork") => fork_child(&args[2]),
        Some("inherit") => inherit(&args[2], &args[3], &args[4..]),
        _ => {
            eprintln!(
                "usage: replicad-probe open FILE | hello [--map FILE]... [--extra-field] [--with-fd FILE] [--try-writes] \
                 | replicate-pid PID | mprotect FILE | hold FILE | unshare FILE | fork FILE | inherit FILE EXE ARGS..."
            );
            std::process::exit(2);
        }
    };
    println!("{out}");
}
