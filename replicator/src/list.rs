//! The replica list: every source, its fence, and every copy of it.
//!
//! ```text
//!  ReplicaList ── Source (dev, ino) ── fd (O_RDONLY; the lease sits on it)
//!                    ├─ fence: how writes are kept out, and whether it is held
//!                    ├─ generation: (seq, size, mtime, ctime) read under the fence
//!                    └─ Replica (target, generation, state) ── ReplicaFile
//!                          └─ attachments: pids that were handed the replica
//! ```
//!
//! Invalidation walks only this list: bounded work, never a scan of all
//! processes. The list is plain data behind the engine's mutex; it performs
//! no I/O of its own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use replicad_client::proto::ReplicaState;

use crate::store::ReplicaFile;

/// A source file's identity: `(st_dev, st_ino)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub dev: u64,
    pub ino: u64,
}

/// Where a replica lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Node-local memory of a NUMA node.
    Node(u32),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Node(n) => write!(f, "node{n}"),
        }
    }
}

/// One state of a source's bytes, read while its fence is held. `seq`
/// counts generations of this source in this daemon; the rest is what
/// `fstat` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    pub seq: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// How writes to a source are kept out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceKind {
    /// A read lease on the source fd; writers wait for its release.
    Lease,
    /// The mount is read-only: nobody can write.
    ReadOnlyMount,
    /// `chattr +i`.
    Immutable,
    /// fs-verity: contents are fixed.
    Verity,
}

impl FenceKind {
    /// Name for the status table.
    pub fn name(self) -> &'static str {
        match self {
            FenceKind::Lease => "lease",
            FenceKind::ReadOnlyMount => "read-only mount",
            FenceKind::Immutable => "immutable",
            FenceKind::Verity => "verity",
        }
    }
}

/// A process that was handed a replica: pid and its start time (so a
/// recycled pid is not mistaken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    pub pid: u32,
    pub start_time: u64,
}

/// One copy of one generation of a source on one target.
#[derive(Debug)]
pub struct Replica {
    pub target: Target,
    pub generation: Generation,
    pub state: ReplicaState,
    /// The file; `None` while populating (the copier holds it).
    pub file: Option<ReplicaFile>,
    pub attachments: BTreeSet<Attachment>,
    /// Where its pages were after the copy (`move_pages`), once valid.
    pub placement: Option<crate::store::Placement>,
}

/// One source file and its replicas.
#[derive(Debug)]
pub struct Source {
    pub key: SourceKey,
    /// Path it was replicated by (it may have been renamed since).
    pub path: PathBuf,
    /// `O_RDONLY` fd of the source; the lease sits on it. Shared with
    /// copiers, which only run while `copies > 0` keeps the source listed.
    pub fd: Arc<OwnedFd>,
    pub fence: FenceKind,
    /// The fence is held now: always true for fences that need no lease.
    pub fenced: bool,
    /// The generation read under the current fence.
    pub generation: Generation,
    /// Targets wanted by policy or request.
    pub targets: BTreeSet<Target>,
    pub replicas: Vec<Replica>,
    /// Copies in flight from this source.
    pub copies: usize,
    /// Set when the fence breaks or the source is evicted: copiers stop.
    pub abort: Arc<AtomicBool>,
    /// When the last writer broke the fence.
    pub broken_at: Option<Instant>,
    /// Consecutive failed attempts to take the fence back.
    pub retries: u32,
}

impl Source {
    /// The replica on `target` at the current generation, in any state.
    pub fn current(&self, target: Target) -> Option<&Replica> {
        self.replicas
            .iter()
            .find(|r| r.target == target && r.generation.seq == self.generation.seq)
    }

    /// Targets that have no replica of the current generation yet.
    pub fn missing_targets(&self) -> Vec<Target> {
        self.targets
            .iter()
            .copied()
            .filter(|t| self.current(*t).is_none())
            .collect()
    }

    /// Pids attached to any replica of this source.
    pub fn attached(&self) -> usize {
        self.replicas.iter().map(|r| r.attachments.len()).sum()
    }
}

/// Every source and its replicas.
#[derive(Debug, Default)]
pub struct ReplicaList {
    sources: BTreeMap<SourceKey, Source>,
    /// Lease fd -> source, for the fence thread.
    by_fd: HashMap<RawFd, SourceKey>,
}

impl ReplicaList {
    /// Add a source (replacing nothing: the caller checked it is new).
    pub fn insert(&mut self, source: Source) {
        self.by_fd.insert(source.fd.as_raw_fd(), source.key);
        self.sources.insert(source.key, source);
    }

    /// Remove a source; its fd closes when the last copier drops it.
    pub fn remove(&mut self, key: SourceKey) -> Option<Source> {
        let source = self.sources.remove(&key)?;
        self.by_fd.remove(&source.fd.as_raw_fd());
        Some(source)
    }

    pub fn get(&self, key: SourceKey) -> Option<&Source> {
        self.sources.get(&key)
    }

    pub fn get_mut(&mut self, key: SourceKey) -> Option<&mut Source> {
        self.sources.get_mut(&key)
    }

    /// The source whose lease sits on `fd`.
    pub fn by_fence_fd(&self, fd: RawFd) -> Option<SourceKey> {
        self.by_fd.get(&fd).copied()
    }

    pub fn keys(&self) -> Vec<SourceKey> {
        self.sources.keys().copied().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Source> {
        self.sources.values()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Source> {
        self.sources.values_mut()
    }

    pub fn len(&self) -> usize {
        self.sources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}
