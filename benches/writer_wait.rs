//! Writer wait: how long `open(O_WRONLY)` waits on a replicated source whose
//! replicas are attached by 8 processes (the fence revokes every replica,
//! then releases the lease), against the same open on a plain file, in the
//! same run.
//!
//! `cargo bench --bench writer_wait` (root; starts its own replicad).
//! `REPLICAD_BENCH_OPENS` sets the number of opens (default 1000),
//! `REPLICAD_BENCH_MB` the file size (default 1), and
//! `REPLICAD_BENCH_HUGE=1` mounts the node stores with huge pages
//! (`store.huge_pages`; files of 2 MiB and more then sit in 2 MiB pages,
//! which makes the revoke's truncate far cheaper).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use replicad_wire::proto::{ReplicaState, Request, Response};

const ATTACHED: usize = 8;

fn status(socket: &Path, file: &Path) -> Option<(u64, usize)> {
    let (resp, _) =
        replicad_client::request(socket, &Request::Status, &[], Duration::from_secs(5)).ok()?;
    let Response::Status { report } = resp else {
        return None;
    };
    let src = report.sources.into_iter().find(|s| s.path == file)?;
    let r = src
        .replicas
        .iter()
        .find(|r| r.state == ReplicaState::Valid && r.generation == src.generation)?;
    Some((src.generation, r.attachments.len()))
}

/// A child that keeps the file mapped through its node replica, touching
/// every page, and re-attaches after each revoke.
fn attached_reader(file: &Path, socket: &Path) -> ! {
    let opts = replicad_client::MapOptions {
        socket: socket.to_path_buf(),
        ..Default::default()
    };
    let mut sum = 0u64;
    loop {
        let m = replicad_client::map_with(file, &opts).expect("map");
        while m.on_replica() {
            for page in m.as_slice().chunks(4096) {
                sum = sum.wrapping_add(u64::from(page[0]));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if sum == u64::MAX {
            println!("{sum}");
        }
    }
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP writer_wait: needs root (tmpfs mounts, leases)");
        return;
    }
    let opens: usize = std::env::var("REPLICAD_BENCH_OPENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mb: usize = std::env::var("REPLICAD_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let huge = std::env::var("REPLICAD_BENCH_HUGE").is_ok_and(|v| v == "1");
    let run = tempfile::Builder::new()
        .prefix("replicad-bench-")
        .tempdir()
        .unwrap();
    let data = tempfile::Builder::new()
        .prefix("replicad-bench-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let file: PathBuf = data.path().join("weights.bin");
    let plain: PathBuf = data.path().join("plain.bin");
    std::fs::write(&file, vec![7u8; mb << 20]).unwrap();
    std::fs::write(&plain, vec![7u8; mb << 20]).unwrap();
    let socket = run.path().join("replicad.sock");
    let config = run.path().join("replicad.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nrun_dir = \"{}\"\nmetrics_listen = \"\"\n[fence]\nsettle_ms = 2\nretry_max_ms = 50\n[store]\nhuge_pages = {huge}\n",
            run.path().display()
        ),
    )
    .unwrap();

    // Fork the readers first, while this process has one thread.
    let mut readers = Vec::new();
    for _ in 0..ATTACHED {
        // SAFETY: single-threaded here; the child only runs the reader loop.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // Wait for the daemon's socket, then read forever.
            while !socket.exists() {
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(300));
            attached_reader(&file, &socket);
        }
        readers.push(pid);
    }
    let mut daemon: Child = Command::new(env!("CARGO_BIN_EXE_replicad"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while replicad_client::request(&socket, &Request::Status, &[], Duration::from_secs(1)).is_err()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "replicad did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    replicad_client::request(
        &socket,
        &Request::Replicate {
            path: file.clone(),
            nodes: replicad_wire::proto::NodeSelection::All,
        },
        &[],
        Duration::from_secs(30),
    )
    .unwrap();

    let mut fenced = Vec::with_capacity(opens);
    let mut short_rounds = 0;
    for _ in 0..opens {
        // Wait for a valid replica attached by every reader.
        let t = Instant::now();
        loop {
            if let Some((_, n)) = status(&socket, &file) {
                if n >= ATTACHED {
                    break;
                }
            }
            if t.elapsed() > Duration::from_secs(2) {
                short_rounds += 1;
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let t = Instant::now();
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        fenced.push(t.elapsed().as_secs_f64());
        drop(f);
    }
    let mut baseline = Vec::with_capacity(opens);
    for _ in 0..opens {
        let t = Instant::now();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&plain)
            .unwrap();
        baseline.push(t.elapsed().as_secs_f64());
        drop(f);
    }
    for pid in readers {
        // SAFETY: kill and reap our own children.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    // SAFETY: kill on our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();

    let (f50, f99, fmax) = (
        pct(&mut fenced, 0.5),
        pct(&mut fenced, 0.99),
        pct(&mut fenced, 1.0),
    );
    let (b50, b99) = (pct(&mut baseline, 0.5), pct(&mut baseline, 0.99));
    println!(
        "writer wait: open(O_WRONLY), {opens} opens, {mb} MiB file, huge pages {}, \
         replicas attached by {ATTACHED} processes",
        if huge { "on" } else { "off" }
    );
    println!(
        "  {:<28} {:>10} {:>10} {:>10}",
        "", "p50 us", "p99 us", "max us"
    );
    println!(
        "  {:<28} {:>10.1} {:>10.1} {:>10.1}",
        "replicated (fence + revoke)",
        f50 * 1e6,
        f99 * 1e6,
        fmax * 1e6
    );
    println!(
        "  {:<28} {:>10.1} {:>10.1}",
        "plain file",
        b50 * 1e6,
        b99 * 1e6
    );
    println!(
        "  ratio p50 {:.1}x, p99 {:.1}x; goal p99 < 1000 us: {}",
        f50 / b50,
        f99 / b99,
        if f99 < 1e-3 { "met" } else { "NOT met" }
    );
    if short_rounds > 0 {
        println!("  note: {short_rounds} opens found fewer than {ATTACHED} attached readers");
    }
}
