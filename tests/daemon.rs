//! The daemon end to end, with real processes: replicate, read through the
//! client API, evict, status, metrics, reload, restart, shutdown, and every
//! kind of bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use replicad_client::proto::{self, ErrorKind, Request, Response};
use replicad_client::sock;

/// A reader process maps the file through `map()`: its maps name the
/// replica file in the node store, its numa_maps put the pages on node 0,
/// and the bytes equal the source.
#[test]
fn reader_maps_the_replica() {
    if !root_or_skip("reader_maps_the_replica") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("reader");
    let file = dir.path().join("weights.bin");
    make_file(&file, 3 << 20, 7);
    let want = fnv1a(&std::fs::read(&file).unwrap());
    let out = d.ctl_ok(&["replicate", "--nodes", "0", file.to_str().unwrap()]);
    assert!(out.contains("generation 1 on node0"), "{out}");

    let mut reader = Command::new(program("replicad-reader"))
        .args(["once", file.to_str().unwrap(), "--hold"])
        .env("REPLICAD_SOCKET", &d.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(reader.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let v = json(&line);
    assert_eq!(v["checksum"], format!("{want:016x}"), "{v}");
    assert!(
        v["backing"]
            .as_str()
            .unwrap()
            .starts_with("replica node0 generation 1"),
        "{v}"
    );
    let store = d.run_dir.path().join("node0");
    let maps = v["maps"].as_str().unwrap();
    assert!(
        maps.contains(store.to_str().unwrap()),
        "maps line {maps:?} does not name the replica in {}",
        store.display()
    );
    assert!(
        maps.split_whitespace().nth(1).unwrap().starts_with("r--s"),
        "{maps}"
    );
    let numa = v["numa_maps"].as_str().unwrap();
    assert!(
        numa.contains("N0="),
        "numa_maps {numa:?} shows no pages on node 0"
    );
    assert!(!numa.contains("N1="), "{numa}");

    // While it holds the mapping, status lists it as attached.
    let pid = v["pid"].as_u64().unwrap() as u32;
    let st = d.status();
    let r = &st.sources[0].replicas[0];
    assert_eq!(r.attachments, vec![pid], "{st:?}");
    let table = d.ctl_ok(&["status"]);
    assert!(
        table.contains(&pid.to_string()) && table.contains("valid"),
        "{table}"
    );
    let js: serde_json::Value = serde_json::from_str(&d.ctl_ok(&["status", "--json"])).unwrap();
    assert_eq!(js["sources"][0]["replicas"][0]["state"], "valid");

    // Evict while it reads: the reader falls back to the file, same bytes.
    let out = d.ctl_ok(&["evict", file.to_str().unwrap()]);
    assert!(out.contains("1 replicas evicted"), "{out}");
    drop(reader.stdin.take());
    line.clear();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let v = json(&line);
    assert_eq!(v["after_hold_checksum"], format!("{want:016x}"));
    assert_eq!(v["on_replica"], false);
    assert!(reader.wait().unwrap().success());
    assert!(d.status().sources.is_empty());
    assert_eq!(
        std::fs::read_dir(&store).unwrap().count(),
        0,
        "replica file left behind"
    );
    assert!(d.metric("replicad_invalidations_total{reason=\"evict\"}") >= 1.0);
    assert!(d.metric("replicad_attach_total{result=\"replica\"}") >= 1.0);
}

/// replicactl map reads through the client API too.
#[test]
fn replicactl_map_reports_backing() {
    if !root_or_skip("replicactl_map_reports_backing") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("ctlmap");
    let file = dir.path().join("index.db");
    make_file(&file, 100_000, 3);
    let want = format!("{:016x}", fnv1a(&std::fs::read(&file).unwrap()));
    let out = d.ctl_ok(&["map", file.to_str().unwrap()]);
    assert!(
        out.contains(&want)
            && out.contains("the file itself")
            && out.contains("the file is not replicated"),
        "{out}"
    );
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    let out = d.ctl_ok(&["map", file.to_str().unwrap()]);
    assert!(
        out.contains(&want) && out.contains("replica on node0, generation 1"),
        "{out}"
    );
}

/// Every bad request gets a clear error, leaves nothing half-made, and the
/// daemon keeps serving.
#[test]
fn bad_requests_get_clear_errors() {
    if !root_or_skip("bad_requests_get_clear_errors") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("bad");
    let store = d.run_dir.path().join("node0");

    let missing = dir.path().join("missing");
    let e = d.ctl_err(&["replicate", missing.to_str().unwrap()]);
    assert!(
        e.contains(&format!("{} does not exist", missing.display())),
        "{e}"
    );

    let e = d.ctl_err(&["replicate", dir.path().to_str().unwrap()]);
    assert!(e.contains("is a directory, not a regular file"), "{e}");

    let e = d.ctl_err(&["replicate", "/proc/self/status"]);
    assert!(
        e.contains("cannot be write-fenced") && e.contains("procfs"),
        "{e}"
    );

    let file = dir.path().join("data");
    make_file(&file, 1 << 20, 1);
    let e = d.ctl_err(&["replicate", "--nodes", "7", file.to_str().unwrap()]);
    assert!(
        e.contains("node 7 does not exist: this machine has nodes 0"),
        "{e}"
    );
    let e = d.ctl_err(&["replicate", "--nodes", "x", file.to_str().unwrap()]);
    assert!(e.contains("not a node number"), "{e}");

    // Open for write by another process: refused, naming the writer.
    let mut holder = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 3>>'{}'; echo ready; read _", file.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    let e = d.ctl_err(&["replicate", file.to_str().unwrap()]);
    assert!(e.contains("open for writing by pid"), "{e}");
    assert!(e.contains(&holder.id().to_string()), "{e}");
    drop(holder.stdin.take());
    holder.wait().unwrap();
    assert!(d.metric("replicad_fence_failures_total{reason=\"open_for_write\"}") >= 1.0);

    let e = d.ctl_err(&["evict", file.to_str().unwrap()]);
    assert!(e.contains("not replicated"), "{e}");

    // Nothing was left in the store by any of these.
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 0);
    assert!(d.status().sources.is_empty());
    // And the daemon still works.
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    assert_eq!(d.status().sources.len(), 1);
}

/// A full node store (ENOSPC) fails the copy and leaves no file behind.
#[test]
fn full_store_is_refused_cleanly() {
    if !root_or_skip("full_store_is_refused_cleanly") {
        return;
    }
    let d = Daemon::start("[store]\nsize = \"1m\"\n");
    let dir = scratch("enospc");
    let file = dir.path().join("big");
    make_file(&file, 4 << 20, 2);
    let e = d.ctl_err(&["replicate", file.to_str().unwrap()]);
    assert!(e.contains("is full"), "{e}");
    assert!(
        e.contains(file.to_str().unwrap()),
        "the error names no file: {e}"
    );
    let store = d.run_dir.path().join("node0");
    assert_eq!(
        std::fs::read_dir(&store).unwrap().count(),
        0,
        "half-made replica left"
    );
    assert!(d.metric("replicad_replication_failures_total{reason=\"no_space\"}") >= 1.0);
    // The source left the list, and no lease is left on it (the daemon's
    // or the fence keeper's).
    let st = d.status();
    assert!(
        st.sources.iter().all(|s| s.path != file),
        "the source that did not fit is listed: {st:?}"
    );
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&file).unwrap());
    assert!(
        !lease_on(ino),
        "a lease is left on the source that did not fit:\n{}",
        std::fs::read_to_string("/proc/locks").unwrap()
    );
    // A file that fits still replicates.
    let small = dir.path().join("small");
    make_file(&small, 100_000, 2);
    d.ctl_ok(&["replicate", small.to_str().unwrap()]);
    // Written to a size that no longer fits: its next generation fails the
    // same way, and the source leaves the list with no lease left on it.
    let small_ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&small).unwrap());
    assert!(lease_on(small_ino), "no lease on a replicated source");
    {
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .open(&small)
            .unwrap();
        w.write_all(&vec![7u8; 4 << 20]).unwrap();
    }
    let t0 = std::time::Instant::now();
    loop {
        let listed = d.status().sources.iter().any(|s| s.path == small);
        if !listed && !lease_on(small_ino) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "10 s after the write that outgrew the store: listed {listed}, lease {}: {:?}\n{}",
            lease_on(small_ino),
            d.status(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.metric("replicad_replication_failures_total{reason=\"no_space\"}") >= 2.0);
}

