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

use nix::sys::inotify::WatchDescriptor;

use crate::fence::Lease;
use crate::model::{Attachment, FenceKind, Generation, ReplicaState, SourceKey, Target};
use crate::store::{Placement, ReplicaFile};

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
    pub placement: Option<Placement>,
}

/// A real file behind an overlayfs source (its upper or lower layer's
/// copy), fenced beside it: a write to the layer's own file bypasses the
/// overlay's lease.
#[derive(Debug)]
pub struct Layer {
    pub path: PathBuf,
    /// `O_RDONLY`; its lease sits on it.
    pub fd: Arc<OwnedFd>,
    pub lease: Option<Lease>,
    pub watch: Option<WatchDescriptor>,
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
    /// The read lease, while held (`FenceKind::Lease` only).
    pub lease: Option<Lease>,
    /// The modify watch on it (writes no lease break announces).
    pub watch: Option<WatchDescriptor>,
    /// The layers' own files, for a source on overlayfs (else none).
    pub layers: Vec<Layer>,
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
    /// Whether the fence is held now: always, for fences that need no
    /// lease; while the lease is held, for the rest.
    pub fn fenced(&self) -> bool {
        self.fence != FenceKind::Lease || self.lease.is_some()
    }

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
    /// Modify watch -> the sources on that inode (several can share one).
    by_watch: HashMap<WatchDescriptor, BTreeSet<SourceKey>>,
}

impl ReplicaList {
    /// Add a source (replacing nothing: the caller checked it is new).
    pub fn insert(&mut self, source: Source) {
        self.by_fd.insert(source.fd.as_raw_fd(), source.key);
        if let Some(wd) = source.watch {
            self.by_watch.entry(wd).or_default().insert(source.key);
        }
        self.index_layers(source.key, &source.layers);
        self.sources.insert(source.key, source);
    }

    fn index_layers(&mut self, key: SourceKey, layers: &[Layer]) {
        for l in layers {
            self.by_fd.insert(l.fd.as_raw_fd(), key);
            if let Some(wd) = l.watch {
                self.by_watch.entry(wd).or_default().insert(key);
            }
        }
    }

    fn unindex_layers(&mut self, key: SourceKey, layers: &[Layer]) {
        for l in layers {
            self.by_fd.remove(&l.fd.as_raw_fd());
            if let Some(wd) = l.watch {
                self.unwatch_index(wd, key);
            }
        }
    }

    fn unwatch_index(&mut self, wd: WatchDescriptor, key: SourceKey) {
        if let Some(keys) = self.by_watch.get_mut(&wd) {
            keys.remove(&key);
            if keys.is_empty() {
                self.by_watch.remove(&wd);
            }
        }
    }

    /// Replace the layers fenced beside `key`; returns the old ones.
    pub fn set_layers(&mut self, key: SourceKey, layers: Vec<Layer>) -> Vec<Layer> {
        let Some(old) = self
            .sources
            .get_mut(&key)
            .map(|s| std::mem::take(&mut s.layers))
        else {
            return layers;
        };
        self.unindex_layers(key, &old);
        self.index_layers(key, &layers);
        if let Some(s) = self.sources.get_mut(&key) {
            s.layers = layers;
        }
        old
    }

    /// Remove a source; its fd closes when the last copier drops it.
    pub fn remove(&mut self, key: SourceKey) -> Option<Source> {
        let source = self.sources.remove(&key)?;
        self.by_fd.remove(&source.fd.as_raw_fd());
        if let Some(wd) = source.watch {
            self.unwatch_index(wd, key);
        }
        self.unindex_layers(key, &source.layers);
        Some(source)
    }

    pub fn get(&self, key: SourceKey) -> Option<&Source> {
        self.sources.get(&key)
    }

    pub fn get_mut(&mut self, key: SourceKey) -> Option<&mut Source> {
        self.sources.get_mut(&key)
    }

    /// The sources a modify watch is on.
    pub fn by_watch(&self, wd: WatchDescriptor) -> Vec<SourceKey> {
        self.by_watch
            .get(&wd)
            .map(|k| k.iter().copied().collect())
            .unwrap_or_default()
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
