//! Test program: rewrites a replicated file, round after round, through
//! every path a writer can take, and checks the fence held each time.
//!
//! `replicad-writer FILE CONTROL ROUNDS [--paths wronly,trunc,truncate,mmap]
//!  [--socket S] [--wait-replica] [--open-only]`
//!
//! Each round: open and map every valid replica of the file (from the
//! daemon's status), announce version v as started, open the file for
//! writing (timed: this is where the fence makes the writer wait), check
//! every one of those replicas is already truncated: size 0 through our fd
//! and our mapping raising SIGBUS (the fence released only after every
//! replica was revoked; an unlinked but intact replica that a process still
//! maps is a stale read), write every page as version v, announce v as complete,
//! and with `--wait-replica` wait until the daemon has a valid replica of
//! the new generation. Prints one JSON line; exits 1 on any violation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};

use replicad_client::proto::{ReplicaState, Request, Response};

include!("pattern.rs");

include!("torn.rs");

/// Every valid replica of `file` (any generation): the source's generation
/// and the replicas' files.
fn valid_replicas(socket: &Path, file: &Path) -> Option<(u64, Vec<String>)> {
    let (resp, _) =
        replicad_client::request(socket, &Request::Status, &[], Duration::from_secs(5)).ok()?;
    let Response::Status { report } = resp else {
        return None;
    };
    let src = report.sources.into_iter().find(|s| s.path == file)?;
    let files: Vec<String> = src
        .replicas
        .into_iter()
        .filter(|r| r.state == ReplicaState::Valid)
        .map(|r| r.file)
        .collect();
    (!files.is_empty()).then_some((src.generation, files))
}

/// One replica held open and mapped (every page touched) across the
/// writer's open, the way a reader holds it.
struct Held {
    path: String,
    file: std::fs::File,
    ptr: *mut libc::c_void,
    len: usize,
}

