//! The engine: replicate, evict, attach, revoke, regenerate.
//!
//! ```text
//!  mod.rs       Replicator, its config, start and shutdown (the lifecycle)
//!  populate.rs  replicate a path or an fd: fence it, copy it, check placement
//!  revoke.rs    a writer (or evict, unlink, shutdown) arrives: revoke every
//!               replica, then release; refence: a new generation after it
//!  migrate.rs   move a file's resident page cache to one node (issue 11)
//!  attach.rs    a client's Map: one replica fd for a file it opened
//!  carry.rs     before a truncate: private pages to each process's spare
//!  hello.rs     the preload shim's Hello: the mappings replicas may back
//!  pid.rs       replicate --pid: the text a running process maps
//!  prune.rs     dead attachments, unlinked sources; the generation worker
//!  status.rs    the replica list as views
//!  publish.rs   the published replica set, after every change of validity
//! ```
//!
//! Threads and locks:
//! - callers (the daemon's control socket) run `replicate`, `evict`,
//!   `attach`, `hello`, `status` on their own threads;
//! - the fence thread runs `on_fence_event`: mark `Revoking`, wait for
//!   in-flight copies of that source to stop (they check an abort flag
//!   every chunk), truncate every replica, release the lease;
//! - the generation worker takes fences back after writers leave, copies
//!   new generations, and prunes dead attachments and unlinked sources.
//!
//! One mutex guards the [`ReplicaList`]; nobody copies, reads `/proc` or
//! waits on I/O while holding it (truncating and unlinking a tmpfs file is
//! the longest step). Every kernel call of the fence state machine goes
//! through [`FenceOps`], so unit tests (`tests.rs`) drive it without root.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use replicad_procfs::ProcReader;

use crate::fence::fdstore::{self, FdStore};
use crate::fence::{self, FenceOps, FenceThread, KeeperLink, KernelOps, ModifyWatch};
use crate::list::ReplicaList;
use crate::model::{Attachment, LeftAlone, NodeSelection, Publisher, SourceKey, Target};
use crate::store::{Store, StoreConfig, StoreKind};
use crate::{Error, Metrics, Result, Topology};

mod adopt;
mod attach;
mod carry;
mod hello;
mod keeper;
mod migrate;
mod overlay;
mod pid;
mod populate;
mod prune;
mod publish;
mod revoke;
mod status;
#[cfg(test)]
mod tests;

pub use adopt::Adopted;
pub use attach::Attach;
pub use hello::{Hello, HelloRange, HomeNode, ProcessAttach, SourceFds, MAX_SOURCES};
pub use migrate::Migrated;
pub use status::Viewer;

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
    /// The most sources the daemon's open-file limit leaves room for
    /// (`None`: no limit checked). The engine counts it again for the
    /// store it opened ([`Replicator::source_limit`]): its `nofile` is
    /// what counts.
    pub max_sources: Option<SourceLimit>,
}

/// How many sources fit in the open-file limit, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceLimit {
    pub sources: usize,
    /// `RLIMIT_NOFILE` (soft) it was computed from.
    pub nofile: u64,
    /// Open files one source takes.
    pub per_source: u64,
}

impl SourceLimit {
    /// Open files kept for everything else: the 512 connections other
    /// users may hold and the fds their requests pass, the store, /proc,
    /// kept pagemaps (`carry.rs`), and the fence's own reserve for cutting
    /// replicas by path (`store::reserve_fds`).
    pub const RESERVED: u64 = 1024;

    /// The room `nofile` open files leave for sources replicated onto
    /// node stores of these kinds (one a node).
    pub fn new(nofile: u64, stores: &[StoreKind]) -> Self {
        // The source's fd (its lease), and a replica fd for each node whose
        // store is memfds: a populated tmpfs replica holds no fd (it is held
        // by its path). A client is given a fresh open of its replica,
        // which lives only while the answer is sent, and every tmpfs
        // operation opens one for its moment (those are in the reserve).
        let memfds = stores.iter().filter(|k| **k == StoreKind::Memfd).count();
        let per_source = 1 + memfds as u64;
        SourceLimit {
            sources: (nofile.saturating_sub(Self::RESERVED) / per_source) as usize,
            nofile,
            per_source,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            store: StoreConfig::default(),
            settle: Duration::from_millis(200),
            retry_max: Duration::from_secs(2),
            prune_every: Duration::from_secs(2),
            home_nodes: Vec::new(),
            max_sources: None,
        }
    }
}

