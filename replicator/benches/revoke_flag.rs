//! What the immutable flag adds to a revoke (issue 10).
//!
//! `cargo bench -p replicad-replicator --bench revoke_flag` (as root)
//!
//! For each size (`REPLICAD_BENCH_SIZES`, default `2m,16m`) and store (tmpfs
//! with `huge=within_size`, the default, and memfd + mbind) it makes
//! replicas the way the daemon does (`Store::create`, `fill`, `seal`: the
//! last sets `FS_IMMUTABLE_FL`) and cuts them the way a revoke does,
//! timing each step: `FS_IOC_GETFLAGS`, `FS_IOC_SETFLAGS` (the clear),
//! `ftruncate(0)`, unlink. A memfd replica is cut on the daemon's fd; a
//! tmpfs one holds no fd once sealed, so the revoke opens its path
//! read-only (in the total, not in a step) and, for the truncate, for
//! writing (in the truncate step), as `ReplicaPath::truncate` does. Every other
//! replica has its flag cleared before the clock starts: there the clear
//! finds nothing to do (one `FS_IOC_GETFLAGS`), as before issue 10 but for
//! that one call. `REPLICAD_BENCH_RUNS` (default 100) replicas per size and
//! store, interleaved. Prints medians and p90 in µs. Nothing maps the
//! replicas: the truncate's cost for mapped ones is in `writer_wait`.
//!
//! Then, per store, what one client's fd costs the attach: a fresh
//! read-only open of the replica (`ReplicaFile::open_readonly`: open, two
//! fstats) against a `dup` of one open (what it was before issue 10),
//! 1000 of each, interleaved.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use replicad_replicator::store::{ReplicaIdent, Store, StoreConfig, StoreKind};
use replicad_replicator::sys;

const MIB: u64 = 1 << 20;

fn main() {
    if let Err(e) = run() {
        eprintln!("revoke_flag bench failed: {e}");
        std::process::exit(1);
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mult) = match s.strip_suffix('m') {
        Some(n) => (n, MIB),
        None => match s.strip_suffix('k') {
            Some(n) => (n, 1024),
            None => (s.as_str(), 1),
        },
    };
    num.parse::<u64>().ok().map(|n| n * mult)
}

fn micros(t: Instant) -> f64 {
    t.elapsed().as_nanos() as f64 / 1000.0
}

/// Median and p90 of `v`.
fn stats(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9))
}

#[derive(Default)]
struct Steps {
    get: Vec<f64>,
    set: Vec<f64>,
    truncate: Vec<f64>,
    unlink: Vec<f64>,
    total: Vec<f64>,
}

