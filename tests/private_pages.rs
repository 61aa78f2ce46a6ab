//! Private pages across a revoke: what a program writes privately in a
//! replica-backed range (a debugger's breakpoint through `/proc/self/mem`,
//! a write after `pkey_mprotect`) is what it reads back after the revoke,
//! exactly as without replicad (`replicator/src/engine/carry.rs`, and the
//! shim's own carry when it puts the file back).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

const PAGES: usize = 8;
const PAGE: usize = 4096;

/// A file of `PAGES` pages, page `i` all `base + i`.
fn paged(path: &Path, base: u8) {
    let mut bytes = Vec::with_capacity(PAGES * PAGE);
    for i in 0..PAGES {
        bytes.extend(std::iter::repeat_n(base + i as u8, PAGE));
    }
    std::fs::write(path, bytes).unwrap();
}

/// Write the second generation in place (one write-open: one lease break).
fn rewrite(path: &Path) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for i in 0..PAGES {
        f.write_at(&vec![b'a' + i as u8; PAGE], (i * PAGE) as u64)
            .unwrap();
    }
}

/// Run `replicad-private A B` as `cmd` says; rewrite both files once it is
/// ready; its two JSON lines.
fn run(mut cmd: Command, a: &Path, b: &Path) -> (Value, Value) {
    let mut child = cmd
        .arg(a)
        .arg(b)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let mut stderr = || {
        let mut s = String::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut s).ok();
        }
        s
    };
    if line.is_empty() {
        panic!("replicad-private printed nothing: {}", stderr());
    }
    let ready = json(&line);
    rewrite(a);
    rewrite(b);
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "replicad-private: {status}");
    (ready, json(&line))
}

fn files(dir: &Path) -> (PathBuf, PathBuf) {
    let a = dir.join("mem-text");
    let b = dir.join("pkey-text");
    paged(&a, b'A');
    paged(&b, b'A');
    (a, b)
}

/// What a range must read after the rewrite, with or without replicad.
fn check(after: &Value, what: &str) {
    for range in ["mem", "pkey"] {
        let r = &after[range];
        assert_eq!(
            r["breakpoint"], 0xcc,
            "{what}: {range}: the breakpoint is gone: {after}"
        );
        // The private page keeps the bytes it was copied from...
        assert_eq!(r["page1"], b'B', "{what}: {range}: {after}");
        // ...and a page never written shows the file as it is now.
        assert_eq!(r["page2"], b'c', "{what}: {range}: {after}");
    }
    assert_eq!(
        after["pkey"]["written"], 0x90,
        "{what}: the pkey write is gone: {after}"
    );
    assert_eq!(after["pkey"]["page3"], b'D', "{what}: {after}");
}

#[test]
fn private_pages_survive_a_revoke_as_without_replicad() {
    if !root_or_skip("private_pages_survive_a_revoke_as_without_replicad") {
        return;
    }
    // Without replicad: what the kernel does.
    let plain = scratch("private-plain");
    let (a, b) = files(plain.path());
    let (_, after) = run(Command::new(program("replicad-private")), &a, &b);
    check(&after, "without replicad");

    let d = Daemon::start("");
    let dir = scratch("private");
    let (a, b) = files(dir.path());
    d.ctl_ok(&["replicate", a.to_str().unwrap(), b.to_str().unwrap()]);
    let mut cmd = Command::new(REPLICACTL);
    cmd.arg("--socket")
        .arg(&d.socket)
        .args(["run", "--node", "0", "--shim"])
        .arg(shim_path())
        .arg("--")
        .arg(program("replicad-private"))
        .env("REPLICAD_DEBUG", "1")
        .env_remove("LD_PRELOAD");
    let (ready, after) = run(cmd, &a, &b);
    assert_eq!(ready["mem_on_replica"], true, "{ready}\n{}", d.log());
    assert_eq!(ready["pkey_on_replica"], true, "{ready}");
    // Made writable: the shim put the file back first, its breakpoint
    // carried along.
    assert_eq!(ready["pkey_on_replica_after_mprotect"], false, "{ready}");
    eprintln!("with replicad: {ready}\n{after}");
    check(&after, "with replicad");
    // The revoke took the other range off its replica, and carried its
    // breakpoint page to the way back first.
    assert_eq!(after["mem"]["on_replica"], false, "{after}");
    assert!(
        d.metric("replicad_private_pages_carried_total") >= 1.0,
        "{}",
        d.log()
    );
}

