//! Running programs follow the published set (the shim's "replicad-follow"
//! thread): real replicad, real processes under `LD_PRELOAD`.
//!
//! * a program that mapped a file before it had a replica moves onto the
//!   replica made later, within 2 s, without a restart; with
//!   `REPLICAD_FOLLOW=0` it stays on the file;
//! * a program started before the daemon (no socket, not even its
//!   directory) attaches once the daemon runs and replicates its file;
//! * while nothing changes the thread sleeps (state S) and uses no CPU;
//! * `unshare(CLONE_NEWUSER)`, which wants a single thread, still works
//!   under the shim, and the thread comes back afterwards;
//! * a fork child has no watcher until it maps a file, then has one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const PROBE: &str = "replicad-probe";
const THREAD: &str = "replicad-follow";

/// A program under the shim holding `file` mapped read-only and private:
/// the child, its pid and the mapping's address.
struct Holder {
    child: Child,
    pid: u32,
    addr: u64,
    log: PathBuf,
}

impl Holder {
    fn start(socket: &Path, file: &Path, env: &[(&str, &str)], log: PathBuf) -> Holder {
        let mut c = Command::new(program(PROBE));
        c.arg("hold")
            .arg(file)
            .env("LD_PRELOAD", shim_path())
            .env("REPLICAD_SOCKET", socket)
            .env("REPLICAD_DEBUG", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("probe said {line:?} ({e})"));
        Holder {
            pid: v["pid"].as_u64().unwrap() as u32,
            addr: v["addr"].as_u64().unwrap(),
            child,
            log,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The maps line of the held mapping.
    fn line(&self) -> String {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid)).unwrap();
        maps.lines()
            .find(|l| {
                l.split('-')
                    .next()
                    .and_then(|s| u64::from_str_radix(s, 16).ok())
                    == Some(self.addr)
            })
            .unwrap_or_else(|| panic!("{:#x} not mapped in {}:\n{maps}", self.addr, self.pid))
            .to_string()
    }

    /// Whether the held mapping is a file of `run_dir`'s node0 store.
    fn on_replica(&self, run_dir: &Path) -> bool {
        let node0 = format!("{}/node0/", run_dir.display());
        self.line().contains(&node0)
    }

