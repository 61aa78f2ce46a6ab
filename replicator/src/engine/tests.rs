//! The engine's state machine without root: a recording stand-in for the
//! kernel's fence calls ([`FenceOps`]), a memfd store, a `/proc` fixture
//! root, and breaks delivered by hand. What the real kernel does with the
//! same calls is proven by the integration tests as root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::Cell;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replicad_procfs::ProcReader;

use super::{lock, relock, Attach, EngineConfig, Hello, Replicator, Wiring};
use crate::fence::{FenceEvent, FenceOps, FileStat, KernelOps, ModifyWatch};
use crate::model::{
    DeviceId, DeviceKind, NodeSelection, PublishedSource, Publisher, ReplicaState, SourceKey,
    Target,
};
use crate::store::{ReplicaFile, ReplicaIdent, StoreConfig};
use crate::{Error, Metrics, Topology};

thread_local! {
    static MISPLACE: Cell<Option<u64>> = const { Cell::new(None) };
    static DURING_COPY: std::cell::RefCell<Option<Box<dyn FnOnce()>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs once in the middle of the next copy made on this thread (after the
/// bytes are in, before the placement check), without the list lock: what
/// another caller does while a copy is in flight.
pub(super) fn during_copy() {
    if let Some(f) = DURING_COPY.with(|d| d.borrow_mut().take()) {
        f();
    }
}

fn while_copying(f: impl FnOnce() + 'static) {
    DURING_COPY.with(|d| *d.borrow_mut() = Some(Box::new(f)));
}

/// Pages the placement check should find off their node, for copies made
/// on this thread (the machine has one node: nothing is ever misplaced).
pub(super) fn misplace() -> Option<u64> {
    MISPLACE.with(Cell::get)
}

/// What the stand-in kernel and the publisher saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Take(RawFd),
    Release(RawFd),
    Truncate(String),
    Publish(Vec<SourceKey>),
    /// The published set's revoke count raised (true) or lowered.
    RevokeGate(bool),
    /// Followers asked to look again, the set unchanged.
    Nudge,
}

#[derive(Default)]
struct Log {
    events: Mutex<Vec<Event>>,
    /// Lease fds the "kernel" holds a lease on.
    leases: Mutex<HashSet<RawFd>>,
    /// Lease fds with a break pending (for the overflow path).
    pending: Mutex<HashSet<RawFd>>,
    /// Refuse the next lease with EAGAIN (a writer holds the file).
    refuse: Mutex<bool>,
    /// The kernel already broke the leases by force: releasing finds none.
    forced: Mutex<bool>,
}

impl Log {
    fn push(&self, e: Event) {
        self.events.lock().unwrap().push(e);
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    fn held(&self, fd: RawFd) -> bool {
        self.leases.lock().unwrap().contains(&fd)
    }
}

/// Leases are bookkeeping here; truncation is real (memfd replicas).
struct Recorder(Arc<Log>);

impl FenceOps for Recorder {
    fn take_lease(&self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        if std::mem::take(&mut *self.0.refuse.lock().unwrap()) {
            return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
        }
        self.0.leases.lock().unwrap().insert(fd.as_raw_fd());
        self.0.push(Event::Take(fd.as_raw_fd()));
        Ok(())
    }

    fn release_lease(&self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        if *self.0.forced.lock().unwrap() {
            self.0.leases.lock().unwrap().remove(&fd.as_raw_fd());
            return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
        }
        self.0.leases.lock().unwrap().remove(&fd.as_raw_fd());
        self.0.pending.lock().unwrap().remove(&fd.as_raw_fd());
        self.0.push(Event::Release(fd.as_raw_fd()));
        Ok(())
    }

    fn break_pending(&self, fd: BorrowedFd<'_>) -> bool {
        self.0.pending.lock().unwrap().contains(&fd.as_raw_fd())
    }

    fn stat(&self, fd: BorrowedFd<'_>) -> std::io::Result<FileStat> {
        KernelOps.stat(fd)
    }

    fn truncate(&self, replica: ReplicaFile) {
        self.0.push(Event::Truncate(replica.label()));
        replica.remove();
    }
}

struct RecordingPublisher(Arc<Log>);

impl Publisher for RecordingPublisher {
    fn publish(&mut self, sources: &[PublishedSource]) {
        self.0
            .push(Event::Publish(sources.iter().map(|s| s.key).collect()));
    }

    fn retire(&mut self) {}

    fn nudge(&mut self) {
        self.0.push(Event::Nudge);
    }

    fn revoke_began(&mut self) {
        self.0.push(Event::RevokeGate(true));
    }

    fn revoke_ended(&mut self) {
        self.0.push(Event::RevokeGate(false));
    }
}

struct Rig {
    engine: Replicator,
    log: Arc<Log>,
    /// The real modify watch (inotify needs no privilege); its events are
    /// delivered by hand, as the fence thread would.
    watch: Arc<ModifyWatch>,
    dir: tempfile::TempDir,
    /// The `/proc` fixture root the engine reads.
    proc_root: PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.engine.shutdown();
    }
}

fn rig() -> Rig {
    rig_with(None)
}

fn rig_with(max_sources: Option<super::SourceLimit>) -> Rig {
    let topo_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/sysfs/1node");
    rig_on(Topology::from_sysfs(&topo_root).unwrap(), max_sources)
}

fn rig_on(topology: Topology, max_sources: Option<super::SourceLimit>) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let proc_root = dir.path().join("proc");
    std::fs::create_dir_all(&proc_root).unwrap();
    let cfg = EngineConfig {
        store: StoreConfig {
            run_dir: dir.path().join("run"),
            size: None,
            huge_pages: false,
            force_memfd: true,
            copy_threads: 1,
        },
        // The generation worker must not refence behind the tests' backs.
        settle: Duration::from_secs(3600),
        retry_max: Duration::from_secs(3600),
        prune_every: Duration::from_secs(3600),
        home_nodes: Vec::new(),
        max_sources,
    };
    let log = Arc::new(Log::default());
    // The watch resolves fds through the real /proc/self.
    let watch = Arc::new(ModifyWatch::new(ProcReader::default()).unwrap());
    let wiring = Wiring {
        ops: Arc::new(Recorder(log.clone())),
        proc: ProcReader::new(&proc_root),
        publisher: Some(Box::new(RecordingPublisher(log.clone()))),
        fence_thread: false,
        watch: Some(watch.clone()),
        keeper: None,
        fd_store: None,
    };
    let engine = Replicator::start_with(cfg, topology, Metrics::new().unwrap(), wiring).unwrap();
    Rig {
        engine,
        log,
        watch,
        dir,
        proc_root,
    }
}

