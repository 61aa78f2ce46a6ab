//! The preload shim (`libreplicad_preload.so`) with unmodified programs:
//! real replicad, real processes, the real kernel.
//!
//! * python3 and a coreutils pipeline under `replicactl run --node 0`: the
//!   text they execute is their node's replica, the daemon lists them as
//!   attached, and their output is the same as without the shim;
//! * libraries loaded after start (`dlopen`, by bare name, by path, as a
//!   dependency) land on replicas too;
//! * coherence: plain-`mmap` readers under the shim never see a stale or
//!   zero word while a writer rewrites the file through every writer path,
//!   and revokes that catch them mid-read never reach them as SIGBUS;
//! * security: no replica of a file the client cannot read (not even
//!   through a connection handed to another process), no way to write a
//!   replica, no way to make the daemon talk about another process;
//! * survival: no daemon, a daemon that hangs up, stalls, or answers
//!   garbage, programs with SIGBUS handlers of their own, a revoke of the
//!   libc the program (and the shim's handler) runs on, and programs that
//!   unmap and map again;
//! * fork and exec keep working and re-attach.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";
/// Debian's python3 has libpython linked into this binary: its r-xp text
/// is the interpreter.
const PYTHON_BIN: &str = "/usr/bin/python3.11";
const LIB: &str = "/usr/lib/x86_64-linux-gnu";

// ---- helpers ------------------------------------------------------------

/// A system file a test needs, canonical; fails loudly when missing.
fn need(path: &str) -> String {
    let p = std::fs::canonicalize(path).unwrap_or_else(|e| {
        panic!(
            "this test needs {path} ({e}); on Debian: apt-get install python3 coreutils \
             libbz2-1.0 libsqlite3-0 liblzma5"
        )
    });
    p.to_str().unwrap().to_string()
}

fn lib(name: &str) -> String {
    need(&format!("{LIB}/{name}"))
}

/// `replicactl run --node 0 --shim <shim> -- args...` against `d`, with
/// the shim explaining itself on stderr.
fn under_shim(d: &Daemon, args: &[&str]) -> Command {
    let mut c = Command::new(REPLICACTL);
    c.arg("--socket")
        .arg(&d.socket)
        .args(["run", "--node", "0", "--shim"])
        .arg(shim_path())
        .arg("--")
        .args(args)
        .env("REPLICAD_DEBUG", "1")
        .env_remove("LD_PRELOAD");
    c
}