    /// Wait up to `limit` for the mapping to be on a replica; how long.
    fn wait_on_replica(&self, run_dir: &Path, limit: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        loop {
            if self.on_replica(run_dir) {
                return Some(t0.elapsed());
            }
            if t0.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The watcher thread's task id.
    fn follow_tid(&self) -> u32 {
        let t0 = Instant::now();
        loop {
            let dir = format!("/proc/{}/task", self.pid);
            for t in std::fs::read_dir(&dir).unwrap() {
                let t = t.unwrap();
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                if comm.trim() == THREAD {
                    return t.file_name().to_str().unwrap().parse().unwrap();
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "no {THREAD} thread in pid {}:\n{}",
                self.pid,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The watcher thread's (state, utime + stime in ticks).
    fn follow_stat(&self, tid: u32) -> (char, u64) {
        let stat = std::fs::read_to_string(format!("/proc/{}/task/{tid}/stat", self.pid)).unwrap();
        // After "pid (comm) ": state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let state = f[0].chars().next().unwrap();
        let ticks = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        (state, ticks)
    }

    fn wchan(&self, tid: u32) -> String {
        std::fs::read_to_string(format!("/proc/{}/task/{tid}/wchan", self.pid)).unwrap_or_default()
    }

    /// Assert the watcher sleeps and uses at most one tick over `span`.
    fn assert_idle(&self, span: Duration, what: &str) {
        let tid = self.follow_tid();
        // Let it settle into its sleep.
        std::thread::sleep(Duration::from_millis(200));
        let (_, before) = self.follow_stat(tid);
        std::thread::sleep(span);
        let (state, after) = self.follow_stat(tid);
        let wchan = self.wchan(tid);
        eprintln!(
            "{what}: {THREAD} (tid {tid}) state {state}, wchan {wchan:?}, {} ticks in {span:?}",
            after - before
        );
        assert_eq!(
            state, 'S',
            "{what}: the watcher is not asleep (wchan {wchan:?})"
        );
        assert!(
            after - before <= 1,
            "{what}: the watcher used {} ticks of CPU in {span:?} while nothing changed:\n{}",
            after - before,
            self.stderr()
        );
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_running_program_moves_onto_a_replica_made_later() {
    let d = Daemon::start("");
    let dir = scratch("follow-later");
    let data = dir.path().join("data.bin");
    make_file(&data, 2 << 20, 11);
    let run_dir = d.run_dir.path();

    let follows = Holder::start(&d.socket, &data, &[], dir.path().join("follows.log"));
    let stays = Holder::start(
        &d.socket,
        &data,
        &[("REPLICAD_FOLLOW", "0")],
        dir.path().join("stays.log"),
    );
    // Nothing is replicated yet: both are on the file.
    assert!(!follows.on_replica(run_dir), "{}", follows.line());
    assert!(!stays.on_replica(run_dir), "{}", stays.line());
    // The watcher is up before anything changes (else this proves nothing).
    follows.follow_tid();

    d.ctl_ok(&["replicate", data.to_str().unwrap()]);
    let took = follows.wait_on_replica(run_dir, Duration::from_secs(2));
    assert!(
        took.is_some(),
        "the running program did not move onto the replica within 2 s: {}\n{}",
        follows.line(),
        follows.stderr()
    );
    eprintln!("moved onto the replica {took:?} after the replicate");
    assert!(
        follows
            .stderr()
            .contains("follow: 1 of 1 ranges now on node"),
        "{}",
        follows.stderr()
    );

    // Without the watcher nothing moves it: it stays on the file.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !stays.on_replica(run_dir),
        "REPLICAD_FOLLOW=0 moved anyway: {}\n{}",
        stays.line(),
        stays.stderr()
    );
    assert!(
        !stays
            .stderr()
            .lines()
            .any(|l| l.contains(&format!("[{}]: follow", stays.pid))),
        "{}",
        stays.stderr()
    );
}

#[test]
fn a_program_started_before_the_daemon_attaches_once_it_runs() {
    let dir = scratch("follow-before");
    let data = dir.path().join("data.bin");
    make_file(&data, 2 << 20, 12);
    let run_dir = tempfile::Builder::new()
        .prefix("replicad-run-")
        .tempdir()
        .unwrap();
    let socket = run_dir.path().join("replicad.sock");
    // Not even the run directory exists yet: the shim watches its parent.
    let away = run_dir.path().with_extension("away");
    std::fs::rename(run_dir.path(), &away).unwrap();

    let h = Holder::start(&socket, &data, &[], dir.path().join("holder.log"));
    assert!(
        h.stderr().contains("no replicad at"),
        "the shim found a daemon: {}",
        h.stderr()
    );
    // No daemon: asleep on inotify, no CPU.
    h.assert_idle(Duration::from_secs(2), "no daemon, no run directory");

    std::fs::rename(&away, run_dir.path()).unwrap();
    let d = Daemon::start_in(run_dir, "", true);
    d.ctl_ok(&["replicate", data.to_str().unwrap()]);
    let took = h.wait_on_replica(d.run_dir.path(), Duration::from_secs(2));
    assert!(
        took.is_some(),
        "the program did not attach to the daemon started after it: {}\n{}",
        h.line(),
        h.stderr()
    );
    eprintln!("attached {took:?} after the replicate");
}

#[test]
fn the_watcher_sleeps_without_cpu_while_nothing_changes() {
    let d = Daemon::start("");
    let dir = scratch("follow-idle");
    let data = dir.path().join("data.bin");
    let other = dir.path().join("other.bin");
    make_file(&data, 1 << 20, 13);
    make_file(&other, 1 << 20, 14);
    d.ctl_ok(&["replicate", other.to_str().unwrap()]);
    let h = Holder::start(&d.socket, &data, &[], dir.path().join("holder.log"));
    h.assert_idle(Duration::from_secs(3), "daemon running, nothing changing");

    // And it is the wake, not a poll, that moves it.
    d.ctl_ok(&["replicate", data.to_str().unwrap()]);
    assert!(
        h.wait_on_replica(d.run_dir.path(), Duration::from_secs(2))
            .is_some(),
        "{}\n{}",
        h.line(),
        h.stderr()
    );
    h.assert_idle(Duration::from_secs(3), "attached, nothing changing");
}

#[test]
fn unshare_of_a_user_namespace_works_under_the_shim() {
    let d = Daemon::start("");
    let dir = scratch("follow-unshare");
    let data = dir.path().join("data.bin");
    make_file(&data, 1 << 20, 15);
    let run = |shim: bool| -> Value {
        let mut c = Command::new(program(PROBE));
        c.arg("unshare")
            .arg(&data)
            .env("REPLICAD_SOCKET", &d.socket)
            .env_remove("LD_PRELOAD");
        if shim {
            c.env("LD_PRELOAD", shim_path());
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
    };
    let plain = run(false);
    if plain["unshare"] != 0 {
        skip(
            "unshare_of_a_user_namespace_works_under_the_shim",
            &format!(
                "unshare(CLONE_NEWUSER) fails here without the shim (errno {}): user \
                 namespaces are off",
                plain["unshare"]
            ),
        );
        return;
    }
    let shimmed = run(true);
    assert_eq!(shimmed["follow_before"], true, "{shimmed}");
    assert_eq!(
        shimmed["unshare"], 0,
        "unshare failed under the shim: {shimmed}"
    );
    assert_eq!(shimmed["follow_after_unshare"], false, "{shimmed}");
    assert_eq!(shimmed["follow_after_mmap"], true, "{shimmed}");
}

#[test]
fn a_fork_child_starts_its_own_watcher_when_it_maps_a_file() {
    let d = Daemon::start("");
    let dir = scratch("follow-fork");
    let data = dir.path().join("data.bin");
    make_file(&data, 1 << 20, 16);
    let out = Command::new(program(PROBE))
        .arg("fork")
        .arg(&data)
        .env("LD_PRELOAD", shim_path())
        .env("REPLICAD_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(v["follow_parent"], true, "{v}");
    assert_eq!(v["read"], 2, "{v}");
    assert_eq!(v["follow_child_at_fork"], false, "{v}");
    assert_eq!(v["follow_child_after_mmap"], true, "{v}");
}

/// The dynamic loader maps and unmaps without the shim's wrappers: a
/// `dlopen` or `dlclose` in one thread while the watcher swaps in another
/// must never have a replica moved over a mapping the loader is building
/// or has just unmapped (the swaps run with the loader held still). A
/// python loop loads a copy of libz, calls it and unloads it for 3 s while
/// the test replicates and evicts that copy again and again, so that the
/// shim (the watcher, or the dlopen wrapper with the watcher running)
/// keeps swapping it; the program must end well with every call answered,
/// the library must have been swapped in more than one of its loads (the
/// ranges the loader unmapped were forgotten) and nothing of it may stay
/// mapped after the last `dlclose` (no spare left behind).
#[test]
fn dlopen_and_dlclose_beside_the_watcher_never_break_the_program() {
    if !root_or_skip("dlopen_and_dlclose_beside_the_watcher_never_break_the_program") {
        return;
    }
    let libz = Path::new("/usr/lib/x86_64-linux-gnu/libz.so.1");
    if !libz.exists() {
        skip(
            "dlopen_and_dlclose_beside_the_watcher_never_break_the_program",
            "needs /usr/lib/x86_64-linux-gnu/libz.so.1 (apt-get install zlib1g)",
        );
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("follow-dlopen");
    let copy = dir.path().join("libz-copy.so.1");
    std::fs::copy(libz, &copy).unwrap();
    let script = format!(
        "import ctypes, _ctypes, sys, time\n\
         n = 0\n\
         end = time.monotonic() + 3\n\
         while time.monotonic() < end:\n\
         \x20   h = ctypes.CDLL({copy:?})\n\
         \x20   f = h.zlibVersion\n\
         \x20   f.restype = ctypes.c_char_p\n\
         \x20   assert f().startswith(b'1.'), f()\n\
         \x20   _ctypes.dlclose(h._handle)\n\
         \x20   n += 1\n\
         left = sum('libz-copy' in l for l in open('/proc/self/maps'))\n\
         print('calls', n, 'left', left)\n",
        copy = copy.to_str().unwrap()
    );
    let log = dir.path().join("python.log");
    let child = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .env("LD_PRELOAD", shim_path())
        .env("REPLICAD_SOCKET", &d.socket)
        .env("REPLICAD_DEBUG", "1")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut cycles = 0;
    while t0.elapsed() < Duration::from_millis(2800) {
        d.ctl_ok(&["replicate", copy.to_str().unwrap()]);
        std::thread::sleep(Duration::from_millis(40));
        d.ctl_ok(&["evict", copy.to_str().unwrap()]);
        std::thread::sleep(Duration::from_millis(10));
        cycles += 1;
    }
    let out = child.wait_with_output().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python loading and unloading a replicated library failed ({}) after {cycles} \
         replicate/evict cycles:\n{stdout}\n{stderr}",
        out.status
    );
    let words: Vec<&str> = stdout.split_whitespace().collect();
    let (calls, left): (u64, u64) = match words[..] {
        ["calls", n, "left", l] => (n.parse().unwrap(), l.parse().unwrap()),
        _ => panic!("python printed {stdout:?}\n{stderr}"),
    };
    let swapped = stderr
        .lines()
        .filter(|l| l.contains("ranges now on node") && !l.contains(": 0 of"))
        .filter(|l| l.contains("follow:") || l.contains("dlopen:"))
        .count();
    let held_off = stderr
        .lines()
        .filter(|l| l.contains("the dynamic loader is loading or unloading"))
        .count();
    eprintln!(
        "{calls} load/call/unload rounds, {cycles} replicate/evict cycles, {swapped} hellos \
         that swapped, {held_off} held off while the loader was busy"
    );
    assert!(calls > 0, "{stdout}");
    // Loaded again after an unload (often at the same address), it is
    // swapped again: the shim forgot the ranges the loader unmapped.
    assert!(
        swapped >= 2,
        "the library was swapped {swapped} times over {calls} loads:\n{stderr}"
    );
    // And nothing of it stays mapped after the last unload: no spare (the
    // shim's second mapping of the file, its way back) is left behind.
    assert_eq!(
        left, 0,
        "{left} mappings of the library left after its last dlclose:\n{stderr}"
    );
}