/// Start replicating `file` on another thread and return once the copy is
/// under way (the source is listed); join for the daemon's answer.
fn replicate_in_background(
    d: &Daemon,
    file: &std::path::Path,
) -> std::thread::JoinHandle<Result<(Response, Vec<OwnedFd>), replicad_client::Error>> {
    let path = file.to_path_buf();
    let socket = d.socket.clone();
    let rep = std::thread::spawn(move || {
        replicad_client::request(
            &socket,
            &Request::Replicate {
                path,
                nodes: proto::NodeSelection::All,
            },
            &[],
            Duration::from_secs(60),
        )
    });
    let t0 = std::time::Instant::now();
    while d.status().sources.is_empty() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    rep
}

/// A source truncated while it is being copied: the writer breaks the
/// fence, the copy stops, nothing is replicated, the writer goes on.
#[test]
fn source_truncated_mid_copy() {
    if !root_or_skip("source_truncated_mid_copy") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("midcopy");
    let file = dir.path().join("big");
    make_file(&file, 768 << 20, 5);
    let _ = std::fs::read(&file).unwrap(); // warm
    let store = d.run_dir.path().join("node0");
    let rep = replicate_in_background(&d, &file);
    // Hold an fd of every file the copy puts in the store, up to the
    // writer's open: whichever way the race goes, what the writer's open
    // found is then visible even if the daemon unlinks the file later.
    let held = hold_store_files(&store, || {
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.set_len(4096).unwrap();
        f
    });
    // Right after the open returned (the writer holds the file).
    let at_open = held.sizes();
    drop(held.result);
    let old_generation = match rep.join().unwrap() {
        Err(replicad_client::Error::Refused { kind, message }) => {
            assert_eq!(kind, ErrorKind::SourceChanged, "{message}");
            assert!(
                message.contains("was opened for writing while it was being copied"),
                "{message}"
            );
            None
        }
        Ok((Response::Replicated { source }, _)) => {
            // The copy won: its replicas were valid before the writer came,
            // so the writer's open must have waited until every one of them
            // was revoked (truncated, not merely unlinked).
            assert!(!source.replicas.is_empty(), "{source:?}");
            for r in &source.replicas {
                assert_eq!(r.state, proto::ReplicaState::Valid, "{source:?}");
                let size = at_open
                    .iter()
                    .find(|(p, _)| p.to_str() == Some(r.file.as_str()))
                    .map(|(_, n)| *n)
                    .unwrap_or_else(|| {
                        panic!(
                            "replica {} was never seen in the store: {at_open:?}",
                            r.file
                        )
                    });
                assert_eq!(
                    size, 0,
                    "the writer's open returned while valid replica {} still held {size} bytes",
                    r.file
                );
            }
            Some(source.generation)
        }
        Ok((other, _)) => panic!("unexpected {other:?}"),
        Err(e) => panic!("unexpected {e}"),
    };
    // Either way no replica of the old bytes remains valid, and the new
    // generation (4096 bytes) comes back by itself.
    let t0 = std::time::Instant::now();
    loop {
        let st = d.status();
        if let Some(s) = st.sources.first() {
            assert!(
                s.replicas
                    .iter()
                    .all(|r| r.bytes == 4096 || r.generation == s.generation),
                "{st:?}"
            );
            assert!(
                s.replicas
                    .iter()
                    .all(|r| r.state != proto::ReplicaState::Valid
                        || (r.bytes == 4096 && Some(r.generation) != old_generation)),
                "a replica of the old bytes is still valid: {st:?}"
            );
            if s.size == 4096
                && s.replicas
                    .iter()
                    .any(|r| r.state == proto::ReplicaState::Valid)
            {
                if let Some(g) = old_generation {
                    assert!(
                        s.generation > g,
                        "the copy won but no new generation: {st:?}"
                    );
                }
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no new generation: {st:?}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        std::fs::read_dir(&store).unwrap().count(),
        1,
        "stale copies left in the store"
    );
}

/// What [`hold_store_files`] saw: an open fd of every file that was in the
/// store at some point before `f` ran, and what `f` returned.
struct Held<T> {
    fds: Vec<(std::path::PathBuf, std::fs::File)>,
    result: T,
}

impl<T> Held<T> {
    /// Each held file's size now (through the fd: unlinked files too).
    fn sizes(&self) -> Vec<(std::path::PathBuf, u64)> {
        self.fds
            .iter()
            .map(|(p, f)| (p.clone(), f.metadata().unwrap().len()))
            .collect()
    }
}

/// Open every file that appears in `store` (a node store) until the copy
/// has written into one (or 2 s have passed), then run `f`: the fds then
/// show what `f` left of each file even if the daemon unlinks it.
fn hold_store_files<T>(store: &std::path::Path, f: impl FnOnce() -> T) -> Held<T> {
    let mut fds: Vec<(std::path::PathBuf, std::fs::File)> = Vec::new();
    let t0 = std::time::Instant::now();
    loop {
        for e in std::fs::read_dir(store).into_iter().flatten().flatten() {
            let p = e.path();
            if fds.iter().all(|(q, _)| *q != p) {
                if let Ok(file) = std::fs::File::open(&p) {
                    fds.push((p, file));
                }
            }
        }
        let copying = fds.iter().any(|(_, f)| f.metadata().unwrap().len() > 0);
        if copying || t0.elapsed() > Duration::from_secs(2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        !fds.is_empty(),
        "no copy appeared in {} within 2 s",
        store.display()
    );
    let result = f();
    Held { fds, result }
}

/// A source deleted while it is copied is not replicated (or, if the copy
/// won, is dropped once unlinked and unattached).
#[test]
fn source_deleted_mid_copy() {
    if !root_or_skip("source_deleted_mid_copy") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("delcopy");
    let file = dir.path().join("big");
    make_file(&file, 768 << 20, 6);
    let _ = std::fs::read(&file).unwrap();
    let store = d.run_dir.path().join("node0");
    let rep = replicate_in_background(&d, &file);
    let held = hold_store_files(&store, || std::fs::remove_file(&file).unwrap());
    match rep.join().unwrap() {
        Err(replicad_client::Error::Refused { kind, message }) => {
            assert_eq!(kind, ErrorKind::SourceChanged, "{message}");
            assert!(message.contains("was deleted"), "{message}");
        }
        Ok((Response::Replicated { source }, _)) => {
            // The copy won: it answered with a whole, valid replica of the
            // file, and that replica must be dropped (checked below) now
            // that the source is unlinked and nobody is attached.
            assert_eq!(source.path, file, "{source:?}");
            assert!(!source.replicas.is_empty(), "{source:?}");
            for r in &source.replicas {
                assert_eq!(r.state, proto::ReplicaState::Valid, "{source:?}");
                assert_eq!(r.bytes, 768 << 20, "{source:?}");
                assert!(r.attachments.is_empty(), "{source:?}");
            }
        }
        Ok((other, _)) => panic!("unexpected {other:?}"),
        Err(e) => panic!("unexpected {e}"),
    }
    let t0 = std::time::Instant::now();
    while !d.status().sources.is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "unlinked source kept: {:?}",
            d.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 0);
    // Whichever way the race went, the copy was truncated, not just
    // unlinked: a process still holding it reads nothing stale.
    for (path, size) in held.sizes() {
        assert_eq!(size, 0, "{} dropped but still holds bytes", path.display());
    }
}

fn raw_connect(d: &Daemon) -> OwnedFd {
    sock::connect(&d.socket, Duration::from_secs(5)).unwrap()
}

fn raw_answer(fd: &OwnedFd) -> Response {
    let p = sock::recv(fd.as_fd(), proto::MAX_RESPONSE)
        .unwrap()
        .expect("an answer");
    Response::decode(&p.data).unwrap()
}

fn expect_error(resp: Response, kind: ErrorKind, needle: &str) {
    match resp {
        Response::Error { kind: k, message } => {
            assert_eq!(k, kind, "{message}");
            assert!(message.contains(needle), "{needle:?} not in {message:?}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Malformed, oversized, wrong-version and fd-smuggling messages, and
/// clients that vanish mid-request: each gets an error (or nothing), and
/// the daemon keeps serving on the same and new connections.
#[test]
fn hostile_control_messages() {
    if !root_or_skip("hostile_control_messages") {
        return;
    }
    let d = Daemon::start("");
    let c = raw_connect(&d);
    sock::send(c.as_fd(), b"garbage", &[]).unwrap();
    expect_error(raw_answer(&c), ErrorKind::BadRequest, "shorter than");
    sock::send(c.as_fd(), b"XXXX\x01\x00\x01\x00{}", &[]).unwrap();
    expect_error(raw_answer(&c), ErrorKind::BadRequest, "magic");
    sock::send(c.as_fd(), b"RPLD\x07\x00\x01\x00{}", &[]).unwrap();
    expect_error(raw_answer(&c), ErrorKind::UnsupportedVersion, "version 7");
    sock::send(c.as_fd(), b"RPLD\x01\x00\x01\x00{\"op\":\"nuke\"}", &[]).unwrap();
    expect_error(raw_answer(&c), ErrorKind::BadRequest, "malformed");
    let mut big = b"RPLD\x01\x00\x01\x00".to_vec();
    big.resize(200_000, b' ');
    sock::send(c.as_fd(), &big, &[]).unwrap();
    expect_error(
        raw_answer(&c),
        ErrorKind::BadRequest,
        "exceeds the limit of 65536",
    );
    // Same connection still answers.
    sock::send(c.as_fd(), &Request::Status.encode(), &[]).unwrap();
    assert!(matches!(raw_answer(&c), Response::Status { .. }));

    let dir = scratch("hostile");
    let file = dir.path().join("f");
    make_file(&file, 8192, 9);
    let f = std::fs::File::open(&file).unwrap();
    // fds on a request that takes none.
    sock::send(c.as_fd(), &Request::Status.encode(), &[f.as_fd()]).unwrap();
    expect_error(raw_answer(&c), ErrorKind::BadRequest, "carries no fds");
    // map with no fd, with two.
    sock::send(
        c.as_fd(),
        &Request::Map {
            node: None,
            table: 0,
            at: 0,
            len: 0,
        }
        .encode(),
        &[],
    )
    .unwrap();
    expect_error(raw_answer(&c), ErrorKind::BadRequest, "exactly one fd");
    sock::send(
        c.as_fd(),
        &Request::Map {
            node: None,
            table: 0,
            at: 0,
            len: 0,
        }
        .encode(),
        &[f.as_fd(), f.as_fd()],
    )
    .unwrap();
    expect_error(raw_answer(&c), ErrorKind::BadRequest, "exactly one fd");
    // An O_PATH fd proves nothing about read permission.
    let cpath = std::ffi::CString::new(file.to_str().unwrap()).unwrap();
    // SAFETY: open(2) with a valid path.
    let opath = unsafe { libc::open(cpath.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    assert!(opath >= 0);
    // SAFETY: opath was just opened.
    let opath = unsafe { OwnedFd::from_raw_fd(opath) };
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    sock::send(
        c.as_fd(),
        &Request::Map {
            node: None,
            table: 0,
            at: 0,
            len: 0,
        }
        .encode(),
        &[opath.as_fd()],
    )
    .unwrap();
    expect_error(
        raw_answer(&c),
        ErrorKind::PermissionDenied,
        "not open for reading",
    );
    // A write-only fd neither.
    let wo = std::fs::OpenOptions::new()
        .append(true)
        .open("/dev/null")
        .unwrap();
    sock::send(
        c.as_fd(),
        &Request::Map {
            node: None,
            table: 0,
            at: 0,
            len: 0,
        }
        .encode(),
        &[wo.as_fd()],
    )
    .unwrap();
    assert!(matches!(raw_answer(&c), Response::Error { .. }));
    // Node out of range on map.
    sock::send(
        c.as_fd(),
        &Request::Map {
            node: Some(9),
            table: 0,
            at: 0,
            len: 0,
        }
        .encode(),
        &[f.as_fd()],
    )
    .unwrap();
    expect_error(raw_answer(&c), ErrorKind::NoSuchNode, "node 9");

    // Clients that disconnect mid-request: before reading the answer of a
    // long copy, and right after connecting.
    let big = dir.path().join("big");
    make_file(&big, 256 << 20, 4);
    for _ in 0..3 {
        let c2 = raw_connect(&d);
        sock::send(
            c2.as_fd(),
            &Request::Replicate {
                path: big.clone(),
                nodes: proto::NodeSelection::All,
            }
            .encode(),
            &[],
        )
        .unwrap();
        drop(c2);
        drop(raw_connect(&d));
    }
    // A half-sent stream of junk on many connections.
    for i in 0..50u8 {
        let c3 = raw_connect(&d);
        let _ = sock::send(c3.as_fd(), &vec![i; i as usize * 100], &[]);
    }
    // Still serving.
    let t0 = std::time::Instant::now();
    loop {
        let st = d.status();
        if st.sources.len() == 2 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.child.is_some());
    d.ctl_ok(&["evict", big.to_str().unwrap()]);
}

/// Admin requests need root; anyone may map files they can read, and
/// nobody gets a replica of a file they cannot read.
#[test]
fn unprivileged_clients() {
    if !root_or_skip("unprivileged_clients") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("unpriv");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let secret = dir.path().join("secret");
    make_file(&secret, 8192, 1);
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let public = dir.path().join("public");
    make_file(&public, 8192, 2);
    std::fs::set_permissions(&public, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    d.ctl_ok(&[
        "replicate",
        secret.to_str().unwrap(),
        public.to_str().unwrap(),
    ]);

    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                REPLICACTL,
                "--socket",
            ])
            .arg(&d.socket)
            .args(args)
            .output()
            .unwrap()
    };
    let out = as_nobody(&["replicate", public.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root (uid 0)"), "{err}");
    let out = as_nobody(&["evict", public.to_str().unwrap()]);
    assert!(!out.status.success());

    let out = as_nobody(&["map", public.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("replica on node0"),
        "{text}"
    );
    // The secret: the client cannot even open it, so it has no fd to pass.
    let out = as_nobody(&["map", secret.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    // Nor can it open the replica file in the store directly.
    let st = d.status();
    let replica = st
        .sources
        .iter()
        .find(|s| s.path == secret)
        .unwrap()
        .replicas[0]
        .file
        .clone();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "cat",
            &replica,
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "nobody read the replica of a 0600 file"
    );
    assert!(d
        .status()
        .sources
        .iter()
        .all(|s| s.replicas[0].attachments.len() <= 1));
}

/// A replica fd is read-only: writes and writable shared mappings fail,
/// and so does reopening it for writing through /proc.
#[test]
fn replica_fd_is_read_only() {
    if !root_or_skip("replica_fd_is_read_only") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("rofd");
    let file = dir.path().join("f");
    make_file(&file, 16384, 1);
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    let f = std::fs::File::open(&file).unwrap();
    let (resp, fds) = replicad_client::request(
        &d.socket,
        &Request::Map {
            node: None,
            table: 0,
            at: 0,
            len: 0,
        },
        &[f.as_fd()],
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(
        matches!(resp, Response::Mapped { size: 16384, .. }),
        "{resp:?}"
    );
    let rfd = &fds[0];
    // SAFETY: write(2) of one byte from a valid buffer.
    let n = unsafe { libc::write(rfd.as_raw_fd(), b"x".as_ptr().cast(), 1) };
    assert_eq!(n, -1, "write to a replica fd succeeded");
    // SAFETY: mmap with a null hint; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            rfd.as_raw_fd(),
            0,
        )
    };
    assert_eq!(p, libc::MAP_FAILED, "writable shared mapping of a replica");
    // Nobody may write the replica file either (that root cannot, the
    // replica being immutable, is in tests/immutable.rs).
    let link = format!("/proc/self/fd/{}", rfd.as_raw_fd());
    let target = std::fs::read_link(&link).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg(format!("echo x >> '{}'", target.display()))
        .output()
        .unwrap();
    assert!(!out.status.success(), "nobody could write the replica file");
    assert_eq!(std::fs::read(&file).unwrap().len(), 16384);
}

/// /metrics exposes the required families, /status the list.
#[test]
fn metrics_and_status_api() {
    if !root_or_skip("metrics_and_status_api") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("metrics");
    // HTTP /status lists what anyone may read: a way in for everyone.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let file = dir.path().join("f");
    make_file(&file, 2 << 20, 1);
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    assert_eq!(d.metric("replicad_replicas{target=\"node0\"}"), 1.0);
    assert_eq!(
        d.metric("replicad_replica_bytes{target=\"node0\"}"),
        (2 << 20) as f64
    );
    assert!(d.metric("replicad_copied_bytes_total{target=\"node0\"}") >= (2 << 20) as f64);
    // A write: invalidation counted, latency observed.
    std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    assert!(d.metric("replicad_invalidations_total{reason=\"write\"}") >= 1.0);
    assert!(d.metric("replicad_invalidation_seconds_count") >= 1.0);
    assert!(d.metric("replicad_writer_wait_seconds_count") >= 1.0);
    let status: serde_json::Value = serde_json::from_str(&d.http_get("/status")).unwrap();
    assert_eq!(status["sources"][0]["path"], file.to_str().unwrap());
    assert_eq!(d.http_get("/healthz"), "ok\n");
}

/// SIGHUP: an invalid config is refused with file, line and reason and the
/// running configuration stays in effect (its [[replicate]] list is still
/// the one the next reload is compared with); a valid one applies its
/// [[replicate]] list, evicting what the running one listed and it does not.
#[test]
fn sighup_reload() {
    if !root_or_skip("sighup_reload") {
        return;
    }
    let dir = scratch("hup");
    let old_file = dir.path().join("old");
    let file = dir.path().join("w");
    make_file(&old_file, 65536, 2);
    make_file(&file, 65536, 1);
    let entry =
        |p: &std::path::Path| format!("\n[[replicate]]\npath = \"{}\"\nnodes = [0]\n", p.display());
    // The running config lists `old`.
    let d = Daemon::start(&entry(&old_file));
    let wait_for = |what: &str, f: &dyn Fn(&proto::StatusReport) -> bool| {
        let t0 = std::time::Instant::now();
        loop {
            let st = d.status();
            if f(&st) {
                return st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{what}: {st:?}\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let valid = |st: &proto::StatusReport, p: &std::path::Path| {
        st.sources.iter().any(|s| {
            s.path == p
                && s.replicas
                    .iter()
                    .any(|r| r.state == proto::ReplicaState::Valid)
        })
    };
    let st = wait_for("the configured file is replicated", &|st| {
        valid(st, &old_file)
    });
    let old_generation = st.sources[0].generation;
    let good = std::fs::read_to_string(&d.config).unwrap();
    let base = good.replace(&entry(&old_file), "");
    assert_ne!(base, good);

    // A bad config that would drop `old` and add `w`: refused, nothing of
    // it applies.
    std::fs::write(
        &d.config,
        format!("{base}{}\n[store]\ncopy_threads = \"two\"\n", entry(&file)),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    let t0 = std::time::Instant::now();
    while !d.log().contains("reload refused") {
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = d.log();
    let line = log.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(
        line.contains(&format!("{}:", d.config.display())) && line.contains("copy_threads"),
        "{line}"
    );
    // Give a wrongly applied list time to show.
    std::thread::sleep(Duration::from_millis(300));
    let st = d.status();
    assert_eq!(st.sources.len(), 1, "{st:?}");
    assert!(
        valid(&st, &old_file),
        "the running config's file lost its replica: {st:?}"
    );
    assert_eq!(st.sources[0].generation, old_generation, "{st:?}");

    // A good config listing only `w`: `w` is replicated and `old`, listed
    // by the running config (still the one from the start), is evicted.
    std::fs::write(&d.config, format!("{base}{}", entry(&file))).unwrap();
    d.signal(libc::SIGHUP);
    let st = wait_for("the reload applies", &|st| {
        valid(st, &file) && !st.sources.iter().any(|s| s.path == old_file)
    });
    assert_eq!(st.sources.len(), 1, "{st:?}");
    assert_eq!(st.sources[0].path, file);
    assert!(d.log().contains("no longer configured"), "{}", d.log());
}

/// A crashed daemon's replicas are taken over from its fence keeper at the
/// next start (copied again: never); with the keeper gone too they are
/// removed before anything else; SIGTERM invalidates everything and
/// unmounts.
#[test]
fn restart_and_shutdown() {
    if !root_or_skip("restart_and_shutdown") {
        return;
    }
    let mut d = Daemon::start("");
    let dir = scratch("restart");
    let file = dir.path().join("w");
    make_file(&file, 1 << 20, 1);
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    let store = d.run_dir.path().join("node0");
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 1);
    let replica = std::fs::read_dir(&store)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let inode =
        |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = inode(&replica);

    // The daemon alone: its keeper fences on, and the next daemon adopts.
    d.crash();
    d.restart();
    let st = d.status();
    assert_eq!(st.sources.len(), 1, "{st:?}\n{}", d.log());
    assert_eq!(st.sources[0].generation, 1, "{st:?}");
    assert_eq!(inode(&replica), before, "the replica was copied again");
    assert_eq!(d.metric("replicad_adopted_replicas_total"), 1.0);
    assert_eq!(
        d.metric("replicad_copied_bytes_total{target=\"node0\"}"),
        0.0
    );
    assert_eq!(d.metric("replicad_leftovers_removed_total"), 0.0);

    // Both processes: the lease died with them; the leftover is stale.
    let keeper = keeper_in(d.run_dir.path()).unwrap();
    // SAFETY: a signal to the keeper of the daemon this test started.
    unsafe { libc::kill(keeper as i32, libc::SIGKILL) };
    d.crash();
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 1);
    d.restart();
    assert_eq!(
        std::fs::read_dir(&store).unwrap().count(),
        0,
        "leftover survived the restart"
    );
    assert!(d.status().sources.is_empty());
    assert!(d.log().contains("leftover"), "{}", d.log());
    assert_eq!(d.metric("replicad_leftovers_removed_total"), 1.0);

    // A reader attached at SIGTERM falls back and keeps the right bytes.
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    let want = fnv1a(&std::fs::read(&file).unwrap());
    let mut reader = Command::new(program("replicad-reader"))
        .args(["once", file.to_str().unwrap(), "--hold"])
        .env("REPLICAD_SOCKET", &d.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(reader.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(
        json(&line)["backing"]
            .as_str()
            .unwrap()
            .starts_with("replica"),
        "{line}"
    );
    // SIGTERM must release every fence, not just die with it: hold our own
    // duplicates of the daemon's fds of the source (the same open file
    // descriptions, so a lease it leaves behind outlives its exit), then
    // after it exits a non-blocking write-open must not find a lease.
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&file).unwrap());
    assert!(
        lease_on(ino),
        "no lease on the source before SIGTERM:\n{}",
        std::fs::read_to_string("/proc/locks").unwrap()
    );
    let dups = dup_fds_of(d.pid(), &file);
    assert!(
        !dups.is_empty(),
        "the daemon holds no fd of {}",
        file.display()
    );
    let st = d.stop();
    assert!(st.success(), "{st}\n{}", d.log());
    let w = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&file);
    assert!(
        w.is_ok() && !lease_on(ino),
        "SIGTERM left a lease on the source (the daemon's fd outlived it in ours): {w:?}\n{}\n{}",
        std::fs::read_to_string("/proc/locks").unwrap(),
        d.log()
    );
    drop(w);
    drop(dups);
    assert!(
        d.mounts().is_empty(),
        "stores still mounted: {:?}",
        d.mounts()
    );
    assert!(!d.socket.exists());
    reader.stdin.take().unwrap().write_all(b"").unwrap();
    drop(reader.stdin.take());
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let v = json(&line);
    assert_eq!(v["after_hold_checksum"], format!("{want:016x}"));
    assert_eq!(v["on_replica"], false);
    assert!(reader.wait().unwrap().success());
    // The writer is not held up by a dead daemon.
    std::fs::OpenOptions::new().write(true).open(&file).unwrap();
}

/// Whether /proc/locks lists a LEASE on inode `ino`.
fn lease_on(ino: u64) -> bool {
    let suffix = format!(":{ino}");
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| l.contains("LEASE") && l.split_whitespace().any(|f| f.ends_with(&suffix)))
}

/// Duplicates (pidfd_getfd: the same open file descriptions) of every fd
/// process `pid` holds of `file`.
fn dup_fds_of(pid: u32, file: &std::path::Path) -> Vec<OwnedFd> {
    // SAFETY: pidfd_open on a pid; the result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if std::fs::read_link(e.path()).ok().as_deref() != Some(file) {
            continue;
        }
        let Ok(target) = e.file_name().to_string_lossy().parse::<libc::c_int>() else {
            continue;
        };
        // SAFETY: pidfd_getfd on our pidfd; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
        assert!(fd >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd we own.
        out.push(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    out
}

/// A second daemon on the same socket refuses to start, naming it, and
/// touches nothing of the first's: its replica stays, valid, and readers
/// still get it.
#[test]
fn second_daemon_refused() {
    if !root_or_skip("second_daemon_refused") {
        return;
    }
    let d = Daemon::start_opts("", false);
    let dir = scratch("second");
    let file = dir.path().join("w");
    make_file(&file, 1 << 20, 4);
    let want = std::fs::read(&file).unwrap();
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    let before = d.status();
    assert_eq!(before.sources.len(), 1, "{before:?}");
    let replica = before.sources[0].replicas[0].clone();
    assert_eq!(replica.state, proto::ReplicaState::Valid, "{before:?}");

    let out = Command::new(REPLICAD)
        .args(["--config"])
        .arg(&d.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another replicad is already serving"), "{err}");

    // The first daemon's replica is untouched: still in its store with the
    // source's bytes, still valid in status, and a reader maps it.
    assert!(
        std::fs::read(&replica.file).unwrap_or_default() == want,
        "replica {} wiped or changed by the refused daemon",
        replica.file
    );
    let after = d.status();
    assert_eq!(after.sources.len(), 1, "{after:?}");
    let r = &after.sources[0].replicas;
    assert!(
        r.iter().any(|r| r.file == replica.file
            && r.state == proto::ReplicaState::Valid
            && r.generation == replica.generation),
        "replica no longer valid after the refused start: {after:?}"
    );
    let out = Command::new(program("replicad-reader"))
        .args(["once", file.to_str().unwrap()])
        .env("REPLICAD_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json(&String::from_utf8_lossy(&out.stdout));
    assert!(
        v["backing"].as_str().unwrap().starts_with("replica"),
        "reader not on the replica: {v}\n{}",
        d.log()
    );
    assert_eq!(v["checksum"], format!("{:016x}", fnv1a(&want)), "{v}");
    assert!(
        v["maps"].as_str().unwrap().contains(&replica.file),
        "reader maps something else: {v}"
    );
}

/// Files on a read-only mount are leased like any other (the mount can be
/// remounted read-write: tests/fence_paths.rs writes through it) and serve
/// replicas like any other.
#[test]
fn read_only_mount_is_leased() {
    if !root_or_skip("read_only_mount_is_leased") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("romount");
    let src = dir.path().join("src");
    let view = dir.path().join("view");
    std::fs::create_dir(&src).unwrap();
    std::fs::create_dir(&view).unwrap();
    make_file(&src.join("f"), 65536, 1);
    // A tmpfs mounted read-only after filling it.
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "replicad-test-ro"])
        .arg(&view)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount tmpfs");
    // Copied by a child: a writable fd of this process on the tmpfs could be
    // inherited by another test's fork, and the remount read-only would
    // fail with EBUSY until that child execs.
    let ok = Command::new("cp")
        .arg(src.join("f"))
        .arg(view.join("f"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp into the tmpfs");
    let ok = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&view)
        .status()
        .unwrap()
        .success();
    assert!(ok, "remount ro");
    let out = d.ctl_ok(&["replicate", view.join("f").to_str().unwrap()]);
    assert!(out.contains("generation 1"), "{out}");
    let st = d.status();
    assert_eq!(st.sources[0].fence, "lease", "{st:?}");
    let out = d.ctl_ok(&["map", view.join("f").to_str().unwrap()]);
    assert!(out.contains("replica on node0"), "{out}");
    d.ctl_ok(&["evict", view.join("f").to_str().unwrap()]);
    let c = std::ffi::CString::new(view.to_str().unwrap()).unwrap();
    // SAFETY: unmounting our test mount.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}