fn run() -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(io::Error::other(
            "run as root: it mounts tmpfs and sets FS_IMMUTABLE_FL",
        ));
    }
    let sizes: Vec<u64> = std::env::var("REPLICAD_BENCH_SIZES")
        .unwrap_or_else(|_| "2m,16m".into())
        .split(',')
        .map(|s| parse_size(s).ok_or_else(|| io::Error::other(format!("bad size {s:?}"))))
        .collect::<io::Result<_>>()?;
    let runs: usize = std::env::var("REPLICAD_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(100);
    let no = AtomicBool::new(false);
    println!(
        "{:<6} {:>5} {:<9} {:>14} {:>14} {:>14} {:>14} {:>14}",
        "store", "MiB", "flag", "GETFLAGS", "SETFLAGS", "ftruncate", "unlink", "all"
    );
    for kind in [StoreKind::Tmpfs, StoreKind::Memfd] {
        let dir = tempfile::Builder::new()
            .prefix("replicad-bench-flag")
            .tempdir_in("/tmp")?;
        let cfg = StoreConfig {
            run_dir: dir.path().to_path_buf(),
            size: Some("512m".into()),
            huge_pages: true,
            force_memfd: kind == StoreKind::Memfd,
            copy_threads: 1,
        };
        let store = Store::open(&cfg, &[0], &Default::default()).map_err(io::Error::other)?;
        if store.kind(0) != Some(kind) {
            return Err(io::Error::other(format!("the {kind:?} store did not open")));
        }
        for &size in &sizes {
            let src = tempfile::Builder::new()
                .prefix("replicad-bench-flag-src")
                .tempfile_in("/var/tmp")?;
            src.as_file().set_len(size)?;
            let md = src.as_file().metadata()?;
            let mut with = Steps::default();
            let mut without = Steps::default();
            for i in 0..runs * 2 {
                let id = ReplicaIdent::of_file(src.path(), &md, i as u64 + 1);
                let mut r = store.create(0, &id).map_err(io::Error::other)?;
                r.fill(src.as_file().as_fd(), size, &no, &id)
                    .map_err(io::Error::other)?;
                r.seal().map_err(io::Error::other)?;
                let immutable = i % 2 == 0;
                if !immutable {
                    sys::clear_immutable(r.open_readonly().map_err(io::Error::other)?.as_fd())?;
                }
                let steps = if immutable { &mut with } else { &mut without };
                let path = PathBuf::from(r.label());
                let t0 = Instant::now();
                let opened = match r.fd() {
                    Some(_) => None,
                    None => Some(
                        std::fs::OpenOptions::new()
                            .read(true)
                            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
                            .open(&path)?,
                    ),
                };
                let fd = match (&opened, r.fd()) {
                    (Some(f), _) => f.as_fd(),
                    (None, Some(fd)) => fd,
                    (None, None) => {
                        return Err(io::Error::other("a replica with no fd and no path"))
                    }
                };
                let t = Instant::now();
                let flags = sys::inode_flags(fd)?;
                steps.get.push(micros(t));
                if flags & sys::FS_IMMUTABLE_FL != 0 {
                    let t = Instant::now();
                    sys::set_inode_flags(fd, flags & !sys::FS_IMMUTABLE_FL)?;
                    steps.set.push(micros(t));
                }
                let t = Instant::now();
                if opened.is_some() {
                    let w = std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
                        .open(&path)?;
                    nix::unistd::ftruncate(&w, 0)?;
                } else {
                    nix::unistd::ftruncate(fd, 0)?;
                }
                steps.truncate.push(micros(t));
                if kind == StoreKind::Tmpfs {
                    let t = Instant::now();
                    std::fs::remove_file(&path)?;
                    steps.unlink.push(micros(t));
                }
                steps.total.push(micros(t0));
                drop(r);
            }
            for (flag, s) in [("immutable", &mut with), ("cleared", &mut without)] {
                let cell = |v: &mut Vec<f64>| {
                    if v.is_empty() {
                        return "-".to_string();
                    }
                    let (p50, p90) = stats(v);
                    format!("{p50:.2} / {p90:.2}")
                };
                println!(
                    "{:<6} {:>5} {:<9} {:>14} {:>14} {:>14} {:>14} {:>14}",
                    format!("{kind:?}").to_lowercase(),
                    size / MIB,
                    flag,
                    cell(&mut s.get),
                    cell(&mut s.set),
                    cell(&mut s.truncate),
                    cell(&mut s.unlink),
                    cell(&mut s.total)
                );
            }
        }
        attach_fd(&store, kind, &no)?;
        store.close();
    }
    println!("µs, median / p90 of {runs} replicas each (the attach fd: of 1000 each)");
    Ok(())
}

/// A fresh open per client against a dup of one open.
fn attach_fd(store: &Store, kind: StoreKind, no: &AtomicBool) -> io::Result<()> {
    let src = tempfile::Builder::new()
        .prefix("replicad-bench-flag-src")
        .tempfile_in("/var/tmp")?;
    src.as_file().set_len(2 * MIB)?;
    let md = src.as_file().metadata()?;
    let id = ReplicaIdent::of_file(src.path(), &md, 1 << 40);
    let mut r = store.create(0, &id).map_err(io::Error::other)?;
    r.fill(src.as_file().as_fd(), 2 * MIB, no, &id)
        .map_err(io::Error::other)?;
    r.seal().map_err(io::Error::other)?;
    let shared = r.open_readonly().map_err(io::Error::other)?;
    let (mut fresh, mut dup) = (Vec::new(), Vec::new());
    for _ in 0..1000 {
        let t = Instant::now();
        let fd = r.open_readonly().map_err(io::Error::other)?;
        fresh.push(micros(t));
        drop(fd);
        let t = Instant::now();
        let fd = shared.try_clone()?;
        dup.push(micros(t));
        drop(fd);
    }
    let (f50, f90) = stats(&mut fresh);
    let (d50, d90) = stats(&mut dup);
    println!(
        "{:<6} attach fd: fresh open {f50:.2} / {f90:.2}, dup of one open {d50:.2} / {d90:.2}",
        format!("{kind:?}").to_lowercase()
    );
    drop(shared);
    r.remove();
    Ok(())
}
