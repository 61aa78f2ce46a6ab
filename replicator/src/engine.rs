//! The engine: replicate, evict, attach, revoke, regenerate.
//!
//! Threads and locks:
//! - callers (the daemon's control socket) run `replicate`, `evict`,
//!   `attach`, `status` on their own threads;
//! - the fence thread runs `Inner::on_fence_event`: mark `Revoking`, wait
//!   for in-flight copies of that source to stop (they check an abort flag
//!   every chunk), truncate every replica, release the lease;
//! - the generation worker takes fences back after writers leave, copies
//!   new generations, and prunes dead attachments and unlinked sources.
//!
//! One mutex guards the [`ReplicaList`]; nobody copies or waits on I/O while
//! holding it (truncating and unlinking a tmpfs file is the longest step).

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use replicad_client::proto::{
    LeftAlone, NodeSelection, ReplicaState, ReplicaStatus, SourceStatus, StatusReport,
};
use replicad_client::published::{self, nodes_mask, PublishedEntry};

use crate::fence::{self, FenceEvent, FenceThread};
use crate::list::{
    Attachment, FenceKind, Generation, Replica, ReplicaList, Source, SourceKey, Target,
};
use crate::store::{Placement, ReplicaFile, ReplicaIdent, Store, StoreConfig};
use crate::{sys, Error, Metrics, Result, Topology};

mod pid;
mod process;

/// Sources the published replica set holds (128 KiB); more are flagged
/// and the shim asks the daemon.
const PUBLISHED_CAPACITY: usize = 4096;

pub use process::{Hello, HomeNode, ProcessAttach};

/// How the engine behaves.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub store: StoreConfig,
    /// How long a source must stay quiet after a writer before a new
    /// generation is copied.
    pub settle: Duration,
    /// Longest wait between attempts to take a fence back.
    pub retry_max: Duration,
    /// How often dead attachments and unlinked sources are pruned.
    pub prune_every: Duration,
    /// Home nodes by cgroup, for processes whose CPUs span several nodes.
    pub home_nodes: Vec<HomeNode>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            store: StoreConfig::default(),
            settle: Duration::from_millis(200),
            retry_max: Duration::from_secs(2),
            prune_every: Duration::from_secs(2),
            home_nodes: Vec::new(),
        }
    }
}

/// What `attach` hands a client.
#[derive(Debug)]
pub enum Attach {
    /// A read-only fd of the replica.
    Replica {
        fd: OwnedFd,
        node: u32,
        generation: u64,
        size: u64,
    },
    /// No replica for this caller; it should use the file itself.
    Original { reason: String },
}

/// The engine. Cheap to clone; every clone is the same engine.
#[derive(Clone, Debug)]
pub struct Replicator {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: EngineConfig,
    topology: Topology,
    store: Store,
    metrics: Metrics,
    list: Mutex<ReplicaList>,
    /// Signalled whenever a copy finishes.
    copies_done: Condvar,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    shutting_down: AtomicBool,
    threads: Mutex<Threads>,
    /// Processes that said hello and were left on their own mappings
    /// (newest last, bounded), pruned when they exit.
    left_alone: Mutex<Vec<(Attachment, LeftAlone)>>,
    /// The published replica set (`<run_dir>/replicas.set`).
    published: Mutex<Option<published::Writer>>,
    /// `cfg.home_nodes`, replaced on reload.
    home_nodes: std::sync::RwLock<Vec<HomeNode>>,
}

#[derive(Default)]
struct Threads {
    fence: Option<FenceThread>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("nodes", &self.topology.nodes.len())
            .finish_non_exhaustive()
    }
}

/// Work for the generation worker.
#[derive(Debug)]
enum Job {
    /// Try to take the fence of this source back at this time.
    Refence(Instant, SourceKey),
    Stop,
}

/// Why replicas are invalidated (the metric's label).
#[derive(Debug, Clone, Copy)]
enum Reason {
    Write,
    Evict,
    Shutdown,
    Unlinked,
}

impl Reason {
    fn label(self) -> &'static str {
        match self {
            Reason::Write => "write",
            Reason::Evict => "evict",
            Reason::Shutdown => "shutdown",
            Reason::Unlinked => "unlinked",
        }
    }
}

