//! `map` believes only replicas and published sets that are the daemon's:
//! a replica fd open for writing, on another filesystem than the daemon's
//! store (tmpfs, hugetlbfs) or owned by another uid than the daemon's is
//! not mapped (the file is, and the reason says which check failed), and a
//! published set owned by an untrusted uid or writable by group or others
//! is not read (the daemon is asked instead). The fake daemon here runs in
//! the test process, as the test's uid; tests/trust.rs runs one as nobody.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use replicad_client::proto::{ErrorKind, Request, Response};
use replicad_client::{map_with, Backing, MapOptions};
use replicad_wire::published::{self, Writer};

fn opts(daemon: &FakeDaemon) -> MapOptions {
    MapOptions {
        socket: daemon.socket.clone(),
        node: Some(0),
        timeout: Duration::from_secs(2),
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// A fake daemon that answers `Map` with `Mapped` and the fd `replica`
/// makes from the client's file.
fn daemon_handing(replica: impl Fn(&OwnedFd) -> OwnedFd + Send + Sync + 'static) -> FakeDaemon {
    FakeDaemon::start(move |inc| {
        let (Some(Request::Map { .. }), [src]) = (&inc.request, &inc.fds[..]) else {
            return Reply::Send(
                Response::error(ErrorKind::BadRequest, "bad").encode(),
                vec![],
            );
        };
        let size = File::from(src.try_clone().unwrap())
            .metadata()
            .unwrap()
            .len();
        Reply::Send(
            Response::Mapped {
                node: 0,
                generation: 1,
                size,
            }
            .encode(),
            vec![replica(src)],
        )
    })
}

/// Map `p` through `daemon` and return why the file itself backs it;
/// panics if a replica does.
fn refused(p: &Path, data: &[u8], daemon: &FakeDaemon) -> String {
    let m = map_with(p, &opts(daemon)).unwrap();
    assert_eq!(first_mismatch(m.as_slice(), data), None);
    assert!(!m.on_replica());
    let Backing::File { reason } = m.backing() else {
        panic!("the replica was mapped: {:?}", m.backing());
    };
    assert!(
        maps_line(m.as_ptr() as usize).ends_with(&p.display().to_string()),
        "{reason}"
    );
    eprintln!("{reason}");
    reason.clone()
}

#[test]
fn a_replica_open_for_writing_is_not_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(2 * 4096 + 7, 3);
    let p = write_file(dir.path(), "data", &data);
    // The memfd as memfd_create made it: read-write.
    let daemon = daemon_handing(|src| replica_copy(src).0);
    let reason = refused(&p, &data, &daemon);
    assert!(
        reason.contains(&format!("the replica /memfd:{REPLICA_NAME}")),
        "{reason}"
    );
    assert!(
        reason.contains("it is open read-write, not read-only"),
        "{reason}"
    );
}

#[test]
fn a_replica_on_another_filesystem_is_not_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(2 * 4096 + 7, 4);
    let p = write_file(dir.path(), "data", &data);
    // A read-only copy on a disk filesystem (the crate's own directory).
    let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let copy = write_file(disk.path(), "copy", &pattern(data.len(), 99));
    let copy2 = copy.clone();
    let daemon = daemon_handing(move |_| OwnedFd::from(File::open(&copy2).unwrap()));
    let reason = refused(&p, &data, &daemon);
    assert!(
        reason.contains(&format!(
            "the replica {} from replicad running as uid {} is refused",
            copy.display(),
            euid()
        )),
        "{reason}"
    );
    assert!(
        reason.contains("not on tmpfs or hugetlbfs, where replicad keeps replicas"),
        "{reason}"
    );
}

#[test]
fn a_replica_of_another_uid_is_not_mapped() {
    if euid() != 0 {
        skip(
            "a_replica_of_another_uid_is_not_mapped",
            "needs root (fchown)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(2 * 4096 + 7, 5);
    let p = write_file(dir.path(), "data", &data);
    // Read-only, on tmpfs, but nobody's: the daemon (this process) is root.
    let daemon = daemon_handing(|src| {
        let (replica, _) = replica_copy(src);
        // SAFETY: fchown on our own memfd.
        let rc = unsafe { libc::fchown(replica.as_raw_fd(), 65534, 65534) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        read_only(&replica)
    });
    let reason = refused(&p, &data, &daemon);
    assert!(
        reason.contains(
            "from replicad running as uid 0 is refused: it is owned by uid 65534, not by the \
             daemon's uid"
        ),
        "{reason}"
    );
}

/// An empty published set (it lists no replica of anything) beside the
/// daemon's socket, with this owner and mode.
fn empty_set(daemon: &FakeDaemon, owner: u32, mode: u32) {
    let path = daemon.dir().join(published::FILE_NAME);
    drop(Writer::create(&path, 8).unwrap());
    std::os::unix::fs::chown(&path, Some(owner), None).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_published_set_of_another_uid_or_writable_by_others_is_not_read() {
    if euid() != 0 {
        skip(
            "a_published_set_of_another_uid_or_writable_by_others_is_not_read",
            "needs root (chown)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(3 * 4096, 6);
    let p = write_file(dir.path(), "data", &data);

    // The daemon's own set, listing no replica of the file: believed, so
    // the daemon is not asked.
    let honest = FakeDaemon::with_replicas();
    empty_set(&honest, 0, 0o644);
    let m = map_with(&p, &opts(&honest)).unwrap();
    let Backing::File { reason } = m.backing() else {
        panic!("{:?}", m.backing());
    };
    assert!(reason.contains("replicad was not asked"), "{reason}");
    assert!(honest.replicas.lock().unwrap().is_empty());

    // The same set owned by nobody, or writable by its group or by others:
    // not read; the daemon is asked, and its replica backs the mapping.
    for (owner, mode) in [(65534, 0o644), (0, 0o664), (0, 0o666)] {
        let daemon = FakeDaemon::with_replicas();
        empty_set(&daemon, owner, mode);
        let m = map_with(&p, &opts(&daemon)).unwrap();
        assert_eq!(
            m.backing(),
            &Backing::Replica {
                node: 0,
                generation: 1
            },
            "a set owned by uid {owner} with mode {mode:04o} was read"
        );
        assert_eq!(first_mismatch(m.as_slice(), &data), None);
        assert_eq!(daemon.replicas.lock().unwrap().len(), 1);
    }
}
