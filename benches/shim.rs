//! The preload shim's costs, each against a baseline measured in the same
//! run.
//!
//! ```text
//!  1. start-up: fork+exec+wait of `/usr/bin/python3 -c pass` and `/bin/true`,
//!     interleaved  a, b, c, a, b, c, ...
//!       a  plain                     (no LD_PRELOAD)
//!       b  shim, replicas            (every file they map replicated first)
//!       c  shim, no daemon           (REPLICAD_SOCKET names no socket)
//!     median, p90, and the median added by b and c (goal: <= 1 ms, issue
//!     11; it was 2 ms before)
//!
//!  2. attach: this bench re-runs itself as a small program that opens a
//!     replicated file, mmap()s it PROT_READ|MAP_PRIVATE (timed), then
//!     reads one byte of every 4 KiB page (timed), interleaved
//!       plain   the file's page cache, no LD_PRELOAD
//!       shim    the shim's mmap wrapper swaps the replica in
//!     per file size (1, 8, 64, 256 MiB): medians, and µs per MiB
//!
//!  3. revoke: the writer's open of a replicated 8 MiB file while
//!     REPLICAD_BENCH_HOLDERS (default 16) processes (this bench again)
//!     map it, interleaved by round
//!       client   through replicad_client::map (no fallback table: the
//!                revoke has no private pages to look for)
//!       shim     the shim's mmap wrapper swaps the replica in (the revoke
//!                asks pagemap about each holder's range first)
//!       shim+bp  as shim, one holder wrote a breakpoint through
//!                /proc/self/mem (the revoke copies it to its way back)
//!     median and p90 of REPLICAD_BENCH_REVOKE_RUNS (default 15) opens each
//! ```
//!
//! `cargo bench --bench shim` (root: the daemon mounts its node stores and
//! takes leases). It starts its own replicad from `target/release` and
//! uses the shim `cargo bench` built beside it
//! (`target/release/libreplicad_preload.so`: the root package dev-depends
//! on replicad-preload). `REPLICAD_BENCH_RUNS` sets the start-up runs per
//! variant (default 100), `REPLICAD_BENCH_MAP_RUNS` the attach runs per size
//! (default 20), `REPLICAD_BENCH_SIZES` the file sizes in MiB (default
//! `1,8,64,256`), `REPLICAD_BENCH_PART` `startup`, `attach` or `revoke`
//! to run only one part.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use replicad_procfs::ProcReader;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use replicad_wire::proto::{ErrorKind, NodeSelection, Request, Response};

const PYTHON: &str = "/usr/bin/python3";
const TRUE: &str = "/bin/true";
/// The argument that makes this binary the part-2 mapping program.
const MAP_CHILD: &str = "__replicad_shim_bench_map";
/// The argument that makes this binary a part-3 holder.
const HOLD_CHILD: &str = "__replicad_shim_bench_hold";
const PAGE: usize = 4096;
const TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for a writer of a file to be replicated to go away.
const FENCE_WAIT: Duration = Duration::from_secs(60);

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Nearest-rank quantile of `v` (sorted here).
fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn median(v: &[f64]) -> f64 {
    pct(&mut v.to_vec(), 0.5)
}

fn p90(v: &[f64]) -> f64 {
    pct(&mut v.to_vec(), 0.9)
}

/// The shim `cargo bench` built: beside the release binaries or in their
/// deps/, the newer of the two.
fn find_shim() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_replicad")).parent().unwrap();
    let found = [
        dir.join("libreplicad_preload.so"),
        dir.join("deps/libreplicad_preload.so"),
    ]
    .into_iter()
    .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
    .max()
    .map(|(_, p)| p);
    match found {
        Some(p) => p,
        None => {
            eprintln!(
                "shim bench: libreplicad_preload.so is in neither {} nor its deps/.\n\
                 `cargo bench` builds it (the root package dev-depends on replicad-preload);\n\
                 if this binary was built another way, run \
                 `cargo build --release -p replicad-preload` first.",
                dir.display()
            );
            std::process::exit(2);
        }
    }
}

