//! Test harness: a real `replicad` process on a private run directory and
//! socket, `replicactl` and the test programs, and the checks shared by the
//! integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use replicad_client::proto::{Request, Response, StatusReport};

pub const REPLICAD: &str = env!("CARGO_BIN_EXE_replicad");
pub const REPLICACTL: &str = env!("CARGO_BIN_EXE_replicactl");

/// Whether skips are failures: `REPLICAD_STRICT=1` (scripts/test.sh sets it
/// in CI and when run as root). A test that cannot run there must not pass.
pub fn strict() -> bool {
    std::env::var("REPLICAD_STRICT").is_ok_and(|v| v == "1")
}

/// Skip `test` because of `why` (a missing tool or privilege): prints
/// `SKIP`, or panics under `REPLICAD_STRICT=1`, where every such skip is
/// a failure.
pub fn skip(test: &str, why: &str) {
    assert!(
        !strict(),
        "{test} cannot run: {why} (REPLICAD_STRICT=1: a skip is a failure)"
    );
    eprintln!("SKIP {test}: {why}");
}

/// Skip `test` for lack of hardware CI never has (a GPU): never a
/// failure, even under `REPLICAD_STRICT=1`.
pub fn skip_no_hardware(test: &str, why: &str) {
    eprintln!("SKIP {test}: no hardware: {why}");
}

/// Whether we run as root; tests that need it skip (see [`skip`]) otherwise.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip(
        test,
        "needs root (tmpfs mounts, leases on any file, trusted xattrs)",
    );
    false
}

/// A test program built by `cargo test` (examples land beside deps/).
pub fn program(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join("examples").join(name);
    assert!(
        p.exists(),
        "{} not built (cargo test builds examples)",
        p.display()
    );
    p
}

/// A scratch directory on a real (ext4) filesystem, not tmpfs.
pub fn scratch(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("replicad-{tag}-"))
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// Write `len` bytes of a deterministic pattern to `path`.
pub fn make_file(path: &Path, len: usize, seed: u8) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut x = seed as u64 | 1;
    let mut left = len;
    while left > 0 {
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    f.sync_all().unwrap();
}

pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A running daemon. Dropping it kills it and unmounts its stores.
pub struct Daemon {
    pub child: Option<Child>,
    pub run_dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub http: Option<String>,
    pub log: PathBuf,
    /// Fence keepers this daemon (or an earlier one on the run directory)
    /// had, seen before it was signalled: once it is dead they are
    /// orphans, no longer its children, and Drop still kills them.
    keepers: std::sync::Mutex<Vec<KeeperProc>>,
    /// The soft open-file limit it starts with, when not inherited.
    pub nofile_soft: Option<u64>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Daemon {
    /// Start with a small settle time and HTTP on a free port; `extra` is
    /// appended to the config file.
    pub fn start(extra: &str) -> Daemon {
        Daemon::start_opts(extra, true)
    }

    pub fn start_opts(extra: &str, http: bool) -> Daemon {
        let run_dir = tempfile::Builder::new()
            .prefix("replicad-run-")
            .tempdir()
            .unwrap();
        Daemon::start_in(run_dir, extra, http)
    }

    /// Start on an existing run directory (for restart tests).
    pub fn start_in(run_dir: tempfile::TempDir, extra: &str, http: bool) -> Daemon {
        let mut d = Daemon::configured(run_dir, extra, http);
        d.spawn();
        d
    }

    /// Start with the soft open-file limit at `soft` (the hard one as
    /// inherited), as a shell's `ulimit -Sn` would.
    pub fn start_with_nofile(extra: &str, soft: u64) -> Daemon {
        let run_dir = tempfile::Builder::new()
            .prefix("replicad-run-")
            .tempdir()
            .unwrap();
        let mut d = Daemon::configured(run_dir, extra, true);
        d.nofile_soft = Some(soft);
        d.spawn();
        d
    }

    /// The config written, nothing started.
    fn configured(run_dir: tempfile::TempDir, extra: &str, http: bool) -> Daemon {
        let socket = run_dir.path().join("replicad.sock");
        let http = http.then(|| format!("127.0.0.1:{}", free_port()));
        let config = run_dir.path().join("replicad.toml");
        let log = run_dir.path().join("replicad.log");
        let mut text = format!(
            "[daemon]\nrun_dir = \"{}\"\nmetrics_listen = \"{}\"\n",
            run_dir.path().display(),
            http.clone().unwrap_or_default()
        );
        if !extra.contains("[fence]") {
            text.push_str("[fence]\nsettle_ms = 20\nretry_max_ms = 200\n");
        }
        text.push_str(extra);
        std::fs::write(&config, text).unwrap();
        Daemon {
            child: None,
            run_dir,
            socket,
            config,
            http,
            log,
            keepers: Default::default(),
            nofile_soft: None,
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(REPLICAD);
        cmd.arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(soft) = self.nofile_soft {
            use std::os::unix::process::CommandExt;
            // SAFETY: only getrlimit/setrlimit between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let mut l = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    l.rlim_cur = soft.min(l.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().unwrap();
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if let Ok((Response::Status { .. }, _)) = replicad_client::request(
                &self.socket,
                &Request::Status,
                &[],
                Duration::from_secs(2),
            ) {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("replicad exited at start ({st}):\n{}", self.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "replicad did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run replicactl against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(REPLICACTL)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// replicactl that must succeed; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let mut out = self.ctl(args);
        // A file a test just wrote may still be open for writing in a
        // child another test thread forked and has not exec'd yet (it
        // holds a duplicate of every fd until exec): the daemon rightly
        // refuses to fence it. That writer goes away within milliseconds.
        let mut tries = 0;
        while args.first() == Some(&"replicate")
            && !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("open for writing")
            && tries < 40
        {
            std::thread::sleep(Duration::from_millis(50));
            out = self.ctl(args);
            tries += 1;
        }
        assert!(
            out.status.success(),
            "replicactl {args:?} failed: {}\n{}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// replicactl that must fail; returns stderr.
    pub fn ctl_err(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            !out.status.success(),
            "replicactl {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn request(&self, req: &Request) -> Result<Response, replicad_client::Error> {
        replicad_client::request(&self.socket, req, &[], Duration::from_secs(60)).map(|r| r.0)
    }

    pub fn status(&self) -> StatusReport {
        match self.request(&Request::Status).unwrap() {
            Response::Status { report } => report,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// GET a path from the daemon's HTTP server.
    pub fn http_get(&self, path: &str) -> String {
        let addr = self.http.as_ref().expect("HTTP is off");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or(out)
    }

    /// The value of a metric line that starts with `prefix`.
    pub fn metric(&self, prefix: &str) -> f64 {
        let text = self.http_get("/metrics");
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {prefix} not found in:\n{text}"))
    }

    pub fn signal(&self, sig: i32) {
        self.remember_keepers();
        // SAFETY: kill on our child's pid.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Note the daemon's keepers (its children now) for Drop.
    fn remember_keepers(&self) {
        let pid = self.child.as_ref().map(Child::id);
        let mut known = self.keepers.lock().unwrap_or_else(|p| p.into_inner());
        for k in keepers(self.run_dir.path(), pid) {
            if !known.contains(&k) {
                known.push(k);
            }
        }
    }

    /// SIGTERM and wait; the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(20))
    }

    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            if t0.elapsed() > limit {
                let _ = child.kill();
                panic!("replicad did not exit within {limit:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (a crash) and wait.
    pub fn crash(&mut self) {
        self.remember_keepers();
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        let st = child.wait().unwrap();
        assert_eq!(st.signal(), Some(libc::SIGKILL));
    }

    /// Restart on the same run directory and config.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or crash the daemon first");
        self.spawn();
    }

    /// Mountpoints under the run directory.
    pub fn mounts(&self) -> Vec<String> {
        mounts_under(self.run_dir.path())
    }
}

pub fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(String::from))
        .filter(|m| m.starts_with(&prefix))
        .collect()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Its keepers first, while they are still its children; then every
        // keeper of the run directory, orphans included: none may hold a
        // lease on a test's file after the test.
        self.remember_keepers();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.remember_keepers();
        kill_keepers(&self.keepers.lock().unwrap_or_else(|p| p.into_inner()));
        for m in mounts_under(self.run_dir.path()) {
            let c = std::ffi::CString::new(m).unwrap();
            // SAFETY: unmounting a test mount by path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Map `path` through the client API from `d`'s node-0 replica, and check
/// it is on the replica.
pub fn map_on_replica(d: &Daemon, path: &Path) -> replicad_client::Mapping {
    let opts = replicad_client::MapOptions {
        socket: d.socket.clone(),
        node: Some(0),
        timeout: Duration::from_secs(5),
    };
    let m = replicad_client::map_with(path, &opts).unwrap();
    assert!(m.on_replica(), "{}: {:?}", path.display(), m.backing());
    m
}

/// Parse one JSON line printed by a test program.
pub fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
}

/// The preload shim `cargo test` built (the root package dev-depends on
/// replicad-preload): `target/<profile>/libreplicad_preload.so` or its
/// `deps/` copy, whichever is newer. Panics, saying how to build it, if
/// neither exists.
pub fn shim_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test binary>
    let dir = exe.parent().unwrap().parent().unwrap();
    let candidates = [
        dir.join("libreplicad_preload.so"),
        dir.join("deps").join("libreplicad_preload.so"),
    ];
    candidates
        .iter()
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p.clone())))
        .max()
        .map(|(_, p)| p)
        .unwrap_or_else(|| {
            panic!(
                "the preload shim libreplicad_preload.so is in neither {} nor {} \
                 (`cargo test` builds it: the root package dev-depends on replicad-preload; \
                 or run `cargo build -p replicad-preload`)",
                candidates[0].display(),
                candidates[1].display()
            )
        })
}

/// A fence keeper process: its pid and start time, so that a pid reused
/// by another process is never taken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeeperProc {
    pub pid: u32,
    start: u64,
}

/// `(state, ppid, start time)` of `pid` from `/proc/<pid>/stat`; `None`
/// once it is gone.
fn proc_stat(pid: u32) -> Option<(char, u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the comm's closing parenthesis: state, ppid, ... starttime
    // (field 22 of the whole line, the 20th after the comm).
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some((
        rest.first()?.chars().next()?,
        rest.get(1)?.parse().ok()?,
        rest.get(19)?.parse().ok()?,
    ))
}

/// The argv of `pid` if it runs replicad (its comm, read first: reading
/// another process's cmdline waits for its mmap lock, which a busy reader
/// process may hold for seconds).
fn replicad_argv(pid: u32) -> Option<Vec<String>> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if comm.trim_end() != "replicad" {
        return None;
    }
    Some(
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()?
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Every live fence keeper of the run directory `run_dir`: a process run
/// as `replicad --fence-keeper <fd> <run_dir>`, orphaned or not, and any
/// child of `daemon` (while it lives) run with `--fence-keeper` (an argv
/// with only the fd).
pub fn keepers(run_dir: &Path, daemon: Option<u32>) -> Vec<KeeperProc> {
    let canon = std::fs::canonicalize(run_dir).ok();
    let names_run_dir =
        |a: &str| Path::new(a) == run_dir || canon.as_deref().is_some_and(|c| Path::new(a) == c);
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Some((state, ppid, start)) = proc_stat(pid) else {
            continue;
        };
        if state == 'Z' {
            continue;
        }
        let Some(argv) = replicad_argv(pid) else {
            continue;
        };
        let Some(i) = argv.iter().position(|a| a == "--fence-keeper") else {
            continue;
        };
        let ours =
            argv.get(i + 2).is_some_and(|a| names_run_dir(a)) || daemon.is_some_and(|d| d == ppid);
        if ours {
            out.push(KeeperProc { pid, start });
        }
    }
    out
}

/// SIGKILL each keeper still running (the same process: same start
/// time, still a keeper) and wait until it is gone (or a zombie, which
/// holds no fds).
pub fn kill_keepers(list: &[KeeperProc]) {
    let same = |k: &KeeperProc| {
        proc_stat(k.pid).is_some_and(|(state, _, start)| start == k.start && state != 'Z')
            && replicad_argv(k.pid).is_some_and(|a| a.iter().any(|a| a == "--fence-keeper"))
    };
    for k in list.iter().filter(|k| same(k)) {
        // SAFETY: a signal to a fence keeper of this test's daemon, checked
        // to be that process just now.
        unsafe { libc::kill(k.pid as i32, libc::SIGKILL) };
    }
    // A keeper that watched sources exits through the kernel's fsnotify
    // teardown, which waits for an SRCU grace period: seconds here at
    // times (seen: D in fsnotify_destroy_group with SIGKILL pending, its
    // leases already closed).
    // Waited for by pid and start time only: an exiting process shows an
    // empty cmdline while it is not gone yet.
    let running = |k: &KeeperProc| {
        proc_stat(k.pid).is_some_and(|(state, _, start)| start == k.start && state != 'Z')
    };
    let t0 = Instant::now();
    while list.iter().any(running) && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The keeper: the child of `daemon` run with --fence-keeper.
pub fn keeper_of(daemon: u32) -> Option<u32> {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // The parent first: only the daemon's children's argv is read.
        if proc_stat(pid).is_none_or(|(state, ppid, _)| ppid != daemon || state == 'Z') {
            continue;
        }
        if replicad_argv(pid).is_some_and(|a| a.iter().any(|a| a == "--fence-keeper")) {
            return Some(pid);
        }
    }
    None
}

/// The fence keeper fencing `run_dir`, the daemon's child or one a dead
/// daemon left and the next one adopted (its argv: `replicad
/// --fence-keeper <fd> <run_dir>`).
pub fn keeper_in(run_dir: &Path) -> Option<u32> {
    keepers(run_dir, None).first().map(|k| k.pid)
}

/// Sets `/proc/sys/fs/lease-break-time` (a global setting) for a test,
/// and puts the old value back on drop.
pub struct BreakTime(String);

const LEASE_BREAK_TIME: &str = "/proc/sys/fs/lease-break-time";

impl BreakTime {
    pub fn set(secs: u32) -> BreakTime {
        let old = std::fs::read_to_string(LEASE_BREAK_TIME).unwrap();
        std::fs::write(LEASE_BREAK_TIME, secs.to_string()).unwrap();
        BreakTime(old)
    }
}

impl Drop for BreakTime {
    fn drop(&mut self) {
        let _ = std::fs::write(LEASE_BREAK_TIME, self.0.trim());
    }
}
