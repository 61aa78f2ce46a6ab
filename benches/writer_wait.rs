//! Writer wait: how long `open(O_WRONLY)` waits on a file whose readers a
//! fence must deal with first, against the least a fence can do and
//! against no fence at all, every row under the same load and interleaved
//! in one run.
//!
//! ```text
//!  rows: store x attached x load x writer against
//!    store     huge  REPLICAD_BENCH_MB (default 8) MiB file, a replicad
//!                    with store.huge_pages = true (huge=within_size:
//!                    2 MiB pages)
//!              4k    REPLICAD_BENCH_4K_MB (default 1) MiB file, a second
//!                    replicad with store.huge_pages = false (4 KiB pages)
//!    attached  8, 64 reader processes
//!    load      idle  every reader touches one byte of every page of its
//!                    mapping, then sleeps 1 ms
//!              busy  busy-reading on every CPU: one reader per CPU reads
//!                    its whole mapping (one byte of every 64-byte line) in
//!                    a loop, never sleeping; the other readers stay idle
//!              overload (only when asked for) every reader busy-reading,
//!                    and one spinning hog per CPU beside them
//!    against   replicad  the readers map the source through replicad_client
//!                        (its node replica) and re-attach after every
//!                        revoke; the writer's open waits for the fence:
//!                        truncate every replica, release the lease
//!              bare      a bare lease holder (benches/bare_holder.c, built
//!                        here with `cc`): F_SETLEASE F_RDLCK + F_SETSIG,
//!                        sigwaitinfo, F_SETLEASE F_UNLCK at once, take it
//!                        again after the writer closed; the readers map the
//!                        file itself (plain mmap)
//!              plain     no lease at all; the readers map the file itself
//!
//!  every row: REPLICAD_BENCH_OPENS opens (default 300), in visits of
//!  REPLICAD_BENCH_BATCH (default 50); a visit starts its own readers (and
//!  hogs, and holder) and kills them after. Round r visits every row once,
//!  the row order rotated by r. Before each open the bench waits until every
//!  reader is ready: on its replica again after the last revoke, pages
//!  touched (replicad); the holder's lease taken again (bare). Before
//!  each plain open it sleeps 200 us (the others come off a wait too).
//! ```
//!
//! `cargo bench --bench writer_wait` (root; starts its own replicads from
//! target/release and kills them, and their fence keepers, at the end).
//! Knobs: `REPLICAD_BENCH_ATTACHED` (default `8,64`), `REPLICAD_BENCH_LOAD`
//! (`idle,busy`; `overload` too), `REPLICAD_BENCH_STORES` (`huge,4k`; without it,
//! `REPLICAD_BENCH_HUGE=1` means `huge` and `=0` means `4k`),
//! `REPLICAD_BENCH_AGAINST` (`replicad,bare,plain`), `REPLICAD_BENCH_OPENS`,
//! `REPLICAD_BENCH_BATCH`, `REPLICAD_BENCH_MB`, `REPLICAD_BENCH_4K_MB`;
//! `REPLICAD_BENCH_LOGS=DIR` keeps each replicad's log there.
//! Right after replicating, the bench opens each replicated file for
//! writing once (a warm-up, not counted): see `Daemon::warm_up` for why;
//! `REPLICAD_BENCH_WARMUP=0` leaves it out. Two knobs
//! change the readers, to find where the time goes (the report says when
//! they are set): `REPLICAD_BENCH_IDLE_MS` (default 1), an idle reader's
//! sleep, and `REPLICAD_BENCH_REATTACH_MS` (default 0), how long a reader
//! reads its fallback after a revoke before it asks for the replica again.
//! Prints p50/p99/max in µs per row, the ratios replicad/bare and
//! replicad/plain, the daemon's own part of the wait (its
//! `replicad_invalidation_seconds`: signal read to lease released, mean
//! per row, scraped from its /metrics around each visit), the goals, the
//! load average, what replicad's log says went wrong (a lost fence keeper,
//! forced breaks), and one `row:` line per row for scripts. Then, unless `REPLICAD_BENCH_PROBE_RUNS=0` (default 50
//! runs each), the kernel's truncate alone: benches/truncate_probe.c times
//! `ftruncate(fd, 0)` of a tmpfs file (same sizes and page sizes) mapped by
//! 0, 8, 64 processes, with no replicad and no lease (one `probe:` line
//! each).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use replicad_procfs::ProcReader;
use replicad_wire::proto::{NodeSelection, ReplicaState, Request, Response};

/// The first argument that makes this binary a reader process.
const READER_ARG: &str = "__writer_wait_reader";
/// The first argument that makes this binary a spinning hog.
const HOG_ARG: &str = "__writer_wait_hog";
const KEEPER_ARG: &str = "--fence-keeper";
const PAGE: usize = 4096;
/// One slot (a cache line) per reader in the shared ready file.
const SLOT: usize = 64;
/// How long the bench waits for every reader (or the holder) to be ready
/// before one open; an open after a longer wait is not counted.
const READY_WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------
// Children: readers and hogs.

/// Die with the bench (a killed bench must not leave 64 spinning readers).
fn die_with_parent() {
    // SAFETY: getppid cannot fail.
    let parent = unsafe { libc::getppid() };
    // SAFETY: prctl(PR_SET_PDEATHSIG) on ourselves, a plain integer argument.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // SAFETY: getppid cannot fail.
    if unsafe { libc::getppid() } != parent {
        std::process::exit(0);
    }
}

/// The per-reader ready counters, a small shared file every reader maps.
struct Slots {
    ptr: *mut u8,
    len: usize,
}

