//! Test program: the coherence reader of reader.rs, but reading the file
//! the way an unmodified program does, through plain `mmap(2)`, so that the
//! preload shim (not the client API) moves the mapping onto a replica.
//!
//! `replicad-mmap-reader verify FILE CONTROL SECONDS private|shared [no-handler]`
//!
//! In a loop: read the completed version `c`, open FILE, `mmap` it
//! `PROT_READ` with `MAP_PRIVATE` or `MAP_SHARED`, close the fd, check every
//! 8-byte word of every page (see pattern.rs): right page and word, version
//! between `c` and the started version read afterwards; then `munmap`.
//! Whether a round ran on a replica is read from `/proc/self/maps`: the
//! mapping's device and inode are not FILE's.
//!
//! A writer that shrinks the file makes the file's own mapping fault: the
//! reader's SIGBUS handler puts a zero page there and the round is torn.
//! With `no-handler` there is none, for writers that never shrink the
//! file: then any SIGBUS that reaches the program (a revoke the shim did
//! not turn into a fallback) kills it.
//!
//! Prints one JSON line after its first complete round (`"first":true`,
//! with the mapping's maps line), so a test can see it is on a replica
//! before any write, and one JSON line of counts at the end; exits 1 if any
//! word was wrong (stale, zero, or foreign).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};

include!("pattern.rs");

include!("torn.rs");

/// The `/proc/self/maps` line of the mapping starting at `addr`, with its
/// device (as maps prints it, `maj:min`) and inode.
fn maps_line(addr: usize) -> (String, String, u64) {
    let text = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let start = f
            .first()
            .and_then(|r| r.split('-').next())
            .and_then(|s| usize::from_str_radix(s, 16).ok());
        if start == Some(addr) && f.len() >= 5 {
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

#[derive(Default)]
struct Counts {
    rounds: u64,
    /// Rounds that began and ended on a replica.
    replica_rounds: u64,
    /// ... of those, before the first write completed (version 1).
    replica_rounds_v1: u64,
    /// ... and after a write (a new generation's replica).
    replica_rounds_new: u64,
    /// Rounds that began on a replica and ended on the file: the replica
    /// was revoked under the reader and the shim fell back mid-round (torn
    /// rounds included).
    fallback_rounds: u64,
    file_rounds: u64,
    torn_rounds: u64,
    empty_rounds: u64,
    words: u64,
    bad_words: u64,
    first_bad: String,
}

fn verify(file: &str, control: &str, seconds: f64, flags: libc::c_int) -> Counts {
    let ctl = Control::open(std::path::Path::new(control));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(seconds);
    let mut c = Counts::default();
    let mut announced = false;
    while std::time::Instant::now() < deadline && !ctl.stopped() {
        let low = ctl.completed();
        let Ok(f) = std::fs::File::open(file) else {
            continue;
        };
        let meta = f.metadata().expect("fstat");
        let size = meta.len() as usize;
        if size < PAGE {
            // Momentarily empty (O_TRUNC, truncate): nothing to read.
            c.empty_rounds += 1;
            continue;
        }
        // SAFETY: a fresh read-only mapping of a file we hold open; the
        // shim may move it onto a replica (same bytes, same protection).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ,
                flags,
                f.as_raw_fd(),
                0,
            )
        };
        drop(f);
        if p == libc::MAP_FAILED {
            continue;
        }
        let addr = p as usize;
        let file_id = (dev_str(meta.dev()), meta.ino());
        let (line0, dev0, ino0) = maps_line(addr);
        let on_replica_at_start = (dev0.clone(), ino0) != file_id && ino0 != 0;
        TORN.store(false, Ordering::SeqCst);
        let base = p as *const u64;
        let pages = size / PAGE;
        let mut max_version = 0;
        let mut bad = 0;
        let mut first_bad = String::new();
        let mut words = 0;
        'pages: for pg in 0..pages {
            for w in 0..WORDS {
                // SAFETY: inside the mapping; a volatile load so the
                // compiler reads memory every time.
                let v = unsafe { std::ptr::read_volatile(base.add(pg * WORDS + w)) };
                if TORN.load(Ordering::SeqCst) {
                    break 'pages;
                }
                words += 1;
                let version = v >> 32;
                max_version = max_version.max(version);
                if (v & 0xffff_ffff) != ((pg as u64) << 9 | w as u64) || version < low {
                    bad += 1;
                    if first_bad.is_empty() {
                        first_bad = format!(
                            "page {pg} word {w}: {v:#018x} (version {version}, completed {low}, on_replica {on_replica_at_start}, maps {line0:?})"
                        );
                    }
                }
            }
        }
        let high = ctl.started();
        let (_, dev1, ino1) = maps_line(addr);
        let still_replica = on_replica_at_start && (dev1, ino1) == (dev0, ino0);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p, size) };
        c.rounds += 1;
        if max_version > high {
            bad += 1;
            first_bad = format!("version {max_version} read but only {high} was started");
        }
        c.words += words;
        c.bad_words += bad;
        if c.first_bad.is_empty() {
            c.first_bad = first_bad;
        }
        if TORN.load(Ordering::SeqCst) {
            c.torn_rounds += 1;
            if on_replica_at_start && !still_replica {
                // The shim fell back first; then the shrunk file faulted.
                c.fallback_rounds += 1;
            }
            continue;
        }
        if still_replica {
            c.replica_rounds += 1;
            if low <= 1 {
                c.replica_rounds_v1 += 1;
            } else {
                c.replica_rounds_new += 1;
            }
        } else {
            c.file_rounds += 1;
            if on_replica_at_start {
                c.fallback_rounds += 1;
            }
        }
        if !announced {
            announced = true;
            println!(
                "{{\"first\":true,\"pid\":{},\"on_replica\":{},\"version\":{},\"maps\":{}}}",
                std::process::id(),
                still_replica,
                max_version,
                json_str(&line0)
            );
            let _ = std::io::stdout().flush();
        }
    }
    c
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flags = match args.get(5).map(String::as_str) {
        Some("private") => libc::MAP_PRIVATE,
        Some("shared") => libc::MAP_SHARED,
        _ => 0,
    };
    let handler = match args.get(6).map(String::as_str) {
        None => true,
        Some("no-handler") => false,
        Some(_) => {
            eprintln!("replicad-mmap-reader: the sixth argument may only be no-handler");
            std::process::exit(2);
        }
    };
    if args.get(1).map(String::as_str) != Some("verify") || flags == 0 {
        eprintln!(
            "usage: replicad-mmap-reader verify FILE CONTROL SECONDS private|shared [no-handler]"
        );
        std::process::exit(2);
    }
    if handler {
        install_sigbus();
    }
    let c = verify(&args[2], &args[3], args[4].parse().expect("seconds"), flags);
    println!(
        "{{\"pid\":{},\"kind\":{},\"rounds\":{},\"replica_rounds\":{},\"replica_rounds_v1\":{},\"replica_rounds_new\":{},\"fallback_rounds\":{},\"file_rounds\":{},\"torn_rounds\":{},\"empty_rounds\":{},\"words\":{},\"bad_words\":{},\"first_bad\":{}}}",
        std::process::id(),
        json_str(&args[5]),
        c.rounds,
        c.replica_rounds,
        c.replica_rounds_v1,
        c.replica_rounds_new,
        c.fallback_rounds,
        c.file_rounds,
        c.torn_rounds,
        c.empty_rounds,
        c.words,
        c.bad_words,
        json_str(&c.first_bad)
    );
    std::process::exit(if c.bad_words == 0 { 0 } else { 1 });
}
