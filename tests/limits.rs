//! Limits far past a handful of files, and a daemon no user can crowd out:
//! status in pages over the socket, commands over many paths, the
//! open-file limit raised and reported, status by permission, and one
//! user's flood of connections queueing nobody else. Real daemon, real
//! processes (some as other users, through setpriv).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use replicad_client::proto::{Request, Response};

/// A scratch directory anyone may enter.
fn open_dir(tag: &str) -> tempfile::TempDir {
    let d = scratch(tag);
    std::fs::set_permissions(d.path(), PermissionsExt::from_mode(0o755)).unwrap();
    d
}

/// `n` small files of 4 KiB, mode 0644, named so that sorting by name is
/// sorting by number.
fn small_files(dir: &Path, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("f{i:05}"));
            std::fs::write(&p, format!("{i:08}").repeat(512)).unwrap();
            p
        })
        .collect()
}

/// Replicate `paths`, a few thousand per replicactl call.
fn replicate_all(d: &Daemon, paths: &[PathBuf]) {
    for chunk in paths.chunks(2500) {
        let mut args = vec!["replicate".to_string()];
        args.extend(chunk.iter().map(|p| p.display().to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        d.ctl_ok(&args);
    }
}

fn as_user(uid: u32, program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
    ])
    .arg(program);
    c
}