fn lock(list: &Mutex<ReplicaList>) -> MutexGuard<'_, ReplicaList> {
    // A panic while holding the lock leaves the list consistent enough to
    // revoke from: every mutation is a single field or vec update.
    list.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Replicator {
    /// Open the store (removing leftovers of an earlier run first), start
    /// the fence thread and the generation worker. [`fence::prepare`] must
    /// have run in this thread before any thread was started.
    pub fn start(cfg: EngineConfig, topology: Topology, metrics: Metrics) -> Result<Replicator> {
        let home_nodes = cfg.home_nodes.clone();
        let nodes: Vec<u32> = topology.nodes.iter().map(|n| n.id).collect();
        if !fence::prepared() {
            return Err(Error::Io {
                path: PathBuf::from("(fence signals)"),
                source: std::io::Error::other(
                    "fence signals are not blocked: call replicad_replicator::fence::prepare() \
                     at the start of main, before any thread starts",
                ),
            });
        }
        let store = Store::open(&cfg.store, &nodes)?;
        let set = cfg.store.run_dir.join(published::FILE_NAME);
        let publisher = match published::Writer::create(&set, PUBLISHED_CAPACITY) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    "cannot publish the replica set at {}: {e}; programs under the preload \
                     shim attach at start and after dlopen, not on mmap",
                    set.display()
                );
                None
            }
        };
        if store.leftovers_removed() > 0 {
            tracing::info!(
                "removed {} leftover replicas of an earlier run (their fence was not held)",
                store.leftovers_removed()
            );
        }
        metrics
            .leftovers_removed
            .inc_by(store.leftovers_removed() as u64);
        for n in &nodes {
            let t = Target::Node(*n).to_string();
            metrics.replicas.with_label_values(&[t.as_str()]).set(0);
            metrics
                .replica_bytes
                .with_label_values(&[t.as_str()])
                .set(0);
        }
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            cfg,
            topology,
            store,
            metrics,
            list: Mutex::new(ReplicaList::default()),
            copies_done: Condvar::new(),
            jobs: Mutex::new(Some(tx)),
            shutting_down: AtomicBool::new(false),
            threads: Mutex::new(Threads::default()),
            left_alone: Mutex::new(Vec::new()),
            home_nodes: std::sync::RwLock::new(home_nodes),
            published: Mutex::new(publisher),
        });
        let weak = Arc::downgrade(&inner);
        let fence = FenceThread::spawn(move |ev| {
            if let Some(inner) = weak.upgrade() {
                inner.on_fence_event(ev);
            }
        })
        .map_err(|e| Error::io("(fence thread)", e))?;
        let weak = Arc::downgrade(&inner);
        let worker = std::thread::Builder::new()
            .name("replicad-gen".into())
            .spawn(move || generation_worker(weak, rx))
            .map_err(|e| Error::io("(generation worker)", e))?;
        {
            let mut t = inner.threads.lock().unwrap_or_else(|p| p.into_inner());
            t.fence = Some(fence);
            t.worker = Some(worker);
        }
        Ok(Replicator { inner })
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Replace the home-node policy (a reloaded configuration).
    pub fn set_home_nodes(&self, home_nodes: Vec<HomeNode>) {
        *self
            .inner
            .home_nodes
            .write()
            .unwrap_or_else(|p| p.into_inner()) = home_nodes;
    }

    /// Resolve a node selection against the machine.
    pub fn targets(&self, nodes: &NodeSelection) -> Result<BTreeSet<Target>> {
        match nodes {
            NodeSelection::All => Ok(self
                .inner
                .topology
                .nodes
                .iter()
                .map(|n| Target::Node(n.id))
                .collect()),
            NodeSelection::List(list) => list
                .iter()
                .map(|n| self.inner.topology.node(*n).map(|_| Target::Node(*n)))
                .collect(),
        }
    }

    /// Replicate `path` onto `nodes`: fence it, copy it, check placement.
    /// Returns when every copy is valid, or with the first error (then no
    /// replica of the failed copy is left anywhere).
    pub fn replicate(&self, path: &Path, nodes: &NodeSelection) -> Result<SourceStatus> {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let targets = self.targets(nodes)?;
        let (file, key) = open_source(path)?;
        self.replicate_source(file, key, path, targets)
    }

    /// Replicate the file behind `file`, which the caller already opened
    /// (through `/proc/<pid>/map_files`, say), onto `nodes`, as
    /// [`Replicator::replicate`] does a path. `path` names the file in
    /// messages and in the status. An fd not open read-only is reopened
    /// read-only through `/proc/self/fd`, since a lease needs one.
    pub fn replicate_file(
        &self,
        file: File,
        path: &Path,
        nodes: &NodeSelection,
    ) -> Result<SourceStatus> {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        let targets = self.targets(nodes)?;
        let (file, key) = Self::readonly_source(file, path)?;
        self.replicate_source(file, key, path, targets)
    }

    /// Fence the opened source `file` (identity `key`) and copy it onto
    /// `targets`.
    fn replicate_source(
        &self,
        file: File,
        key: SourceKey,
        path: &Path,
        targets: BTreeSet<Target>,
    ) -> Result<SourceStatus> {
        let inner = &self.inner;
        let fence_kind = fence::fence_kind(file.as_fd(), path).inspect_err(|e| {
            inner.note_fence_failure(e);
        })?;
        {
            let mut list = lock(&inner.list);
            if let Some(src) = list.get_mut(key) {
                // Known source: the fence it holds stays; ours is dropped.
                src.targets.extend(targets.iter().copied());
                if !src.fenced {
                    return Ok(inner.source_status(src));
                }
            } else {
                if fence_kind == FenceKind::Lease {
                    fence::take_lease(file.as_fd(), path, key).inspect_err(|e| {
                        inner.note_fence_failure(e);
                    })?;
                }
                let generation = read_generation(file.as_fd(), path, 1)?;
                list.insert(Source {
                    key,
                    path: path.to_path_buf(),
                    fd: Arc::new(OwnedFd::from(file)),
                    fence: fence_kind,
                    fenced: true,
                    generation,
                    targets: targets.clone(),
                    replicas: Vec::new(),
                    copies: 0,
                    abort: Arc::new(AtomicBool::new(false)),
                    broken_at: None,
                    retries: 0,
                });
            }
        }
        let result = inner.populate(key);
        let list = lock(&inner.list);
        let status = list.get(key).map(|s| inner.source_status(s));
        drop(list);
        result?;
        status.ok_or_else(|| Error::SourceChanged {
            path: path.to_path_buf(),
            what: "was dropped",
        })
    }

    /// An opened file as a source: it must be a regular file; one not open
    /// read-only (`O_WRONLY`, `O_RDWR`, `O_PATH`) is reopened read-only
    /// through `/proc/self/fd`, and the original closed, so that our own fd
    /// does not refuse the lease.
    fn readonly_source(file: File, path: &Path) -> Result<(File, SourceKey)> {
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let ft = meta.file_type();
        if !ft.is_file() {
            return Err(not_regular(ft, path));
        }
        let key = SourceKey {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| Error::io(path, e.into()))?;
        if flags & libc::O_PATH == 0 && flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Ok((file, key));
        }
        let reopened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| Error::io(path, e))?;
        drop(file);
        let meta = reopened.metadata().map_err(|e| Error::io(path, e))?;
        if (meta.dev(), meta.ino()) != (key.dev, key.ino) || !meta.file_type().is_file() {
            return Err(Error::SourceChanged {
                path: path.to_path_buf(),
                what: "changed identity when reopened read-only",
            });
        }
        Ok((reopened, key))
    }

    /// Drop every replica of `path` and its fence. Returns how many
    /// replicas were invalidated.
    pub fn evict(&self, path: &Path) -> Result<usize> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let key = SourceKey {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        let list = lock(&self.inner.list);
        if list.get(key).is_none() {
            return Err(Error::NotReplicated {
                path: path.to_path_buf(),
            });
        }
        let (_list, n) = self.inner.drop_source(list, key, Reason::Evict);
        Ok(n)
    }

    /// Hand `pid` a read-only fd of its node's replica of the file behind
    /// `fd` (which the client opened itself: proof that it may read it).
    pub fn attach(&self, pid: u32, fd: BorrowedFd<'_>, node: Option<u32>) -> Result<Attach> {
        let inner = &self.inner;
        let result = inner.attach(pid, fd, node);
        let label = match &result {
            Ok(Attach::Replica { .. }) => "replica",
            Ok(Attach::Original { .. }) => "original",
            Err(_) => "refused",
        };
        inner.metrics.attaches.with_label_values(&[label]).inc();
        result
    }

    /// The whole replica list, after pruning dead attachments.
    pub fn status(&self) -> StatusReport {
        self.inner.prune();
        let list = lock(&self.inner.list);
        let sources = list.iter().map(|s| self.inner.source_status(s)).collect();
        drop(list);
        let left_alone = self
            .inner
            .left_alone
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(_, l)| l.clone())
            .collect();
        StatusReport {
            sources,
            left_alone,
        }
    }

    /// Invalidate every replica, release every fence, stop the threads and
    /// unmount the store. Idempotent.
    pub fn shutdown(&self) {
        let inner = &self.inner;
        if inner.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(tx) = inner.jobs.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(Job::Stop);
        }
        let mut list = lock(&inner.list);
        for key in list.keys() {
            list = inner.drop_source(list, key, Reason::Shutdown).0;
        }
        drop(list);
        let threads = std::mem::take(&mut *inner.threads.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(mut f) = threads.fence {
            f.stop();
        }
        if let Some(w) = threads.worker {
            let _ = w.join();
        }
        if let Some(w) = inner
            .published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            if let Err(e) = w.remove() {
                tracing::warn!("removing the published replica set: {e}");
            }
        }
        inner.store.close();
        tracing::info!("every replica invalidated, every fence released");
    }
}

