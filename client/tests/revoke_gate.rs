//! The client and the published set beside the daemon's socket: a file the
//! set does not list costs no round trip, and a fault on a revoked replica
//! waits while the set shows a revoke in progress before it falls back.
//! Its own test binary: the fallback watches one set per process.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::{Duration, Instant};

use common::*;
use replicad_client::{map_with, Backing, MapOptions};
use replicad_wire::published::{self, nodes_mask, PublishedEntry, Writer};

fn opts(daemon: &FakeDaemon) -> MapOptions {
    MapOptions {
        socket: daemon.socket.clone(),
        node: None,
        timeout: Duration::from_secs(5),
    }
}

fn listed(path: &std::path::Path) -> PublishedEntry {
    let m = std::fs::metadata(path).unwrap();
    PublishedEntry {
        dev: m.dev(),
        ino: m.ino(),
        nodes: nodes_mask([0]),
        generation: 1,
    }
}

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

#[test]
fn the_published_set_decides_whether_the_daemon_is_asked_and_fallbacks_wait_for_revokes() {
    let daemon = FakeDaemon::with_replicas();
    let len = 8 * page();
    let (a_old, a_new) = (pattern(len, 1), pattern(len, 2));
    let a = write_file(daemon.dir(), "listed", &a_old);
    let b = write_file(daemon.dir(), "unlisted", &pattern(len, 3));
    let mut set = Writer::create(&daemon.dir().join(published::FILE_NAME), 8).unwrap();
    set.publish(&[listed(&a)]);

    // Not listed: the file itself, and the daemon never heard of it.
    let mb = map_with(&b, &opts(&daemon)).unwrap();
    let Backing::File { reason } = mb.backing() else {
        panic!("an unlisted file got {:?}", mb.backing());
    };
    assert!(
        reason.contains("not replicated") && reason.contains("replicad was not asked"),
        "{reason}"
    );
    assert_eq!(daemon.replicas.lock().unwrap().len(), 0);

    // Listed: asked, and mapped on the replica.
    let ma = map_with(&a, &opts(&daemon)).unwrap();
    assert!(ma.on_replica(), "{:?}", ma.backing());
    assert_eq!(daemon.replicas.lock().unwrap().len(), 1);

    // A revoke in progress: the source changes, the replica is truncated,
    // and the count stays up until another thread lowers it 2 ms later.
    set.revoke_began();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .unwrap()
        .write_all_at(&a_new, 0)
        .unwrap();
    daemon.revoke_all();
    let t = Instant::now();
    let lowering = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(2));
        set.revoke_ended();
        set
    });
    // The fault falls back only once the revoke ended (or after the
    // fallback's 4 ms bound): never before the count was lowered.
    assert_eq!(first_mismatch(ma.as_slice(), &a_new), None);
    let waited = t.elapsed();
    let mut set = lowering.join().unwrap();
    assert!(!ma.on_replica());
    assert!(
        waited >= Duration::from_millis(2),
        "fell back after {waited:?}"
    );

    // Gone from the set (as the daemon publishes after a revoke): asking
    // again maps the file with no round trip.
    set.publish(&[]);
    let again = map_with(&a, &opts(&daemon)).unwrap();
    assert!(!again.on_replica());
    assert_eq!(first_mismatch(again.as_slice(), &a_new), None);
    assert_eq!(daemon.replicas.lock().unwrap().len(), 1);
    // Listed again (the next generation): asked again.
    set.publish(&[listed(&a)]);
    let next = map_with(&a, &opts(&daemon)).unwrap();
    assert!(next.on_replica());
    assert_eq!(daemon.replicas.lock().unwrap().len(), 2);

    // A count left up by a daemon that died mid-revoke costs a fault the
    // bound, not a hang.
    set.revoke_began();
    daemon.revoke_all();
    let t = Instant::now();
    assert_eq!(first_mismatch(next.as_slice(), &a_new), None);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(4) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    drop(mb);
}