/// The daemon's run directory, where its socket is: anyone may enter it.
fn open_run_dir(d: &Daemon) {
    std::fs::set_permissions(d.run_dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
}

#[test]
fn status_comes_in_pages_and_evict_reports_each_failure() {
    if !root_or_skip("status_comes_in_pages_and_evict_reports_each_failure") {
        return;
    }
    let d = Daemon::start("");
    let dir = open_dir("pages");
    let files = small_files(dir.path(), 3000);
    replicate_all(&d, &files);

    // One request answers one page, which says where the next starts.
    let Response::Status { report } = d.request(&Request::Status).unwrap() else {
        panic!("not a status");
    };
    let first = report.sources.len();
    assert!(first > 0 && first < files.len(), "first page of {first}");
    assert!(report.next.is_some());

    // replicactl pages through all of it, text and JSON.
    let json: serde_json::Value = serde_json::from_str(&d.ctl_ok(&["status", "--json"])).unwrap();
    let listed: Vec<PathBuf> = json["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| PathBuf::from(s["path"].as_str().unwrap()))
        .collect();
    assert_eq!(listed, files, "every source once, sorted by path");
    assert!(json.get("next").is_none());
    let text = d.ctl_ok(&["status"]);
    for f in [&files[0], &files[1499], &files[2999]] {
        assert!(
            text.contains(&f.display().to_string()),
            "{} missing",
            f.display()
        );
    }
    assert_eq!(
        text.lines()
            .filter(|l| l.contains(&dir.path().display().to_string()))
            .count(),
        3000
    );

    // evict A B C, B not replicated: A and C go, B is named, exit 1.
    let b = dir.path().join("never-replicated");
    std::fs::write(&b, b"x").unwrap();
    let out = d.ctl(&[
        "evict",
        files[0].to_str().unwrap(),
        b.to_str().unwrap(),
        files[1].to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stdout.contains(&format!("{}: 1 replicas evicted", files[0].display()))
            && stdout.contains(&format!("{}: 1 replicas evicted", files[1].display())),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("{}: not replicated", b.display()))
            && stderr.contains("1 of 3 files were not evicted")
            && stderr.contains(&b.display().to_string()),
        "{stderr}"
    );
    let left = replicad_client::status(&d.socket, Duration::from_secs(30)).unwrap();
    assert_eq!(left.sources.len(), 2998);
    assert!(left
        .sources
        .iter()
        .all(|s| s.path != files[0] && s.path != files[1]));
}

#[test]
fn the_open_file_limit_is_raised_reported_and_refused_beyond() {
    if !root_or_skip("the_open_file_limit_is_raised_reported_and_refused_beyond") {
        return;
    }
    let d = Daemon::start_with_nofile("", 1024);
    // It says what it got and what that leaves room for.
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("open-file limit"))
        .unwrap_or_else(|| panic!("no open-file limit line:\n{log}"));
    assert!(line.contains("(was 1024,"), "{line}");
    let room: usize = line
        .split("room for ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(soft > 1024, "the soft limit stayed at 1024:\n{limits}");
    eprintln!("open-file limit {soft}: room for {room} sources");

    // 10,000 sources. A populated tmpfs replica holds no fd (the daemon
    // and the keeper hold it by path), so a source costs one open file,
    // its lease: a hard limit of 10,000 + the reserve leaves room for all
    // of them, and then all must replicate. Below that (a machine whose
    // hard limit is lower) as many as it leaves room for, and the next one
    // is refused.
    let want = 10_000;
    let hard: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|n| n.parse().ok())
        .unwrap();
    let fits = hard >= want as u64 + replicad_replicator::engine::SourceLimit::RESERVED;
    if fits {
        assert!(
            room >= want,
            "a hard open-file limit of {hard} leaves room for {want} sources at one open file \
             each, but the daemon says room for {room}:\n{line}"
        );
    }
    let n = want.min(room);
    let dir = open_dir("nofile");
    let files = small_files(dir.path(), n + 1);
    let t = Instant::now();
    replicate_all(&d, &files[..n]);
    eprintln!("{n} sources replicated in {:?}", t.elapsed());
    let report = replicad_client::status(&d.socket, Duration::from_secs(60)).unwrap();
    assert_eq!(report.sources.len(), n);
    assert!(report
        .sources
        .iter()
        .all(|s| s.fence == "lease" && s.replicas.len() == 1));
    // replicactl lists every one, text and JSON (how fast: the bench,
    // `cargo bench --bench limits`).
    let json: serde_json::Value = serde_json::from_str(&d.ctl_ok(&["status", "--json"])).unwrap();
    assert_eq!(json["sources"].as_array().unwrap().len(), n);
    let prefix = dir.path().display().to_string();
    let text = d.ctl_ok(&["status"]);
    assert_eq!(
        text.lines().filter(|l| l.contains(&prefix)).count(),
        n,
        "replicactl status does not list {n} sources"
    );
    if n < want {
        // The next one is refused, with the limit and the fix.
        let err = d.ctl_err(&["replicate", files[n].to_str().unwrap()]);
        assert!(
            err.contains("RLIMIT_NOFILE") && err.contains("LimitNOFILE="),
            "{err}"
        );
        eprintln!(
            "this machine's hard open-file limit ({hard}) leaves room for {room} sources, \
             not {want}: the rest is refused as shown"
        );
    }
}

#[test]
fn status_shows_each_user_only_what_it_may_read() {
    if !root_or_skip("status_shows_each_user_only_what_it_may_read") {
        return;
    }
    let d = Daemon::start("");
    open_run_dir(&d);
    let dir = open_dir("perm");
    let public = dir.path().join("public");
    make_file(&public, 8192, 1);
    std::fs::set_permissions(&public, PermissionsExt::from_mode(0o644)).unwrap();
    let secret = dir.path().join("secret");
    make_file(&secret, 8192, 2);
    std::fs::set_permissions(&secret, PermissionsExt::from_mode(0o600)).unwrap();
    let closed = dir.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, PermissionsExt::from_mode(0o700)).unwrap();
    let inner = closed.join("inner");
    make_file(&inner, 8192, 3);
    std::fs::set_permissions(&inner, PermissionsExt::from_mode(0o644)).unwrap();
    let group = dir.path().join("group");
    make_file(&group, 8192, 4);
    std::fs::set_permissions(&group, PermissionsExt::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(&group, Some(0), Some(4242)).unwrap();
    for f in [&public, &secret, &inner, &group] {
        d.ctl_ok(&["replicate", f.to_str().unwrap()]);
    }
    // Root (this test) attached to the public replica.
    let _m = map_on_replica(&d, &public);
    let me = std::process::id();

    let status_as = |args: &[&str]| -> serde_json::Value {
        let mut c = Command::new("setpriv");
        c.args(args)
            .arg(env!("CARGO_BIN_EXE_replicactl"))
            .arg("--socket")
            .arg(&d.socket)
            .args(["status", "--json"]);
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let paths = |v: &serde_json::Value| -> Vec<String> {
        v["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["path"].as_str().unwrap().to_string())
            .collect()
    };
    let pids = |v: &serde_json::Value| -> Vec<u64> {
        v["sources"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["replicas"].as_array().unwrap().clone())
            .flat_map(|r| r["attachments"].as_array().unwrap().clone())
            .map(|p| p.as_u64().unwrap())
            .collect()
    };
    let s = |p: &Path| p.display().to_string();

    // nobody: the public file only, and not root's pid.
    let nobody = status_as(&["--reuid=65534", "--regid=65534", "--clear-groups"]);
    assert_eq!(paths(&nobody), [s(&public)], "{nobody}");
    assert!(pids(&nobody).is_empty(), "{nobody}");
    // A member of group 4242 also sees the 0640 file of that group.
    let member = status_as(&["--reuid=65534", "--regid=65534", "--groups=4242"]);
    assert_eq!(paths(&member), [s(&group), s(&public)], "{member}");
    // HTTP: anyone may connect, so what anyone may read, and no pids.
    let http: serde_json::Value = serde_json::from_str(&d.http_get("/status")).unwrap();
    assert_eq!(paths(&http), [s(&public)], "{http}");
    assert!(pids(&http).is_empty(), "{http}");
    // Root: everything, its own pid among the attachments.
    let root = status_as(&["--reuid=0"]);
    let mut all = paths(&root);
    all.sort();
    let mut want = vec![s(&public), s(&secret), s(&inner), s(&group)];
    want.sort();
    assert_eq!(all, want);
    assert!(pids(&root).contains(&u64::from(me)), "{root}");
}

/// The flooder (see its header), copied where nobody may read it.
const FLOOD: &str = include_str!("programs/flood.py");

#[test]
fn a_flood_from_one_user_queues_no_one_else() {
    if !root_or_skip("a_flood_from_one_user_queues_no_one_else") {
        return;
    }
    let d = Daemon::start("");
    open_run_dir(&d);
    let dir = open_dir("flood");
    let public = dir.path().join("public");
    make_file(&public, 1 << 20, 1);
    std::fs::set_permissions(&public, PermissionsExt::from_mode(0o644)).unwrap();
    d.ctl_ok(&["replicate", public.to_str().unwrap()]);

    let script = dir.path().join("flood.py");
    std::fs::write(&script, FLOOD).unwrap();
    let flooder = as_user(65534, Path::new("/usr/bin/python3"))
        .arg(&script)
        .arg(&d.socket)
        .args(["1000", "12"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // The daemon's connections, counted in its fd table now and then.
    let sockets = || {
        std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .filter(|l| l.to_string_lossy().starts_with("socket:"))
            .count()
    };
    let mut most = sockets();

    // Root's status, 100 times, while the flood goes on.
    let mut took = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let r = replicad_client::status(&d.socket, Duration::from_secs(5));
        took.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r.unwrap().sources.len(), 1);
        most = most.max(sockets());
    }
    took.sort_by(|a, b| a.total_cmp(b));
    eprintln!(
        "root's status during the flood: p50 {:.2} ms, p99 {:.2} ms",
        took[50], took[98]
    );
    // Another user's map, 100 times: each on the replica.
    let out = as_user(65533, &program("replicad-map-timer"))
        .arg(&d.socket)
        .arg(&public)
        .arg("100")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && text.contains("on_replica=100"),
        "{text}"
    );
    eprintln!("uid 65533's map during the flood: {}", text.trim());

    let out = flooder.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    let nums: Vec<usize> = said
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(
        nums.len(),
        2,
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // nobody held its share and no more (besides the daemon's own few
    // sockets: listener, keeper, HTTP), and was told why.
    assert!(most <= 64 + 16, "the daemon held {most} sockets");
    assert!(nums[0] >= 64, "the flood never reached the limit: {said}");
    assert!(nums[1] > 0, "no connection was refused: {said}");
    eprintln!("the flood: {}", said.trim());
}
