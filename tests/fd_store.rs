//! systemd's fd store (issue 9): under systemd (`NOTIFY_SOCKET`) every
//! kept lease and memfd replica also goes to the store (`FDSTORE=1`; a
//! tmpfs replica holds no fd and stays in its node store, found again by
//! its xattrs), so that the
//! leases outlive the daemon and its keeper killed together, and the
//! restarted daemon takes them back from `LISTEN_FDS`. This test plays
//! systemd's part with the same protocol: it binds the notify socket,
//! keeps every fd it is sent (dropping those `FDSTOREREMOVE=1` names), and
//! starts the new daemon with them at fds 3.. and `LISTEN_PID`,
//! `LISTEN_FDS`, `LISTEN_FDNAMES` set, as systemd does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// What systemd would hold: fds by name, in arrival order.
#[derive(Default)]
struct Store {
    fds: BTreeMap<String, Vec<OwnedFd>>,
}

impl Store {
    fn drain(&mut self, sock: &UnixDatagram) {
        let mut buf = [0u8; 4096];
        while let Ok(Some((n, fds))) =
            replicad_replicator::sys::recv_with_fds(sock.as_fd(), &mut buf)
        {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .unwrap_or("stored")
                .to_string();
            if text.lines().any(|l| l == "FDSTORE=1") {
                self.fds.entry(name).or_default().extend(fds);
            } else if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
                self.fds.remove(&name);
            }
        }
    }
}