/// The error for a source that is not a regular file, naming what it is.
fn not_regular(ft: std::fs::FileType, path: &Path) -> Error {
    let kind = if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else {
        "special file"
    };
    Error::NotRegularFile {
        path: path.to_path_buf(),
        kind,
    }
}

/// Open a source for replication: it must exist and be a regular file.
fn open_source(path: &Path) -> Result<(File, SourceKey)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(not_regular(ft, path));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(Error::NotRegularFile {
            path: path.to_path_buf(),
            kind: "special file",
        });
    }
    Ok((
        file,
        SourceKey {
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

fn read_generation(fd: BorrowedFd<'_>, path: &Path, seq: u64) -> Result<Generation> {
    let st = nix::sys::stat::fstat(fd).map_err(|e| Error::io(path, e.into()))?;
    Ok(Generation {
        seq,
        size: st.st_size as u64,
        mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
        ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
    })
}

/// The start time of a process (field 22 of /proc/<pid>/stat), to tell a
/// recycled pid from the one that attached.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The CPUs `pid` may run on (`Cpus_allowed_list` of /proc/<pid>/status).
fn allowed_cpus(pid: u32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    crate::topology::sysfs::parse_cpulist(list.trim()).ok()
}

impl Inner {
    fn note_fence_failure(&self, e: &Error) {
        let reason = match e {
            Error::Unfenceable { reason, .. } if reason.contains("open for writing") => {
                "open_for_write"
            }
            Error::Unfenceable { reason, .. } if reason.contains("refused a read lease") => {
                "lease_refused"
            }
            Error::Unfenceable { .. } => "filesystem",
            _ => "other",
        };
        self.metrics
            .fence_failures
            .with_label_values(&[reason])
            .inc();
    }

    fn jobs(&self, job: Job) {
        if let Some(tx) = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(job);
        }
    }

    /// Copy the current generation of `key` to every wanted target that
    /// lacks it. The fence must be held; copies run without the list lock.
    fn populate(&self, key: SourceKey) -> Result<()> {
        let (fd, abort, ident, work) = {
            let mut list = lock(&self.list);
            let Some(src) = list.get_mut(key) else {
                return Ok(());
            };
            if !src.fenced {
                return Err(Error::SourceChanged {
                    path: src.path.clone(),
                    what: "was opened for writing",
                });
            }
            let work = src.missing_targets();
            if work.is_empty() {
                return Ok(());
            }
            for t in &work {
                src.replicas.push(Replica {
                    target: *t,
                    generation: src.generation,
                    state: ReplicaState::Populating,
                    file: None,
                    attachments: BTreeSet::new(),
                    placement: None,
                });
            }
            src.copies += 1;
            let ident = ReplicaIdent {
                path: src.path.clone(),
                dev: key.dev,
                ino: key.ino,
                generation: src.generation.seq,
                size: src.generation.size,
                mtime_ns: src.generation.mtime_ns,
                ctime_ns: src.generation.ctime_ns,
            };
            (src.fd.clone(), src.abort.clone(), ident, work)
        };

        let results: Vec<(Target, Result<(ReplicaFile, Placement)>)> = work
            .iter()
            .map(|t| (*t, self.copy_one(*t, fd.as_fd(), &abort, &ident)))
            .collect();
        // A source unlinked while we copied is dropped, not replicated.
        let unlinked = nix::sys::stat::fstat(fd.as_fd())
            .map(|st| st.st_nlink == 0)
            .unwrap_or(false);
        drop(fd);

        let mut list = lock(&self.list);
        let mut first_err = None;
        let seq = ident.generation;
        if let Some(src) = list.get_mut(key) {
            src.copies -= 1;
            let aborted = abort.load(Ordering::SeqCst) || !src.fenced;
            for (target, result) in results {
                let pos = src.replicas.iter().position(|r| {
                    r.target == target
                        && r.generation.seq == seq
                        && r.state == ReplicaState::Populating
                });
                match (result, pos) {
                    (Ok((file, placement)), Some(i)) if !aborted && !unlinked => {
                        let bytes = src.replicas[i].generation.size as i64;
                        src.replicas[i].file = Some(file);
                        src.replicas[i].placement = Some(placement);
                        src.replicas[i].state = ReplicaState::Valid;
                        let t = target.to_string();
                        self.metrics.replicas.with_label_values(&[t.as_str()]).inc();
                        self.metrics
                            .replica_bytes
                            .with_label_values(&[t.as_str()])
                            .add(bytes);
                        tracing::info!(
                            "{}: generation {seq} valid on {target}",
                            src.path.display()
                        );
                    }
                    (Ok((file, _)), pos) => {
                        file.remove();
                        if let Some(i) = pos {
                            src.replicas.remove(i);
                        }
                        let what = if unlinked {
                            "was deleted"
                        } else {
                            "was opened for writing"
                        };
                        first_err.get_or_insert(Error::SourceChanged {
                            path: src.path.clone(),
                            what,
                        });
                    }
                    (Err(e), pos) => {
                        if let Some(i) = pos {
                            src.replicas.remove(i);
                        }
                        first_err.get_or_insert(e);
                    }
                }
            }
        } else {
            // Evicted meanwhile: the evictor waited for us; drop our copies.
            for (_, result) in results {
                if let Ok((file, _)) = result {
                    file.remove();
                }
            }
        }
        self.copies_done.notify_all();
        self.publish(&list);
        if unlinked {
            if let Some(src) = list.get(key) {
                if src.attached() == 0 {
                    let _ = self.drop_source(list, key, Reason::Unlinked);
                }
            }
        }
        match first_err {
            Some(e) => {
                let reason = match &e {
                    Error::NoSpace { .. } => "no_space",
                    Error::SourceChanged { .. } => "source_changed",
                    Error::Misplaced { .. } => "misplaced",
                    _ => "io",
                };
                self.metrics
                    .replication_failures
                    .with_label_values(&[reason])
                    .inc();
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Create, fill, check and seal one replica file.
    fn copy_one(
        &self,
        target: Target,
        src: BorrowedFd<'_>,
        abort: &AtomicBool,
        ident: &ReplicaIdent,
    ) -> Result<(ReplicaFile, Placement)> {
        let Target::Node(node) = target;
        let file = self.store.create(node, ident)?;
        let done = (|| {
            let stats = file.fill(src, ident.size, abort, ident)?;
            let t = target.to_string();
            self.metrics
                .copied_bytes
                .with_label_values(&[t.as_str()])
                .inc_by(stats.bytes);
            self.metrics
                .copy_seconds
                .with_label_values(&[t.as_str()])
                .observe(stats.nanos as f64 / 1e9);
            let placement = file.placement()?;
            if placement.misplaced > 0 {
                self.metrics.misplaced_pages.inc_by(placement.misplaced);
                return Err(Error::Misplaced {
                    path: ident.path.clone(),
                    node,
                    pages: placement.pages,
                    misplaced: placement.misplaced,
                });
            }
            file.seal()?;
            Ok(placement)
        })();
        match done {
            Ok(placement) => Ok((file, placement)),
            Err(e) => {
                file.remove();
                Err(e)
            }
        }
    }

    /// Revoke every replica of `key` and release its fence, keeping the
    /// source listed (a writer broke in; a new generation follows).
    /// Returns the guard and how many replicas were invalidated.
    fn revoke<'a>(
        &'a self,
        mut list: MutexGuard<'a, ReplicaList>,
        key: SourceKey,
        reason: Reason,
        signalled: Option<Instant>,
    ) -> (MutexGuard<'a, ReplicaList>, usize) {
        // 1. No new attaches, and copiers stop at their next chunk.
        if let Some(src) = list.get_mut(key) {
            src.abort.store(true, Ordering::SeqCst);
            for r in &mut src.replicas {
                if r.state != ReplicaState::Gone {
                    r.state = ReplicaState::Revoking;
                }
            }
        }
        // 2. Wait for in-flight copies (bounded: one chunk each).
        loop {
            match list.get(key) {
                Some(src) if src.copies > 0 => {
                    list = self
                        .copies_done
                        .wait(list)
                        .unwrap_or_else(|p| p.into_inner());
                }
                _ => break,
            }
        }
        let Some(src) = list.get_mut(key) else {
            return (list, 0);
        };
        // 3. Truncate: the kernel unmaps the pages from every process.
        let mut n = 0;
        for r in src.replicas.drain(..) {
            if let Some(file) = r.file {
                let t = r.target.to_string();
                self.metrics.replicas.with_label_values(&[t.as_str()]).dec();
                self.metrics
                    .replica_bytes
                    .with_label_values(&[t.as_str()])
                    .sub(r.generation.size as i64);
                file.remove();
                n += 1;
            }
        }
        self.metrics
            .invalidations
            .with_label_values(&[reason.label()])
            .inc_by(n as u64);
        // 4. Only now may the writer go on.
        if let Some(at) = signalled {
            self.metrics
                .invalidation_seconds
                .observe(at.elapsed().as_secs_f64());
        }
        if src.fence == FenceKind::Lease && src.fenced {
            if let Err(e) = sys::release_lease(src.fd.as_fd()) {
                tracing::warn!("{}: releasing the lease: {e}", src.path.display());
            }
        }
        src.fenced = src.fence != FenceKind::Lease;
        // After the writer was let go: not on its path.
        self.publish(&list);
        (list, n)
    }

    /// Write the published replica set: which sources have valid replicas
    /// of their current generation on which nodes. The preload shim reads
    /// it to skip the daemon for files without replicas. Called with the
    /// list locked, so tables are published in list order.
    fn publish(&self, list: &ReplicaList) {
        let mut guard = self.published.lock().unwrap_or_else(|p| p.into_inner());
        let Some(writer) = guard.as_mut() else {
            return;
        };
        let entries: Vec<PublishedEntry> = list
            .iter()
            .filter(|s| s.fenced)
            .map(|s| PublishedEntry {
                dev: s.key.dev,
                ino: s.key.ino,
                nodes: nodes_mask(s.replicas.iter().filter_map(|r| {
                    let Target::Node(n) = r.target;
                    (r.state == ReplicaState::Valid && r.generation.seq == s.generation.seq)
                        .then_some(n)
                })),
                generation: s.generation.seq,
            })
            .filter(|e| e.nodes != 0)
            .collect();
        let out = writer.publish(&entries);
        if out.overflow {
            tracing::warn!(
                "the published replica set holds {} of {} sources: programs ask the \
                 daemon for the rest",
                out.sources,
                entries.len()
            );
        }
    }

    /// Revoke and forget a source.
    fn drop_source<'a>(
        &'a self,
        list: MutexGuard<'a, ReplicaList>,
        key: SourceKey,
        reason: Reason,
    ) -> (MutexGuard<'a, ReplicaList>, usize) {
        let (mut list, n) = self.revoke(list, key, reason, None);
        if let Some(src) = list.remove(key) {
            tracing::info!(
                "{}: dropped ({}), {n} replicas invalidated",
                src.path.display(),
                reason.label()
            );
        }
        (list, n)
    }

    fn on_fence_event(&self, ev: FenceEvent) {
        let (fds, at) = match ev {
            FenceEvent::Break { fd, at } => (vec![fd], at),
            FenceEvent::Overflow { at } => {
                // Unknown fd: every held lease with a break pending.
                let list = lock(&self.list);
                let fds = list
                    .iter()
                    .filter(|s| s.fence == FenceKind::Lease && s.fenced)
                    .filter(|s| sys::get_lease(s.fd.as_fd()).ok() == Some(libc::F_UNLCK))
                    .map(|s| s.fd.as_raw_fd())
                    .collect();
                (fds, at)
            }
        };
        for fd in fds {
            let list = lock(&self.list);
            let Some(key) = list.by_fence_fd(fd) else {
                continue;
            };
            if !list.get(key).is_some_and(|s| s.fenced) {
                continue;
            }
            let (mut list, n) = self.revoke(list, key, Reason::Write, Some(at));
            let waited = at.elapsed();
            if let Some(src) = list.get_mut(key) {
                src.broken_at = Some(Instant::now());
                src.retries = 0;
                tracing::info!(
                    "{}: writer arrived; {n} replicas revoked, lease released after {:?}",
                    src.path.display(),
                    waited
                );
            }
            drop(list);
            self.jobs(Job::Refence(Instant::now() + self.cfg.settle, key));
        }
    }

    /// Try to take the fence of `key` back and copy a new generation.
    /// Returns when to try again, if needed.
    fn refence(&self, key: SourceKey) -> Option<Duration> {
        {
            let mut list = lock(&self.list);
            let src = list.get_mut(key)?;
            if src.fenced {
                return None;
            }
            // Quiet long enough since the last writer?
            if let Some(at) = src.broken_at {
                let quiet = at.elapsed();
                if quiet < self.cfg.settle {
                    return Some(self.cfg.settle - quiet);
                }
            }
            match sys::set_read_lease(src.fd.as_fd()) {
                Ok(()) => {}
                Err(e) => {
                    src.retries += 1;
                    let backoff = self
                        .cfg
                        .settle
                        .saturating_mul(1 << src.retries.min(10))
                        .min(self.cfg.retry_max);
                    if e.raw_os_error() != Some(libc::EAGAIN) {
                        tracing::warn!(
                            "{}: cannot take the lease back: {e}; retrying",
                            src.path.display()
                        );
                    }
                    return Some(backoff);
                }
            }
            let seq = src.generation.seq + 1;
            match read_generation(src.fd.as_fd(), &src.path, seq) {
                Ok(g) => src.generation = g,
                Err(e) => {
                    tracing::warn!("{e}");
                    let _ = sys::release_lease(src.fd.as_fd());
                    return Some(self.cfg.retry_max);
                }
            }
            src.fenced = true;
            src.retries = 0;
            src.abort = Arc::new(AtomicBool::new(false));
        }
        if let Err(e) = self.populate(key) {
            tracing::warn!("new generation: {e}");
        }
        None
    }

    fn attach(&self, pid: u32, fd: BorrowedFd<'_>, node: Option<u32>) -> Result<Attach> {
        let path = PathBuf::from(format!("(fd from pid {pid})"));
        // The fd must be open for reading: an O_PATH fd proves nothing.
        // SAFETY: fcntl F_GETFL on a valid fd.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(Error::io(&path, std::io::Error::last_os_error()));
        }
        if flags & libc::O_PATH != 0 || flags & libc::O_ACCMODE == libc::O_WRONLY {
            return Err(Error::Io {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "the fd passed is not open for reading (O_PATH or O_WRONLY): \
                     open the file O_RDONLY and pass that fd",
                ),
            });
        }
        let st = nix::sys::stat::fstat(fd).map_err(|e| Error::io(&path, e.into()))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Error::NotRegularFile {
                path,
                kind: "special file",
            });
        }
        let key = SourceKey {
            dev: st.st_dev,
            ino: st.st_ino,
        };
        let node = match node {
            Some(n) => {
                self.topology.node(n)?;
                n
            }
            None => match allowed_cpus(pid).and_then(|c| self.topology.home_node(&c)) {
                Some(n) => n,
                None => {
                    return Ok(Attach::Original {
                        reason: format!(
                            "pid {pid} may run on CPUs of several nodes: it has no home node \
                             (bind it to one node, or ask for a node explicitly)"
                        ),
                    })
                }
            },
        };
        let target = Target::Node(node);
        let attachment = Attachment {
            pid,
            start_time: start_time(pid).unwrap_or(0),
        };
        let mut list = lock(&self.list);
        let Some(src) = list.get_mut(key) else {
            return Ok(Attach::Original {
                reason: "the file is not replicated".into(),
            });
        };
        if !src.fenced {
            return Ok(Attach::Original {
                reason: "a writer holds the file; its replicas are revoked".into(),
            });
        }
        let seq = src.generation.seq;
        let Some(replica) = src
            .replicas
            .iter_mut()
            .find(|r| r.target == target && r.generation.seq == seq)
        else {
            return Ok(Attach::Original {
                reason: format!("no replica on {target}"),
            });
        };
        let file = match (&replica.state, &replica.file) {
            (ReplicaState::Valid, Some(file)) => file,
            (state, _) => {
                return Ok(Attach::Original {
                    reason: format!("the replica on {target} is {state}"),
                })
            }
        };
        let rfd = file
            .open_readonly()
            .map_err(|e| Error::io(file.label(), e))?;
        replica.attachments.insert(attachment);
        Ok(Attach::Replica {
            fd: rfd,
            node,
            generation: seq,
            size: replica.generation.size,
        })
    }

    /// Forget attachments of processes that exited, and drop sources that
    /// were unlinked and have no attachment left.
    fn prune(&self) {
        // Read /proc without the list lock: the fence thread may need it.
        let (attached, fds): (BTreeSet<Attachment>, Vec<(SourceKey, Arc<OwnedFd>)>) = {
            let list = lock(&self.list);
            (
                list.iter()
                    .flat_map(|s| s.replicas.iter())
                    .flat_map(|r| r.attachments.iter().copied())
                    .collect(),
                list.iter().map(|s| (s.key, s.fd.clone())).collect(),
            )
        };
        let dead: BTreeSet<Attachment> = attached
            .into_iter()
            .filter(|a| !start_time(a.pid).is_some_and(|t| t == a.start_time || a.start_time == 0))
            .collect();
        let unlinked: Vec<SourceKey> = fds
            .into_iter()
            .filter(|(_, fd)| nix::sys::stat::fstat(fd.as_fd()).is_ok_and(|st| st.st_nlink == 0))
            .map(|(key, _)| key)
            .collect();
        let gone: BTreeSet<Attachment> = {
            let left = self.left_alone.lock().unwrap_or_else(|p| p.into_inner());
            left.iter().map(|(a, _)| *a).collect::<Vec<Attachment>>()
        }
        .into_iter()
        .filter(|a| !start_time(a.pid).is_some_and(|t| t == a.start_time || a.start_time == 0))
        .collect();
        self.left_alone
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(a, _)| !gone.contains(a));
        let mut list = lock(&self.list);
        for src in list.iter_mut() {
            for r in &mut src.replicas {
                r.attachments.retain(|a| !dead.contains(a));
            }
        }
        for key in unlinked {
            if list
                .get(key)
                .is_some_and(|s| s.attached() == 0 && s.copies == 0)
            {
                list = self.drop_source(list, key, Reason::Unlinked).0;
            }
        }
    }

    fn source_status(&self, src: &Source) -> SourceStatus {
        SourceStatus {
            path: src.path.clone(),
            dev: src.key.dev,
            ino: src.key.ino,
            generation: src.generation.seq,
            size: src.generation.size,
            fence: if src.fenced {
                src.fence.name().to_string()
            } else {
                "broken".to_string()
            },
            targets: src.targets.iter().map(|t| t.to_string()).collect(),
            replicas: src
                .replicas
                .iter()
                .map(|r| ReplicaStatus {
                    target: r.target.to_string(),
                    generation: r.generation.seq,
                    bytes: r.generation.size,
                    state: r.state,
                    attachments: r.attachments.iter().map(|a| a.pid).collect(),
                    file: r.file.as_ref().map(|f| f.label()).unwrap_or_default(),
                    pages: r.placement.map_or(0, |p| p.pages),
                    pages_on_node: r.placement.map_or(0, |p| p.pages - p.misplaced),
                })
                .collect(),
        }
    }
}

/// The generation worker: takes fences back after writers leave, and
/// prunes periodically.
fn generation_worker(inner: std::sync::Weak<Inner>, rx: mpsc::Receiver<Job>) {
    let mut due: BinaryHeap<Reverse<(Instant, SourceKey)>> = BinaryHeap::new();
    let mut next_prune = Instant::now();
    loop {
        let now = Instant::now();
        let wake = due
            .peek()
            .map(|Reverse((t, _))| *t)
            .unwrap_or(next_prune)
            .min(next_prune);
        match rx.recv_timeout(wake.saturating_duration_since(now)) {
            Ok(Job::Refence(at, key)) => due.push(Reverse((at, key))),
            Ok(Job::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        while due
            .peek()
            .is_some_and(|Reverse((t, _))| *t <= Instant::now())
        {
            let Some(Reverse((_, key))) = due.pop() else {
                break;
            };
            if let Some(again) = inner.refence(key) {
                due.push(Reverse((Instant::now() + again, key)));
            }
        }
        if Instant::now() >= next_prune {
            inner.prune();
            next_prune = Instant::now() + inner.cfg.prune_every;
        }
    }
}
