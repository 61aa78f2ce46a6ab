//! `replicactl replicate --pid` against a real daemon and real processes,
//! and `replicactl run`, which needs no daemon.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use replicad_client::proto::ReplicaState;

/// A process the test started, killed when the test ends (even by a
/// failed assertion).
struct Proc(Child);

impl Proc {
    /// `cmd`, started and given time to map its libraries.
    fn start(cmd: &mut Command) -> Proc {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let p = Proc(child);
        p.wait_for_text();
        p
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Wait until the dynamic loader is done: libc's text is mapped.
    fn wait_for_text(&self) {
        let t0 = Instant::now();
        let maps = format!("/proc/{}/maps", self.pid());
        while !std::fs::read_to_string(&maps)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(" r-xp ") && l.contains("libc.so"))
        {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "pid {} never mapped libc's text",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sleep30() -> Proc {
    Proc::start(Command::new("sleep").arg("30"))
}

/// The preload shim `cargo test` built: beside replicactl (target/debug/)
/// or in deps/, the newer of the two.
fn shim() -> PathBuf {
    let dir = Path::new(REPLICACTL).parent().unwrap();
    [
        dir.join("libreplicad_preload.so"),
        dir.join("deps/libreplicad_preload.so"),
    ]
    .into_iter()
    .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
    .max()
    .map(|(_, p)| p)
    .unwrap_or_else(|| {
        panic!(
            "libreplicad_preload.so is in neither {} nor its deps/ \
                 (cargo test builds it: the root package dev-depends on replicad-preload)",
            dir.display()
        )
    })
}

/// replicactl without a daemon (no --socket), with `env` set.
fn ctl_alone(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(REPLICACTL);
    c.args(args)
        .env_remove("LD_PRELOAD")
        .env_remove("REPLICAD_SOCKET");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The node's CPUs from sysfs, as a list of numbers.
fn node_cpus(node: u32) -> Vec<u32> {
    let list =
        std::fs::read_to_string(format!("/sys/devices/system/node/node{node}/cpulist")).unwrap();
    replicad_replicator::topology::parse_cpulist(list.trim()).unwrap()
}

/// The `Cpus_allowed_list` line of a `/proc/<pid>/status`, as numbers.
fn cpus_allowed(stdout: &str) -> Vec<u32> {
    let list = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_else(|| panic!("no Cpus_allowed_list in {stdout:?}"));
    replicad_replicator::topology::parse_cpulist(list.trim()).unwrap()
}

/// `replicate --pid` on a running `sleep`: its libc is replicated on node0,
/// along with the program, each file once.
#[test]
fn replicate_pid_replicates_libc() {
    if !root_or_skip("replicate_pid_replicates_libc") {
        return;
    }
    let d = Daemon::start("");
    let sleep = sleep30();
    let pid = sleep.pid().to_string();
    let out = d.ctl_ok(&["replicate", "--pid", &pid]);
    assert!(out.starts_with(&format!("pid {pid} (sleep): ")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("FILE")), "{out}");
    let libc_row = out
        .lines()
        .find(|l| l.contains("libc.so.6"))
        .unwrap_or_else(|| panic!("libc.so.6 not listed:\n{out}\ndaemon log:\n{}", d.log()));
    assert!(libc_row.contains("node0"), "{out}");
    // The dynamic loader is skipped: the shim never moves it.
    let loader_row = out
        .lines()
        .find(|l| l.contains("ld-linux"))
        .unwrap_or_else(|| panic!("the loader is not listed:\n{out}"));
    assert!(loader_row.contains("dynamic loader"), "{out}");

    let status = d.status();
    let libc = status
        .sources
        .iter()
        .find(|s| s.path.file_name().is_some_and(|n| n == "libc.so.6"))
        .unwrap_or_else(|| panic!("libc.so.6 not in the status: {status:#?}"));
    assert!(
        libc.replicas
            .iter()
            .any(|r| r.target == "node0" && r.state == ReplicaState::Valid),
        "{libc:#?}"
    );
    // Its identity is the one the process maps.
    let st = std::fs::metadata(&libc.path).unwrap();
    assert_eq!(
        (libc.dev, libc.ino),
        (
            std::os::unix::fs::MetadataExt::dev(&st),
            std::os::unix::fs::MetadataExt::ino(&st)
        )
    );
    assert!(status
        .sources
        .iter()
        .any(|s| s.path.file_name().is_some_and(|n| n == "sleep")));
    // Each file once, however many r-xp mappings it has.
    let mut keys: Vec<(u64, u64)> = status.sources.iter().map(|s| (s.dev, s.ino)).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), status.sources.len());

    // The table shows it too.
    let table = d.ctl_ok(&["status"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("libc.so.6") && l.contains("node0") && l.contains("valid")),
        "{table}"
    );

    // Asking again is no error: the replicas are already there.
    let again = d.ctl_ok(&["replicate", "--pid", &pid, "--nodes", "0"]);
    assert!(again.contains("libc.so.6"), "{again}");
    drop(sleep);
}

/// Files that cannot be replicated are skipped with the reason, and the
/// rest still are: a library held open for writing, the preload shim.
#[test]
fn replicate_pid_skips_what_it_cannot_fence() {
    if !root_or_skip("replicate_pid_skips_what_it_cannot_fence") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("pid-skip");
    // A private copy of libc on ext4, which the test then holds open for
    // writing (a mapped library, unlike a running program, may be).
    let lib = dir.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    let system_libc = Command::new("sh")
        .args(["-c", "ldd /bin/sleep | awk '/libc.so.6/ {print $3}'"])
        .output()
        .unwrap();
    let system_libc = text(&system_libc.stdout).trim().to_string();
    assert!(!system_libc.is_empty(), "ldd did not name libc.so.6");
    let libc_copy = lib.join("libc.so.6");
    std::fs::copy(&system_libc, &libc_copy).unwrap();
    let shim = shim();
    let sleep = Proc::start(
        Command::new("sleep")
            .arg("30")
            .env("LD_LIBRARY_PATH", &lib)
            .env("LD_PRELOAD", &shim)
            .env("REPLICAD_SOCKET", dir.path().join("no-daemon.sock")),
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", sleep.pid())).unwrap();
    assert!(maps.contains(libc_copy.to_str().unwrap()), "{maps}");
    let writer = File::options().write(true).open(&libc_copy).unwrap();

    let pid = sleep.pid().to_string();
    let out = d.ctl_ok(&["replicate", "--pid", &pid]);
    let row = |name: &str| {
        out.lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} not listed:\n{out}\ndaemon log:\n{}", d.log()))
            .to_string()
    };
    assert!(row("/usr/bin/sleep").contains("node0"), "{out}");
    let skipped = out
        .lines()
        .skip_while(|l| !l.starts_with("SKIPPED"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        skipped.contains(libc_copy.to_str().unwrap()) && skipped.contains("open for writing"),
        "the library open for writing is not skipped with the reason:\n{out}"
    );
    assert!(
        skipped.contains("libreplicad_preload.so") && skipped.contains("shim"),
        "the shim is not skipped:\n{out}"
    );
    let status = d.status();
    assert!(!status.sources.iter().any(|s| s.path == libc_copy));
    assert!(!status
        .sources
        .iter()
        .any(|s| s.path.to_string_lossy().contains("libreplicad_preload")));
    drop(writer);
    drop(sleep);
}

/// A pid that does not exist: a failure naming it.
#[test]
fn replicate_pid_of_a_missing_process() {
    if !root_or_skip("replicate_pid_of_a_missing_process") {
        return;
    }
    let d = Daemon::start("");
    // A pid that just exited (and is not reused this fast).
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let err = d.ctl_err(&["replicate", "--pid", &pid.to_string()]);
    assert!(
        err.contains(&format!("pid {pid}: no such process")),
        "the error does not name pid {pid}: {err}"
    );
    // Not a number, or both a pid and paths: refused before asking.
    let err = d.ctl_err(&["replicate", "--pid", "abc"]);
    assert!(err.contains("--pid"), "{err}");
    let err = d.ctl_err(&["replicate", "--pid", "1", "/etc/hostname"]);
    assert!(err.contains("cannot be used with"), "{err}");
    let err = d.ctl_err(&["replicate"]);
    assert!(err.contains("--pid") && err.contains("PATH"), "{err}");
    // A node the machine lacks fails the request, naming the nodes it has.
    let sleep = sleep30();
    let err = d.ctl_err(&[
        "replicate",
        "--pid",
        &sleep.pid().to_string(),
        "--nodes",
        "9",
    ]);
    assert!(err.contains("node 9 does not exist"), "{err}");
    assert!(d.status().sources.is_empty());
}

/// Only root may ask: anyone else is refused, and nothing is replicated.
#[test]
fn replicate_pid_needs_root() {
    if !root_or_skip("replicate_pid_needs_root") {
        return;
    }
    let d = Daemon::start("");
    let sleep = sleep30();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            REPLICACTL,
            "--socket",
        ])
        .arg(&d.socket)
        .args(["replicate", "--pid", &sleep.pid().to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("needs root (uid 0)"), "{err}");
    assert!(
        err.contains(&format!("pid {}", sleep.pid())),
        "the error does not name the pid asked for: {err}"
    );
    assert!(d.status().sources.is_empty());
}

/// `run --node 0`: the command runs on node 0's CPUs with the shim first in
/// LD_PRELOAD, even from a narrower affinity; without --node the affinity
/// stays. No daemon runs.
#[test]
fn run_binds_and_preloads() {
    let shim = shim();
    let shim_s = shim.to_str().unwrap();
    let script = "grep Cpus_allowed_list /proc/self/status; echo \"$LD_PRELOAD\"; \
                  echo \"socket=${REPLICAD_SOCKET:-unset}\"";
    let out = ctl_alone(
        &[
            "run", "--node", "0", "--shim", shim_s, "--", "sh", "-c", script,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(cpus_allowed(&stdout), node_cpus(0), "{stdout}");
    let preload = stdout.lines().nth(1).unwrap();
    assert!(
        preload
            .split(':')
            .next()
            .unwrap()
            .ends_with("libreplicad_preload.so"),
        "{stdout}"
    );
    assert!(stdout.contains("socket=unset"), "{stdout}");

    // An LD_PRELOAD already set is kept after the shim; a --socket other
    // than the default is passed on.
    let out = ctl_alone(
        &[
            "--socket",
            "/nonexistent/replicad.sock",
            "run",
            "--shim",
            shim_s,
            "--",
            "sh",
            "-c",
            script,
        ],
        &[("LD_PRELOAD", "libm.so.6")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let preload = stdout.lines().nth(1).unwrap();
    let canonical = std::fs::canonicalize(&shim).unwrap();
    assert_eq!(preload, format!("{}:libm.so.6", canonical.display()));
    assert!(
        stdout.contains("socket=/nonexistent/replicad.sock"),
        "{stdout}"
    );

    // From a process pinned to one CPU: --node widens to the node's CPUs,
    // no --node keeps the one CPU.
    let cpus = node_cpus(0);
    if cpus.len() < 2 || Command::new("taskset").arg("-V").output().is_err() {
        skip(
            "run_binds_and_preloads (narrow affinity)",
            "needs taskset and 2 CPUs",
        );
        return;
    }
    let first = cpus[0].to_string();
    let pinned = |node: &[&str]| {
        let out = Command::new("taskset")
            .args(["-c", &first, REPLICACTL, "run"])
            .args(node)
            .args(["--shim", shim_s, "--", "sh", "-c", script])
            .env_remove("LD_PRELOAD")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        cpus_allowed(&text(&out.stdout))
    };
    assert_eq!(pinned(&["--node", "0"]), cpus);
    assert_eq!(pinned(&[]), vec![cpus[0]]);
}

/// `run` fails clearly: a node the machine lacks, a command that is not
/// there or cannot be executed, a shim that is not there.
#[test]
fn run_failures_say_why() {
    let shim = shim();
    let shim_s = shim.to_str().unwrap();

    let out = ctl_alone(&["run", "--node", "9", "--shim", shim_s, "--", "true"], &[]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(err.contains("node 9 does not exist"), "{err}");
    assert!(err.contains("this machine has nodes 0"), "{err}");

    let out = ctl_alone(&["run", "--shim", shim_s, "--", "/nonexistent"], &[]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("cannot run /nonexistent"), "{err}");

    let out = ctl_alone(
        &["run", "--shim", shim_s, "--", "replicad-no-such-command"],
        &[],
    );
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("command not found"));

    // A file that is not executable: 126, like a shell.
    let dir = scratch("run-noexec");
    let plain = dir.path().join("plain.txt");
    std::fs::write(&plain, "not a program\n").unwrap();
    let out = ctl_alone(
        &["run", "--shim", shim_s, "--", plain.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));

    // The command's own exit status comes through.
    let out = ctl_alone(&["run", "--shim", shim_s, "--", "sh", "-c", "exit 7"], &[]);
    assert_eq!(out.status.code(), Some(7));

    // A shim that is not there: named, and how to build one.
    let out = ctl_alone(
        &["run", "--shim", "/nonexistent/shim.so", "--", "true"],
        &[],
    );
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(err.contains("/nonexistent/shim.so: no such file"), "{err}");
    assert!(
        err.contains("cargo build --release -p replicad-preload"),
        "{err}"
    );
    let out = ctl_alone(
        &["run", "--", "true"],
        &[("REPLICAD_PRELOAD", "/nonexistent/env.so")],
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("$REPLICAD_PRELOAD"));
}