impl Slots {
    fn map(path: &Path, n: usize) -> Slots {
        let len = (n * SLOT).div_ceil(PAGE) * PAGE;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        assert!(f.metadata().unwrap().len() as usize >= len);
        // SAFETY: a fresh shared mapping of a file we opened; the kernel
        // picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "mmap slots");
        Slots {
            ptr: ptr.cast(),
            len,
        }
    }

    fn get(&self, i: usize) -> &AtomicU64 {
        assert!((i + 1) * SLOT <= self.len);
        // SAFETY: in bounds (checked), 64-byte aligned (page-aligned base),
        // and the mapping lives as long as self; other processes touch it
        // only through atomics.
        unsafe { &*(self.ptr.add(i * SLOT) as *const AtomicU64) }
    }
}

/// One byte of every page (idle) or of every 64-byte line (busy).
fn touch(bytes: &[u8], busy: bool) -> u64 {
    let step = if busy { 64 } else { PAGE };
    let mut sum = 0u64;
    let mut off = 0;
    while off < bytes.len() {
        // SAFETY: off < len; a volatile read of memory the slice covers,
        // so that every pass really reads the mapping.
        sum = sum.wrapping_add(u64::from(unsafe {
            std::ptr::read_volatile(bytes.as_ptr().add(off))
        }));
        off += step;
    }
    sum
}