impl Held {
    fn open(path: &str) -> Result<Held, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
        let len = file.metadata().map_err(|e| e.to_string())?.len() as usize;
        if len == 0 {
            return Err("already empty while listed valid".into());
        }
        // SAFETY: a fresh shared read-only mapping of the replica's fd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        for off in (0..len).step_by(PAGE) {
            // SAFETY: inside the mapping; the replica is whole and valid.
            unsafe { std::ptr::read_volatile(ptr.cast::<u8>().add(off)) };
        }
        Ok(Held {
            path: path.to_string(),
            file,
            ptr,
            len,
        })
    }

    /// Why the replica is not revoked, if it is not: it must be truncated
    /// (our fd sees size 0, whether or not it was unlinked) and our mapping
    /// must fault.
    fn not_revoked(&self) -> Option<String> {
        let size = self.file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
        TORN.store(false, Ordering::SeqCst);
        // SAFETY: inside our mapping; a revoked replica raises SIGBUS, which
        // our handler (torn.rs) answers with a zero page and TORN.
        unsafe { std::ptr::read_volatile(self.ptr.cast::<u8>()) };
        let faulted = TORN.load(Ordering::SeqCst);
        if size == 0 && faulted {
            return None;
        }
        let unlinked = !Path::new(&self.path).exists();
        Some(format!(
            "holds {size} bytes through a held fd (unlinked: {unlinked}), a mapping of it {}",
            if faulted { "faults" } else { "still reads" }
        ))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

fn valid_replica(socket: &Path, file: &Path) -> Option<(u64, String)> {
    let (resp, _) =
        replicad_client::request(socket, &Request::Status, &[], Duration::from_secs(5)).ok()?;
    let Response::Status { report } = resp else {
        return None;
    };
    let src = report.sources.into_iter().find(|s| s.path == file)?;
    let r = src
        .replicas
        .into_iter()
        .find(|r| r.state == ReplicaState::Valid && r.generation == src.generation)?;
    Some((src.generation, r.file))
}

fn write_pages(f: &mut std::fs::File, version: u64, pages: u64) {
    for p in 0..pages {
        f.write_all(&page_bytes(version, p)).expect("write page");
    }
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: replicad-writer FILE CONTROL ROUNDS [--paths wronly,trunc,truncate,mmap] [--socket S] [--wait-replica] [--open-only]");
        std::process::exit(2);
    }
    let file = PathBuf::from(&args[1]);
    let ctl = Control::open(Path::new(&args[2]));
    let rounds: u64 = args[3].parse().expect("rounds");
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let paths: Vec<String> = opt("--paths")
        .unwrap_or_else(|| "wronly,trunc,truncate,mmap".into())
        .split(',')
        .map(String::from)
        .collect();
    let socket = opt("--socket")
        .map(PathBuf::from)
        .unwrap_or_else(replicad_client::socket_path);
    let wait_replica = args.iter().any(|a| a == "--wait-replica");
    let open_only = args.iter().any(|a| a == "--open-only");
    let size = std::fs::metadata(&file).expect("stat file").len();
    let pages = size / PAGE as u64;

    let mut waits: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let mut regen = Vec::new();
    let mut violations = Vec::new();
    let mut regen_timeouts = 0;
    install_sigbus();
    for round in 0..rounds {
        let how = paths[(round as usize) % paths.len()].as_str();
        let before = valid_replica(&socket, &file);
        let mut held = Vec::new();
        if let Some((generation, files)) = valid_replicas(&socket, &file) {
            for r in files {
                match Held::open(&r) {
                    Ok(h) => held.push((generation, h)),
                    Err(e) => violations.push(format!(
                        "round {round} ({how}): valid replica {r} of generation {generation}: {e}"
                    )),
                }
            }
        }
        let v = ctl.completed() + 1;
        if !open_only {
            ctl.set_started(v);
        }
        let t0 = Instant::now();
        let mut f = match how {
            "wronly" => std::fs::OpenOptions::new().write(true).open(&file),
            "trunc" => std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&file),
            "truncate" => {
                let c = std::ffi::CString::new(file.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: truncate(2) on a NUL-terminated path.
                let rc = unsafe { libc::truncate(c.as_ptr(), 0) };
                assert_eq!(rc, 0, "truncate: {}", std::io::Error::last_os_error());
                std::fs::OpenOptions::new().write(true).open(&file)
            }
            "mmap" => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&file),
            other => panic!("unknown writer path {other}"),
        }
        .expect("open for write");
        let waited = t0.elapsed().as_secs_f64();
        waits.entry(how.to_string()).or_default().push(waited);
        // The fence let us in: every replica must already be revoked
        // (truncated: unlinked is not enough while anyone maps it).
        for (generation, h) in held.drain(..) {
            if let Some(why) = h.not_revoked() {
                violations.push(format!(
                    "round {round} ({how}): replica {} of generation {generation} {why} after the writer's open returned",
                    h.path
                ));
            }
        }
        if !open_only {
            match how {
                "mmap" => {
                    f.set_len(size).expect("size");
                    // SAFETY: a shared writable mapping of the file we hold
                    // open read-write, `size` bytes long.
                    let ptr = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            size as usize,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_SHARED,
                            f.as_raw_fd(),
                            0,
                        )
                    };
                    assert_ne!(ptr, libc::MAP_FAILED, "mmap for write");
                    let words = ptr as *mut u64;
                    for p in 0..pages {
                        for w in 0..WORDS as u64 {
                            // SAFETY: inside the mapping.
                            unsafe {
                                words
                                    .add((p as usize) * WORDS + w as usize)
                                    .write_volatile(word(v, p, w))
                            };
                        }
                    }
                    // SAFETY: the mapping made above.
                    unsafe {
                        libc::msync(ptr, size as usize, libc::MS_SYNC);
                        libc::munmap(ptr, size as usize);
                    }
                }
                _ => write_pages(&mut f, v, pages),
            }
        }
        drop(f);
        if !open_only {
            ctl.set_completed(v);
        }
        if wait_replica {
            let t1 = Instant::now();
            let old = before.as_ref().map(|b| b.0).unwrap_or(0);
            loop {
                if let Some((g, _)) = valid_replica(&socket, &file) {
                    if g > old {
                        regen.push(t1.elapsed().as_secs_f64());
                        break;
                    }
                }
                if t1.elapsed() > Duration::from_secs(10) {
                    regen_timeouts += 1;
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
    let mut out = String::from("{");
    for (how, mut w) in waits {
        let n = w.len();
        out.push_str(&format!(
            "\"{how}\":{{\"n\":{n},\"p50_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1}}},",
            pct(&mut w, 0.5) * 1e6,
            pct(&mut w, 0.99) * 1e6,
            pct(&mut w, 1.0) * 1e6
        ));
    }
    out.push_str(&format!(
        "\"regen_n\":{},\"regen_p50_ms\":{:.2},\"regen_timeouts\":{regen_timeouts},\"violations\":{}}}",
        regen.len(),
        pct(&mut regen, 0.5) * 1e3,
        serde_json::to_string(&violations).unwrap()
    ));
    println!("{out}");
    std::process::exit(if violations.is_empty() && regen_timeouts == 0 {
        0
    } else {
        1
    });
}