/// `setpriv` to nobody, then `args`.
fn as_nobody(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    for a in args {
        c.arg(a.as_ref());
    }
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Lines of a child's pipe, read on a thread, with time-outs.
struct Lines {
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// Lines read while waiting for another: kept for a later `until`.
    unclaimed: Vec<String>,
}

impl Lines {
    fn new(r: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
            unclaimed: Vec::new(),
        }
    }

    /// The next line that satisfies `pred` (lines before it are kept). Two
    /// processes may share the pipe, so a line that came before one asked
    /// for earlier still counts, once.
    fn until(&mut self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        if let Some(i) = self.unclaimed.iter().position(|l| pred(l)) {
            return self.unclaimed.remove(i);
        }
        let t0 = Instant::now();
        loop {
            let left = limit.saturating_sub(t0.elapsed());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                    self.unclaimed.push(l);
                }
                Err(e) => panic!(
                    "no {what} within {limit:?} ({e}); lines so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Every line, once the writer has closed the pipe.
    fn all(mut self) -> Vec<String> {
        while let Ok(l) = self.rx.recv_timeout(Duration::from_secs(30)) {
            self.seen.push(l);
        }
        self.seen
    }
}

/// The status as `replicactl status --json` prints it.
fn status_json(d: &Daemon) -> Value {
    serde_json::from_str(&d.ctl_ok(&["status", "--json"])).unwrap()
}

fn source<'a>(st: &'a Value, path: &str) -> &'a Value {
    st["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["path"] == path)
        .unwrap_or_else(|| panic!("{path} is not in the status: {st:#}"))
}

/// The file of `path`'s valid node0 replica of the current generation.
fn replica_file(st: &Value, path: &str) -> String {
    let s = source(st, path);
    s["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["target"] == "node0" && r["state"] == "valid" && r["generation"] == s["generation"]
        })
        .unwrap_or_else(|| panic!("no valid node0 replica of {path}: {s:#}"))["file"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Pids attached to `path`'s replicas.
fn attached(st: &Value, path: &str) -> Vec<u64> {
    source(st, path)["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["attachments"].as_array().unwrap().clone())
        .map(|p| p.as_u64().unwrap())
        .collect()
}

fn maps_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap()
}

/// The maps line holding `addr`.
fn line_at(maps: &str, addr: u64) -> Option<String> {
    maps.lines()
        .find(|l| {
            let Some((s, e)) = l.split(' ').next().and_then(|r| r.split_once('-')) else {
                return false;
            };
            let (s, e) = (
                u64::from_str_radix(s, 16).unwrap(),
                u64::from_str_radix(e, 16).unwrap(),
            );
            s <= addr && addr < e
        })
        .map(String::from)
}

fn perms(line: &str) -> &str {
    line.split_whitespace().nth(1).unwrap_or("")
}

/// The path of a maps line (may hold spaces).
fn path_of(line: &str) -> &str {
    let mut rest = line;
    for _ in 0..5 {
        rest = rest.trim_start();
        rest = &rest[rest.find(' ').unwrap_or(rest.len())..];
    }
    rest.trim()
}

/// Assert the mapping holding `addr` in `pid` is `replica`'s text (r-xp),
/// and that `replica` lies in the daemon's node0 store.
fn assert_text_on(d: &Daemon, pid: u32, addr: u64, replica: &str, what: &str) {
    let node0 = d.run_dir.path().join("node0");
    assert!(
        Path::new(replica).starts_with(&node0),
        "{what}: replica {replica} is not under {}",
        node0.display()
    );
    let maps = maps_of(pid);
    let line = line_at(&maps, addr)
        .unwrap_or_else(|| panic!("{what}: {addr:#x} is not mapped in {pid}:\n{maps}"));
    assert_eq!(
        (perms(&line), path_of(&line)),
        ("r-xp", replica),
        "{what}: {addr:#x} of pid {pid} is not on the node0 replica: {line}\n{maps}"
    );
}

/// The program counter of `pid`'s main thread once it sleeps in a system
/// call (`/proc/<pid>/syscall`: number, six arguments, sp, pc).
fn pc_in_syscall(pid: u32) -> u64 {
    let t0 = Instant::now();
    loop {
        let s = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        let f: Vec<&str> = s.split_whitespace().collect();
        if f.len() == 9 && f[0].parse::<i64>().is_ok_and(|n| n >= 0) {
            return u64::from_str_radix(f[8].trim_start_matches("0x"), 16).unwrap();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "pid {pid} never slept in a system call: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The program's entry point (`AT_ENTRY` in `/proc/<pid>/auxv`).
fn entry_point(pid: u32) -> u64 {
    let auxv = std::fs::read(format!("/proc/{pid}/auxv")).unwrap();
    auxv.chunks_exact(16)
        .map(|c| {
            (
                u64::from_ne_bytes(c[..8].try_into().unwrap()),
                u64::from_ne_bytes(c[8..].try_into().unwrap()),
            )
        })
        .find(|(k, _)| *k == libc::AT_ENTRY)
        .map(|(_, v)| v)
        .unwrap()
}

/// Wait until `pid` runs `exe` (a `replicactl run` has exec'd).
fn wait_exec(pid: u32, exe: &str) {
    let t0 = Instant::now();
    while std::fs::read_link(format!("/proc/{pid}/exe")).ok() != Some(PathBuf::from(exe)) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "pid {pid} never became {exe}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The shim's summary line for `pid` in `stderr`: `(done, offered)`.
fn attach_summaries(stderr: &str, pid: u32, why: &str) -> Vec<(u64, u64)> {
    let prefix = format!("replicad-preload[{pid}]: {why}: ");
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter(|l| l.contains(" ranges now on node "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[2].parse().unwrap())
        })
        .collect()
}

/// A data file of `pages` pages in the pattern of pattern.rs, version 1,
/// and a control file saying version 1 is complete.
fn pattern_files(dir: &Path, pages: u64) -> (PathBuf, PathBuf) {
    let file = dir.join("data");
    let mut data = Vec::with_capacity((pages * 4096) as usize);
    for p in 0..pages {
        for w in 0..512u64 {
            data.extend_from_slice(&((1u64 << 32) | (p << 9) | w).to_le_bytes());
        }
    }
    std::fs::write(&file, data).unwrap();
    let control = dir.join("control");
    let mut c = vec![0u8; 24];
    c[0] = 1; // completed = 1
    c[8] = 1; // started = 1
    std::fs::write(&control, c).unwrap();
    (file, control)
}

fn stop_readers(control: &Path) {
    use std::os::unix::fs::FileExt;
    let c = std::fs::OpenOptions::new()
        .write(true)
        .open(control)
        .unwrap();
    c.write_all_at(&1u64.to_le_bytes(), 16).unwrap();
}

/// Run the writer program; its JSON report (after asserting it succeeded).
fn run_writer(d: &Daemon, file: &Path, control: &Path, rounds: u64, paths: &str) -> Value {
    let out = Command::new(program("replicad-writer"))
        .arg(file)
        .arg(control)
        .arg(rounds.to_string())
        .args(["--paths", paths, "--socket"])
        .arg(&d.socket)
        .arg("--wait-replica")
        .output()
        .unwrap();
    let report = text(&out.stdout);
    assert!(
        out.status.success(),
        "writer failed ({}): {report}\n{}\ndaemon log:\n{}",
        out.status,
        text(&out.stderr),
        d.log()
    );
    let w = json(&report);
    // Every write-open found every replica already revoked: the writer
    // waited for the fence.
    assert_eq!(w["violations"].as_array().unwrap().len(), 0, "{w}");
    assert_eq!(w["regen_timeouts"], 0, "{w}");
    assert_eq!(w["regen_n"], rounds, "{w}");
    w
}

// ---- 1. real programs ---------------------------------------------------

const WORK_PY: &str = r#"
import ctypes, hashlib, json, os, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 16), b""):
        h.update(chunk)
print("sha256", h.hexdigest())
xs = [(i * 7919 + 13) % 100003 for i in range(50000)]
xs.sort()
print("sorted", xs[:4], xs[-4:], sum(xs))
doc = {"name": "replicad", "values": xs[:64], "nested": {"a": [1, 2.5, None, True], "s": "\u00e9\u2603"}}
back = json.loads(json.dumps(doc, sort_keys=True))
print("json", back == doc, hashlib.sha256(json.dumps(back, sort_keys=True).encode()).hexdigest())
libc = ctypes.CDLL(None)
print("getpid agrees", libc.getpid() == os.getpid())
addr_libc = ctypes.cast(libc.getpid, ctypes.c_void_p).value
addr_py = ctypes.cast(ctypes.pythonapi.Py_GetVersion, ctypes.c_void_p).value
sys.stdout.write("ADDR %d %x %x\n" % (os.getpid(), addr_libc, addr_py))
sys.stdout.flush()
sys.stdin.readline()
print("after pause", sum(x * x for x in xs) % 1000003)
"#;

#[test]
fn python_runs_on_replicas_with_the_same_output() {
    if !root_or_skip("python_runs_on_replicas_with_the_same_output") {
        return;
    }
    need(PYTHON);
    let python = need(PYTHON_BIN);
    let libc_so = lib("libc.so.6");
    let mut files = vec![libc_so.clone(), python.clone()];
    files.extend(["libm.so.6", "libz.so.1", "libexpat.so.1"].map(lib));
    let d = Daemon::start("");
    let dir = scratch("shim-python");
    let data = dir.path().join("data");
    make_file(&data, 4 << 20, 7);
    let script = dir.path().join("work.py");
    std::fs::write(&script, WORK_PY).unwrap();
    let mut args = vec!["replicate"];
    args.extend(files.iter().map(String::as_str));
    d.ctl_ok(&args);

    let strip = |out: &[String]| -> Vec<String> {
        out.iter()
            .filter(|l| !l.starts_with("ADDR "))
            .cloned()
            .collect()
    };
    let base = Command::new(PYTHON)
        .arg(&script)
        .arg(&data)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(base.status.success(), "{}", text(&base.stderr));
    let base_lines: Vec<String> = text(&base.stdout).lines().map(String::from).collect();

    let mut child = under_shim(
        &d,
        &[PYTHON, script.to_str().unwrap(), data.to_str().unwrap()],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let pid = child.id();
    let mut out = Lines::new(child.stdout.take().unwrap());
    let err = Lines::new(child.stderr.take().unwrap());
    let addr = out.until("ADDR line", Duration::from_secs(30), |l| {
        l.starts_with("ADDR ")
    });
    let f: Vec<&str> = addr.split_whitespace().collect();
    assert_eq!(
        f[1].parse::<u32>().unwrap(),
        pid,
        "replicactl run did not exec"
    );
    let (a_libc, a_py) = (
        u64::from_str_radix(f[2], 16).unwrap(),
        u64::from_str_radix(f[3], 16).unwrap(),
    );
    // The program is paused on stdin: look at it.
    let st = status_json(&d);
    assert_text_on(&d, pid, a_libc, &replica_file(&st, &libc_so), "libc getpid");
    assert_text_on(&d, pid, a_py, &replica_file(&st, &python), "Py_GetVersion");
    // Where it sleeps (libc's read) is the replica too.
    let pc = pc_in_syscall(pid);
    assert_text_on(&d, pid, pc, &replica_file(&st, &libc_so), "pc in read(2)");
    for f in [&libc_so, &python] {
        assert!(
            attached(&st, f).contains(&u64::from(pid)),
            "status does not list pid {pid} as attached to {f}: {st:#}"
        );
    }
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    let stderr = err.all().join("\n");
    assert!(status.success(), "{status}\n{stderr}");
    assert_eq!(
        strip(&out.all()),
        strip(&base_lines),
        "output differs under the shim; stderr:\n{stderr}"
    );
    let sums = attach_summaries(&stderr, pid, "start");
    assert!(
        matches!(sums.first(), Some((done, offered)) if *done > 0 && done == offered),
        "no complete attach at start: {sums:?}\n{stderr}"
    );
}

/// Text lines `%016x %07d\n` from a xorshift stream.
fn make_lines(path: &Path, lines: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..lines {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        writeln!(f, "{x:016x} {:07}", i % 9_999_999).unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
}

#[test]
fn coreutils_pipeline_runs_on_replicas_with_the_same_output() {
    if !root_or_skip("coreutils_pipeline_runs_on_replicas_with_the_same_output") {
        return;
    }
    let sort = need("/usr/bin/sort");
    let sha = need("/usr/bin/sha256sum");
    let libc_so = lib("libc.so.6");
    let d = Daemon::start("");
    // sort's program and libraries, found from a running sort.
    let mut idle = Command::new(&sort)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_exec(idle.id(), &sort);
    let t0 = Instant::now();
    while !maps_of(idle.id()).contains("libc.so.6") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "sort never mapped libc"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    d.ctl_ok(&["replicate", "--pid", &idle.id().to_string()]);
    idle.kill().unwrap();
    idle.wait().unwrap();
    d.ctl_ok(&["replicate", &sha]);
    let st = status_json(&d);
    for f in [&sort, &libc_so, &sha] {
        replica_file(&st, f);
    }

    let dir = scratch("shim-coreutils");
    let input = dir.path().join("input");
    make_lines(&input, 1_000_000); // 25 MB
    let len = std::fs::metadata(&input).unwrap().len() as usize;

    // Without the shim.
    let mut base_sort = Command::new(&sort)
        .env("LC_ALL", "C")
        .stdin(std::fs::File::open(&input).unwrap())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let base = Command::new(&sha)
        .stdin(base_sort.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(base_sort.wait().unwrap().success());
    assert!(base.status.success());

    // With it: sort | sha256sum, each under `replicactl run`, fed by us so
    // that both wait (sort for its last MiB, sha256sum for sort) while we
    // look.
    let mut sorter = under_shim(&d, &[&sort])
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let summer = under_shim(&d, &[&sha])
        .stdin(sorter.stdout.take().unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sort_err = Lines::new(sorter.stderr.take().unwrap());
    let mut stdin = sorter.stdin.take().unwrap();
    let (fed_tx, fed_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let input2 = input.clone();
    let feeder = std::thread::spawn(move || {
        let data = std::fs::read(&input2).unwrap();
        let hold = len - (1 << 20);
        stdin.write_all(&data[..hold]).unwrap();
        fed_tx.send(()).unwrap();
        let _ = go_rx.recv();
        stdin.write_all(&data[hold..]).unwrap();
    });
    fed_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let st = status_json(&d);
    for (pid, exe) in [(sorter.id(), &sort), (summer.id(), &sha)] {
        wait_exec(pid, exe);
        let pc = pc_in_syscall(pid);
        assert_text_on(&d, pid, pc, &replica_file(&st, &libc_so), "pc in read(2)");
        assert_text_on(
            &d,
            pid,
            entry_point(pid),
            &replica_file(&st, exe),
            "the program's entry point",
        );
        let st = status_json(&d);
        assert!(
            attached(&st, &libc_so).contains(&u64::from(pid)),
            "status does not list {exe} (pid {pid}) as attached to libc: {st:#}"
        );
    }
    go_tx.send(()).unwrap();
    feeder.join().unwrap();
    let sort_pid = sorter.id();
    let st_sort = sorter.wait().unwrap();
    let sort_stderr = sort_err.all().join("\n");
    assert!(st_sort.success(), "sort: {st_sort}\n{sort_stderr}");
    let summer_pid = summer.id();
    let got = summer.wait_with_output().unwrap();
    let sum_stderr = text(&got.stderr);
    assert!(got.status.success(), "sha256sum: {sum_stderr}");
    assert_eq!(
        text(&got.stdout),
        text(&base.stdout),
        "sort | sha256sum differs under the shim"
    );
    for (pid, stderr) in [(sort_pid, &sort_stderr), (summer_pid, &sum_stderr)] {
        let sums = attach_summaries(stderr, pid, "start");
        assert!(
            matches!(sums.first(), Some((done, offered)) if *done > 0 && done == offered),
            "pid {pid}: no complete attach at start: {sums:?}\n{stderr}"
        );
    }
}

// ---- 2. dlopen ------------------------------------------------------------

const DLOPEN_PY: &str = r#"
import ctypes, sys
def line(addr):
    for l in open("/proc/self/maps"):
        s, e = l.split()[0].split("-")
        if int(s, 16) <= addr < int(e, 16):
            return l.rstrip("\n")
def loaded(name):
    return any(name in l for l in open("/proc/self/maps"))
def where(fn):
    return line(ctypes.cast(fn, ctypes.c_void_p).value)
print("loaded at start", loaded("libbz2"), loaded("libsqlite3"), loaded("liblzma"))
bz = ctypes.CDLL("libbz2.so.1.0")
bz.BZ2_bzlibVersion.restype = ctypes.c_char_p
print("bz2", bz.BZ2_bzlibVersion().decode())
print("LINE bz2", where(bz.BZ2_bzlibVersion))
sq = ctypes.CDLL(sys.argv[1])
sq.sqlite3_libversion.restype = ctypes.c_char_p
print("sqlite", sq.sqlite3_libversion().decode())
print("LINE sqlite", where(sq.sqlite3_libversion))
import lzma
blob = b"replicad " * 5000
packed = lzma.compress(blob)
print("lzma", lzma.decompress(packed) == blob, len(packed) < len(blob))
lz = ctypes.CDLL("liblzma.so.5")
print("LINE lzma", where(lz.lzma_version_string))
"#;

#[test]
fn libraries_loaded_later_land_on_replicas() {
    if !root_or_skip("libraries_loaded_later_land_on_replicas") {
        return;
    }
    need(PYTHON);
    let bz2 = lib("libbz2.so.1.0");
    let sqlite = lib("libsqlite3.so.0");
    let lzma = lib("liblzma.so.5");
    let d = Daemon::start("");
    d.ctl_ok(&["replicate", &bz2, &sqlite, &lzma]);
    let st = status_json(&d);
    let dir = scratch("shim-dlopen");
    let script = dir.path().join("dl.py");
    std::fs::write(&script, DLOPEN_PY).unwrap();
    let sqlite_arg = format!("{LIB}/libsqlite3.so.0");

    let base = Command::new(PYTHON)
        .arg(&script)
        .arg(&sqlite_arg)
        .output()
        .unwrap();
    assert!(base.status.success(), "{}", text(&base.stderr));
    let out = under_shim(&d, &[PYTHON, script.to_str().unwrap(), &sqlite_arg])
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let plain = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| !l.starts_with("LINE "))
            .map(String::from)
            .collect()
    };
    assert_eq!(plain(&stdout), plain(&text(&base.stdout)), "{stderr}");
    assert!(
        stdout.contains("loaded at start False False False"),
        "a library was loaded at start: the test proves nothing\n{stdout}"
    );
    for (tag, file, how) in [
        ("bz2", &bz2, "dlopen by bare name"),
        ("sqlite", &sqlite, "dlopen by absolute path"),
        ("lzma", &lzma, "a dependency of a dlopen'ed module"),
    ] {
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("LINE {tag} ")))
            .unwrap_or_else(|| panic!("no LINE {tag}: {stdout}"));
        let replica = replica_file(&st, file);
        assert_eq!(
            (perms(line), path_of(line)),
            ("r-xp", replica.as_str()),
            "{tag} ({how}): its function runs from {line}, not the replica; stderr:\n{stderr}"
        );
        assert!(Path::new(&replica).starts_with(d.run_dir.path().join("node0")));
    }
    assert!(
        stderr.contains("]: dlopen: "),
        "no attach after dlopen in the shim's log:\n{stderr}"
    );
}

// ---- 3. coherence -----------------------------------------------------------

/// Readers under the shim, mapping the file with plain `mmap` each round,
/// while the writer program rewrites it `rounds` times through `paths`.
/// Returns the readers' final reports (after the common checks).
fn mmap_readers_under_writes(
    tag: &str,
    kinds: &[&str],
    rounds: u64,
    paths: &str,
    handler: bool,
) -> Vec<Value> {
    let d = Daemon::start("");
    let dir = scratch(tag);
    let (file, control) = pattern_files(dir.path(), 256);
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    let reader = program("replicad-mmap-reader");
    let mut readers: Vec<(Child, Lines, &str)> = kinds
        .iter()
        .map(|&kind| {
            let mut args = vec![
                reader.to_str().unwrap(),
                "verify",
                file.to_str().unwrap(),
                control.to_str().unwrap(),
                "120",
                kind,
            ];
            if !handler {
                args.push("no-handler");
            }
            let mut c = under_shim(&d, &args)
                .env_remove("REPLICAD_DEBUG")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let lines = Lines::new(c.stdout.take().unwrap());
            (c, lines, kind)
        })
        .collect();
    // Each reader is on the replica before the first write.
    for (_, lines, kind) in &mut readers {
        let first = json(&lines.until("first round", Duration::from_secs(30), |l| {
            l.contains("\"first\":true")
        }));
        assert_eq!(
            first["on_replica"], true,
            "{kind} reader's first mapping is not the replica: {first}"
        );
        assert_eq!(first["version"], 1, "{first}");
    }
    // One write at a time, with a pause after each new generation is
    // replicated: the readers move onto it, so that the next revoke finds
    // them reading a replica (else it finds them still on the file).
    let paths: Vec<&str> = paths.split(',').collect();
    for round in 0..rounds {
        let how = paths[round as usize % paths.len()];
        let w = run_writer(&d, &file, &control, 1, how);
        assert_eq!(w[how]["n"], 1, "{how}: {w}");
        eprintln!("writer round {round}: {w}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Readers run on the last generation's replica for a moment.
    std::thread::sleep(Duration::from_millis(300));
    stop_readers(&control);
    let mut reports = Vec::new();
    for (mut c, lines, kind) in readers {
        let status = c.wait().unwrap();
        let all = lines.all();
        let r = all.last().map(|l| json(l)).unwrap_or(Value::Null);
        eprintln!("{kind} reader: {r}");
        assert!(
            status.success(),
            "a {kind} reader failed ({status}; a signal means a fault reached it): {r}"
        );
        assert_eq!(
            r["bad_words"], 0,
            "a {kind} reader saw a stale, zero or foreign word: {r}"
        );
        assert!(r["words"].as_u64().unwrap() > 0, "{r}");
        assert!(r["replica_rounds_v1"].as_u64().unwrap() > 0, "{r}");
        assert!(
            r["replica_rounds_new"].as_u64().unwrap() > 0,
            "a {kind} reader never mapped a new generation's replica: {r}"
        );
        assert!(
            r["fallback_rounds"].as_u64().unwrap() > 0,
            "no revoke ever caught the {kind} reader on a replica mid-read: \
             the fallback was not exercised: {r}"
        );
        reports.push(r);
    }
    let st = d.status();
    assert_eq!(st.sources[0].generation, rounds + 1, "{st:?}");
    reports
}

/// Plain-`mmap` readers (private and shared) never see a stale or zero
/// word while the writer goes through every writer path; each write-open
/// finds the replicas already revoked (the writer checks).
#[test]
fn plain_mmap_readers_under_the_shim_stay_coherent() {
    if !root_or_skip("plain_mmap_readers_under_the_shim_stay_coherent") {
        return;
    }
    let reports = mmap_readers_under_writes(
        "shim-coherence",
        &["private", "shared", "private", "shared"],
        // Each of the four readers must be caught mid-read by some revoke:
        // with 8 rounds one was not in about 1 run of 15 (measured over 80
        // runs of this file); 24 make that about 1 in 3000.
        24,
        "wronly,trunc,truncate,mmap",
        true,
    );
    for r in &reports {
        eprintln!(
            "{} reader: {} rounds fell back to the file mid-read, {} torn by a shrinking write",
            r["kind"], r["fallback_rounds"], r["torn_rounds"]
        );
    }
}

/// The same with writers that never shrink the file, and readers with no
/// SIGBUS handler of their own: every fault a revoke causes must be the
/// shim's to fix; one that reached the program would kill it.
#[test]
fn plain_mmap_readers_without_a_handler_never_see_a_revoke() {
    if !root_or_skip("plain_mmap_readers_without_a_handler_never_see_a_revoke") {
        return;
    }
    let reports = mmap_readers_under_writes(
        "shim-coherence-nohandler",
        &["private", "shared"],
        // Each reader must be caught mid-read by some revoke: enough
        // rounds that a loaded machine, where a reader is slow to move
        // onto each new generation, still gives it the chance (6 once
        // gave none, with every test running at once).
        12,
        "wronly,mmap",
        false,
    );
    for r in &reports {
        assert_eq!(r["torn_rounds"], 0, "{r}");
    }
}

// ---- 4. security ----------------------------------------------------------

/// A 0755 scratch directory with root's 0600 `secret` and a 0644 `public`,
/// both replicated.
fn secret_and_public(d: &Daemon, tag: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = scratch(tag);
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let secret = dir.path().join("secret");
    make_file(&secret, 64 << 10, 3);
    std::fs::set_permissions(&secret, PermissionsExt::from_mode(0o600)).unwrap();
    let public = dir.path().join("public");
    make_file(&public, 64 << 10, 4);
    std::fs::set_permissions(&public, PermissionsExt::from_mode(0o644)).unwrap();
    d.ctl_ok(&[
        "replicate",
        secret.to_str().unwrap(),
        public.to_str().unwrap(),
        &lib("libc.so.6"),
    ]);
    (dir, secret, public)
}

/// `replicad-probe ARGS` as nobody under the shim; its last JSON line.
fn probe_as_nobody(d: &Daemon, args: &[&str]) -> (Value, Output) {
    let probe = program("replicad-probe");
    let mut full: Vec<&str> = vec![probe.to_str().unwrap()];
    full.extend(args);
    let run = under_shim(d, &full);
    let mut cmd = as_nobody(&[&run.get_program()]);
    cmd.args(run.get_args());
    for (k, v) in run.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().unwrap();
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "replicad-probe {args:?} printed nothing ({}): {}",
            out.status,
            text(&out.stderr)
        )
    });
    (json(last), out)
}

fn ino(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

#[test]
fn no_replica_of_a_file_the_client_cannot_read() {
    if !root_or_skip("no_replica_of_a_file_the_client_cannot_read") {
        return;
    }
    let d = Daemon::start("");
    let (_dir, secret, public) = secret_and_public(&d, "shim-secret");
    let (r, out) = probe_as_nobody(&d, &["open", secret.to_str().unwrap()]);
    assert_eq!(r["opened"], false, "nobody opened root's 0600 file: {r}");
    assert_eq!(r["errno"], libc::EACCES, "{r}");
    // The shim in the same process attached (libc): the shim works for
    // nobody, so what it does not get is withheld, not missed.
    assert!(
        text(&out.stderr).contains(" ranges now on node 0 replicas"),
        "{}",
        text(&out.stderr)
    );
    let (r, out) = probe_as_nobody(&d, &["hello", "--map", public.to_str().unwrap()]);
    assert_eq!(r["answer"], "attached", "{r}\n{}", text(&out.stderr));
    let ranges = r["ranges"].as_array().unwrap();
    assert!(
        ranges.iter().any(|x| x["ino"] == ino(&public)),
        "the public file it maps is not offered: {r}"
    );
    assert!(
        !ranges.iter().any(|x| x["ino"] == ino(&secret)),
        "nobody was offered root's 0600 file: {r}"
    );
    assert!(
        ranges.iter().all(|x| x["inside_own_maps"] == true),
        "a range outside the caller's own maps: {r}"
    );
    let st = status_json(&d);
    assert!(
        attached(&st, secret.to_str().unwrap()).is_empty(),
        "someone is attached to the secret: {st:#}"
    );
}

/// Invariant 5 against a client that hands its connection to another
/// process: nobody connects, forks, and the parent execs a set-user-ID
/// program that maps root's 0600 file, keeping the pid the daemon knows
/// the connection by; the child asks Hello on the inherited socket.
#[test]
fn a_handed_on_connection_gets_no_replica_of_an_unreadable_file() {
    if !root_or_skip("a_handed_on_connection_gets_no_replica_of_an_unreadable_file") {
        return;
    }
    let d = Daemon::start("");
    let (dir, secret, _public) = secret_and_public(&d, "shim-inherit");
    // A set-user-ID root copy of the probe, to run `hold SECRET`.
    let suid = dir.path().join("probe-suid");
    std::fs::copy(program("replicad-probe"), &suid).unwrap();
    std::fs::set_permissions(&suid, PermissionsExt::from_mode(0o4755)).unwrap();
    let mut child = as_nobody(&[
        &program("replicad-probe"),
        &"inherit",
        &secret,
        &suid,
        &"hold",
        &secret,
    ])
    .env("REPLICAD_SOCKET", &d.socket)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = Lines::new(child.stdout.take().unwrap());
    let held = json(&lines.until("held line", Duration::from_secs(10), |l| {
        l.contains("\"held\"")
    }));
    assert_eq!(
        held["uid"], 0,
        "the set-user-ID probe does not run as root (is /var/tmp nosuid?): {held}"
    );
    let report = json(
        &lines.until("inherit report", Duration::from_secs(10), |l| {
            l.contains("\"inherit\"")
        }),
    );
    drop(child.stdin.take());
    let _ = child.wait();
    // The hello got through to the daemon and was refused: the connection
    // is the set-user-ID program's now, not its child's.
    assert_eq!(
        (&report["last"]["answer"], &report["last"]["kind"]),
        (&Value::from("error"), &Value::from("PermissionDenied")),
        "{report}"
    );
    assert_eq!(
        (
            report["ranges_of_file"].as_u64(),
            report["leaked_bytes"].as_u64()
        ),
        (Some(0), Some(0)),
        "a process running as nobody got root's 0600 file through a connection \
         whose peer pid now runs a set-user-ID program: {report}"
    );
}

#[test]
fn replicas_cannot_be_written_through_the_shim_or_the_fds() {
    if !root_or_skip("replicas_cannot_be_written_through_the_shim_or_the_fds") {
        return;
    }
    let d = Daemon::start("");
    let (_dir, _secret, public) = secret_and_public(&d, "shim-rofd");
    let before = std::fs::read(&public).unwrap();
    let (r, out) = probe_as_nobody(&d, &["mprotect", public.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(r["shared"]["on_replica"], true, "{r}\n{stderr}");
    assert_eq!(
        r["shared"]["mprotect_rw_errno"],
        libc::EACCES,
        "a MAP_SHARED replica mapping became writable: {r}"
    );
    assert_eq!(r["private"]["on_replica"], true, "{r}\n{stderr}");
    // A private mapping may be made writable: the write lands in a private
    // copy, never in the replica or the file.
    assert_eq!(r["private"]["wrote"], true, "{r}");
    let st = status_json(&d);
    let replica = replica_file(&st, public.to_str().unwrap());
    assert_eq!(
        std::fs::read(&replica).unwrap(),
        before,
        "the replica changed"
    );
    assert_eq!(std::fs::read(&public).unwrap(), before, "the file changed");

    let (r, _) = probe_as_nobody(
        &d,
        &["hello", "--map", public.to_str().unwrap(), "--try-writes"],
    );
    assert_eq!(r["answer"], "attached", "{r}");
    let writes = r["writes"].as_array().unwrap();
    assert!(writes.len() >= 2, "no fds came back: {r}");
    for w in writes {
        assert_eq!(w["accmode_rdonly"], true, "{w}");
        for how in [
            "write",
            "pwrite",
            "ftruncate",
            "mmap_shared_rw",
            "reopen_wronly",
        ] {
            assert_ne!(w[how], 0, "{how} through a returned fd worked: {w}");
        }
        assert_eq!(w["mmap_shared_rw"], libc::EACCES, "{w}");
        // A replica: EPERM, not EACCES: it is immutable, which the kernel
        // checks before the mode (and which stops root too). A source
        // (the way back): its mode.
        let replica = w["file"]
            .as_str()
            .is_some_and(|f| std::path::Path::new(f).starts_with(d.run_dir.path()));
        let want = if replica { libc::EPERM } else { libc::EACCES };
        assert_eq!(w["reopen_wronly"], want, "{w}");
    }
    assert_eq!(
        std::fs::read(&replica).unwrap(),
        before,
        "the replica changed"
    );
    assert_eq!(std::fs::read(&public).unwrap(), before, "the file changed");
}

#[test]
fn hello_only_ever_concerns_the_caller() {
    if !root_or_skip("hello_only_ever_concerns_the_caller") {
        return;
    }
    let d = Daemon::start("");
    let (_dir, _secret, public) = secret_and_public(&d, "shim-caller");
    // A Hello naming a pid (an unknown field) is a bad request.
    let (r, _) = probe_as_nobody(&d, &["hello", "--extra-field"]);
    assert_eq!(r["answer"], "error", "{r}");
    assert_eq!(r["kind"], "BadRequest", "{r}");
    // So is a Hello with an fd riding along.
    let (r, _) = probe_as_nobody(&d, &["hello", "--with-fd", public.to_str().unwrap()]);
    assert_eq!(r["answer"], "error", "{r}");
    assert_eq!(r["kind"], "BadRequest", "{r}");
    // ReplicatePid is root's.
    let sources_before = d.status().sources.len();
    let (r, _) = probe_as_nobody(&d, &["replicate-pid", &d.pid().to_string()]);
    assert_eq!(r["answer"], "error", "{r}");
    assert_eq!(r["kind"], "PermissionDenied", "{r}");
    assert_eq!(d.status().sources.len(), sources_before);
    // Whatever a Hello returns lies in the caller's own maps, for nobody
    // and for root.
    let (r, _) = probe_as_nobody(&d, &["hello", "--map", public.to_str().unwrap()]);
    let ranges = r["ranges"].as_array().unwrap();
    assert!(!ranges.is_empty(), "{r}");
    assert!(ranges.iter().all(|x| x["inside_own_maps"] == true), "{r}");
    let out = under_shim(
        &d,
        &[
            program("replicad-probe").to_str().unwrap(),
            "hello",
            "--map",
            public.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    let r = json(text(&out.stdout).lines().last().unwrap());
    let ranges = r["ranges"].as_array().unwrap();
    assert!(!ranges.is_empty(), "{r}");
    assert!(ranges.iter().all(|x| x["inside_own_maps"] == true), "{r}");
}

// ---- 5. survival ------------------------------------------------------------

const SURVIVE_PY: &str = r#"
import hashlib, json, bz2, sys
xs = sorted((i * 104729) % 65537 for i in range(20000))
doc = json.loads(json.dumps({"xs": xs[:32], "s": "\u2603"}))
blob = bz2.compress(b"survive " * 1000)
print(hashlib.sha256(repr((xs[:8], sum(xs), doc)).encode()).hexdigest(), bz2.decompress(blob) == b"survive " * 1000)
"#;

/// What the fake daemon does with one connection.
#[derive(Clone, Copy, Debug)]
enum Fake {
    /// Accept and close at once, before reading.
    HangUp,
    /// Answer random bytes.
    Garbage,
    /// A valid header, then a body that is not JSON.
    BadBody,
    /// A proper refusal.
    Refuse,
    /// Attached: ranges at addresses nobody maps, with two real fds.
    RangesNowhere,
    /// Attached: the caller's real libc ranges, no fds.
    MissingFds,
    /// Attached: real ranges naming source 5 of 1.
    SourceOutOfRange,
    /// Attached: real ranges, the "replica" an empty file.
    EmptyReplica,
    /// Attached: real ranges, the replica a copy of libc open read-write.
    WritableReplica,
    /// Attached: real ranges, the replica a read-only copy of libc, and
    /// another file than libc as the way back.
    OtherWayBack,
    /// Read the hello, never answer.
    Stall,
}

struct FakeDaemon {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    hellos: Arc<AtomicUsize>,
}

fn listen(path: &Path) -> OwnedFd {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: fd was just created and is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a valid sockaddr_un of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    // SAFETY: listen on our socket.
    assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 16) }, 0);
    fd
}

/// The peer's r-xp libc ranges, read the way the daemon would.
fn libc_ranges(pid: u32) -> Vec<replicad_client::proto::AttachRange> {
    let maps = maps_of(pid);
    maps.lines()
        .filter_map(replicad_procfs::MapsLine::parse)
        .filter(|l| l.path.ends_with("/libc.so.6") && l.private_readonly_file())
        .map(|l| replicad_client::proto::AttachRange {
            start: l.start,
            end: l.end,
            offset: l.offset,
            dev: l.dev,
            ino: l.ino,
            perms: l.perms_str().to_string(),
            source: 0,
            generation: 1,
        })
        .collect()
}

/// An empty memfd, opened read-only (as replicad hands its replicas).
fn memfd_empty() -> OwnedFd {
    // SAFETY: a valid name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fake-replica".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    OwnedFd::from(std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap())
}

/// A memfd holding a copy of `path`: open read-write as memfd_create made
/// it, or read-only (as replicad hands its replicas).
fn memfd_copy(path: &str, read_only: bool) -> OwnedFd {
    // SAFETY: a valid name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fake-replica".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(fd.try_clone().unwrap())
        .write_all(&std::fs::read(path).unwrap())
        .unwrap();
    if !read_only {
        return fd;
    }
    OwnedFd::from(std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap())
}

fn answer(how: Fake, pid: u32) -> (Vec<u8>, Vec<OwnedFd>) {
    use replicad_client::proto::{AttachRange, ErrorKind, Response};
    let attached = |ranges: Vec<AttachRange>, sources: u32| {
        Response::Attached {
            node: 0,
            sources,
            ranges,
            skipped: vec![],
        }
        .encode()
    };
    let libc_fd = || OwnedFd::from(std::fs::File::open(lib("libc.so.6")).unwrap());
    match how {
        Fake::Garbage => {
            let mut x = 0x1234_5678_9abc_def0u64;
            let bytes = (0..97)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            (bytes, vec![])
        }
        Fake::BadBody => {
            let mut b = replicad_client::proto::MAGIC.to_vec();
            b.extend_from_slice(&replicad_client::proto::VERSION.to_le_bytes());
            b.extend_from_slice(&2u16.to_le_bytes());
            b.extend_from_slice(b"{\"op\":\"attached\",\"node\":0,\"sources\":");
            (b, vec![])
        }
        Fake::Refuse => (
            Response::error(ErrorKind::Internal, "fake daemon says no").encode(),
            vec![],
        ),
        Fake::RangesNowhere => {
            let ranges = [(0x1000u64, 0x3000u64), (0x7ff0_dead_0000, 0x7ff0_dead_4000)]
                .map(|(start, end)| AttachRange {
                    start,
                    end,
                    offset: 0,
                    dev: 1,
                    ino: 2,
                    perms: "r-xp".into(),
                    source: 0,
                    generation: 1,
                })
                .to_vec();
            (attached(ranges, 1), vec![libc_fd(), libc_fd()])
        }
        Fake::MissingFds => (attached(libc_ranges(pid), 1), vec![]),
        Fake::SourceOutOfRange => {
            let mut ranges = libc_ranges(pid);
            for r in &mut ranges {
                r.source = 5;
            }
            (attached(ranges, 1), vec![libc_fd(), libc_fd()])
        }
        Fake::EmptyReplica => (
            attached(libc_ranges(pid), 1),
            vec![memfd_empty(), libc_fd()],
        ),
        Fake::WritableReplica => (
            attached(libc_ranges(pid), 1),
            vec![memfd_copy(&lib("libc.so.6"), false), libc_fd()],
        ),
        Fake::OtherWayBack => (
            attached(libc_ranges(pid), 1),
            vec![
                memfd_copy(&lib("libc.so.6"), true),
                OwnedFd::from(std::fs::File::open(PYTHON_BIN).unwrap()),
            ],
        ),
        Fake::HangUp | Fake::Stall => (vec![], vec![]),
    }
}

impl FakeDaemon {
    fn start(how: Fake) -> FakeDaemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("replicad.sock");
        let listener = listen(&socket);
        let hellos = Arc::new(AtomicUsize::new(0));
        let count = hellos.clone();
        // The thread ends with the test process; the listener with it.
        std::thread::spawn(move || loop {
            // SAFETY: accept4 on our listening socket; checked.
            let c = unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if c < 0 {
                continue;
            }
            // SAFETY: just accepted, ours.
            let conn = unsafe { OwnedFd::from_raw_fd(c) };
            count.fetch_add(1, Ordering::SeqCst);
            if let Fake::HangUp = how {
                continue;
            }
            let Ok(peer) = replicad_client::sock::peer_cred(conn.as_fd()) else {
                continue;
            };
            let Ok(Some(_packet)) = replicad_client::sock::recv(conn.as_fd(), 64 * 1024) else {
                continue;
            };
            if let Fake::Stall = how {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(5));
                    drop(conn);
                });
                continue;
            }
            let (bytes, fds) = answer(how, peer.pid);
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            let _ = replicad_client::sock::send(conn.as_fd(), &bytes, &borrowed);
        });
        FakeDaemon {
            _dir: dir,
            socket,
            hellos,
        }
    }
}

fn python_with_shim(socket: &Path, script: &str) -> Output {
    Command::new(PYTHON)
        .args(["-c", script])
        .env("LD_PRELOAD", shim_path())
        .env("REPLICAD_SOCKET", socket)
        .env("REPLICAD_DEBUG", "1")
        .output()
        .unwrap()
}

/// Every `replicad_attach_total` sample summed: hellos and Map requests.
fn attach_requests(d: &Daemon) -> f64 {
    d.http_get("/metrics")
        .lines()
        .filter(|l| l.starts_with("replicad_attach_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_program_that_maps_nothing_replicated_asks_nothing_until_it_does() {
    let d = Daemon::start_opts("", true);
    let dir = scratch("shim-lazy");
    let data = dir.path().join("data.bin");
    make_file(&data, 3 << 20, 5);
    d.ctl_ok(&["replicate", data.to_str().unwrap()]);
    let before = attach_requests(&d);

    // /bin/true maps nothing replicated: the published set says so, and
    // the shim never talks to the daemon.
    let out = Command::new("/bin/true")
        .env("LD_PRELOAD", shim_path())
        .env("REPLICAD_SOCKET", &d.socket)
        .env("REPLICAD_DEBUG", "1")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("start: nothing this program maps is replicated"),
        "{err}"
    );
    assert_eq!(attach_requests(&d), before, "a hello was sent: {err}");

    // python maps the replicated file later: that mmap says hello and the
    // mapping lands on the replica.
    let script = format!(
        "import mmap\n\
         f = open({data:?}, 'rb')\n\
         m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n\
         print(sum(m[0:4096:512]))\n\
         print(''.join(l for l in open('/proc/self/maps') if {data:?} in l or 'node0/' in l))\n",
        data = data.to_str().unwrap()
    );
    let out = python_with_shim(&d.socket, &script);
    let err = text(&out.stderr);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{err}");
    assert!(
        err.contains("start: nothing this program maps is replicated"),
        "{err}"
    );
    assert!(err.contains("mmap: "), "no hello on the first mmap: {err}");
    let run_dir = d.run_dir.path().to_str().unwrap().to_string();
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(&format!("{run_dir}/node0/")) && l.contains("r--s")),
        "the mapping is not on the replica:\n{stdout}\n{err}"
    );
    let bytes = std::fs::read(&data).unwrap();
    let want: u64 = (0..4096).step_by(512).map(|i| u64::from(bytes[i])).sum();
    assert_eq!(stdout.lines().next().unwrap().trim(), want.to_string());
    assert!(attach_requests(&d) > before);
}