/// `READER_ARG kind load path socket slots index n`: a reader of `path`.
/// kind `replica`: through replicad_client, re-attaching after each revoke;
/// the slot counts the mappings it got on the replica and read all
/// through. kind `file`: a plain shared mapping of the file; the slot is 1
/// once it is read. An idle reader sleeps `REPLICAD_BENCH_IDLE_MS`
/// (default 1) between passes; after a revoke a reader reads its fallback
/// `REPLICAD_BENCH_REATTACH_MS` (default 0) before it asks for the replica
/// again (both inherited from the bench).
fn reader_main(args: &[String]) -> ! {
    die_with_parent();
    let [kind, load, path, socket, slots, index, n] = args else {
        eprintln!("reader: bad arguments {args:?}");
        std::process::exit(2);
    };
    let busy = load == "busy";
    let nap = Duration::from_millis(env_num("REPLICAD_BENCH_IDLE_MS", 1) as u64);
    let reattach = Duration::from_millis(env_num("REPLICAD_BENCH_REATTACH_MS", 0) as u64);
    let slots = Slots::map(Path::new(slots), n.parse().unwrap());
    let slot = slots.get(index.parse().unwrap());
    let mut sum = 0u64;
    if kind == "file" {
        let f = std::fs::File::open(path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        // SAFETY: a fresh read-only shared mapping of a file we opened.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "mmap {path}");
        // SAFETY: the mapping is len bytes, lives until exit, nobody
        // shrinks the file.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        sum = sum.wrapping_add(touch(bytes, busy));
        slot.store(1, Ordering::SeqCst);
        loop {
            sum = sum.wrapping_add(touch(bytes, busy));
            if !busy {
                std::thread::sleep(nap);
            }
            if sum == u64::MAX {
                println!("{sum}");
            }
        }
    }
    let opts = replicad_client::MapOptions {
        socket: PathBuf::from(socket),
        ..Default::default()
    };
    loop {
        let m = match replicad_client::map_with(path, &opts) {
            Ok(m) => m,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        if !m.on_replica() {
            // The daemon is still making the new generation: read the file
            // (once, or for 1 ms when busy), then ask again.
            let t = Instant::now();
            loop {
                sum = sum.wrapping_add(touch(m.as_slice(), busy));
                if !busy || t.elapsed() >= Duration::from_millis(1) {
                    break;
                }
            }
            if !busy {
                std::thread::sleep(nap);
            }
            continue;
        }
        let mut first = true;
        loop {
            sum = sum.wrapping_add(touch(m.as_slice(), busy));
            if !m.on_replica() {
                break;
            }
            if first {
                slot.fetch_add(1, Ordering::SeqCst);
                first = false;
            }
            if !busy {
                std::thread::sleep(nap);
            }
        }
        // Fallen back to the file.
        let t = Instant::now();
        while t.elapsed() < reattach {
            sum = sum.wrapping_add(touch(m.as_slice(), busy));
            if !busy {
                std::thread::sleep(nap);
            }
        }
        if sum == u64::MAX {
            println!("{sum}");
        }
    }
}

fn hog_main() -> ! {
    die_with_parent();
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

// ---------------------------------------------------------------------
// Processes the bench starts.

/// Children killed and reaped on drop.
struct Children(Vec<Child>);

impl Children {
    fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Child::id).collect()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn spawn_self(args: &[&str]) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .env_remove("LD_PRELOAD")
        .spawn()
        .unwrap()
}

fn hogs(n: usize) -> Children {
    Children((0..n).map(|_| spawn_self(&[HOG_ARG])).collect())
}

/// A replicad of our own on a fresh run directory, and its fence keeper.
struct Daemon {
    child: Child,
    socket: PathBuf,
    run: tempfile::TempDir,
    /// Its Prometheus endpoint (127.0.0.1:port).
    metrics: std::net::SocketAddr,
}

/// The fence keepers `daemon` started: its children run with
/// `argv[1] == --fence-keeper`, as (pid, start time).
fn keepers_of(proc: &ProcReader, daemon: u32) -> Vec<(u32, u64)> {
    let mut found = Vec::new();
    for pid in proc.pids().unwrap_or_default() {
        let Ok(Some(stat)) = proc.stat(pid) else {
            continue;
        };
        if stat.ppid != daemon {
            continue;
        }
        let cmdline = std::fs::read(
            replicad_procfs::ProcReader::default()
                .pid_dir(pid)
                .join("cmdline"),
        )
        .unwrap_or_default();
        if cmdline.split(|&b| b == 0).nth(1) == Some(KEEPER_ARG.as_bytes()) {
            found.push((pid, stat.start_time));
        }
    }
    found
}

/// Whether (pid, start time) still names a live (not zombie) process.
fn alive(proc: &ProcReader, (pid, start): (u32, u64)) -> bool {
    matches!(proc.stat(pid), Ok(Some(s)) if s.start_time == start && s.state != 'Z' && s.state != 'X')
}

impl Daemon {
    fn start(huge: bool) -> Daemon {
        let run = tempfile::Builder::new()
            .prefix("replicad-bench-")
            .tempdir()
            .unwrap();
        let socket = run.path().join("replicad.sock");
        let config = run.path().join("replicad.toml");
        // A port free a moment ago, for the daemon's /metrics.
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        std::fs::write(
            &config,
            format!(
                "[daemon]\nrun_dir = \"{}\"\nmetrics_listen = \"{metrics}\"\n[fence]\n\
                 settle_ms = 2\nretry_max_ms = 50\n[store]\nhuge_pages = {huge}\n",
                run.path().display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(run.path().join("replicad.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_replicad"))
            .arg("--config")
            .arg(&config)
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            socket,
            run,
            metrics,
        };
        let t0 = Instant::now();
        while replicad_client::request(&d.socket, &Request::Status, &[], Duration::from_secs(1))
            .is_err()
        {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "replicad did not start; its log: {}",
                std::fs::read_to_string(d.run.path().join("replicad.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    /// `replicad_invalidation_seconds` (signal read to lease released, the
    /// daemon's part of the writer's wait): (sum in seconds, count).
    fn invalidations(&self) -> Option<(f64, u64)> {
        use std::io::Write;
        let mut c =
            std::net::TcpStream::connect_timeout(&self.metrics, Duration::from_secs(2)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        c.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        c.read_to_string(&mut text).ok()?;
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        Some((
            value("replicad_invalidation_seconds_sum")?,
            value("replicad_invalidation_seconds_count")? as u64,
        ))
    }

    /// What its log says went wrong that the bench should know of: the
    /// fence keeper lost (it revoked on its own), forced breaks.
    fn log_troubles(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.run.path().join("replicad.log")).unwrap_or_default();
        let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
        let mut out = Vec::new();
        let lost = count("the fence keeper is lost");
        if lost > 0 {
            out.push(format!(
                "the fence keeper was lost {lost} times ({} times it took replicad for dead: \
                 no word from it within its deadline) and every replica revoked",
                count("the daemon stopped answering")
            ));
        }
        let forced = count("broke the lease by force");
        if forced > 0 {
            out.push(format!("{forced} leases broken by force"));
        }
        out
    }

    fn replicate(&self, path: &Path) {
        replicad_client::request(
            &self.socket,
            &Request::Replicate {
                path: path.to_path_buf(),
                nodes: NodeSelection::All,
            },
            &[],
            Duration::from_secs(30),
        )
        .unwrap();
    }

    /// The generation of `path`'s valid replica, if it has one.
    fn valid_generation(&self, path: &Path) -> Option<u64> {
        let (resp, _) =
            replicad_client::request(&self.socket, &Request::Status, &[], Duration::from_secs(5))
                .ok()?;
        let Response::Status { report } = resp else {
            return None;
        };
        let src = report.sources.into_iter().find(|s| s.path == path)?;
        src.replicas
            .iter()
            .any(|r| r.state == ReplicaState::Valid && r.generation == src.generation)
            .then_some(src.generation)
    }

    /// One write-open right after `replicate`, before any row: its revoke
    /// makes replicad take the lease again from its long-lived refence
    /// thread. The first lease was taken by the thread that served the
    /// request; the kernel signals a lease break to the thread that took
    /// the lease (F_SETLEASE sets the owner to the calling thread), and a
    /// thread of the request pool that has since exited gets none: the
    /// writer then waits out lease-break-time, the kernel breaks the lease
    /// by force and the replica stays mapped and handed out. `Err` says
    /// so when this open is not revoked.
    fn warm_up(&self, path: &Path) -> Result<(), String> {
        let before = self.invalidations().map_or(0, |(_, n)| n);
        let gen = self.valid_generation(path);
        let t = Instant::now();
        drop(std::fs::OpenOptions::new().write(true).open(path).unwrap());
        let waited = t.elapsed();
        let t = Instant::now();
        while self.valid_generation(path).is_none_or(|g| Some(g) == gen) {
            if t.elapsed() > Duration::from_secs(10) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let after = self.invalidations().map_or(0, |(_, n)| n);
        if after > before {
            Ok(())
        } else {
            Err(format!(
                "BUG: the warm-up write-open of {} waited {waited:?} and was not revoked \
                 (no lease-break signal reached replicad)",
                path.display()
            ))
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let proc = ProcReader::default();
        let pid = self.child.id();
        let keepers = keepers_of(&proc, pid);
        if let Ok(dir) = std::env::var("REPLICAD_BENCH_LOGS") {
            let name = format!("replicad-{pid}.log");
            let _ = std::fs::copy(
                self.run.path().join("replicad.log"),
                Path::new(&dir).join(name),
            );
        }
        // SAFETY: kill on our own child; SIGTERM revokes every replica,
        // stops the keeper and unmounts the stores.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let t = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) {
            if t.elapsed() > Duration::from_secs(10) {
                eprintln!("replicad {pid} still runs 10 s after SIGTERM: SIGKILL");
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The keeper exits when its daemon goes; make sure it has.
        for k in keepers {
            let t = Instant::now();
            while alive(&proc, k) && t.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if alive(&proc, k) {
                eprintln!(
                    "fence keeper {} still runs 2 s after its replicad exited: SIGKILL",
                    k.0
                );
                // SAFETY: kill on the keeper our daemon started, checked by
                // pid and start time just above.
                unsafe { libc::kill(k.0 as i32, libc::SIGKILL) };
            }
        }
    }
}

/// A bare lease holder on `path`; says on stdout each time it holds the
/// lease.
struct Holder {
    _child: Children,
    out: ChildStdout,
}

impl Holder {
    fn start(exe: &Path, path: &Path) -> Holder {
        let mut child = Command::new(exe)
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        Holder {
            _child: Children(vec![child]),
            out,
        }
    }

    /// Wait until the holder has taken the lease (again).
    fn leased(&mut self, limit: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.out.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, limit.as_millis() as i32) };
        let mut b = [0u8; 1];
        n == 1 && self.out.read(&mut b).ok() == Some(1)
    }
}

// ---------------------------------------------------------------------
// The rows.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Load {
    Idle,
    Busy,
    Overload,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Against {
    Replicad,
    Bare,
    Plain,
}

impl Load {
    fn label(self) -> &'static str {
        match self {
            Load::Idle => "idle",
            Load::Busy => "busy",
            Load::Overload => "overload",
        }
    }

    /// How many of `n` readers read without sleeping, on `cpus` CPUs.
    fn busy_readers(self, n: usize, cpus: usize) -> usize {
        match self {
            Load::Idle => 0,
            Load::Busy => n.min(cpus),
            Load::Overload => n,
        }
    }
}

impl Against {
    fn label(self) -> &'static str {
        match self {
            Against::Replicad => "replicad",
            Against::Bare => "bare",
            Against::Plain => "plain",
        }
    }
}

/// One store: its daemon and its three files.
struct Store {
    label: &'static str,
    mb: usize,
    daemon: Daemon,
    /// Replicated by `daemon`.
    rep: PathBuf,
    /// Leased by the bare holder.
    bare: PathBuf,
    /// No lease.
    plain: PathBuf,
    /// What backs the replica, seen from a reader (filled on the first
    /// replicad visit).
    pages: Option<String>,
    /// What went wrong at start (the report prints it).
    notes: Vec<String>,
}

struct Row {
    store: usize,
    n: usize,
    load: Load,
    against: Against,
    waits: Vec<f64>,
    /// Opens not counted: not every reader (or the holder) was ready.
    not_ready: usize,
    /// The daemon's own part (replicad rows): invalidation seconds summed
    /// over the row's visits, their count, and the writer's waits summed
    /// over the same opens.
    daemon_sum: f64,
    daemon_count: u64,
    writer_sum: f64,
    writer_count: usize,
}

struct Bench {
    slots_path: PathBuf,
    slots: Slots,
    cpus: usize,
    holder_exe: Option<PathBuf>,
}

impl Bench {
    fn reset_slots(&self, n: usize) {
        for i in 0..n {
            self.slots.get(i).store(0, Ordering::SeqCst);
        }
    }

    fn readers(&self, kind: &str, load: Load, path: &Path, socket: &Path, n: usize) -> Children {
        self.reset_slots(n);
        let busy = load.busy_readers(n, self.cpus);
        let slots = self.slots_path.to_str().unwrap();
        let path = path.to_str().unwrap();
        let socket = socket.to_str().unwrap();
        let total = n.to_string();
        Children(
            (0..n)
                .map(|i| {
                    let mode = if i < busy { "busy" } else { "idle" };
                    let i = i.to_string();
                    spawn_self(&[READER_ARG, kind, mode, path, socket, slots, &i, &total])
                })
                .collect(),
        )
    }

    /// Wait until every one of the `n` readers' slots is above `base`.
    fn ready(&self, base: &[u64], limit: Duration) -> bool {
        let t = Instant::now();
        loop {
            if base
                .iter()
                .enumerate()
                .all(|(i, &b)| self.slots.get(i).load(Ordering::SeqCst) > b)
            {
                return true;
            }
            if t.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Which readers were not ready, and what they were doing (stderr).
    fn explain_not_ready(&self, label: &str, readers: &Children, base: &[u64]) {
        let proc = ProcReader::default();
        let mut stuck = Vec::new();
        for (i, pid) in readers.pids().into_iter().enumerate() {
            let now = self.slots.get(i).load(Ordering::SeqCst);
            if i < base.len() && now > base[i] {
                continue;
            }
            let state = proc.stat(pid).ok().flatten().map_or('?', |s| s.state);
            let wchan =
                std::fs::read_to_string(proc.pid_dir(pid).join("wchan")).unwrap_or_default();
            // The kernel stack, frames joined, where root may read it.
            let stack = std::fs::read_to_string(proc.pid_dir(pid).join("stack"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .collect::<Vec<_>>()
                .join(" < ");
            eprintln!(
                "{label}: reader {i} (pid {pid}) not ready: slot {now}, state {state}, wchan \
                 {wchan}, stack {stack}"
            );
            stuck.push(pid);
        }
        // Who has a /proc file of a stuck reader open (maps, pagemap,
        // cmdline readers hold its mmap_lock), and who else sleeps in D.
        for other in proc.pids().unwrap_or_default() {
            let comm = proc.comm(other).ok().flatten().unwrap_or_default();
            if let Ok(dir) = std::fs::read_dir(proc.pid_dir(other).join("fd")) {
                for fd in dir.flatten() {
                    let Ok(target) = std::fs::read_link(fd.path()) else {
                        continue;
                    };
                    if stuck.iter().any(|p| target.starts_with(proc.pid_dir(*p))) {
                        let target = target.display();
                        eprintln!("{label}:   pid {other} ({comm}) has {target} open");
                    }
                }
            }
            if !stuck.contains(&other)
                && proc
                    .stat(other)
                    .ok()
                    .flatten()
                    .is_some_and(|s| s.state == 'D')
            {
                let wchan =
                    std::fs::read_to_string(proc.pid_dir(other).join("wchan")).unwrap_or_default();
                eprintln!("{label}:   pid {other} ({comm}) in D too, wchan {wchan}");
            }
        }
    }

    fn snapshot(&self, n: usize) -> Vec<u64> {
        (0..n)
            .map(|i| self.slots.get(i).load(Ordering::SeqCst))
            .collect()
    }

    /// One visit: `k` opens of the row, with its readers (and hogs,
    /// holder) started for it.
    fn visit(&self, row: &mut Row, store: &mut Store, k: usize) {
        let _hogs = if row.load == Load::Overload {
            hogs(self.cpus)
        } else {
            Children(Vec::new())
        };
        let timed_open = |path: &Path| {
            let t = Instant::now();
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            let w = t.elapsed().as_secs_f64();
            drop(f);
            w
        };
        match row.against {
            Against::Replicad => {
                let readers =
                    self.readers("replica", row.load, &store.rep, &store.daemon.socket, row.n);
                let mut base = vec![0u64; row.n];
                let mut misses = 0;
                let before = store.daemon.invalidations();
                let (mut writer, mut writes) = (0.0, 0);
                for _ in 0..k {
                    let ok = self.ready(&base, READY_WAIT);
                    if !ok {
                        self.explain_not_ready(store.label, &readers, &base);
                    }
                    if ok && store.pages.is_none() {
                        store.pages =
                            replica_pages(readers.pids()[0], &store.daemon.run.path().join("node"));
                    }
                    base = self.snapshot(row.n);
                    let w = timed_open(&store.rep);
                    writer += w;
                    writes += 1;
                    if ok {
                        row.waits.push(w);
                        misses = 0;
                    } else {
                        row.not_ready += 1;
                        misses += 1;
                        if misses >= 3 {
                            eprintln!(
                                "{} {} {}: readers not ready three times running; visit cut short",
                                store.label,
                                row.n,
                                row.load.label()
                            );
                            break;
                        }
                    }
                }
                if let (Some(b), Some(a)) = (before, store.daemon.invalidations()) {
                    row.daemon_sum += a.0 - b.0;
                    row.daemon_count += a.1 - b.1;
                    row.writer_sum += writer;
                    row.writer_count += writes;
                }
            }
            Against::Bare => {
                let Some(exe) = &self.holder_exe else {
                    return;
                };
                let mut holder = Holder::start(exe, &store.bare);
                let _readers = self.readers("file", row.load, &store.bare, Path::new("-"), row.n);
                let all = self.ready(&vec![0u64; row.n], READY_WAIT * 4);
                for done in 0..k {
                    if !holder.leased(READY_WAIT) {
                        row.not_ready += k - done;
                        eprintln!("bare holder: no lease taken within {READY_WAIT:?}");
                        return;
                    }
                    let w = timed_open(&store.bare);
                    if all {
                        row.waits.push(w);
                    } else {
                        row.not_ready += 1;
                    }
                }
            }
            Against::Plain => {
                let _readers = self.readers("file", row.load, &store.plain, Path::new("-"), row.n);
                let all = self.ready(&vec![0u64; row.n], READY_WAIT * 4);
                for _ in 0..k {
                    std::thread::sleep(Duration::from_micros(200));
                    let w = timed_open(&store.plain);
                    if all {
                        row.waits.push(w);
                    } else {
                        row.not_ready += 1;
                    }
                }
            }
        }
    }
}

/// How the replica a reader maps is backed: pages present and the folios
/// they sit in (`/proc/PID/pagemap`, `/proc/kpageflags`).
fn replica_pages(pid: u32, store_prefix: &Path) -> Option<String> {
    const COMPOUND_HEAD: u64 = 1 << 15;
    const COMPOUND_TAIL: u64 = 1 << 16;
    let proc = ProcReader::default();
    let prefix = store_prefix.to_str()?;
    let maps = proc.maps(pid).ok()??;
    let m = maps.iter().find(|m| m.path.starts_with(prefix))?;
    let pagemap = proc.pagemap(pid).ok()??;
    let kflags = std::fs::File::open(proc.root().join("kpageflags")).ok()?;
    let (mut present, mut folios) = (0u64, 0u64);
    let mut va = m.start;
    while va < m.end {
        let mut e = [0u8; 8];
        pagemap.read_exact_at(&mut e, va / PAGE as u64 * 8).ok()?;
        let e = u64::from_le_bytes(e);
        va += PAGE as u64;
        if e >> 63 == 0 {
            continue;
        }
        let pfn = e & ((1 << 55) - 1);
        let mut f = [0u8; 8];
        kflags.read_exact_at(&mut f, pfn * 8).ok()?;
        let f = u64::from_le_bytes(f);
        present += 1;
        if f & COMPOUND_HEAD != 0 || f & COMPOUND_TAIL == 0 {
            folios += 1;
        }
    }
    if folios == 0 {
        return Some(format!(
            "{} KiB mapped, no page present",
            (m.end - m.start) / 1024
        ));
    }
    Some(format!(
        "{} KiB present in {folios} folios of {} KiB on average",
        present * 4,
        present * 4 / folios
    ))
}

/// Nearest-rank quantile of `v` (sorted here).
fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn loadavg() -> String {
    std::fs::read_to_string(
        replicad_procfs::ProcReader::default()
            .root()
            .join("loadavg"),
    )
    .unwrap_or_default()
    .split_whitespace()
    .take(3)
    .collect::<Vec<_>>()
    .join(" ")
}

/// Build `benches/NAME.c` with `cc` into `dir`; `Err` says why not.
fn build_c(name: &str, dir: &Path) -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("benches/{name}.c"));
    let exe = dir.join(name);
    let out = Command::new("cc")
        .args(["-O2", "-Wall", "-Wextra", "-o"])
        .arg(&exe)
        .arg(&src)
        .output();
    match out {
        Err(e) => Err(format!("cannot run cc ({e})")),
        Ok(o) if !o.status.success() => Err(format!(
            "cc failed on {}: {}",
            src.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => Ok(exe),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some(READER_ARG) => reader_main(&args[2..]),
        Some(HOG_ARG) => hog_main(),
        _ => {}
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP writer_wait: needs root (tmpfs mounts, leases)");
        return;
    }
    let opens = env_num("REPLICAD_BENCH_OPENS", 300).max(1);
    let batch = env_num("REPLICAD_BENCH_BATCH", 50).max(1);
    let attached: Vec<usize> = env_list("REPLICAD_BENCH_ATTACHED", "8,64")
        .iter()
        .map(|s| s.parse().expect("REPLICAD_BENCH_ATTACHED: numbers"))
        .collect();
    let loads: Vec<Load> = env_list("REPLICAD_BENCH_LOAD", "idle,busy")
        .iter()
        .map(|s| match s.as_str() {
            "idle" => Load::Idle,
            "busy" => Load::Busy,
            "overload" => Load::Overload,
            _ => panic!("REPLICAD_BENCH_LOAD: idle, busy, overload"),
        })
        .collect();
    let against: Vec<Against> = env_list("REPLICAD_BENCH_AGAINST", "replicad,bare,plain")
        .iter()
        .map(|s| match s.as_str() {
            "replicad" => Against::Replicad,
            "bare" => Against::Bare,
            "plain" => Against::Plain,
            _ => panic!("REPLICAD_BENCH_AGAINST: replicad, bare, plain"),
        })
        .collect();
    let default_stores = match std::env::var("REPLICAD_BENCH_HUGE").as_deref() {
        Ok("1") => "huge",
        Ok("0") => "4k",
        _ => "huge,4k",
    };
    let store_names = env_list("REPLICAD_BENCH_STORES", default_stores);
    let huge_mb = env_num("REPLICAD_BENCH_MB", 8);
    let small_mb = env_num("REPLICAD_BENCH_4K_MB", 1);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_start = loadavg();

    let data = tempfile::Builder::new()
        .prefix("replicad-bench-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let scratch = tempfile::Builder::new()
        .prefix("replicad-bench-")
        .tempdir_in(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .unwrap();
    let max_n = attached.iter().copied().max().unwrap_or(1);
    let slots_path = scratch.path().join("ready");
    let slots_len = (max_n * SLOT).div_ceil(PAGE) * PAGE;
    std::fs::write(&slots_path, vec![0u8; slots_len]).unwrap();
    let (holder_exe, holder_skip) = match build_c("bare_holder", scratch.path()) {
        Ok(exe) => (Some(exe), None),
        Err(why) => (None, Some(why)),
    };
    let bench = Bench {
        slots: Slots::map(&slots_path, max_n),
        slots_path,
        cpus,
        holder_exe,
    };

    let mut stores = Vec::new();
    for name in &store_names {
        let (label, huge, mb) = match name.as_str() {
            "huge" => ("huge", true, huge_mb),
            "4k" => ("4k", false, small_mb),
            _ => panic!("REPLICAD_BENCH_STORES: huge, 4k"),
        };
        let file = |what: &str| {
            let p = data.path().join(format!("{label}-{what}.bin"));
            std::fs::write(&p, vec![7u8; mb << 20]).unwrap();
            p
        };
        let (rep, bare, plain) = (file("replicated"), file("bare"), file("plain"));
        let daemon = Daemon::start(huge);
        daemon.replicate(&rep);
        let notes = if std::env::var("REPLICAD_BENCH_WARMUP").as_deref() == Ok("0") {
            vec!["no warm-up write-open (REPLICAD_BENCH_WARMUP=0)".to_string()]
        } else {
            daemon.warm_up(&rep).err().into_iter().collect()
        };
        stores.push(Store {
            label,
            mb,
            daemon,
            rep,
            bare,
            plain,
            pages: None,
            notes,
        });
    }

    let mut rows = Vec::new();
    for s in 0..stores.len() {
        for &n in &attached {
            for &load in &loads {
                for &a in &against {
                    rows.push(Row {
                        store: s,
                        n,
                        load,
                        against: a,
                        waits: Vec::new(),
                        not_ready: 0,
                        daemon_sum: 0.0,
                        daemon_count: 0,
                        writer_sum: 0.0,
                        writer_count: 0,
                    });
                }
            }
        }
    }
    let rounds = opens.div_ceil(batch);
    let t0 = Instant::now();
    for r in 0..rounds {
        let k = batch.min(opens - r * batch);
        for j in 0..rows.len() {
            let i = (j + r) % rows.len();
            let row = &mut rows[i];
            bench.visit(row, &mut stores[row.store], k);
        }
        eprintln!(
            "writer_wait: round {}/{rounds} done after {:.0} s, load average {}",
            r + 1,
            t0.elapsed().as_secs_f64(),
            loadavg()
        );
    }
    let load_end = loadavg();

    report(
        &mut rows,
        &stores,
        &Header {
            opens,
            batch,
            rounds,
            cpus,
            load_start,
            load_end,
            holder_skip,
            secs: t0.elapsed().as_secs_f64(),
        },
    );
    let probe_stores: Vec<(&'static str, usize)> = stores.iter().map(|s| (s.label, s.mb)).collect();
    drop(stores);

    let probe_runs = env_num("REPLICAD_BENCH_PROBE_RUNS", 50);
    if probe_runs > 0 {
        match build_c("truncate_probe", scratch.path()) {
            Err(why) => println!("SKIP kernel truncate alone (benches/truncate_probe.c): {why}"),
            Ok(exe) => truncate_probe(
                &exe,
                scratch.path(),
                &probe_stores,
                &attached,
                &loads,
                probe_runs,
                cpus,
            ),
        }
    }
}

/// The kernel's truncate of a tmpfs file mapped by N processes, alone (no
/// replicad, no lease): benches/truncate_probe.c, run after the rows.
fn truncate_probe(
    exe: &Path,
    scratch: &Path,
    stores: &[(&'static str, usize)],
    attached: &[usize],
    loads: &[Load],
    runs: usize,
    cpus: usize,
) {
    let dir = scratch.join("probe");
    std::fs::create_dir_all(&dir).unwrap();
    println!(
        "kernel truncate alone (benches/truncate_probe.c, no replicad): ftruncate(fd, 0) of a \
         tmpfs file mapped by N processes, {runs} runs each, µs; load average {}",
        loadavg()
    );
    println!(
        "  readers: pause = touched every page once, then asleep in pause() (the unmap alone); \
         idle, busy as in the rows above, falling back to a spare mapping on SIGBUS as \
         replicad_client does"
    );
    println!(
        "  {:<5} {:>4} {:<6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "store", "N", "reader", "p50", "p99", "max", "unlink", "tlb ipi", "cal ipi"
    );
    let mut configs: Vec<(usize, &str, usize)> = vec![(0, "pause", 0)];
    for &n in attached {
        configs.push((n, "pause", 0));
        for &l in loads {
            configs.push((n, l.label(), l.busy_readers(n, cpus)));
        }
    }
    for &(label, mb) in stores {
        let huge = if label == "huge" { "1" } else { "0" };
        for &(n, mode, busy) in &configs {
            let idle = if mode == "pause" { "pause" } else { "touch" };
            let out = Command::new(exe)
                .arg(&dir)
                .arg(mb.to_string())
                .arg(n.to_string())
                .arg(runs.to_string())
                .arg(huge)
                .arg(busy.to_string())
                .arg(idle)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                println!(
                    "  {label:<5} {n:>4} {mode:<6} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                continue;
            }
            let field = |k: &str| {
                text.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                    .unwrap_or("?")
                    .to_string()
            };
            println!(
                "  {label:<5} {n:>4} {mode:<6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                field("trunc_p50_us"),
                field("trunc_p99_us"),
                field("trunc_max_us"),
                field("unlink_p50_us"),
                field("tlb_ipis_p50"),
                field("cal_ipis_p50")
            );
            println!("probe: store={label} reader={mode} {}", text.trim());
        }
    }
}

struct Header {
    opens: usize,
    batch: usize,
    rounds: usize,
    cpus: usize,
    load_start: String,
    load_end: String,
    holder_skip: Option<String>,
    secs: f64,
}

#[derive(Clone, Copy)]
struct Stats {
    p50: f64,
    p99: f64,
    max: f64,
}

fn report(rows: &mut [Row], stores: &[Store], h: &Header) {
    println!(
        "writer wait: open(O_WRONLY), µs; {} opens a row in visits of {}, every row \
         visited once a round, {} rounds, {:.0} s; {} CPUs",
        h.opens, h.batch, h.rounds, h.secs, h.cpus
    );
    println!(
        "  load average (1, 5, 15 min): {} at the start, {} at the end; \
         /proc/sys/fs/lease-break-time {} s",
        h.load_start,
        h.load_end,
        replicad_procfs::ProcReader::default()
            .lease_break_time()
            .map_or_else(|| "?".to_string(), |s| s.to_string())
    );
    println!(
        "  idle: readers touch every page, then sleep 1 ms; busy: one reader per CPU ({}) \
         reads its whole mapping in a loop, the others idle; overload: every reader busy, \
         and {} spinning hogs",
        h.cpus, h.cpus
    );
    let (nap, reattach) = (
        env_num("REPLICAD_BENCH_IDLE_MS", 1),
        env_num("REPLICAD_BENCH_REATTACH_MS", 0),
    );
    if nap != 1 || reattach != 0 {
        println!(
            "  NOTE not the defaults: idle readers sleep {nap} ms (REPLICAD_BENCH_IDLE_MS); after \
             a revoke readers wait {reattach} ms before they re-attach (REPLICAD_BENCH_REATTACH_MS)"
        );
    }
    for s in stores {
        println!(
            "  store {}: {} MiB file; replica as a reader maps it: {}",
            s.label,
            s.mb,
            s.pages.as_deref().unwrap_or("not seen")
        );
        for t in &s.notes {
            println!("  store {}: NOTE {t}", s.label);
        }
        for t in s.daemon.log_troubles() {
            println!("  store {}: NOTE replicad's log: {t}", s.label);
        }
    }
    if let Some(why) = &h.holder_skip {
        println!("  SKIP bare holder rows: {why}");
    }
    let stats = |r: &mut Row| -> Option<Stats> {
        if r.waits.is_empty() {
            return None;
        }
        Some(Stats {
            p50: pct(&mut r.waits, 0.5),
            p99: pct(&mut r.waits, 0.99),
            max: pct(&mut r.waits, 1.0),
        })
    };
    let st: Vec<Option<Stats>> = rows.iter_mut().map(stats).collect();
    let find = |s: usize, n: usize, l: Load, a: Against| {
        rows.iter()
            .zip(&st)
            .find(|(r, _)| r.store == s && r.n == n && r.load == l && r.against == a)
            .and_then(|(_, x)| *x)
    };
    println!(
        "  {:<5} {:>4} {:<5} {:<9} {:>5} {:>9} {:>9} {:>9}",
        "store", "att", "load", "against", "n", "p50", "p99", "max"
    );
    for (r, &st) in rows.iter().zip(&st) {
        let (s, n, l, a, count, not_ready) =
            (r.store, r.n, r.load, r.against, r.waits.len(), r.not_ready);
        let label = stores[s].label;
        match (a, st) {
            (Against::Bare, _) if h.holder_skip.is_some() => {
                println!(
                    "  {:<5} {:>4} {:<5} {:<9} SKIP (no bare holder: see above)",
                    label,
                    n,
                    l.label(),
                    a.label()
                );
            }
            (_, None) => println!(
                "  {:<5} {:>4} {:<5} {:<9} no opens counted ({not_ready} not ready)",
                label,
                n,
                l.label(),
                a.label()
            ),
            (_, Some(st)) => {
                println!(
                    "  {:<5} {:>4} {:<5} {:<9} {:>5} {:>9.1} {:>9.1} {:>9.1}{}",
                    label,
                    n,
                    l.label(),
                    a.label(),
                    count,
                    st.p50 * 1e6,
                    st.p99 * 1e6,
                    st.max * 1e6,
                    if not_ready > 0 {
                        format!("  ({not_ready} opens not counted: readers not ready)")
                    } else {
                        String::new()
                    }
                );
            }
        }
        if a == Against::Replicad {
            if let Some(st) = st {
                let mut parts = Vec::new();
                if let Some(b) = find(s, n, l, Against::Bare) {
                    parts.push(format!(
                        "/bare p50 {:.2}x p99 {:.2}x",
                        st.p50 / b.p50,
                        st.p99 / b.p99
                    ));
                }
                if let Some(p) = find(s, n, l, Against::Plain) {
                    parts.push(format!(
                        "/plain p50 {:.0}x p99 {:.0}x",
                        st.p50 / p.p50,
                        st.p99 / p.p99
                    ));
                }
                if !parts.is_empty() {
                    println!("  {:<27} replicad{}", "", parts.join(", replicad"));
                }
                if r.daemon_count < r.writer_count as u64 {
                    println!(
                        "  {:<27} NOTE {} of {} opens were not revoked by replicad (a lost \
                         lease break?)",
                        "",
                        r.writer_count as u64 - r.daemon_count,
                        r.writer_count
                    );
                }
                if r.daemon_count > 0 {
                    println!(
                        "  {:<27} in replicad (signal read to lease released): mean {:.0} us \
                         of the writer's mean {:.0} us ({} revokes, {} opens)",
                        "",
                        r.daemon_sum / r.daemon_count as f64 * 1e6,
                        r.writer_sum / r.writer_count.max(1) as f64 * 1e6,
                        r.daemon_count,
                        r.writer_count
                    );
                }
            }
        }
    }
    println!("  goals:");
    for (s, store) in stores.iter().enumerate() {
        if let Some(st) = find(s, 64, Load::Idle, Against::Replicad) {
            println!(
                "    p99 < 1000 us, 64 idle attached, {} store: p99 {:.0} us: {}{}",
                store.label,
                st.p99 * 1e6,
                if st.p99 < 1e-3 { "met" } else { "NOT met" },
                if store.label == "huge" {
                    ""
                } else {
                    " (reported; the goal is set for the huge-page store)"
                }
            );
        }
    }
    for (s, store) in stores.iter().enumerate() {
        for (row, &x) in rows.iter().zip(&st) {
            if row.store != s || row.load != Load::Busy || row.against != Against::Replicad {
                continue;
            }
            let (Some(r), Some(b)) = (x, find(s, row.n, Load::Busy, Against::Bare)) else {
                continue;
            };
            let (q50, q99) = (r.p50 / b.p50, r.p99 / b.p99);
            println!(
                "    busy, replicad within 1.5x of the bare holder, {} store, {} attached: \
                 p50 {q50:.2}x, p99 {q99:.2}x: {}",
                store.label,
                row.n,
                if q50 <= 1.5 && q99 <= 1.5 {
                    "met"
                } else {
                    "NOT met"
                }
            );
        }
    }
    for (r, &st) in rows.iter().zip(&st) {
        let (s, n, l, a, count, not_ready) =
            (r.store, r.n, r.load, r.against, r.waits.len(), r.not_ready);
        if let Some(st) = st {
            println!(
                "row: store={} attached={n} load={} against={} n={count} not_ready={not_ready} \
                 p50_us={:.1} p99_us={:.1} max_us={:.1}",
                stores[s].label,
                l.label(),
                a.label(),
                st.p50 * 1e6,
                st.p99 * 1e6,
                st.max * 1e6
            );
        }
    }
}
