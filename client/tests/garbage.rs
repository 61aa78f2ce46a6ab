//! Whatever the daemon sends back, `map` returns the file's bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use std::os::fd::OwnedFd;
use std::time::Duration;

use common::*;
use replicad_client::proto::{self, ErrorKind, Response};
use replicad_client::{map_with, Backing, MapOptions};

fn header(magic: &[u8; 4], version: u16, kind: u16) -> Vec<u8> {
    let mut v = magic.to_vec();
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&kind.to_le_bytes());
    v
}

fn mapped(size: u64) -> Vec<u8> {
    Response::Mapped {
        node: 0,
        generation: 9,
        size,
    }
    .encode()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

type Case = (&'static str, Box<dyn Fn(&Incoming) -> Reply + Send + Sync>);

fn cases(file_len: u64) -> Vec<Case> {
    let replica = |inc: &Incoming| replica_copy(&inc.fds[0]).0;
    let pipe = || -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds has room for two fds.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        use std::os::fd::FromRawFd;
        // SAFETY: both fds were just created.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    };
    vec![
        (
            "bad magic",
            Box::new(move |inc| {
                let mut b = header(b"XXXX", proto::VERSION, 2);
                b.extend_from_slice(&mapped(file_len)[proto::HEADER_LEN..]);
                Reply::Send(b, vec![replica(inc)])
            }),
        ),
        (
            "other version",
            Box::new(move |inc| {
                let mut b = header(&proto::MAGIC, 77, 2);
                b.extend_from_slice(&mapped(file_len)[proto::HEADER_LEN..]);
                Reply::Send(b, vec![replica(inc)])
            }),
        ),
        (
            "request kind",
            Box::new(move |inc| {
                let mut b = header(&proto::MAGIC, proto::VERSION, 1);
                b.extend_from_slice(&mapped(file_len)[proto::HEADER_LEN..]);
                Reply::Send(b, vec![replica(inc)])
            }),
        ),
        (
            "short packet",
            Box::new(|_| Reply::Send(b"RPL".to_vec(), vec![])),
        ),
        (
            "malformed json",
            Box::new(move |inc| {
                let mut b = header(&proto::MAGIC, proto::VERSION, 2);
                b.extend_from_slice(b"{\"op\":\"mapped\",\"node\":");
                Reply::Send(b, vec![replica(inc)])
            }),
        ),
        (
            "oversized",
            Box::new(move |inc| {
                let mut b = mapped(file_len);
                b.resize(proto::MAX_RESPONSE + 4096, b' ');
                Reply::Send(b, vec![replica(inc)])
            }),
        ),
        (
            "mapped without fd",
            Box::new(move |_| Reply::Send(mapped(file_len), vec![])),
        ),
        (
            "mapped with two fds",
            Box::new(move |inc| Reply::Send(mapped(file_len), vec![replica(inc), replica(inc)])),
        ),
        (
            "size larger than file",
            Box::new(move |inc| Reply::Send(mapped(file_len + 1), vec![replica(inc)])),
        ),
        (
            "size u64::MAX",
            Box::new(move |inc| Reply::Send(mapped(u64::MAX), vec![replica(inc)])),
        ),
        (
            "size zero",
            Box::new(move |inc| Reply::Send(mapped(0), vec![replica(inc)])),
        ),
        (
            "replica shorter than size",
            Box::new(move |_| Reply::Send(mapped(file_len), vec![memfd("short")])),
        ),
        (
            "replica is a pipe",
            Box::new(move |_| Reply::Send(mapped(file_len), vec![pipe().0])),
        ),
        (
            "replica is write-only",
            Box::new(move |inc| {
                let r = replica(inc);
                let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&r));
                let w = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                Reply::Send(mapped(file_len), vec![OwnedFd::from(w)])
            }),
        ),
        (
            "original",
            Box::new(|_| {
                Reply::Send(
                    Response::Original {
                        reason: "no replica on node 0 yet".into(),
                    }
                    .encode(),
                    vec![],
                )
            }),
        ),
        (
            "refused",
            Box::new(|_| {
                Reply::Send(
                    Response::error(ErrorKind::NoSpace, "node 0 store is full").encode(),
                    vec![],
                )
            }),
        ),
        (
            "wrong response",
            Box::new(move |inc| {
                Reply::Send(
                    Response::Evicted { replicas: 3 }.encode(),
                    vec![replica(inc)],
                )
            }),
        ),
        ("closes without answering", Box::new(|_| Reply::Close)),
        (
            "never answers",
            Box::new(|_| Reply::Stall(Duration::from_millis(1500))),
        ),
    ]
}

#[test]
fn garbage_from_the_daemon_still_maps_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(3 * 4096 + 99, 9);
    let p = write_file(dir.path(), "data", &data);
    let fds_before = open_fds();
    for (name, reply) in cases(data.len() as u64) {
        let daemon = FakeDaemon::start(move |inc| reply(&inc));
        let opts = MapOptions {
            socket: daemon.socket.clone(),
            node: Some(0),
            timeout: Duration::from_millis(400),
        };
        let t0 = std::time::Instant::now();
        let m = map_with(&p, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        // One request, each step bounded by `timeout` (connect, and
        // SO_RCVTIMEO for the answer): even a daemon that never answers
        // costs at most 400 ms. Asserted with 3x slack for a loaded
        // 2-core machine.
        let took = t0.elapsed();
        assert!(
            took < opts.timeout * 3,
            "{name}: map_with took {took:?}, its time-out is {:?}",
            opts.timeout
        );
        assert_eq!(first_mismatch(m.as_slice(), &data), None, "{name}");
        assert!(!m.on_replica(), "{name}");
        let Backing::File { reason } = m.backing() else {
            panic!("{name}: {:?}", m.backing());
        };
        assert!(!reason.is_empty(), "{name}");
        eprintln!("{name}: {reason}");
        match name {
            "original" => assert!(reason.contains("no replica on node 0 yet"), "{reason}"),
            "refused" => assert!(reason.contains("node 0 store is full"), "{reason}"),
            "oversized" => assert!(
                reason.contains("exceeds") || reason.contains("without an answer"),
                "{reason}"
            ),
            _ => {}
        }
        let mapping = maps_line(m.as_ptr() as usize);
        assert!(
            mapping.ends_with(&p.display().to_string()),
            "{name}: {mapping}"
        );
        drop(m);
        drop(daemon);
    }
    // Every fd the daemon sent (replicas, pipes) was closed.
    assert_eq!(open_fds(), fds_before, "fds leaked");
}