/// What the engine is wired to: the kernel (or a test's stand-in), where
/// `/proc` is, where it publishes, and whether it runs a fence thread.
pub struct Wiring {
    pub ops: Arc<dyn FenceOps>,
    pub proc: ProcReader,
    pub publisher: Option<Box<dyn Publisher>>,
    /// Hear lease breaks on a fence thread (the daemon). Unit tests with a
    /// stand-in kernel take no real lease and deliver breaks themselves.
    pub fence_thread: bool,
    /// The modify watch on every leased source (the fence thread reads it
    /// when there is one).
    pub watch: Option<Arc<ModifyWatch>>,
    /// Start a fence keeper by running this program (replicad itself)
    /// with [`fence::keeper::KEEPER_ARG`].
    pub keeper: Option<std::path::PathBuf>,
    /// systemd's fd store (`NOTIFY_SOCKET`): every kept lease and replica
    /// goes there too, and comes back at the next start (`LISTEN_FDS`).
    pub fd_store: Option<FdStore>,
}

impl Wiring {
    /// The real kernel and `/proc`, publishing through `publisher`.
    pub fn kernel(publisher: Option<Box<dyn Publisher>>) -> Result<Wiring> {
        let proc = ProcReader::default();
        let watch = ModifyWatch::new(proc.clone()).map_err(|source| Error::Thread {
            what: "modify watch (inotify)",
            source,
        })?;
        Ok(Wiring {
            ops: Arc::new(KernelOps),
            proc,
            publisher,
            fence_thread: true,
            watch: Some(Arc::new(watch)),
            keeper: Some(std::env::current_exe().map_err(|source| Error::Thread {
                what: "fence keeper (cannot find replicad's own executable)",
                source,
            })?),
            fd_store: FdStore::from_env(),
        })
    }
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
    ops: Arc<dyn FenceOps>,
    proc: ProcReader,
    watch: Option<Arc<ModifyWatch>>,
    /// The fence keeper, which holds every lease and valid replica too.
    keeper: Option<KeeperLink>,
    /// systemd's fd store, which holds them too under systemd.
    fd_store: Option<FdStore>,
    list: Mutex<ReplicaList>,
    /// Signalled whenever a copy finishes.
    copies_done: Condvar,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    shutting_down: AtomicBool,
    threads: Mutex<Threads>,
    /// Processes that said hello and were left on their own mappings
    /// (newest last, bounded), pruned when they exit.
    /// Processes a hello left alone (no node for them), with whether
    /// followers were nudged since they got one ([`Replicator::recheck_left_alone`]).
    left_alone: Mutex<Vec<(Attachment, LeftAlone, bool)>>,
    /// Sources a writer broke in on (lease break or modify watch), oldest
    /// first, for the planner's changes per hour ([`Replicator::take_write_breaks`]).
    write_breaks: Mutex<Vec<SourceKey>>,
    /// Where validity changes are published.
    publisher: Mutex<Option<Box<dyn Publisher>>>,
    /// Revoke gates held until the writer each let go is seen opening
    /// (see `revoke.rs`).
    held_gates: Mutex<Vec<revoke::HeldGate>>,
    /// `cfg.home_nodes`, replaced on reload.
    home_nodes: RwLock<Vec<HomeNode>>,
    /// Where attached processes keep their fallback tables (see
    /// `carry.rs`), pruned when they exit.
    tables: Mutex<std::collections::BTreeMap<Attachment, carry::Carrying>>,
    /// The thread that scans and copies for `carry.rs`.
    carrier: Mutex<Option<carry::Carrier>>,
    /// Processes and uids whose memory kept a copier waiting (`carry.rs`).
    carry_banned: Mutex<carry::Banned>,
}