/// A replicad of our own, on a fresh run directory.
struct Daemon {
    child: Child,
    socket: PathBuf,
    _run: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Daemon {
        let run = tempfile::Builder::new()
            .prefix("replicad-bench-")
            .tempdir()
            .unwrap();
        let socket = run.path().join("replicad.sock");
        let log = std::fs::File::create(run.path().join("replicad.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_replicad"))
            .arg("--run-dir")
            .arg(run.path())
            .arg("--metrics-listen")
            .arg("")
            .env_remove("LD_PRELOAD")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            socket,
            _run: run,
        };
        let t0 = Instant::now();
        while replicad_client::request(&d.socket, &Request::Status, &[], Duration::from_secs(1))
            .is_err()
        {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "replicad did not start; its log: {}",
                std::fs::read_to_string(d._run.path().join("replicad.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    fn ask(&self, req: &Request) -> Result<Response, replicad_client::Error> {
        replicad_client::request(&self.socket, req, &[], TIMEOUT).map(|(r, _)| r)
    }

    /// Replicate `path` onto every node; panics with the daemon's reason.
    /// A file someone holds open for writing cannot be fenced: wait up to
    /// a minute for the writer to go.
    fn replicate(&self, path: &Path) {
        let req = Request::Replicate {
            path: path.to_path_buf(),
            nodes: NodeSelection::All,
        };
        let t0 = Instant::now();
        loop {
            match self.ask(&req) {
                Ok(Response::Replicated { .. }) => return,
                Err(replicad_client::Error::Refused {
                    kind: ErrorKind::Unfenceable,
                    message,
                }) if t0.elapsed() < FENCE_WAIT => {
                    if t0.elapsed() < Duration::from_secs(1) {
                        println!("waiting up to {FENCE_WAIT:?}: {message}");
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                other => panic!("replicating {}: {other:?}", path.display()),
            }
        }
    }

    fn replicated(&self) -> BTreeSet<(u64, u64)> {
        match self.ask(&Request::Status) {
            Ok(Response::Status { report }) => {
                report.sources.iter().map(|s| (s.dev, s.ino)).collect()
            }
            other => panic!("status: {other:?}"),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill on our own child; SIGTERM drops every replica and
        // unmounts the stores.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// How a program is started.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Plain,
    Shim,
    ShimNoDaemon,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Plain => "a  plain",
            Variant::Shim => "b  shim, replicas",
            Variant::ShimNoDaemon => "c  shim, no daemon",
        }
    }
}

struct Setup {
    shim: PathBuf,
    socket: PathBuf,
    /// A socket path that does not exist (variant c).
    no_socket: PathBuf,
}

impl Setup {
    fn command(&self, program: &str, args: &[&str], v: Variant) -> Command {
        let mut c = Command::new(program);
        c.args(args)
            .env_remove("LD_PRELOAD")
            .env_remove("REPLICAD_SOCKET")
            .env_remove("REPLICAD_DEBUG")
            .env_remove("REPLICAD_DISABLE")
            .env_remove("REPLICAD_NODE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match v {
            Variant::Plain => {}
            Variant::Shim => {
                c.env("LD_PRELOAD", &self.shim)
                    .env("REPLICAD_SOCKET", &self.socket);
            }
            Variant::ShimNoDaemon => {
                c.env("LD_PRELOAD", &self.shim)
                    .env("REPLICAD_SOCKET", &self.no_socket);
            }
        }
        c
    }

    /// What the shim says about one start (`REPLICAD_DEBUG=1`): its stderr.
    fn debug_run(&self, program: &str, args: &[&str], v: Variant) -> String {
        let out = self
            .command(program, args, v)
            .env("REPLICAD_DEBUG", "1")
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(out.status.success(), "{program} failed: {out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// The files `path`'s program needs, as the dynamic loader lists them
/// (what `ldd` prints), and the program itself.
fn loaded_objects(program: &str) -> Vec<PathBuf> {
    let out = Command::new(program)
        .env("LD_TRACE_LOADED_OBJECTS", "1")
        .env_remove("LD_PRELOAD")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut files = vec![std::fs::canonicalize(program).unwrap()];
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line.trim(),
        };
        let path = path.split(" (").next().unwrap_or("");
        if path.starts_with('/') {
            files.push(std::fs::canonicalize(path).unwrap());
        }
    }
    files
}

/// The private file mappings of a running process (its program, libraries,
/// locale files).
fn mapped_files(pid: u32) -> Vec<PathBuf> {
    let maps = ProcReader::default().maps_text(pid).unwrap().unwrap();
    let mut out = Vec::new();
    for l in maps.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 6 && f[1].ends_with('p') && f[5].starts_with('/') {
            out.push(PathBuf::from(f[5]));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Replicate everything the start-up programs map: what a running python
/// maps (`ReplicatePid`, as `replicactl replicate --pid` does, or, from a
/// daemon without it, every file in its maps), and what the loader lists
/// for both programs.
fn replicate_programs(daemon: &Daemon) {
    let mut py = Command::new(PYTHON)
        .args([
            "-c",
            "import sys; print('ready', flush=True); sys.stdin.read()",
        ])
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(py.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid = py.id();
    let mut files = Vec::new();
    match daemon.ask(&Request::ReplicatePid {
        pid,
        nodes: NodeSelection::All,
    }) {
        Ok(Response::ReplicatedPid { sources, skipped }) => {
            println!(
                "replicated the text of a running {PYTHON} (pid {pid}, ReplicatePid): \
                 {} files, {} skipped",
                sources.len(),
                skipped.len()
            );
            for s in skipped {
                println!("  skipped {}: {}", s.path.display(), s.reason);
            }
        }
        other => {
            println!(
                "ReplicatePid of a running {PYTHON} failed ({other:?}): \
                 replicating the files its maps list instead"
            );
        }
    }
    files.extend(mapped_files(pid));
    drop(py.stdin.take());
    let _ = py.wait();
    files.extend(loaded_objects(PYTHON));
    files.extend(loaded_objects(TRUE));
    files.sort();
    files.dedup();
    let have = daemon.replicated();
    for f in &files {
        let Ok(m) = f.metadata() else { continue };
        if !have.contains(&(m.dev(), m.ino())) {
            daemon.replicate(f);
        }
    }
    let have = daemon.replicated();
    let mut missing = Vec::new();
    for f in &files {
        let m = f.metadata().unwrap();
        if !have.contains(&(m.dev(), m.ino())) {
            missing.push(f.display().to_string());
        }
    }
    assert!(missing.is_empty(), "not replicated: {missing:?}");
    println!(
        "replicas of: {}",
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// fork+exec+wait of one start, in seconds.
fn time_start(setup: &Setup, program: &str, args: &[&str], v: Variant) -> f64 {
    let mut c = setup.command(program, args, v);
    let t = Instant::now();
    let status = c.status().unwrap();
    let s = t.elapsed().as_secs_f64();
    assert!(status.success(), "{program} {args:?} failed: {status}");
    s
}

/// The shim's own account of its hello (`... in X ms`), in ms.
fn hello_ms(stderr: &str) -> Option<f64> {
    let line = stderr.lines().find(|l| l.contains("now on node"))?;
    line.rsplit_once(" in ")?
        .1
        .trim_end_matches(" ms")
        .parse()
        .ok()
}

fn startup(setup: &Setup, runs: usize) {
    let programs: [(&str, &str, &[&str]); 2] = [
        ("/usr/bin/python3 -c pass", PYTHON, &["-c", "pass"]),
        ("/bin/true", TRUE, &[]),
    ];
    let variants = [Variant::Plain, Variant::Shim, Variant::ShimNoDaemon];

    // The shim must attach in b and fail fast in c, else the figures mean
    // nothing.
    for (name, prog, args) in programs {
        let b = setup.debug_run(prog, args, Variant::Shim);
        let line = b
            .lines()
            .find(|l| l.contains("now on node"))
            .unwrap_or_else(|| panic!("{name}: the shim did not attach:\n{b}"));
        assert!(!line.contains(": 0 of"), "{name}: nothing attached: {line}");
        println!("{name}, b: {}", line.split_once(": ").map_or(line, |x| x.1));
        let c = setup.debug_run(prog, args, Variant::ShimNoDaemon);
        assert!(c.contains("no replicad at"), "{name}, c: {c}");
        println!(
            "{name}, c: {}",
            c.trim().split_once(": ").map_or("", |x| x.1)
        );
    }

    let mut times = vec![vec![Vec::with_capacity(runs); variants.len()]; programs.len()];
    // Warm-up, not counted: page cache, dentries, the daemon's threads.
    for _ in 0..3 {
        for (_, prog, args) in programs {
            for v in variants {
                time_start(setup, prog, args, v);
            }
        }
    }
    for _ in 0..runs {
        for (p, (_, prog, args)) in programs.iter().enumerate() {
            for (i, v) in variants.iter().enumerate() {
                times[p][i].push(time_start(setup, prog, args, *v));
            }
        }
    }
    // The shim's own hello time, in a separate pass (printing costs).
    let mut hello = vec![Vec::new(); programs.len()];
    for _ in 0..runs.min(20) {
        for (p, (_, prog, args)) in programs.iter().enumerate() {
            if let Some(ms) = hello_ms(&setup.debug_run(prog, args, Variant::Shim)) {
                hello[p].push(ms);
            }
        }
    }

    println!();
    println!("start-up: fork+exec+wait, {runs} interleaved runs of each (a, b, c, a, b, c, ...)");
    println!(
        "  {:<22} {:>10} {:>10} {:>16} {:>16}",
        "", "median ms", "p90 ms", "added median ms", "paired median ms"
    );
    let mut met = true;
    for (p, (name, _, _)) in programs.iter().enumerate() {
        println!("  {name}");
        let base = median(&times[p][0]);
        for (i, v) in variants.iter().enumerate() {
            let m = median(&times[p][i]);
            // The added median, and the median of the per-round
            // differences (each variant against the plain run beside it).
            let (added, paired) = if i == 0 {
                (String::new(), String::new())
            } else {
                let diffs: Vec<f64> = times[p][i]
                    .iter()
                    .zip(&times[p][0])
                    .map(|(x, a)| x - a)
                    .collect();
                (
                    format!("{:+.2}", (m - base) * 1e3),
                    format!("{:+.2}", median(&diffs) * 1e3),
                )
            };
            println!(
                "    {:<20} {:>10.2} {:>10.2} {:>16} {:>16}",
                v.label(),
                m * 1e3,
                p90(&times[p][i]) * 1e3,
                added,
                paired
            );
        }
        let added_b = (median(&times[p][1]) - base) * 1e3;
        met &= added_b <= GOAL_MS;
        if !hello[p].is_empty() {
            println!(
                "    the shim's own hello time in b (REPLICAD_DEBUG=1, its printing included, \
                 {} runs): median {:.2} ms, p90 {:.2} ms",
                hello[p].len(),
                median(&hello[p]),
                p90(&hello[p])
            );
        }
    }
    println!(
        "  goal: at most {GOAL_MS} ms added to the median (b - a), each program: {}",
        if met { "met" } else { "NOT met" }
    );
}

/// Start-up goal: added to the median start of each program (issue 11).
const GOAL_MS: f64 = 1.0;

// ---- part 2 -----------------------------------------------------------

/// What one mapping program run measured.
struct MapRun {
    map_s: f64,
    touch_s: f64,
    on_replica: bool,
    /// `ShmemPmdMapped` + `FilePmdMapped` of the range after the touch, KiB.
    pmd_kb: u64,
}

/// The mapping program (this binary, re-run): map FILE, touch every page,
/// print `map_ns touch_ns backing 2m-aligned pmd-mapped-kib checksum`.
fn map_child(file: &Path) {
    let f = std::fs::File::open(file).unwrap();
    let meta = f.metadata().unwrap();
    let len = meta.len() as usize;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let t = Instant::now();
    // SAFETY: a fresh read-only private mapping of our own open file; the
    // call goes through the PLT, so the shim's wrapper (when preloaded)
    // sees it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            fd,
            0,
        )
    };
    let map_ns = t.elapsed().as_nanos();
    assert_ne!(p, libc::MAP_FAILED, "mmap {}", file.display());
    let base = p as *const u8;
    let t = Instant::now();
    let mut sum = 0u64;
    for off in (0..len).step_by(PAGE) {
        // SAFETY: off < len, inside our mapping of the whole file.
        sum = sum.wrapping_add(u64::from(unsafe { std::ptr::read_volatile(base.add(off)) }));
    }
    let touch_ns = t.elapsed().as_nanos();
    // What backs the range now: the file (same dev, ino) or a replica.
    let maps = ProcReader::default().self_maps_text().unwrap();
    let prefix = format!("{:x}-", p as usize);
    let line = maps
        .lines()
        .find(|l| l.starts_with(&prefix))
        .expect("our mapping in /proc/self/maps");
    let inode: u64 = line
        .split_whitespace()
        .nth(4)
        .and_then(|i| i.parse().ok())
        .unwrap_or(0);
    let backing = if inode == meta.ino() {
        "file"
    } else {
        "replica"
    };
    let aligned = (p as usize).is_multiple_of(2 << 20);
    // How much of it the kernel mapped with 2 MiB entries.
    let smaps = std::fs::read_to_string(ProcReader::default().self_path("smaps")).unwrap();
    let pmd_kb: u64 = smaps
        .lines()
        .skip_while(|l| !l.starts_with(&prefix))
        .skip(1)
        .take_while(|l| !smaps_header(l))
        .filter_map(|l| {
            l.strip_prefix("ShmemPmdMapped:")
                .or_else(|| l.strip_prefix("FilePmdMapped:"))
        })
        .filter_map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .sum();
    println!("{map_ns} {touch_ns} {backing} {aligned} {pmd_kb} {sum}");
}

/// Whether an smaps line opens a mapping (`start-end perms ...`) rather
/// than being one of its `Key: value` lines.
fn smaps_header(line: &str) -> bool {
    line.split_whitespace()
        .next()
        .is_some_and(|t| t.contains('-') && t.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
}

fn run_map_child(setup: &Setup, file: &Path, v: Variant) -> MapRun {
    let exe = std::env::current_exe().unwrap();
    let out = setup
        .command(exe.to_str().unwrap(), &[MAP_CHILD], v)
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "map program: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<&str> = text.split_whitespace().collect();
    assert!(f.len() >= 5, "map program printed {text:?}");
    MapRun {
        map_s: f[0].parse::<f64>().unwrap() * 1e-9,
        touch_s: f[1].parse::<f64>().unwrap() * 1e-9,
        on_replica: f[2] == "replica",
        pmd_kb: f[4].parse().unwrap_or(0),
    }
}

/// Least-squares line through (x, y): (intercept, slope).
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (x, y) in points {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
    }
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (my - slope * mx, slope)
}

fn attach(setup: &Setup, daemon: &Daemon, runs: usize, sizes: &[usize]) {
    let data = tempfile::Builder::new()
        .prefix("replicad-bench-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let mut files = Vec::new();
    for &mb in sizes {
        let path = data.path().join(format!("data-{mb}m.bin"));
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
        for _ in 0..mb {
            f.write_all(&chunk).unwrap();
        }
        drop(f);
        daemon.replicate(&path);
        // The original warm in the page cache, as the replica is in its
        // store: both first touches are minor faults.
        let _ = std::fs::read(&path).unwrap();
        files.push((mb, path));
    }
    let variants = [Variant::Plain, Variant::Shim];
    let mut results: Vec<Vec<Vec<MapRun>>> = (0..sizes.len())
        .map(|_| (0..variants.len()).map(|_| Vec::new()).collect())
        .collect();
    for (_, path) in &files {
        for v in variants {
            // Warm-up, and the check that each variant maps what it says.
            let r = run_map_child(setup, path, v);
            assert_eq!(
                r.on_replica,
                v == Variant::Shim,
                "{}: {} mapped the {}",
                path.display(),
                v.label(),
                if r.on_replica { "replica" } else { "file" }
            );
        }
    }
    for _ in 0..runs {
        for (s, (_, path)) in files.iter().enumerate() {
            for (i, v) in variants.iter().enumerate() {
                let r = run_map_child(setup, path, *v);
                assert_eq!(r.on_replica, *v == Variant::Shim, "{}", path.display());
                results[s][i].push(r);
            }
        }
    }

    println!();
    println!(
        "attach: mmap(PROT_READ, MAP_PRIVATE) of a replicated file in a fresh process, \
         then a read of every 4 KiB page; {runs} interleaved runs per size; medians"
    );
    println!(
        "  {:>5} | {:>10} {:>10} {:>10} {:>9} {:>8} | {:>10} {:>10} {:>8} {:>8} {:>9} | {:>9}",
        "MiB",
        "mmap file",
        "mmap shim",
        "shim p90",
        "added",
        "per MiB",
        "touch file",
        "touch repl",
        "file/MiB",
        "repl/MiB",
        "repl/file",
        "2M-mapped"
    );
    println!(
        "  {:>5} | {:>10} {:>10} {:>10} {:>9} {:>8} | {:>10} {:>10} {:>8} {:>8} {:>9} | {:>9}",
        "", "us", "us", "us", "us", "us", "us", "us", "us", "us", "", "file/repl"
    );
    let mut added_pts = Vec::new();
    let mut touch_file_pts = Vec::new();
    let mut touch_repl_pts = Vec::new();
    for (s, (mb, _)) in files.iter().enumerate() {
        let us = |i: usize, f: fn(&MapRun) -> f64| -> Vec<f64> {
            results[s][i].iter().map(|r| f(r) * 1e6).collect()
        };
        let (mp, ms) = (median(&us(0, |r| r.map_s)), median(&us(1, |r| r.map_s)));
        let ms90 = p90(&us(1, |r| r.map_s));
        let (tp, ts) = (median(&us(0, |r| r.touch_s)), median(&us(1, |r| r.touch_s)));
        let x = *mb as f64;
        // Median share of the range the kernel mapped with 2 MiB entries.
        let pmd = |i: usize| -> f64 {
            let v: Vec<f64> = results[s][i]
                .iter()
                .map(|r| r.pmd_kb as f64 / (x * 1024.0) * 100.0)
                .collect();
            median(&v)
        };
        added_pts.push((x, ms - mp));
        touch_file_pts.push((x, tp));
        touch_repl_pts.push((x, ts));
        println!(
            "  {:>5} | {:>10.1} {:>10.1} {:>10.1} {:>9.1} {:>8.2} | {:>10.0} {:>10.0} {:>8.1} {:>8.1} {:>8.2}x | {:>3.0}%/{:>3.0}%",
            mb,
            mp,
            ms,
            ms90,
            ms - mp,
            (ms - mp) / x,
            tp,
            ts,
            tp / x,
            ts / x,
            ts / tp,
            pmd(0),
            pmd(1)
        );
    }
    if files.len() >= 2 {
        let (a0, a1) = fit(&added_pts);
        let (f0, f1) = fit(&touch_file_pts);
        let (r0, r1) = fit(&touch_repl_pts);
        println!(
            "  line through the medians: attach adds {a0:.0} us + {a1:.2} us/MiB; \
             first touch {f1:.0} us/MiB on the file's page cache (+{f0:.0} us), \
             {r1:.0} us/MiB on the replica (+{r0:.0} us)"
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(MAP_CHILD) {
        map_child(Path::new(&args[2]));
        return;
    }
    if args.get(1).map(String::as_str) == Some(HOLD_CHILD) {
        hold_child(&args[2], Path::new(&args[3]), Path::new(&args[4]));
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP shim: needs root (the daemon mounts node stores and takes leases)");
        return;
    }
    for p in [PYTHON, TRUE] {
        assert!(Path::new(p).exists(), "{p} is missing");
    }
    let runs = env_num("REPLICAD_BENCH_RUNS", 100).max(1);
    let map_runs = env_num("REPLICAD_BENCH_MAP_RUNS", 20).max(1);
    let sizes: Vec<usize> = std::env::var("REPLICAD_BENCH_SIZES")
        .unwrap_or_else(|_| "1,8,64,256".into())
        .split(',')
        .filter_map(|s| s.trim().trim_end_matches(['m', 'M']).parse().ok())
        .collect();
    let part = std::env::var("REPLICAD_BENCH_PART").unwrap_or_default();
    let shim = find_shim();
    println!("shim: {}", shim.display());
    let daemon = Daemon::start();
    let setup = Setup {
        shim,
        socket: daemon.socket.clone(),
        no_socket: PathBuf::from("/nonexistent/replicad-bench/replicad.sock"),
    };
    if part.is_empty() || part == "startup" {
        replicate_programs(&daemon);
        startup(&setup, runs);
    }
    if part.is_empty() || part == "attach" {
        attach(&setup, &daemon, map_runs, &sizes);
    }
    if part.is_empty() || part == "revoke" {
        let holders = env_num("REPLICAD_BENCH_HOLDERS", 16).max(1);
        let runs = env_num("REPLICAD_BENCH_REVOKE_RUNS", 15).max(1);
        revoke(&setup, &daemon, holders, runs);
    }
}

/// A part-3 holder (this binary, re-run): map FILE read-only and private
/// (`client`: through replicad_client::map), touch every page, with `bp`
/// write one byte of page 1 through /proc/self/mem; print 1 if the range
/// is on a replica (else 0), then hold it until stdin closes.
fn hold_child(mode: &str, file: &Path, socket: &Path) {
    let f = std::fs::File::open(file).unwrap();
    let meta = f.metadata().unwrap();
    let len = meta.len() as usize;
    let mut kept = None;
    let p = if mode == "client" {
        let opts = replicad_client::MapOptions {
            socket: socket.to_path_buf(),
            ..Default::default()
        };
        let m = replicad_client::map_with(file, &opts).unwrap();
        let p = m.as_ptr() as usize;
        kept = Some(m);
        p
    } else {
        // SAFETY: a fresh read-only private mapping of our own open file,
        // through the PLT (the shim's wrapper sees it).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as usize
    };
    for off in (0..len).step_by(PAGE) {
        // SAFETY: inside the mapping of the whole file.
        unsafe { std::ptr::read_volatile((p + off) as *const u8) };
    }
    if mode == "bp" {
        let mem = std::fs::OpenOptions::new()
            .write(true)
            .open(ProcReader::default().self_path("mem"))
            .unwrap();
        std::os::unix::fs::FileExt::write_at(&mem, &[0xcc], (p + PAGE) as u64).unwrap();
    }
    let on = match &kept {
        Some(m) => m.on_replica(),
        None => {
            let maps = ProcReader::default().self_maps_text().unwrap();
            let prefix = format!("{p:x}-");
            maps.lines()
                .find(|l| l.starts_with(&prefix))
                .and_then(|l| l.split_whitespace().nth(4))
                .and_then(|i| i.parse::<u64>().ok())
                .is_some_and(|ino| ino != meta.ino())
        }
    };
    println!("{}", u8::from(on));
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(kept);
}

/// Part 3: see the top of the file.
fn revoke(setup: &Setup, daemon: &Daemon, holders: usize, runs: usize) {
    let dir = tempfile::Builder::new()
        .prefix("replicad-bench-revoke-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let file = dir.path().join("held");
    std::fs::write(&file, vec![7u8; 8 << 20]).unwrap();
    daemon.replicate(&file);
    let me = std::env::current_exe().unwrap();
    let modes = ["client", "shim", "bp"];
    let mut waits: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut off_replica = 0;
    for _ in 0..runs {
        for (i, mode) in modes.iter().enumerate() {
            wait_valid(daemon, &file);
            let mut kids: Vec<Child> = (0..holders)
                .map(|k| {
                    let m = if *mode == "bp" && k > 0 { "shim" } else { mode };
                    let mut c = setup.command(
                        me.to_str().unwrap(),
                        &[
                            HOLD_CHILD,
                            m,
                            file.to_str().unwrap(),
                            daemon.socket.to_str().unwrap(),
                        ],
                        if *mode == "client" {
                            Variant::Plain
                        } else {
                            Variant::Shim
                        },
                    );
                    c.stdin(Stdio::piped()).stdout(Stdio::piped());
                    c.spawn().unwrap()
                })
                .collect();
            for k in &mut kids {
                let mut line = String::new();
                BufReader::new(k.stdout.as_mut().unwrap())
                    .read_line(&mut line)
                    .unwrap();
                if line.trim() != "1" {
                    off_replica += 1;
                }
            }
            let t = Instant::now();
            let w = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            waits[i].push(t.elapsed().as_secs_f64() * 1e6);
            drop(w);
            for mut k in kids {
                drop(k.stdin.take());
                let _ = k.wait();
            }
        }
    }
    println!(
        "\nrevoke: writer's open, {holders} holders of an 8 MiB replica, {runs} rounds \
         ({off_replica} holders found themselves off the replica)"
    );
    let base = median(&waits[0]);
    for (i, mode) in modes.iter().enumerate() {
        waits[i].sort_by(f64::total_cmp);
        println!(
            "  {mode:<8} median {:>7.0} µs  p90 {:>7.0} µs  ({:.2}x client)",
            median(&waits[i]),
            p90(&waits[i]),
            median(&waits[i]) / base
        );
    }
}

/// Wait until `file`'s current generation has a valid replica again.
fn wait_valid(daemon: &Daemon, file: &Path) {
    let ino = std::fs::metadata(file).unwrap().ino();
    let t0 = Instant::now();
    loop {
        if let Ok(Response::Status { report }) = daemon.ask(&Request::Status) {
            if report.sources.iter().any(|s| {
                s.ino == ino
                    && s.replicas
                        .iter()
                        .any(|r| r.state == replicad_wire::proto::ReplicaState::Valid)
            }) {
                return;
            }
        }
        assert!(
            t0.elapsed() < TIMEOUT,
            "no valid replica of {}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