/// The shim's time-out for a hello's answer (client/preload/src/attach.rs
/// ANSWER_TIMEOUT; its connect time-out is 500 ms, and connecting to a
/// listening socket does not wait).
const SHIM_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

#[test]
fn programs_survive_absent_broken_and_lying_daemons() {
    need(PYTHON);
    let t0 = Instant::now();
    let base = Command::new(PYTHON)
        .args(["-c", SURVIVE_PY])
        .output()
        .unwrap();
    let base_took = t0.elapsed();
    assert!(base.status.success(), "{}", text(&base.stderr));
    let want = text(&base.stdout);
    assert!(want.trim_end().ends_with("True"), "{want}");

    // No daemon: the socket does not exist.
    let dir = tempfile::tempdir().unwrap();
    let out = python_with_shim(&dir.path().join("nothing.sock"), SURVIVE_PY);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "no daemon: {stderr}");
    assert_eq!(text(&out.stdout), want, "no daemon: {stderr}");
    assert!(stderr.contains("no replicad at"), "no daemon: {stderr}");

    let cases = [
        (Fake::HangUp, "the program runs on its own mappings"),
        (Fake::Garbage, "the program runs on its own mappings"),
        (Fake::BadBody, "the program runs on its own mappings"),
        (Fake::Refuse, "fake daemon says no"),
        (Fake::RangesNowhere, "no longer mapped: left alone"),
        (
            Fake::MissingFds,
            "the daemon sent 0 fds for 1 files: not attaching",
        ),
        (
            Fake::SourceOutOfRange,
            "the daemon named a file it did not send",
        ),
        (Fake::EmptyReplica, "the replica was revoked meanwhile"),
        (
            Fake::WritableReplica,
            "is refused: it is open read-write, not read-only: left alone",
        ),
        (Fake::OtherWayBack, "is not the file the range maps"),
        (Fake::Stall, "the program runs on its own mappings"),
    ];
    for (how, says) in cases {
        let fake = FakeDaemon::start(how);
        let t0 = Instant::now();
        let out = python_with_shim(&fake.socket, SURVIVE_PY);
        let took = t0.elapsed();
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{how:?}: {}\n{stderr}", out.status);
        assert_eq!(text(&out.stdout), want, "{how:?}: {stderr}");
        assert!(
            fake.hellos.load(Ordering::SeqCst) > 0,
            "{how:?}: the shim never connected: {stderr}"
        );
        assert!(
            stderr.contains(says),
            "{how:?}: the shim's log does not say {says:?}:\n{stderr}"
        );
        // Each hello waits at most the shim's answer time-out (1 s): the
        // run may take the program's own time plus 1 s per hello, with 2 s
        // of slack for a loaded 2-core machine (1 hello, a stalling daemon:
        // < 3 s over the program's own time).
        let hellos = fake.hellos.load(Ordering::SeqCst) as u32;
        let bound = base_took + SHIM_ANSWER_TIMEOUT * hellos + Duration::from_secs(2);
        assert!(
            took < bound,
            "{how:?}: took {took:?} for {hellos} hello(s) (the program alone {base_took:?}; \
             bound {bound:?})\n{stderr}"
        );
        eprintln!("{how:?}: ok in {took:?}");
    }
}