#[derive(Default)]
struct Threads {
    fence: Option<FenceThread>,
    worker: Option<JoinHandle<()>>,
    keeper: Option<JoinHandle<()>>,
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

/// Write breaks kept for the planner between two of its ticks (it takes
/// them each interval; a daemon without one keeps the newest).
pub const WRITE_BREAKS_MAX: usize = 4096;

/// Why replicas are invalidated (the metric's label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Write,
    Evict,
    Shutdown,
    Unlinked,
    /// The source changed without a lease break (`O_RDONLY|O_TRUNC`).
    Modified,
    /// The fence keeper was lost (and may have revoked and released).
    KeeperLost,
    /// A copy failed and left the source without a replica: its fence goes
    /// too (no lease without a replica).
    CopyFailed,
}

impl Reason {
    #[cfg(test)]
    const ALL: [Reason; 7] = [
        Reason::Write,
        Reason::Evict,
        Reason::Shutdown,
        Reason::Unlinked,
        Reason::Modified,
        Reason::KeeperLost,
        Reason::CopyFailed,
    ];

    fn label(self) -> &'static str {
        match self {
            Reason::Write => "write",
            Reason::Evict => "evict",
            Reason::Shutdown => "shutdown",
            Reason::Unlinked => "unlinked",
            Reason::Modified => "modified",
            Reason::KeeperLost => "keeper_lost",
            Reason::CopyFailed => "copy_failed",
        }
    }
}

fn lock(list: &Mutex<ReplicaList>) -> MutexGuard<'_, ReplicaList> {
    // A panic while holding the lock leaves the list consistent enough to
    // revoke from: every mutation is a single field or vec update.
    list.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Lock a mutex, taking over a poisoned one (its data stays usable).
fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Replicator {
    /// Open the store (removing leftovers of an earlier run first), start
    /// the fence thread and the generation worker, on the real kernel.
    /// [`fence::prepare`] must have run in this thread before any thread
    /// was started.
    pub fn start(
        cfg: EngineConfig,
        topology: Topology,
        metrics: Metrics,
        publisher: Option<Box<dyn Publisher>>,
    ) -> Result<Replicator> {
        Self::start_with(cfg, topology, metrics, Wiring::kernel(publisher)?)
    }

    /// [`Replicator::start`] with the kernel, `/proc` and publisher given.
    pub fn start_with(
        cfg: EngineConfig,
        topology: Topology,
        metrics: Metrics,
        wiring: Wiring,
    ) -> Result<Replicator> {
        if wiring.fence_thread && !fence::prepared() {
            return Err(Error::FenceNotPrepared);
        }
        let home_nodes = cfg.home_nodes.clone();
        let nodes: Vec<u32> = topology.nodes.iter().map(|n| n.id).collect();
        // A keeper a dead daemon left fencing on this run dir: take it over
        // with everything it holds, before the store removes leftovers
        // (what it holds is not left over).
        let run_dir = cfg.store.run_dir.clone();
        let (keeper, handed) = match wiring.keeper {
            Some(exe) => {
                let adopted =
                    KeeperLink::adopt(exe.clone(), run_dir.clone()).map_err(|source| {
                        Error::Thread {
                            what: "fence keeper (the one left on this run directory)",
                            source,
                        }
                    })?;
                let (link, handed) = match adopted {
                    Some((link, handed)) => (link, handed),
                    None => (Self::new_keeper(exe, run_dir)?, Vec::new()),
                };
                (Some(link), handed)
            }
            None => (None, Vec::new()),
        };
        // What systemd kept for us: taken over when no keeper survived (the
        // daemon and its keeper died together); else the keeper's own.
        let stored = fdstore::take_captured();
        let from_fd_store = handed.is_empty() && !stored.is_empty();
        let handed = if from_fd_store {
            tracing::info!(
                sources = stored.len(),
                "taking over the leases and replicas systemd's fd store kept"
            );
            stored
        } else {
            // The keeper's are the live ones: what the store kept besides
            // goes (its fds close here; systemd forgets the names).
            if let Some(store) = &wiring.fd_store {
                for h in &stored {
                    store.remove(h.key);
                }
            }
            handed
        };
        let mut handed = handed;
        if from_fd_store {
            // systemd kept the leases (and memfd replicas); the tmpfs
            // replicas are where they were, in the store: found by the
            // source their xattrs name, and checked whole by `adopt`.
            let mut found: std::collections::BTreeMap<(u64, u64), Vec<_>> = Default::default();
            for (source, at) in crate::store::replicas_in(&cfg.store.run_dir, &nodes) {
                found.entry(source).or_default().push(at);
            }
            for h in &mut handed {
                h.paths
                    .extend(found.remove(&(h.key.dev, h.key.ino)).unwrap_or_default());
            }
        }
        let keep: BTreeSet<(u64, u64)> = handed
            .iter()
            .flat_map(|h| h.replicas.iter())
            .filter_map(|fd| nix::sys::stat::fstat(fd).ok())
            .map(|st| (st.st_dev, st.st_ino))
            .chain(
                handed
                    .iter()
                    .flat_map(|h| h.paths.iter().map(|p| (p.dev, p.ino))),
            )
            .collect();
        let store = Store::open(&cfg.store, &nodes, &keep)?;
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
            metrics.add_target(&Target::Node(*n).to_string());
        }
        // What a source costs depends on what backs each node's store.
        let mut cfg = cfg;
        if let Some(limit) = cfg.max_sources {
            let kinds: Vec<StoreKind> = nodes.iter().filter_map(|n| store.kind(*n)).collect();
            cfg.max_sources = Some(SourceLimit::new(limit.nofile, &kinds));
        }
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            cfg,
            topology,
            store,
            metrics,
            ops: wiring.ops,
            proc: wiring.proc,
            watch: wiring.watch.clone(),
            keeper,
            fd_store: wiring.fd_store,
            list: Mutex::new(ReplicaList::default()),
            copies_done: Condvar::new(),
            jobs: Mutex::new(Some(tx)),
            shutting_down: AtomicBool::new(false),
            threads: Mutex::new(Threads::default()),
            left_alone: Mutex::new(Vec::new()),
            write_breaks: Mutex::new(Vec::new()),
            home_nodes: RwLock::new(home_nodes),
            publisher: Mutex::new(wiring.publisher),
            held_gates: Mutex::new(Vec::new()),
            tables: Mutex::new(std::collections::BTreeMap::new()),
            carrier: Mutex::new(None),
            carry_banned: Mutex::new(carry::Banned::default()),
        });
        let fence = if wiring.fence_thread {
            let weak = Arc::downgrade(&inner);
            Some(
                FenceThread::spawn(
                    move |ev| {
                        if let Some(inner) = weak.upgrade() {
                            inner.on_fence_event(ev);
                        }
                    },
                    wiring.watch,
                )
                .map_err(|source| Error::Thread {
                    what: "fence thread",
                    source,
                })?,
            )
        } else {
            None
        };
        let weak = Arc::downgrade(&inner);
        let worker = std::thread::Builder::new()
            .name("replicad-gen".into())
            .spawn(move || prune::generation_worker(weak, rx))
            .map_err(|source| Error::Thread {
                what: "generation worker",
                source,
            })?;
        let keeper = if inner.keeper.is_some() {
            let weak = Arc::downgrade(&inner);
            Some(
                std::thread::Builder::new()
                    .name("replicad-keeper".into())
                    .spawn(move || keeper::link_thread(weak))
                    .map_err(|source| Error::Thread {
                        what: "fence keeper link",
                        source,
                    })?,
            )
        } else {
            None
        };
        {
            let mut t = relock(&inner.threads);
            t.fence = fence;
            t.worker = Some(worker);
            t.keeper = keeper;
        }
        inner.adopt(handed);
        if let Some(k) = &inner.keeper {
            k.adopted();
        }
        Ok(Replicator { inner })
    }

    fn new_keeper(exe: std::path::PathBuf, run_dir: std::path::PathBuf) -> Result<KeeperLink> {
        KeeperLink::start(exe, run_dir).map_err(|source| Error::Thread {
            what: "fence keeper",
            source,
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// How many sources the open-file limit leaves room for, counted for
    /// the store this engine opened (`None`: no limit checked).
    pub fn source_limit(&self) -> Option<SourceLimit> {
        self.inner.cfg.max_sources
    }

    /// The run directory the store lives in.
    pub fn run_dir(&self) -> &std::path::Path {
        &self.inner.cfg.store.run_dir
    }

    /// Replace the home-node policy (a reloaded configuration).
    /// Programs whose cgroup's home node changed look again (a nudge).
    pub fn set_home_nodes(&self, home_nodes: Vec<HomeNode>) {
        let changed = {
            let mut current = self
                .inner
                .home_nodes
                .write()
                .unwrap_or_else(|p| p.into_inner());
            let changed = *current != home_nodes;
            *current = home_nodes;
            changed
        };
        if changed {
            self.nudge_followers();
        }
    }

    /// The sources writers broke in on since the last call, one entry per
    /// revoke (a writer that keeps the file open counts once), oldest
    /// first; at most [`WRITE_BREAKS_MAX`] are kept between calls.
    pub fn take_write_breaks(&self) -> Vec<SourceKey> {
        std::mem::take(&mut *relock(&self.inner.write_breaks))
    }

    /// Wake every program that follows the published set to look at its
    /// maps again, the set unchanged: one left alone (its CPUs spanned
    /// nodes, say) asks again, and is answered for where it runs now.
    pub fn nudge_followers(&self) {
        if let Some(p) = relock(&self.inner.publisher).as_mut() {
            p.nudge();
        }
        self.inner.metrics.follower_nudges.inc();
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

    /// Invalidate every replica, release every fence, stop the threads and
    /// unmount the store. Idempotent.
    pub fn shutdown(&self) {
        let inner = &self.inner;
        if inner.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(tx) = relock(&inner.jobs).take() {
            let _ = tx.send(Job::Stop);
        }
        let mut list = lock(&inner.list);
        for key in list.keys() {
            list = inner.drop_source(list, key, Reason::Shutdown).0;
        }
        drop(list);
        let threads = std::mem::take(&mut *relock(&inner.threads));
        if let Some(mut f) = threads.fence {
            f.stop();
        }
        if let Some(w) = threads.worker {
            let _ = w.join();
        }
        if let Some(k) = threads.keeper {
            let _ = k.join();
        }
        // Everything is revoked and released: the keeper has nothing to do.
        if let Some(k) = &inner.keeper {
            k.stop();
        }
        if let Some(mut p) = relock(&inner.publisher).take() {
            p.retire();
        }
        inner.store.close();
        tracing::info!("every replica invalidated, every fence released");
    }

    /// Whether [`Replicator::shutdown`] began.
    pub fn is_stopped(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    fn check_running(&self) -> Result<()> {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown);
        }
        Ok(())
    }
}

impl Inner {
    fn jobs(&self, job: Job) {
        if let Some(tx) = relock(&self.jobs).as_ref() {
            let _ = tx.send(job);
        }
    }

    /// The attachment record of `pid` now: pid and start time (0 when the
    /// process is gone already; such a record is pruned at once).
    fn attachment(&self, pid: u32) -> Attachment {
        Attachment {
            pid,
            start_time: self.proc.start_time(pid).ok().flatten().unwrap_or(0),
        }
    }

    /// Whether the process `a` names still runs (not exited, pid not
    /// recycled). A process that vanished is simply gone: no error.
    fn still_runs(&self, a: &Attachment) -> bool {
        match self.proc.start_time(a.pid) {
            Ok(Some(t)) => t == a.start_time || a.start_time == 0,
            Ok(None) => false,
            // Unreadable but present: keep it rather than guess.
            Err(_) => true,
        }
    }
}