/// Start the daemon again as systemd would, with what `store` kept at fds
/// 3.. and `LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES` set.
fn restart_from(d: &mut Daemon, store: &mut Store) {
    let mut names = Vec::new();
    let mut fds = Vec::new();
    for (name, list) in std::mem::take(&mut store.fds) {
        for fd in list {
            names.push(name.clone());
            fds.push(fd);
        }
    }
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(&d.log)
        .unwrap();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(REPLICAD)
        .arg("--config")
        .arg(&d.config)
        .env("LISTEN_FDS", raw.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: only dup2/fcntl (async-signal-safe) between fork and exec:
    // the stored fds moved out of the way, then to 3, 4, ...
    unsafe {
        cmd.pre_exec(move || {
            let mut high = Vec::with_capacity(raw.len());
            for &fd in &raw {
                let h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 1000);
                if h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high.push(h);
            }
            for (i, &h) in high.iter().enumerate() {
                if libc::dup2(h, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    d.child = Some(cmd.spawn().unwrap());
    drop(fds);
    let t0 = Instant::now();
    while d.request(&replicad_client::proto::Request::Status).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A daemon started as systemd would start it: `NOTIFY_SOCKET` names a
/// datagram socket this test reads (the store's messages arrive there).
/// Call with [`ONE_AT_A_TIME`] held: no other thread of this binary reads
/// the environment or starts a process meanwhile.
fn under_systemd() -> (Daemon, UnixDatagram, tempfile::TempDir) {
    let dir = scratch("fdstore-notify");
    let notify = dir.path().join("notify");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_nonblocking(true).unwrap();
    std::env::set_var("NOTIFY_SOCKET", &notify);
    let d = Daemon::start("");
    std::env::remove_var("NOTIFY_SOCKET");
    (d, sock, dir)
}

#[test]
fn the_fd_store_keeps_the_fence_when_daemon_and_keeper_die_together() {
    if !root_or_skip("the_fd_store_keeps_the_fence_when_daemon_and_keeper_die_together") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let _t = BreakTime::set(10);
    let (mut d, sock, _notify_dir) = under_systemd();

    let dir = scratch("fdstore");
    let (written, kept) = (dir.path().join("written"), dir.path().join("kept"));
    make_file(&written, 64 * 4096, 1);
    make_file(&kept, 64 * 4096, 2);
    d.ctl_ok(&[
        "replicate",
        written.to_str().unwrap(),
        kept.to_str().unwrap(),
    ]);
    let reader = map_on_replica(&d, &kept);
    let want = std::fs::read(&kept).unwrap();

    let mut store = Store::default();
    let t0 = Instant::now();
    while store.fds.len() < 2 && t0.elapsed() < Duration::from_secs(5) {
        store.drain(&sock);
        std::thread::sleep(Duration::from_millis(10));
    }
    // Give anything more a moment to arrive: there must be nothing more.
    std::thread::sleep(Duration::from_millis(100));
    store.drain(&sock);
    let names: Vec<&String> = store.fds.keys().collect();
    assert_eq!(
        names.iter().filter(|n| n.starts_with("src-")).count(),
        2,
        "{names:?}"
    );
    // The replicas are tmpfs (root): they hold no fd, and need none in the
    // store: they stay in the node store, where the restarted daemon finds
    // them by their xattrs (memfd replicas would be stored as rep-).
    assert_eq!(
        names.iter().filter(|n| n.starts_with("rep-")).count(),
        0,
        "{names:?}"
    );

    // Both processes die together: only the store holds the leases now.
    let keeper = keeper_in(d.run_dir.path()).unwrap();
    // SAFETY: a signal to the keeper of the daemon this test started.
    unsafe { libc::kill(keeper as i32, libc::SIGKILL) };
    d.crash();
    // A writer comes, and waits: the lease lives in the store.
    let w = written.clone();
    let writer = std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut f = std::fs::OpenOptions::new().write(true).open(&w).unwrap();
        let waited = t0.elapsed();
        f.write_all(&vec![9u8; 64 * 4096]).unwrap();
        waited
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !writer.is_finished(),
        "the writer went through with no fence"
    );

    // systemd starts the daemon again with what it kept.
    restart_from(&mut d, &mut store);
    // The writer was let in by the adoption (a writer waiting: revoked),
    // not by the kernel's 10 s.
    let waited = writer.join().unwrap();
    assert!(
        waited < Duration::from_secs(5),
        "the writer waited {waited:?}"
    );
    eprintln!("both killed, restarted from the fd store: the writer waited {waited:?}");
    // The untouched source was taken over, not copied, and its reader is
    // still on the same replica, reading the right bytes.
    let st = d.status();
    let src = st.sources.iter().find(|s| s.path == kept).unwrap();
    assert_eq!(src.generation, 1, "{st:?}");
    assert!(
        d.metric("replicad_adopted_replicas_total") >= 1.0,
        "{}",
        d.log()
    );
    assert_eq!(
        d.metric("replicad_copied_bytes_total{target=\"node0\"}"),
        0.0
    );
    assert!(reader.on_replica());
    assert_eq!(reader.as_slice(), &want[..]);
    assert!(d.log().contains("fd store kept"), "{}", d.log());
}

/// The daemon killed alone under systemd, its keeper orphaned and then
/// stopped, so that it can neither hand over nor exit. The stored fds are
/// the same open file descriptions the keeper holds: a daemon that served
/// them while that keeper lived could have its lease released under it
/// the moment the keeper ran again. So the restarted daemon ends the keeper
/// first (it revokes everything); a later generation is then fenced by
/// nobody but the daemon.
#[test]
fn a_keeper_that_cannot_hand_over_is_ended_before_the_store_is_used() {
    if !root_or_skip("a_keeper_that_cannot_hand_over_is_ended_before_the_store_is_used") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let _t = BreakTime::set(3);
    let (mut d, sock, _notify_dir) = under_systemd();
    let dir = scratch("fdstore2");
    let file = dir.path().join("f");
    make_file(&file, 64 * 4096, 1);
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    let mut store = Store::default();
    let t0 = Instant::now();
    while store.fds.is_empty() && t0.elapsed() < Duration::from_secs(5) {
        store.drain(&sock);
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    store.drain(&sock);
    // The lease; the tmpfs replica stays in the node store, with no fd.
    assert_eq!(store.fds.len(), 1, "{:?}", store.fds.keys());

    let keeper = keeper_in(d.run_dir.path()).unwrap();
    d.crash();
    let t0 = Instant::now();
    while !d.run_dir.path().join("keeper.sock").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "the keeper never listened"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: a signal to the keeper of the daemon this test started.
    unsafe { libc::kill(keeper as i32, libc::SIGSTOP) };
    restart_from(&mut d, &mut store);
    let gone =
        |pid: u32| std::fs::read(format!("/proc/{pid}/cmdline")).map_or(true, |c| c.is_empty());
    assert!(
        gone(keeper),
        "the old keeper lives beside the new daemon:\n{}",
        d.log()
    );

    // A write, and the next generation, fenced by the new daemon alone.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .write_all(&vec![2u8; 64 * 4096])
        .unwrap();
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    let reader = map_on_replica(&d, &file);
    // Had the old keeper lived, it would run now, and release.
    if !gone(keeper) {
        // SAFETY: as above.
        unsafe { libc::kill(keeper as i32, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(200));
    }
    let t0 = Instant::now();
    let mut w = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    let waited = t0.elapsed();
    w.write_all(&vec![3u8; 64 * 4096]).unwrap();
    let stale = reader.as_slice().iter().filter(|&&b| b != 3).count();
    assert_eq!(
        stale, 0,
        "the reader read {stale} stale bytes (writer waited {waited:?})"
    );
}