/// A client that lies about where it mapped a file (a range not page
/// aligned, one as long as the address space, one past the file's end)
/// and where its table is (a heap buffer of private pages, no slot in it)
/// holds no revoke up: the server keeps no range a mapping of the file
/// could not be (`client_range`, unit-tested in src/server.rs), and the
/// revoke's first look is one `PAGEMAP_SCAN` that stops at the first
/// private page and never falls back to reading pagemap entry by entry.
/// Before, `Map{at: 1, len: 2^47}` kept a SCHED_FIFO copier walking
/// pagemap for minutes and the revoke ran into the copier's deadline.
#[test]
fn a_client_lying_about_its_ranges_costs_no_revoke_its_deadline() {
    if !root_or_skip("a_client_lying_about_its_ranges_costs_no_revoke_its_deadline") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start("");
    let dir = scratch("private-liar");
    std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
    let file = dir.path().join("public");
    make_file(&file, 1 << 20, 5);
    std::fs::set_permissions(&file, PermissionsExt::from_mode(0o644)).unwrap();
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    for (at, len) in [
        ("1", "0x800000000000"),
        ("0x1000", "0x800000000000"),
        ("0x7f0000000000", "0x10000000000"),
    ] {
        let t = std::time::Instant::now();
        while !d.status().sources.iter().any(|s| {
            s.replicas
                .iter()
                .any(|r| r.state == replicad_client::proto::ReplicaState::Valid)
        }) {
            assert!(t.elapsed().as_secs() < 20, "no new generation: {}", d.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut liar = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(program("replicad-private"))
            .args([
                "liar",
                d.socket.to_str().unwrap(),
                file.to_str().unwrap(),
                at,
                len,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(liar.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(json(&line)["answer"], "mapped", "{line}");
        rewrite(&file);
        drop(liar.stdin.take());
        liar.wait().unwrap();
        let log = d.log();
        assert!(
            !log.contains("past its deadline") && !log.contains("took over"),
            "Map{{at: {at}, len: {len}}} from a liar held a revoke up:\n{log}"
        );
    }
    assert_eq!(d.metric("replicad_private_pages_carried_total"), 0.0);
}

/// A process forked from one the shim attached has its parent's replica
/// ranges but never says hello: the daemon finds it among the parent's
/// children (at its next prune), attaches it, and a revoke carries the
/// child's private pages as well as the parent's.
#[test]
fn a_forked_child_keeps_its_private_pages_too() {
    if !root_or_skip("a_forked_child_keeps_its_private_pages_too") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("private-fork");
    let file = dir.path().join("text");
    paged(&file, b'A');
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    let mut child = Command::new(REPLICACTL)
        .arg("--socket")
        .arg(&d.socket)
        .args(["run", "--node", "0", "--shim"])
        .arg(shim_path())
        .arg("--")
        .arg(program("replicad-private"))
        .arg("fork")
        .arg(&file)
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut ready = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        ready.push(json(&line));
    }
    for r in &ready {
        assert_eq!(r["on_replica"], true, "{r}\n{}", d.log());
    }
    let kid = ready
        .iter()
        .find(|r| r["who"] == "child")
        .and_then(|r| r["pid"].as_u64())
        .unwrap();
    // The daemon attaches the child at its next prune (every 2 s).
    let t = std::time::Instant::now();
    while !d.status().sources.iter().any(|s| {
        s.replicas
            .iter()
            .any(|r| r.attachments.iter().any(|&p| u64::from(p) == kid))
    }) {
        assert!(
            t.elapsed().as_secs() < 20,
            "child {kid} never attached:\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    rewrite(&file);
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    for _ in 0..2 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let after = json(&line);
        assert_eq!(
            after["breakpoint"],
            0xcc,
            "{}: {after}\n{}",
            after["who"],
            d.log()
        );
        assert_eq!(after["on_replica"], false, "{after}");
    }
    assert!(child.wait().unwrap().success());
    assert!(d.metric("replicad_private_pages_carried_total") >= 2.0);
}