/// The sigbus program in `mode`, on a replicated data file, with a writer
/// revoking the replica in between.
fn own_sigbus_handler(mode: &str) {
    let d = Daemon::start("");
    let dir = scratch(&format!("shim-sigbus-{mode}"));
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let (file, control) = pattern_files(dir.path(), 64);
    // Only the data file: nothing is attached at start, so in "before" the
    // program's handler really comes before the shim's.
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    let mut child = under_shim(
        &d,
        &[
            program("replicad-sigbus").to_str().unwrap(),
            mode,
            file.to_str().unwrap(),
            dir.path().to_str().unwrap(),
        ],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut out = Lines::new(child.stdout.take().unwrap());
    let err = Lines::new(child.stderr.take().unwrap());
    let a = json(&out.until("attached step", Duration::from_secs(20), |l| {
        l.contains("\"step\":\"attached\"")
    }));
    assert_eq!(
        a["on_replica"], true,
        "{mode}: the data is not on the replica: {a}"
    );
    assert_eq!(a["bad_words"], 0, "{mode}: {a}");
    assert_eq!(
        a["sigaction_reports_ours"], true,
        "{mode}: sigaction(SIGBUS, NULL, &old) does not report the program's handler: {a}"
    );
    assert_eq!(
        a["kernel_handler_is_ours"], false,
        "{mode}: the shim's handler is not installed: nothing to chain: {a}"
    );
    assert!(
        a["kernel_owner"]
            .as_str()
            .unwrap()
            .contains("libreplicad_preload"),
        "{mode}: the kernel's SIGBUS action is not the shim's: {a}"
    );
    if mode == "before" {
        assert_eq!(
            a["kernel_owner_at_start"]
                .as_str()
                .map(|o| o.contains("replicad_preload")),
            Some(false),
            "the shim's handler was there before the program's: {a}"
        );
    }
    let w = run_writer(&d, &file, &control, 2, "wronly,trunc");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "check 3").unwrap();
    drop(stdin);
    let r = json(&out.until("revoked step", Duration::from_secs(20), |l| {
        l.contains("\"step\":\"revoked\"")
    }));
    let o = json(&out.until("own fault step", Duration::from_secs(20), |l| {
        l.contains("\"step\":\"own_fault\"")
    }));
    let status = child.wait().unwrap();
    let stderr = err.all().join("\n");
    assert_eq!(
        r["bad_words"], 0,
        "{mode}: wrong bytes after the revoke: {r}\n{stderr}"
    );
    assert_eq!(
        r["handler_calls"], 0,
        "{mode}: the revoke's fault reached the program's handler: {r}"
    );
    assert!(
        !r["maps"].as_str().unwrap().contains("/node0/"),
        "{mode}: still on the revoked replica: {r}"
    );
    assert_eq!(
        (&o["handler_calls"], &o["si_addr_ok"], &o["value"]),
        (&1.into(), &true.into(), &0.into()),
        "{mode}: the program's own SIGBUS was not chained to its handler: {o}\n{stderr}"
    );
    assert!(status.success(), "{mode}: {status}\n{stderr}\nwriter {w}");
}