impl Rig {
    fn source(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn key(path: &Path) -> SourceKey {
        let m = std::fs::metadata(path).unwrap();
        SourceKey {
            dev: m.dev(),
            ino: m.ino(),
        }
    }

    fn lease_fd(&self, key: SourceKey) -> RawFd {
        lock(&self.engine.inner.list)
            .get(key)
            .unwrap()
            .fd
            .as_raw_fd()
    }

    fn states(&self, key: SourceKey) -> Vec<ReplicaState> {
        lock(&self.engine.inner.list)
            .get(key)
            .map(|s| s.replicas.iter().map(|r| r.state).collect())
            .unwrap_or_default()
    }

    /// A writer arrives: the break the fence thread would deliver.
    fn break_lease(&self, key: SourceKey) {
        let fd = self.lease_fd(key);
        self.engine.inner.on_fence_event(FenceEvent::Break {
            fd,
            at: Instant::now(),
        });
    }

    /// Deliver what the modify watch saw, as the fence thread would.
    fn deliver_modifications(&self) -> usize {
        let seen = self.watch.modified().unwrap();
        for s in &seen {
            let at = Instant::now();
            self.engine.inner.on_fence_event(match s {
                crate::fence::Seen::Modified(wd) => FenceEvent::Modified { wd: *wd, at },
                crate::fence::Seen::Opened(wd) => FenceEvent::Opened { wd: *wd },
                crate::fence::Seen::Overflow => FenceEvent::ModifiedUnknown { at },
            });
        }
        seen.len()
    }

    /// A fixture process: `<root>/<pid>/stat` (start time `start`) and
    /// `maps` mapping `path` privately read-only.
    fn process(&self, pid: u32, start: u64, maps_of: Option<&Path>) {
        let d = self.proc_root.join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        let mut stat = format!("{pid} (fixture) S 1 {pid} {pid} 0 -1 4194560");
        for _ in 0..12 {
            stat.push_str(" 0");
        }
        stat.push_str(&format!(" {start} 1000 10"));
        for _ in 0..30 {
            stat.push_str(" 0");
        }
        std::fs::write(d.join("stat"), stat + "\n").unwrap();
        if let Some(path) = maps_of {
            let m = std::fs::metadata(path).unwrap();
            let line = format!(
                "7f0000000000-7f0000001000 r--p 00000000 {:02x}:{:02x} {} {}\n",
                libc::major(m.dev()),
                libc::minor(m.dev()),
                m.ino(),
                path.display()
            );
            std::fs::write(d.join("maps"), line).unwrap();
        }
    }
}

fn read_all(fd: BorrowedFd<'_>) -> Vec<u8> {
    let mut f = std::fs::File::from(fd.try_clone_to_owned().unwrap());
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

fn attach(rig: &Rig, path: &Path, pid: u32) -> Attach {
    let f = std::fs::File::open(path).unwrap();
    rig.engine.attach(pid, f.as_fd(), Some(0)).unwrap()
}

#[test]
fn revoke_marks_revoking_first_and_releases_only_after_every_replica_is_gone() {
    let rig = rig();
    let path = rig.source("weights.bin", &[7u8; 3 * 4096]);
    let key = Rig::key(&path);
    rig.engine.replicate(&path, &NodeSelection::All).unwrap();
    let fd = rig.lease_fd(key);
    assert!(rig.log.held(fd));
    // A second replica of the same source, so "every" means more than one.
    {
        let mut list = lock(&rig.engine.inner.list);
        let src = list.get_mut(key).unwrap();
        let ident = ReplicaIdent::of_file(&path, &std::fs::metadata(&path).unwrap(), 1);
        let file = rig.engine.inner.store.create(0, &ident).unwrap();
        let mut second = crate::list::Replica {
            target: Target::Device(DeviceId {
                kind: DeviceKind::Cuda,
                index: 0,
            }),
            generation: src.generation,
            state: ReplicaState::Valid,
            file: Some(file),
            attachments: Default::default(),
            placement: None,
        };
        second.attachments.insert(crate::model::Attachment {
            pid: 1,
            start_time: 1,
        });
        src.replicas.push(second);
        // A copy in flight: the revoke must wait for it with the lock
        // released, which is the window an attach could come through.
        src.copies = 1;
    }
    let before = rig.log.events().len();
    std::thread::scope(|s| {
        let revoker = s.spawn(|| rig.break_lease(key));
        let deadline = Instant::now() + Duration::from_secs(10);
        while rig.states(key) != [ReplicaState::Revoking, ReplicaState::Revoking] {
            assert!(Instant::now() < deadline, "never marked revoking");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Marked, and nothing truncated or released yet.
        assert_eq!(rig.log.events().len(), before, "{:?}", rig.log.events());
        assert!(rig.log.held(fd));
        // An attach now is refused, and leaves no attachment behind.
        match attach(&rig, &path, std::process::id()) {
            Attach::Original { reason } => assert!(reason.contains("revoking"), "{reason}"),
            Attach::Replica { .. } => panic!("attached to a revoking replica"),
        }
        let attached: usize = lock(&rig.engine.inner.list).get(key).unwrap().attached();
        assert_eq!(attached, 1, "the refused attach was recorded");
        // The copy stops; the revoke goes on.
        {
            let mut list = lock(&rig.engine.inner.list);
            list.get_mut(key).unwrap().copies = 0;
        }
        rig.engine.inner.copies_done.notify_all();
        revoker.join().unwrap();
    });
    let events = rig.log.events()[before..].to_vec();
    // Fallbacks are told a revoke runs before the first truncate, and that
    // it ended only once the writer was let go.
    assert_eq!(events[0], Event::RevokeGate(true), "{events:?}");
    let truncates = events[1..]
        .iter()
        .take_while(|e| matches!(e, Event::Truncate(_)))
        .count();
    assert_eq!(truncates, 2, "{events:?}");
    assert_eq!(events[3], Event::Release(fd), "{events:?}");
    // Published after the writer was let go, without the source; the gate
    // stays up until the writer is seen opening the file.
    assert!(
        matches!(&events[4], Event::Publish(keys) if !keys.contains(&key)),
        "{events:?}"
    );
    assert_eq!(events.len(), 5, "{events:?}");
    // The writer's open (IN_OPEN on the source's watch) lowers it.
    let before_open = rig.log.events().len();
    drop(std::fs::OpenOptions::new().write(true).open(&path).unwrap());
    assert!(rig.deliver_modifications() >= 1);
    let after = rig.log.events()[before_open..].to_vec();
    assert_eq!(after, [Event::RevokeGate(false)], "{after:?}");
    // Opens are no longer watched once it is down.
    drop(std::fs::File::open(&path).unwrap());
    assert_eq!(rig.deliver_modifications(), 0);
    assert!(!rig.log.held(fd));
    assert!(rig.states(key).is_empty());
    let m = &rig.engine.inner.metrics;
    assert_eq!(m.invalidations.with_label_values(&["write"]).get(), 2);
    // The planner counts it once among the file's changes per hour.
    assert_eq!(
        rig.engine.take_write_breaks(),
        [key],
        "two replicas, one break"
    );
    assert!(rig.engine.take_write_breaks().is_empty(), "taken");
    // A later attach is refused: a writer holds the file.
    match attach(&rig, &path, std::process::id()) {
        Attach::Original { reason } => assert!(reason.contains("writer"), "{reason}"),
        Attach::Replica { .. } => panic!("attached while the fence is down"),
    }
}

#[test]
fn a_source_costs_one_open_file_on_tmpfs_and_one_more_per_memfd_node() {
    use crate::store::StoreKind::{Memfd, Tmpfs};
    // A populated tmpfs replica holds no fd: only the source's lease counts.
    for nodes in [1, 2, 8] {
        let limit = super::SourceLimit::new(20_000, &vec![Tmpfs; nodes]);
        let room = 20_000 - super::SourceLimit::RESERVED as usize;
        assert_eq!((limit.per_source, limit.sources), (1, room), "{nodes}");
        // memfd replicas keep their fd: one more a node.
        let limit = super::SourceLimit::new(20_000, &vec![Memfd; nodes]);
        assert_eq!(limit.per_source, 1 + nodes as u64, "{nodes}");
        assert_eq!(limit.sources, room / (1 + nodes), "{nodes}");
    }
    // A mixed store: the memfd nodes count.
    let nofile = super::SourceLimit::RESERVED + 768;
    let limit = super::SourceLimit::new(nofile, &[Tmpfs, Memfd, Tmpfs]);
    assert_eq!(
        (limit.per_source, limit.sources, limit.nofile),
        (2, 384, nofile)
    );
    // The goal of issue 10: 10,000 sources under a hard limit of 20000.
    assert!(super::SourceLimit::new(20_000, &[Tmpfs]).sources >= 10_000);
    assert_eq!(super::SourceLimit::new(100, &[Tmpfs]).sources, 0);
}

#[test]
fn sources_beyond_the_open_file_room_are_refused_with_the_limit() {
    // RESERVED kept back, 2 open files a source on one node: room for 2.
    let limit = super::SourceLimit::new(
        super::SourceLimit::RESERVED + 5,
        &[crate::store::StoreKind::Memfd],
    );
    assert_eq!((limit.sources, limit.per_source), (2, 2));
    let rig = rig_with(Some(limit));
    let a = rig.source("a", b"one");
    let b = rig.source("b", b"two");
    let c = rig.source("c", b"three");
    rig.engine.replicate(&a, &NodeSelection::All).unwrap();
    rig.engine.replicate(&b, &NodeSelection::All).unwrap();
    // Known sources are no new ones: asked again, still fine.
    rig.engine.replicate(&a, &NodeSelection::All).unwrap();
    let e = rig.engine.replicate(&c, &NodeSelection::All).unwrap_err();
    assert!(
        matches!(
            e,
            Error::TooManySources {
                sources: 2,
                nofile,
                per_source: 2,
                ..
            } if nofile == super::SourceLimit::RESERVED + 5
        ),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(
        text.contains(&format!(
            "RLIMIT_NOFILE {}",
            super::SourceLimit::RESERVED + 5
        )) && text.contains("LimitNOFILE="),
        "{text}"
    );
    assert_eq!(rig.engine.status().sources.len(), 2);
    // Evicting one makes room.
    rig.engine.evict(&a).unwrap();
    rig.engine.replicate(&c, &NodeSelection::All).unwrap();
}

#[test]
fn a_held_revoke_gate_ends_in_time_without_the_writers_open() {
    let rig = rig();
    let path = rig.source("index.db", b"generation one");
    let key = Rig::key(&path);
    rig.engine.replicate(&path, &NodeSelection::All).unwrap();
    let before = rig.log.events().len();
    rig.break_lease(key);
    let gates = |from: usize| {
        rig.log.events()[from..]
            .iter()
            .filter(|e| matches!(e, Event::RevokeGate(_)))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(gates(before), [Event::RevokeGate(true)]);
    // A tick before its time leaves it up; one after lowers it.
    rig.engine.inner.on_fence_event(FenceEvent::Tick);
    assert_eq!(gates(before), [Event::RevokeGate(true)]);
    std::thread::sleep(super::revoke::GATE_HOLD + Duration::from_millis(1));
    rig.engine.inner.on_fence_event(FenceEvent::Tick);
    assert_eq!(
        gates(before),
        [Event::RevokeGate(true), Event::RevokeGate(false)]
    );
    assert!(relock(&rig.engine.inner.held_gates).is_empty());
}

#[test]
fn a_revoke_nobody_waits_for_lowers_its_gate_at_once() {
    let rig = rig();
    let path = rig.source("index.db", b"generation one");
    rig.engine.replicate(&path, &NodeSelection::All).unwrap();
    let before = rig.log.events().len();
    // Evicted: no writer waits, the gate goes up and down around the truncate.
    assert_eq!(rig.engine.evict(&path).unwrap(), 1);
    let events = rig.log.events()[before..].to_vec();
    let up = events.iter().position(|e| *e == Event::RevokeGate(true));
    let down = events.iter().position(|e| *e == Event::RevokeGate(false));
    let truncate = events.iter().position(|e| matches!(e, Event::Truncate(_)));
    assert!(
        matches!((up, truncate, down), (Some(u), Some(t), Some(d)) if u < t && t < d),
        "{events:?}"
    );
    assert!(relock(&rig.engine.inner.held_gates).is_empty());
}

#[test]
fn refence_after_a_writer_makes_a_new_generation() {
    let rig = rig();
    let path = rig.source("index.db", b"generation one");
    let key = Rig::key(&path);
    rig.engine.replicate(&path, &NodeSelection::All).unwrap();
    rig.break_lease(key);
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap()
        .write_all(b"the second generation")
        .unwrap();
    // A writer still there: no lease, a back-off, nothing copied.
    *rig.log.refuse.lock().unwrap() = true;
    rig.engine
        .inner
        .list
        .lock()
        .unwrap()
        .get_mut(key)
        .unwrap()
        .broken_at = None;
    assert!(rig.engine.inner.refence(key).is_some());
    assert!(rig.states(key).is_empty());
    // The writer left: the lease comes back, then a new generation.
    assert_eq!(rig.engine.inner.refence(key), None);
    let events = rig.log.events();
    let fd = rig.lease_fd(key);
    let takes: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| **e == Event::Take(fd))
        .map(|(i, _)| i)
        .collect();
    let release = events
        .iter()
        .position(|e| *e == Event::Release(fd))
        .unwrap();
    assert_eq!(takes.len(), 2, "{events:?}");
    assert!(takes[0] < release && release < takes[1], "{events:?}");
    let view = rig.engine.status();
    let s = &view.sources[0];
    assert_eq!(s.generation, 2);
    assert_eq!(s.size, b"the second generation".len() as u64);
    assert!(s.fenced);
    assert_eq!(s.replicas.len(), 1);
    assert_eq!(s.replicas[0].state, ReplicaState::Valid);
    assert_eq!(s.replicas[0].generation, 2);
    match attach(&rig, &path, std::process::id()) {
        Attach::Replica { fd, generation, .. } => {
            assert_eq!(generation, 2);
            assert_eq!(read_all(fd.as_fd()), b"the second generation");
        }
        Attach::Original { reason } => panic!("no replica of generation 2: {reason}"),
    }
}

#[test]
fn a_failed_copy_leaves_no_lease_held() {
    let rig = rig();
    let path = rig.source("model.bin", &[1u8; 8 * 4096]);
    let key = Rig::key(&path);
    MISPLACE.with(|m| m.set(Some(3)));
    let err = rig
        .engine
        .replicate(&path, &NodeSelection::All)
        .unwrap_err();
    MISPLACE.with(|m| m.set(None));
    // The placement check rejects a replica with pages off its node.
    match &err {
        Error::Misplaced {
            node, misplaced, ..
        } => {
            assert_eq!((*node, *misplaced), (0, 3));
        }
        e => panic!("not a placement failure: {e}"),
    }
    let m = &rig.engine.inner.metrics;
    assert_eq!(m.misplaced_pages.get(), 3);
    assert_eq!(
        m.replication_failures
            .with_label_values(&["misplaced"])
            .get(),
        1
    );
    // The lease was taken, and given back; nothing is listed or stored.
    let events = rig.log.events();
    let take = events.iter().find_map(|e| match e {
        Event::Take(fd) => Some(*fd),
        _ => None,
    });
    let fd = take.expect("no lease was taken");
    assert!(events.contains(&Event::Release(fd)), "{events:?}");
    assert!(!rig.log.held(fd));
    assert!(rig.engine.status().sources.is_empty());
    assert!(lock(&rig.engine.inner.list).get(key).is_none());
    // Replicating again works, and holds the lease again.
    rig.engine.replicate(&path, &NodeSelection::All).unwrap();
    assert!(rig.log.held(rig.lease_fd(key)));
}

#[test]
fn a_writer_holding_the_file_is_a_typed_fence_failure() {
    let rig = rig();
    let path = rig.source("busy.bin", b"busy");
    *rig.log.refuse.lock().unwrap() = true;
    let err = rig
        .engine
        .replicate(&path, &NodeSelection::All)
        .unwrap_err();
    match &err {
        Error::Unfenceable { why, .. } => assert_eq!(why.label(), "open_for_write"),
        e => panic!("{e}"),
    }
    let m = &rig.engine.inner.metrics;
    assert_eq!(
        m.fence_failures
            .with_label_values(&["open_for_write"])
            .get(),
        1
    );
    assert!(rig.engine.status().sources.is_empty());
}

#[test]
fn overflow_revokes_exactly_the_sources_with_a_break_pending() {
    let rig = rig();
    let a = rig.source("a.bin", b"aaaa");
    let b = rig.source("b.bin", b"bbbb");
    rig.engine.replicate(&a, &NodeSelection::All).unwrap();
    rig.engine.replicate(&b, &NodeSelection::All).unwrap();
    let (ka, kb) = (Rig::key(&a), Rig::key(&b));
    rig.log.pending.lock().unwrap().insert(rig.lease_fd(kb));
    rig.engine
        .inner
        .on_fence_event(FenceEvent::Overflow { at: Instant::now() });
    assert_eq!(rig.states(ka), [ReplicaState::Valid]);
    assert!(rig.states(kb).is_empty());
    assert!(rig.log.held(rig.lease_fd(ka)));
    assert!(!rig.log.held(rig.lease_fd(kb)));
}

#[test]
fn a_process_that_vanished_during_hello_or_prune_is_no_error() {
    let rig = rig();
    let path = rig.source("lib.so", &[3u8; 4096]);
    rig.engine.replicate(&path, &NodeSelection::All).unwrap();
    let alive = || true;
    // No such process at all.
    assert!(matches!(
        rig.engine.hello(4242, Some(0), &alive).unwrap(),
        Hello::Vanished
    ));
    // Its maps were read, then it exited before pagemap.
    rig.process(4243, 77, Some(&path));
    assert!(matches!(
        rig.engine.hello(4243, Some(0), &alive).unwrap(),
        Hello::Vanished
    ));
    // All was read, but the peer is gone by the end (pid recycled).
    assert!(matches!(
        rig.engine.hello(4243, Some(0), &|| false).unwrap(),
        Hello::Vanished
    ));
    // A process that attached, then vanished: pruned, no error.
    rig.process(4244, 99, None);
    match attach(&rig, &path, 4244) {
        Attach::Replica { .. } => {}
        Attach::Original { reason } => panic!("{reason}"),
    }
    assert_eq!(
        rig.engine.status().sources[0].replicas[0].attachments,
        [4244]
    );
    std::fs::remove_dir_all(rig.proc_root.join("4244")).unwrap();
    assert!(rig.engine.status().sources[0].replicas[0]
        .attachments
        .is_empty());
    // A recycled pid (another start time) is not the one that attached.
    rig.process(4245, 5, None);
    attach(&rig, &path, 4245);
    rig.process(4245, 6, None);
    assert!(rig.engine.status().sources[0].replicas[0]
        .attachments
        .is_empty());
}

#[test]
fn evict_and_shutdown_release_every_lease() {
    let rig = rig();
    let a = rig.source("a.bin", b"aaaa");
    let b = rig.source("b.bin", b"bbbb");
    rig.engine.replicate(&a, &NodeSelection::All).unwrap();
    rig.engine.replicate(&b, &NodeSelection::All).unwrap();
    let (fa, fb) = (rig.lease_fd(Rig::key(&a)), rig.lease_fd(Rig::key(&b)));
    assert_eq!(rig.engine.evict(&a).unwrap(), 1);
    assert!(!rig.log.held(fa) && rig.log.held(fb));
    rig.engine.shutdown();
    assert!(!rig.log.held(fb));
    assert!(matches!(
        rig.engine.replicate(&a, &NodeSelection::All),
        Err(Error::ShuttingDown)
    ));
}

#[test]
fn every_label_the_engine_uses_exists_at_zero() {
    use crate::metrics::{INVALIDATION_REASONS, REPLICATION_FAILURE_REASONS};
    for r in super::Reason::ALL {
        assert!(INVALIDATION_REASONS.contains(&r.label()), "{}", r.label());
    }
    let path = PathBuf::from("/x");
    let errors = [
        Error::NoSpace {
            node: 0,
            dir: path.clone(),
            path: path.clone(),
        },
        Error::SourceChanged {
            path: path.clone(),
            what: "was deleted",
        },
        Error::Misplaced {
            path: path.clone(),
            node: 0,
            pages: 1,
            misplaced: 1,
        },
        Error::NotFound { path },
    ];
    for e in &errors {
        let label = e.replication_failure_label();
        assert!(REPLICATION_FAILURE_REASONS.contains(&label), "{label}");
    }
}

#[test]
fn a_target_added_during_a_failed_copy_keeps_the_source() {
    let rig = rig();
    let path = rig.source("shared.bin", &[5u8; 4 * 4096]);
    let key = Rig::key(&path);
    let cuda = Target::Device(DeviceId {
        kind: DeviceKind::Cuda,
        index: 0,
    });
    // While this call copies node0, another asks for a target it did not
    // try (the second caller of replicate, before its own populate).
    let engine = rig.engine.clone();
    while_copying(move || {
        let mut list = lock(&engine.inner.list);
        list.get_mut(key).unwrap().targets.insert(cuda);
    });
    MISPLACE.with(|m| m.set(Some(1)));
    let err = rig
        .engine
        .replicate(&path, &NodeSelection::All)
        .unwrap_err();
    MISPLACE.with(|m| m.set(None));
    assert!(matches!(err, Error::Misplaced { .. }), "{err}");
    // Not dropped: the other caller's target is still wanted, and its
    // fence stays for it.
    let fd = rig.lease_fd(key);
    assert!(rig.log.held(fd));
    // The other caller's populate: node0 again (this time it works), and
    // the device target, which no backend holds yet.
    let e = rig.engine.inner.populate(key).unwrap_err();
    assert!(matches!(e, Error::NoDeviceBackend { .. }), "{e}");
    assert_eq!(rig.states(key), [ReplicaState::Valid]);
    assert!(rig.log.held(fd));
}

#[test]
fn a_second_caller_waits_for_the_copy_in_flight() {
    let rig = rig();
    let path = rig.source("big.bin", &[9u8; 16 * 4096]);
    let key = Rig::key(&path);
    let engine = rig.engine.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let second: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
    let handle = second.clone();
    while_copying(move || {
        // The second caller finds node0 populating: no work of its own.
        let b = std::thread::spawn(move || {
            let r = engine.inner.populate(key);
            let states: Vec<ReplicaState> = lock(&engine.inner.list)
                .get(key)
                .map(|s| s.replicas.iter().map(|r| r.state).collect())
                .unwrap_or_default();
            tx.send((r.is_ok(), states)).unwrap();
        });
        *handle.lock().unwrap() = Some(b);
        std::thread::sleep(Duration::from_millis(100));
    });
    rig.engine.replicate(&path, &NodeSelection::All).unwrap();
    // It answered only after the copy it waited for was valid.
    let (ok, states) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(ok);
    assert_eq!(states, [ReplicaState::Valid]);
    second.lock().unwrap().take().unwrap().join().unwrap();
}

#[test]
fn a_panicking_copy_leaves_no_copy_counted_and_no_lease() {
    let rig = rig();
    let path = rig.source("panic.bin", &[1u8; 4096]);
    let key = Rig::key(&path);
    while_copying(|| panic!("a copy panics (test)"));
    let err = rig
        .engine
        .replicate(&path, &NodeSelection::All)
        .unwrap_err();
    assert!(matches!(err, Error::CopyPanicked { .. }), "{err}");
    // Nothing counted in flight, nothing listed, no lease: a writer and
    // a later replicate go on.
    assert!(lock(&rig.engine.inner.list).get(key).is_none());
    assert!(rig.log.leases.lock().unwrap().is_empty());
    rig.engine.replicate(&path, &NodeSelection::All).unwrap();
    rig.break_lease(key);
    assert!(rig.states(key).is_empty());
}

#[test]
fn a_truncation_no_break_announces_is_revoked_by_the_modify_watch() {
    let rig = rig();
    let path = rig.source("index.seg", &[8u8; 4 * 4096]);
    let key = Rig::key(&path);
    rig.engine.replicate(&path, &NodeSelection::All).unwrap();
    let fd = rig.lease_fd(key);
    // Reads, and the engine's own copying, are no modification.
    assert_eq!(rig.deliver_modifications(), 0);
    // open(O_RDONLY|O_TRUNC): the kernel cuts the file and breaks no lease.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_TRUNC)
        .open(&path)
        .unwrap();
    drop(f);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    assert!(rig.log.held(fd), "the stand-in broke nothing either");
    assert!(rig.deliver_modifications() >= 1);
    // Revoked and released, as for a writer.
    assert!(rig.states(key).is_empty());
    assert!(!rig.log.held(fd));
    let m = &rig.engine.inner.metrics;
    assert_eq!(m.invalidations.with_label_values(&["modified"]).get(), 1);
    match attach(&rig, &path, std::process::id()) {
        Attach::Original { reason } => assert!(reason.contains("writer"), "{reason}"),
        Attach::Replica { .. } => panic!("attached to a revoked replica"),
    }
}

#[test]
fn a_modification_the_generation_already_holds_revokes_nothing() {
    let rig = rig();
    let path = rig.source("weights.bin", &[2u8; 4 * 4096]);
    let key = Rig::key(&path);
    rig.engine.replicate(&path, &NodeSelection::All).unwrap();
    // A writer came through the fence (break, revoke), wrote, and left;
    // the new generation is copied before its events are read.
    rig.break_lease(key);
    std::fs::write(&path, [3u8; 4 * 4096]).unwrap();
    rig.engine
        .inner
        .list
        .lock()
        .unwrap()
        .get_mut(key)
        .unwrap()
        .broken_at = None;
    assert_eq!(rig.engine.inner.refence(key), None);
    assert_eq!(rig.states(key), [ReplicaState::Valid]);
    // Its late events change nothing: generation 2 holds those bytes.
    assert!(rig.deliver_modifications() >= 1);
    assert_eq!(rig.states(key), [ReplicaState::Valid]);
    let m = &rig.engine.inner.metrics;
    assert_eq!(m.invalidations.with_label_values(&["modified"]).get(), 0);
}

#[test]
fn a_lease_the_kernel_broke_by_force_is_counted() {
    let rig = rig();
    let path = rig.source("stopped.bin", &[4u8; 4096]);
    let key = Rig::key(&path);
    rig.engine.replicate(&path, &NodeSelection::All).unwrap();
    // The daemon could not answer in lease-break-time (stopped, starved):
    // by the time it releases, the kernel already has.
    *rig.log.forced.lock().unwrap() = true;
    rig.break_lease(key);
    let m = &rig.engine.inner.metrics;
    assert_eq!(m.forced_breaks.get(), 1);
    // Revoked all the same.
    assert!(rig.states(key).is_empty());
    assert_eq!(m.invalidations.with_label_values(&["write"]).get(), 1);
    // An ordinary release counts nothing.
    *rig.log.forced.lock().unwrap() = false;
    let other = rig.source("other.bin", &[5u8; 4096]);
    rig.engine.replicate(&other, &NodeSelection::All).unwrap();
    rig.break_lease(Rig::key(&other));
    assert_eq!(m.forced_breaks.get(), 1);
}

#[test]
fn a_copier_busy_in_time_serves_no_second_revoke_and_a_stuck_one_is_replaced() {
    let rig = rig();
    let inner = &rig.engine.inner;
    let first = inner.carrier().unwrap();
    assert!(first.busy.load(Ordering::Acquire));
    // Another revoke meanwhile, within the first's deadline: a thread of
    // its own.
    let second = inner.carrier().unwrap();
    assert!(!Arc::ptr_eq(&first.busy, &second.busy));
    // The first revoke gave up on its copier (the process it was on was
    // banned then): the next revoke gets a new one.
    first.late.store(true, Ordering::Release);
    let third = inner.carrier().unwrap();
    assert!(!Arc::ptr_eq(&first.busy, &third.busy));
    // Once a copier is done, it serves the next revoke again.
    third.busy.store(false, Ordering::Release);
    third.late.store(true, Ordering::Release);
    let fourth = inner.carrier().unwrap();
    assert!(Arc::ptr_eq(&third.busy, &fourth.busy));
    assert!(
        !fourth.late.load(Ordering::Acquire),
        "a new claim starts in time"
    );
}

#[test]
fn three_slow_processes_of_one_uid_ban_the_uid() {
    let mut b = super::carry::Banned::default();
    b.strike(10, 1000);
    assert!(b.covers(10, 1000));
    assert!(!b.covers(11, 1000), "one process is not its uid");
    b.strike(10, 1000);
    b.strike(11, 1000);
    assert!(!b.covers(12, 1000), "the same pid twice is one strike");
    b.strike(12, 1000);
    assert!(b.covers(99, 1000));
    assert!(!b.covers(99, 1001));
}

/// A file of `pages` pages in `dir`, written and read back (cached).
fn cached(dir: &Path, name: &str, pages: usize) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![3u8; pages * 4096]).unwrap();
    std::fs::File::open(&p).unwrap().sync_all().unwrap();
    assert_eq!(std::fs::read(&p).unwrap().len(), pages * 4096);
    p
}

#[test]
fn migrate_to_node0_leaves_every_resident_page_on_node0() {
    let rig = rig();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    for p in [
        cached(rig.dir.path(), "disk", 200),
        cached(shm.path(), "shm", 50),
    ] {
        let m = rig.engine.migrate(&p, 0).unwrap();
        let resident: u64 = m.resident_before.values().sum();
        assert_eq!(m.path, p);
        assert_eq!(m.node, 0);
        assert_eq!(m.failed, 0, "{m:?}");
        assert_eq!(m.moved + m.already, resident, "{m:?}");
        // One node: everything was there already.
        assert_eq!(m.already, resident, "{m:?}");
        assert_eq!(m.resident_after.keys().copied().collect::<Vec<_>>(), [0]);
        assert_eq!(m.resident_after.get(&0).copied(), Some(resident), "{m:?}");
        assert!(resident > 0 && resident <= m.pages, "{m:?}");
    }
    // Pages already on the node are not counted as migrated.
    assert_eq!(rig.engine.metrics().migrated_pages.get(), 0);
}

#[test]
fn migrate_to_a_missing_node_names_it_and_the_nodes_there_are() {
    let rig = rig();
    let p = cached(rig.dir.path(), "f", 4);
    let e = rig.engine.migrate(&p, 7).unwrap_err();
    assert!(matches!(e, Error::NoSuchNode { node: 7, .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("node 7") && text.contains("nodes 0"),
        "{text}"
    );
}

#[test]
fn migrate_of_a_missing_path_names_the_path() {
    let rig = rig();
    let p = rig.dir.path().join("no-such-file");
    let e = rig.engine.migrate(&p, 0).unwrap_err();
    assert!(
        matches!(&e, Error::NotFound { path } if *path == p),
        "{e:?}"
    );
    assert!(e.to_string().contains("no-such-file"), "{e}");
}

#[test]
fn migrate_of_a_file_truncated_after_open_finds_nothing_to_move() {
    let rig = rig();
    let p = cached(rig.dir.path(), "f", 16);
    let f = std::fs::File::open(&p).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(0)
        .unwrap();
    let m = rig.engine.migrate_file(&f, &p, 0).unwrap();
    assert_eq!((m.pages, m.moved, m.already, m.failed), (0, 0, 0, 0));
    assert!(m.resident_before.is_empty() && m.resident_after.is_empty());
}

#[test]
fn migrate_refuses_files_of_the_store_and_directories() {
    let rig = rig();
    let run = rig.engine.run_dir().to_path_buf();
    std::fs::create_dir_all(&run).unwrap();
    let p = cached(&run, "replica", 1);
    let e = rig.engine.migrate(&p, 0).unwrap_err();
    assert!(matches!(e, Error::StoreFile { .. }), "{e:?}");
    let e = rig.engine.migrate(rig.dir.path(), 0).unwrap_err();
    assert!(matches!(e, Error::NotRegularFile { .. }), "{e:?}");
}

/// Nudges the engine sent the publisher.
fn nudges(rig: &Rig) -> usize {
    rig.log
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Nudge))
        .count()
}

#[test]
fn a_changed_home_node_list_nudges_followers_and_the_same_one_does_not() {
    let rig = rig();
    let home = |node| {
        vec![super::HomeNode {
            cgroup: "/system.slice/m.service".into(),
            node,
        }]
    };
    rig.engine.set_home_nodes(Vec::new());
    assert_eq!(nudges(&rig), 0, "no home nodes before either");
    rig.engine.set_home_nodes(home(0));
    assert_eq!(nudges(&rig), 1);
    rig.engine.set_home_nodes(home(0));
    assert_eq!(
        nudges(&rig),
        1,
        "a reload that changes nothing wakes nobody"
    );
    rig.engine.set_home_nodes(Vec::new());
    assert_eq!(nudges(&rig), 2);
    assert_eq!(rig.engine.metrics().follower_nudges.get(), 2);
}

/// Two nodes with one CPU each, 0 and 1: this machine's two CPUs on two
/// nodes, so a real process can span them and then be bound to one.
fn cpu_per_node() -> (tempfile::TempDir, Topology) {
    let dir = tempfile::tempdir().unwrap();
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/sysfs/2node");
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(from.join("sys"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let sys = dir.path().join("sys/devices/system");
    std::fs::write(sys.join("node/node0/cpulist"), "0\n").unwrap();
    std::fs::write(sys.join("node/node1/cpulist"), "1\n").unwrap();
    for f in ["online", "present", "possible"] {
        std::fs::write(sys.join("cpu").join(f), "0-1\n").unwrap();
    }
    let topology = Topology::from_sysfs(dir.path()).unwrap();
    (dir, topology)
}

fn set_affinity(pid: u32, cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: c is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: a valid set of the size given, for a child we started.
    let rc =
        unsafe { libc::sched_setaffinity(pid as libc::pid_t, std::mem::size_of_val(&set), &set) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

#[test]
fn a_process_left_alone_for_spanning_nodes_is_rechecked_once_it_has_one() {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    if online.trim() == "0" {
        eprintln!("SKIP: one CPU online ({online:?}); a process cannot span two");
        return;
    }
    let (_sys, topology) = cpu_per_node();
    let rig = rig_on(topology, None);
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = child.id();
    set_affinity(pid, &[0, 1]);
    let dir = rig.proc_root.join(pid.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cgroup"), "0::/\n").unwrap();
    // Its own stat: the attachment (pid, start time) stays alive.
    let stat = std::fs::read(format!("/proc/{pid}/stat")).unwrap();
    std::fs::write(dir.join("stat"), stat).unwrap();
    let hello = rig.engine.hello(pid, None, &|| true).unwrap();
    assert!(
        matches!(&hello, super::Hello::LeftAlone { reason } if reason.contains("span several nodes")),
        "{hello:?}"
    );
    assert_eq!(rig.engine.recheck_left_alone(), 0, "still spans");
    assert_eq!(nudges(&rig), 0);
    set_affinity(pid, &[1]);
    assert_eq!(rig.engine.recheck_left_alone(), 1, "on node 1 now");
    assert_eq!(nudges(&rig), 1);
    assert_eq!(
        rig.engine.recheck_left_alone(),
        0,
        "nudged once: no wake every interval while it stays listed"
    );
    assert_eq!(nudges(&rig), 1);
    assert_eq!(rig.engine.status().left_alone.len(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn the_planner_s_calls_refuse_a_file_renamed_over_since_the_scan() {
    let rig = rig();
    let scanned = rig.source("weights", &[7u8; 8192]);
    let key = Rig::key(&scanned);
    // A hostile user renames another file over the path the scan saw.
    let other = rig.source("other", &[9u8; 8192]);
    std::fs::rename(&other, &scanned).unwrap();
    let e = rig
        .engine
        .replicate_expected(&scanned, key, &NodeSelection::All)
        .unwrap_err();
    assert!(matches!(e, Error::Replaced { .. }), "{e:?}");
    assert!(
        e.to_string().contains("no longer the file the scan saw"),
        "{e}"
    );
    assert!(
        rig.engine.status().sources.is_empty(),
        "nothing fenced or copied"
    );
    let e = rig.engine.migrate_expected(&scanned, key, 0).unwrap_err();
    assert!(matches!(e, Error::Replaced { .. }), "{e:?}");
    // The file that is there now, named by its own key, is copied.
    let now = Rig::key(&scanned);
    let v = rig
        .engine
        .replicate_expected(&scanned, now, &NodeSelection::All)
        .unwrap();
    assert_eq!(v.key, now);
    assert!(rig.engine.migrate_expected(&scanned, now, 0).is_ok());
}
