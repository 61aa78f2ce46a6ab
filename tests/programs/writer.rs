//! Test program: rewrites a replicated file, round after round, through
//! every path a writer can take, and checks the fence held each time.
//!
//! `replicad-writer FILE CONTROL ROUNDS [--paths wronly,trunc,truncate,mmap]
//!  [--socket S] [--wait-replica] [--open-only]`
//!
//! Each round: note the valid replica's file (from the daemon's status),
//! announce version v as started, open the file for writing (timed: this
//! is where the fence makes the writer wait), check the replica file is
//! already truncated or gone (the fence released only after every replica
//! was revoked), write every page as version v, announce v as complete,
//! and with `--wait-replica` wait until the daemon has a valid replica of
//! the new generation. Prints one JSON line; exits 1 on any violation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use replicad_client::proto::{ReplicaState, Request, Response};

include!("pattern.rs");

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
    for round in 0..rounds {
        let how = paths[(round as usize) % paths.len()].as_str();
        let before = valid_replica(&socket, &file);
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
        // The fence let us in: every replica must already be revoked.
        if let Some((generation, replica)) = &before {
            if let Ok(meta) = std::fs::metadata(replica) {
                if meta.len() != 0 {
                    violations.push(format!(
                        "round {round} ({how}): replica {replica} of generation {generation} still holds {} bytes after the writer's open returned",
                        meta.len()
                    ));
                }
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