#[test]
fn own_sigbus_handler_installed_before_attach() {
    if root_or_skip("own_sigbus_handler_installed_before_attach") {
        own_sigbus_handler("before");
    }
}

#[test]
fn own_sigbus_handler_installed_after_attach() {
    if root_or_skip("own_sigbus_handler_installed_after_attach") {
        own_sigbus_handler("after");
    }
}

#[test]
fn own_sigbus_handler_installed_with_signal() {
    if root_or_skip("own_sigbus_handler_installed_with_signal") {
        own_sigbus_handler("signal");
    }
}

// ---- fork and exec ----------------------------------------------------------

const FORK_EXEC_PY: &str = r#"
import ctypes, hashlib, mmap, os, sys
path, run_dir = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None)
def line(addr):
    for l in open("/proc/self/maps"):
        s, e = l.split()[0].split("-")
        if int(s, 16) <= addr < int(e, 16):
            return l.rstrip("\n")
def data_lines():
    return [l.rstrip("\n") for l in open("/proc/self/maps") if run_dir + "/node0/" in l and " r--s " in l]
want = hashlib.sha256(open(path, "rb").read()).hexdigest()
f = open(path, "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
f.close()
print("parent", os.getpid(), hashlib.sha256(m[:]).hexdigest() == want, len(data_lines()))
sys.stdout.flush()
pid = os.fork()
if pid == 0:
    ok = hashlib.sha256(m[:]).hexdigest() == want
    getpid = line(ctypes.cast(libc.getpid, ctypes.c_void_p).value)
    print("child", os.getpid(), ok, libc.getpid() == os.getpid(), len(data_lines()), "|", getpid)
    sys.stdout.flush()
    os._exit(0 if ok else 1)
_, st = os.waitpid(pid, 0)
print("child exit", st)
sys.stdout.flush()
os.execv(sys.executable, [sys.executable, "-c", """
import ctypes, os, sys
libc = ctypes.CDLL(None)
a = ctypes.cast(libc.getpid, ctypes.c_void_p).value
for l in open("/proc/self/maps"):
    s, e = l.split()[0].split("-")
    if int(s, 16) <= a < int(e, 16):
        print("exec", os.getpid(), "|", l.rstrip())
"""])
"#;

#[test]
fn fork_and_exec_under_the_shim() {
    if !root_or_skip("fork_and_exec_under_the_shim") {
        return;
    }
    need(PYTHON);
    need(PYTHON_BIN);
    let libc_so = lib("libc.so.6");
    let d = Daemon::start("");
    let dir = scratch("shim-fork");
    let data = dir.path().join("data");
    make_file(&data, 1 << 20, 9);
    d.ctl_ok(&["replicate", &libc_so, data.to_str().unwrap()]);
    let st = status_json(&d);
    let libc_replica = replica_file(&st, &libc_so);
    let run_dir = d.run_dir.path().to_str().unwrap();
    let out = under_shim(
        &d,
        &[PYTHON, "-c", FORK_EXEC_PY, data.to_str().unwrap(), run_dir],
    )
    .output()
    .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let field = |tag: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| l.starts_with(tag))
            .unwrap_or_else(|| panic!("no {tag:?} line:\n{stdout}\n{stderr}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let parent = field("parent ");
    assert_eq!(
        (parent[2].as_str(), parent[3].as_str()),
        ("True", "1"),
        "the parent's mmap is not on the data replica:\n{stdout}\n{stderr}"
    );
    let pid: u32 = parent[1].parse().unwrap();
    let child = field("child ");
    assert_eq!(
        &child[2..5],
        ["True", "True", "1"],
        "the forked child's mappings do not work:\n{stdout}"
    );
    let child_line = stdout.lines().find(|l| l.starts_with("child ")).unwrap();
    assert!(
        child_line.ends_with(&libc_replica) && child_line.contains(" r-xp "),
        "the child's libc text is not the replica: {child_line}"
    );
    assert_eq!(field("child exit")[2], "0", "{stdout}");
    let exec = stdout
        .lines()
        .find(|l| l.starts_with("exec "))
        .unwrap_or_else(|| panic!("the exec'd program printed nothing:\n{stdout}\n{stderr}"));
    assert!(
        exec.starts_with(&format!("exec {pid} |")),
        "exec changed the pid? {exec}"
    );
    assert!(
        exec.ends_with(&libc_replica) && exec.contains(" r-xp "),
        "the exec'd program's libc text is not the replica: {exec}"
    );
    // One attach at start before the exec and one after, both complete.
    let sums = attach_summaries(&stderr, pid, "start");
    assert_eq!(
        sums.len(),
        2,
        "expected two start attaches for pid {pid}:\n{stderr}"
    );
    assert!(
        sums.iter()
            .all(|(done, offered)| *done > 0 && done == offered),
        "{sums:?}\n{stderr}"
    );
}

// ---- revoking the libc a program runs on ---------------------------------

const REVOKE_PY: &str = r#"
import ctypes, hashlib, os, sys
libc = ctypes.CDLL(None)
a = ctypes.cast(libc.getpid, ctypes.c_void_p).value
def line():
    for l in open("/proc/self/maps"):
        s, e = l.split()[0].split("-")
        if int(s, 16) <= a < int(e, 16):
            return l.rstrip("\n")
print("READY", os.getpid(), "|", line(), flush=True)
for l in sys.stdin:
    print("ANSWER", hashlib.sha256(l.encode()).hexdigest(), libc.getpid() == os.getpid(), "|", line(), flush=True)
"#;

/// A writer opens the libc a program executes from its replica: the
/// replica is truncated under the running code, and the shim's SIGBUS
/// handler must put the original back using nothing from libc (a fault
/// inside the handler itself would find the range mid-remap and wait for
/// itself forever). A private copy of libc (LD_LIBRARY_PATH) stands in
/// for the system's, which a test must not open for writing.
#[test]
fn revoking_the_libc_a_program_runs_on() {
    if !root_or_skip("revoking_the_libc_a_program_runs_on") {
        return;
    }
    need(PYTHON);
    let d = Daemon::start("");
    let dir = scratch("shim-libc-revoke");
    let libdir = dir.path().join("lib");
    std::fs::create_dir(&libdir).unwrap();
    let libc_copy = libdir.join("libc.so.6");
    std::fs::copy(lib("libc.so.6"), &libc_copy).unwrap();
    let libc_copy = libc_copy.to_str().unwrap().to_string();
    d.ctl_ok(&["replicate", &libc_copy]);
    let st = status_json(&d);
    let replica = replica_file(&st, &libc_copy);

    let base = Command::new(PYTHON)
        .args(["-c", REVOKE_PY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut base_in = base.stdin.as_ref().unwrap();
    writeln!(base_in, "hello").unwrap();
    let base = base.wait_with_output().unwrap();
    let want = text(&base.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("ANSWER "))
        .map(|l| l.split(" | ").next().unwrap().to_string())
        .unwrap();

    let mut child = under_shim(&d, &[PYTHON, "-c", REVOKE_PY])
        .env("LD_LIBRARY_PATH", &libdir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = Lines::new(child.stdout.take().unwrap());
    let err = Lines::new(child.stderr.take().unwrap());
    let ready = out.until("READY", Duration::from_secs(20), |l| {
        l.starts_with("READY ")
    });
    assert!(
        ready.ends_with(&replica) && ready.contains(" r-xp "),
        "libc (the copy) is not on its replica: {ready}"
    );
    let mut stdin = child.stdin.take().unwrap();
    let ask = |stdin: &mut std::process::ChildStdin, out: &mut Lines, what: &str| {
        writeln!(stdin, "hello").unwrap();
        out.until(what, Duration::from_secs(15), |l| l.starts_with("ANSWER "))
    };
    let on_replica = ask(&mut stdin, &mut out, "an answer on the replica");
    assert!(
        on_replica.starts_with(&format!("ANSWER {want} |")),
        "{on_replica}"
    );
    // The write-open waits until the daemon has truncated the replica.
    let t0 = Instant::now();
    drop(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&libc_copy)
            .unwrap(),
    );
    eprintln!("write-open of the libc copy waited {:?}", t0.elapsed());
    assert_eq!(std::fs::metadata(&replica).map(|m| m.len()).unwrap_or(0), 0);
    // Next touch of libc text faults; the program must go on, on the file.
    writeln!(stdin, "hello").unwrap();
    let t0 = Instant::now();
    let mut after = None;
    while t0.elapsed() < Duration::from_secs(15) {
        match out.rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.starts_with("ANSWER ") => {
                after = Some(l);
                break;
            }
            Ok(l) => out.seen.push(l),
            Err(_) => {}
        }
    }
    let Some(after) = after else {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "the program stopped answering once its libc replica was revoked \
             (/proc/{pid}/stat: {state}); shim log:\n{}",
            err.all().join("\n")
        );
    };
    assert!(
        after.starts_with(&format!("ANSWER {want} |")),
        "wrong answer after the revoke: {after}"
    );
    assert!(
        after.ends_with(&libc_copy) && after.contains(" r-xp "),
        "libc text is not back on the file after the revoke: {after}"
    );
    drop(stdin);
    let status = child.wait().unwrap();
    let stderr = err.all().join("\n");
    assert!(status.success(), "{status}\n{stderr}");
}

// ---- programs that unmap and map again -----------------------------------

const REMAP_PY: &str = r#"
import ctypes, mmap, sys
path, node0, how = sys.argv[1], sys.argv[2], sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)
keep = []
def lines():
    return [l.split() for l in open("/proc/self/maps") if node0 in l and " r--s " in l]
def mapping():
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
m = mapping()
first = lines()
print("FIRST", first[0][0] if first else "-", first[0][-1] if first else "-", flush=True)
if how == "munmap":
    m.close()
else:
    # munmap(2) straight to the kernel, as code the shim cannot see does
    # (a static binary's libc, the loader's dlclose): the shim's entry for
    # the range stays behind. The mmap object is kept, never closed.
    s, e = (int(x, 16) for x in first[0][0].split("-"))
    rc = libc.syscall(11, ctypes.c_void_p(s), ctypes.c_size_t(e - s))
    assert rc == 0, ctypes.get_errno()
    keep.append(m)
sys.stdin.readline()          # the test writes the file: a new generation
m = mapping()
second = lines()
print("SECOND", second[0][0] if second else "-", second[0][-1] if second else "-", flush=True)
sys.stdin.readline()          # the test revokes that generation
print("READ", m[:16].hex(), flush=True)
sys.stdout.flush()
import os
os._exit(0)
"#;

/// A program maps a replicated file, unmaps it, and maps it again after a
/// write: the kernel puts the new mapping where the old one was. The
/// revoke of the new generation must fall back to the file: never go by
/// the old range's fallback entry (whose replica is gone: the program
/// would die of SIGBUS) nor put the old range's spare back. `munmap`: the
/// program unmaps through libc, which the shim wraps (the entry is
/// forgotten); `raw`: straight through the syscall, as code the shim
/// cannot see does (the entry stays until the program's next mmap there,
/// which replaces it).
fn mapping_again_at_a_reused_address(how: &str) {
    need(PYTHON);
    let d = Daemon::start("");
    let dir = scratch(&format!("shim-remap-{how}"));
    let file = dir.path().join("data");
    make_file(&file, 64 << 10, 5);
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    let node0 = d.run_dir.path().join("node0");
    let mut child = under_shim(
        &d,
        &[
            PYTHON,
            "-c",
            REMAP_PY,
            file.to_str().unwrap(),
            node0.to_str().unwrap(),
            how,
        ],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut out = Lines::new(child.stdout.take().unwrap());
    let err = Lines::new(child.stderr.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    let first = out.until("FIRST", Duration::from_secs(20), |l| {
        l.starts_with("FIRST ")
    });
    assert!(
        first.ends_with("-g1"),
        "{how}: the first mapping is not on the replica: {first}"
    );
    // Write: new bytes at the start, generation 2 replicated.
    let new_head: Vec<u8> = (0..16u8).map(|i| 0xa0 | i).collect();
    {
        use std::os::unix::fs::FileExt;
        let w = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        w.write_all_at(&new_head, 0).unwrap();
    }
    let t0 = Instant::now();
    while !d.status().sources[0]
        .replicas
        .iter()
        .any(|r| r.generation >= 2 && r.state == replicad_client::proto::ReplicaState::Valid)
    {
        assert!(t0.elapsed() < Duration::from_secs(10), "no generation 2");
        std::thread::sleep(Duration::from_millis(10));
    }
    writeln!(stdin, "go").unwrap();
    let second = out.until("SECOND", Duration::from_secs(20), |l| {
        l.starts_with("SECOND ")
    });
    assert!(
        second.ends_with("-g2"),
        "{how}: the second mapping is not on the new replica: {second}"
    );
    let range = |l: &str| l.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(
        range(&first),
        range(&second),
        "{how}: the kernel did not reuse the address: the scenario did not happen"
    );
    // Revoke generation 2 (a write-open waits for it), then read.
    drop(std::fs::OpenOptions::new().write(true).open(&file).unwrap());
    writeln!(stdin, "go").unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    let stderr = err.all().join("\n");
    let lines = out.all();
    let read = lines.iter().find(|l| l.starts_with("READ "));
    assert!(
        status.success(),
        "{how}: the program died after the revoke ({status}): {lines:?}\n{stderr}"
    );
    let want: String = new_head.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        read.map(String::as_str),
        Some(format!("READ {want}").as_str()),
        "{how}: {stderr}"
    );
}

#[test]
fn mapping_again_at_a_reused_address_survives_a_revoke() {
    if root_or_skip("mapping_again_at_a_reused_address_survives_a_revoke") {
        mapping_again_at_a_reused_address("munmap");
    }
}

#[test]
fn mapping_again_after_an_unseen_munmap_survives_a_revoke() {
    if root_or_skip("mapping_again_after_an_unseen_munmap_survives_a_revoke") {
        mapping_again_at_a_reused_address("raw");
    }
}

const MANY_PY: &str = r#"
import mmap, sys
path, node0, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
on = 0
for i in range(rounds):
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    if any(node0 in l and " r--s " in l for l in open("/proc/self/maps")):
        on += 1
    m.close()
left = [l.rstrip() for l in open("/proc/self/maps") if path in l or node0 in l and " r--s " in l]
print("ON", on, "LEFT", len(left), flush=True)
for l in left[:3]:
    print("LEFTOVER", l)
"#;

/// A program that maps and unmaps a replicated file over and over: every
/// mapping is on the replica, and nothing is left behind once it is
/// unmapped (the shim's way back, a spare mapping of the file, and its
/// SIGBUS-table entry, of which there are 1024).
#[test]
fn mapping_and_unmapping_many_times_leaks_nothing() {
    if !root_or_skip("mapping_and_unmapping_many_times_leaks_nothing") {
        return;
    }
    need(PYTHON);
    const ROUNDS: usize = 1100;
    let d = Daemon::start("");
    let dir = scratch("shim-many");
    let file = dir.path().join("data");
    make_file(&file, 16 << 10, 6);
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    let node0 = d.run_dir.path().join("node0");
    let out = under_shim(
        &d,
        &[
            PYTHON,
            "-c",
            MANY_PY,
            file.to_str().unwrap(),
            node0.to_str().unwrap(),
            &ROUNDS.to_string(),
        ],
    )
    .env_remove("REPLICAD_DEBUG")
    .output()
    .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.starts_with(&format!("ON {ROUNDS} LEFT 0\n")),
        "expected all {ROUNDS} mappings on the replica and none left over:\n{stdout}"
    );
}

// ---- programs that change a replica-backed range themselves ------------------

const MPROTECT_PY: &str = r#"
import ctypes, os, sys
path = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
def line(addr):
    for l in open("/proc/self/maps"):
        a, b = (int(x, 16) for x in l.split()[0].split("-"))
        if a <= addr < b:
            return l.strip()
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
p = libc.mmap(None, size, 1, 2, fd, 0)   # PROT_READ, MAP_PRIVATE: the shim swaps it
print("BEFORE", line(p), flush=True)
assert libc.mprotect(p, 4096, 3) == 0     # PROT_READ|PROT_WRITE: the file comes back first
ctypes.memmove(p, b"Z", 1)
print("AFTER", line(p), flush=True)
print("READY", flush=True)
sys.stdin.readline()                       # the test rewrites the file meanwhile
print("BYTE0", ctypes.string_at(p, 1).decode(), flush=True)
print("PAGE2", ctypes.string_at(p + 8192, 8).hex(), flush=True)
"#;

#[test]
fn a_range_the_program_makes_writable_keeps_what_it_wrote_across_a_revoke() {
    let d = Daemon::start("");
    let dir = scratch("shim-mprotect");
    let data = dir.path().join("data.bin");
    make_file(&data, 4 * 4096, 9);
    d.ctl_ok(&["replicate", data.to_str().unwrap()]);
    let run_dir = d.run_dir.path().to_str().unwrap().to_string();
    let mut child = Command::new(PYTHON)
        .args(["-c", MPROTECT_PY, data.to_str().unwrap()])
        .env("LD_PRELOAD", shim_path())
        .env("REPLICAD_SOCKET", &d.socket)
        .env("REPLICAD_DEBUG", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        assert!(
            out.read_line(&mut l).unwrap() > 0,
            "python ended early: {lines:?}"
        );
        let done = l.starts_with("READY");
        lines.push(l.trim().to_string());
        if done {
            break;
        }
    }
    assert!(
        lines[0].starts_with("BEFORE") && lines[0].contains(&format!("{run_dir}/node0/")),
        "not on the replica before mprotect: {lines:?}"
    );
    assert!(
        lines[1].starts_with("AFTER") && lines[1].ends_with(data.to_str().unwrap()),
        "mprotect(PROT_WRITE) did not put the file back: {lines:?}"
    );
    // A writer rewrites page 2; the daemon revokes the (unused) replica.
    let new = vec![0xabu8; 4096];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
        f.write_all_at(&new, 8192).unwrap();
    }
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{rest}\n{err}");
    // What the program wrote is still there, and the file's new bytes
    // show through the pages it did not write.
    assert!(
        rest.contains("BYTE0 Z"),
        "the program's write was lost: {rest}\n{err}"
    );
    assert!(rest.contains("PAGE2 abababababababab"), "{rest}\n{err}");
}
