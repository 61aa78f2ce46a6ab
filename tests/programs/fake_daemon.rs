//! Test program: a fake replicad, as an attacker would run one (tests/trust.rs
//! runs it as nobody).
//!
//! `replicad-fake-daemon SOCKET FILE...`
//!
//! Listens on SOCKET and writes a forged published set beside it
//! (`replicas.set`, the runner's own, mode 0644) that lists a replica of
//! every FILE on every node. It answers a hello with `Attached` and nothing
//! in it, and a `Map` with `Mapped` and a replica of its own making: a
//! memfd the size of the client's file holding `FORGED!!` over and over,
//! handed as the real daemon hands replicas (a fresh read-only open, on
//! tmpfs), so that only its owner tells it from a real one.
//!
//! Prints `ready` once listening, then one line per event: `connection`,
//! `request hello`, `request map`, `read the client's file: <bytes>` (what
//! the fd a client sent lets it read), `closed without a request`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use replicad_wire::proto::{ErrorKind, Request, Response};
use replicad_wire::published::{self, PublishedEntry, Writer};
use replicad_wire::sock;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// A read-only open of a new memfd of `len` bytes of `FORGED!!`.
fn forged_replica(len: u64) -> OwnedFd {
    // SAFETY: a valid name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"replicad:forged".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: just created, ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let bytes: Vec<u8> = b"FORGED!!"
        .iter()
        .copied()
        .cycle()
        .take(len as usize)
        .collect();
    let mut f = File::from(fd.try_clone().unwrap());
    f.write_all(&bytes).unwrap();
    let ro = File::open(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    OwnedFd::from(ro)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((socket, files)) = args.split_first() else {
        eprintln!("usage: replicad-fake-daemon SOCKET FILE...");
        std::process::exit(2);
    };
    let socket = Path::new(socket);
    let _ = std::fs::remove_file(socket);
    let listener = sock::listen(socket, 16).unwrap();
    // Blocking accepts: this program does nothing else.
    // SAFETY: F_SETFL on our own listening socket.
    unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_SETFL, 0) };

    let entries: Vec<PublishedEntry> = files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).unwrap();
            PublishedEntry {
                dev: m.dev(),
                ino: m.ino(),
                nodes: !published::NODES_OTHER,
                generation: 1,
            }
        })
        .collect();
    let mut set = Writer::create(&socket.with_file_name(published::FILE_NAME), 8).unwrap();
    set.publish(&entries);
    say("ready");

    loop {
        // SAFETY: accept4 on our listening socket; the result is checked.
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
        say("connection");
        sock::set_recv_timeout(conn.as_fd(), Duration::from_secs(5)).unwrap();
        let packet = match sock::recv(conn.as_fd(), 64 * 1024) {
            Ok(Some(p)) => p,
            _ => {
                say("closed without a request");
                continue;
            }
        };
        let (bytes, fds) = match Request::decode(&packet.data) {
            Ok(Request::Hello { .. }) => {
                say("request hello");
                let r = Response::Attached {
                    node: 0,
                    sources: 0,
                    ranges: vec![],
                    skipped: vec![],
                };
                (r.encode(), vec![])
            }
            Ok(Request::Map { .. }) if packet.fds.len() == 1 => {
                say("request map");
                let theirs = File::from(packet.fds[0].try_clone().unwrap());
                let size = theirs.metadata().unwrap().len();
                let mut head = vec![0u8; 32];
                let n = theirs.read_at(&mut head, 0).unwrap_or(0);
                head.truncate(n);
                say(&format!("read the client's file: {}", head.escape_ascii()));
                let r = Response::Mapped {
                    node: 0,
                    generation: 1,
                    size,
                };
                (r.encode(), vec![forged_replica(size)])
            }
            _ => (
                Response::error(ErrorKind::BadRequest, "fake daemon").encode(),
                vec![],
            ),
        };
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        let _ = sock::send(conn.as_fd(), &bytes, &borrowed);
    }
}
