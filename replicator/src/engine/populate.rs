//! Replicate: fence a source, copy its current generation onto every
//! wanted target that lacks it, check placement, seal, mark valid.
//!
//! ```text
//!  open O_RDONLY ── fence_kind ── Lease::take (lease kinds) ── generation (fstat)
//!        └─ populate: Populating replicas ── copy without the lock ── Valid
//!                      (aborted by a writer, unlinked, or failed: removed,
//!                       and a source with no replica left holds no lease)
//! ```

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};

use super::{lock, Inner, Reason, Replicator};
use crate::fence::{self, FenceFailure, Lease};
use crate::list::{Replica, ReplicaList, Source};
use crate::model::{
    FenceKind, Generation, NodeSelection, ReplicaState, SourceKey, SourceView, Target,
};
use crate::store::{Placement, ReplicaFile, ReplicaIdent};
use crate::{Error, Result};

impl Replicator {
    /// Replicate `path` onto `nodes`: fence it, copy it, check placement.
    /// Returns when every copy is valid, or with the first error (then no
    /// replica of the failed copy is left anywhere).
    pub fn replicate(&self, path: &Path, nodes: &NodeSelection) -> Result<SourceView> {
        self.check_running()?;
        let targets = self.targets(nodes)?;
        let (file, key) = open_source(path)?;
        self.inner.replicate_source(file, key, path, targets)
    }

    /// [`Replicator::replicate`] of `path` only while it still is `key`:
    /// the planner names files by what a scan saw, and one renamed over or
    /// replaced since is [`Error::Replaced`], opened but never fenced or
    /// copied.
    pub fn replicate_expected(
        &self,
        path: &Path,
        key: SourceKey,
        nodes: &NodeSelection,
    ) -> Result<SourceView> {
        self.check_running()?;
        let targets = self.targets(nodes)?;
        let file = open_expected(path, key)?;
        self.inner.replicate_source(file, key, path, targets)
    }

    /// Replicate the file behind `file`, which the caller already opened
    /// (through `map_files`, say), onto `nodes`, as [`Replicator::replicate`]
    /// does a path. `path` names the file in messages and in the status.
    /// An fd not open read-only is reopened read-only, since a lease needs
    /// one.
    pub fn replicate_file(
        &self,
        file: File,
        path: &Path,
        nodes: &NodeSelection,
    ) -> Result<SourceView> {
        self.check_running()?;
        let targets = self.targets(nodes)?;
        let (file, key) = self.inner.readonly_source(file, path)?;
        self.inner.replicate_source(file, key, path, targets)
    }
}

impl Inner {
    /// Fence the opened source `file` (identity `key`) and copy it onto
    /// `targets`.
    pub(super) fn replicate_source(
        &self,
        file: File,
        key: SourceKey,
        path: &Path,
        targets: BTreeSet<Target>,
    ) -> Result<SourceView> {
        let fence_kind =
            fence::fence_kind(file.as_fd(), path).inspect_err(|e| self.note_fence_failure(e))?;
        let layer_paths = if fence_kind == FenceKind::Lease {
            match self.layer_paths(file.as_fd(), path, key.dev) {
                Some(paths) => paths,
                None => {
                    let e = Error::Unfenceable {
                        path: path.to_path_buf(),
                        why: FenceFailure::OverlayLayers,
                    };
                    self.note_fence_failure(&e);
                    return Err(e);
                }
            }
        } else {
            Vec::new()
        };
        {
            let mut list = lock(&self.list);
            if let Some(src) = list.get_mut(key) {
                // Known source: the fence it holds stays; ours is dropped.
                src.targets.extend(targets.iter().copied());
                if !src.fenced() {
                    // A writer broke the fence: nothing can be replicated
                    // until it is done (then a new generation follows).
                    let busy = std::io::Error::from_raw_os_error(libc::EAGAIN);
                    return Err(self.lease_refused(list, path, key, busy));
                }
            } else {
                if let Some(limit) = self.cfg.max_sources.filter(|l| list.len() >= l.sources) {
                    return Err(Error::TooManySources {
                        path: path.to_path_buf(),
                        sources: list.len(),
                        nofile: limit.nofile,
                        per_source: limit.per_source,
                    });
                }
                let fd = Arc::new(OwnedFd::from(file));
                // The watch first: a change between it and the generation
                // read below is then seen.
                let watch = match (fence_kind, &self.watch) {
                    (FenceKind::Lease, Some(w)) => {
                        Some(w.add(fd.as_fd()).map_err(|e| Error::io(path, e))?)
                    }
                    _ => None,
                };
                let unwatch = |w: Option<nix::sys::inotify::WatchDescriptor>| {
                    if let (Some(wd), Some(mw)) = (w, &self.watch) {
                        mw.remove(wd);
                    }
                };
                let lease = if fence_kind == FenceKind::Lease {
                    match Lease::take(fd.clone(), self.ops.clone()) {
                        Ok(lease) => Some(lease),
                        // Named outside the lock: finding the writers
                        // reads all of /proc.
                        Err(e) => {
                            unwatch(watch);
                            return Err(self.lease_refused(list, path, key, e));
                        }
                    }
                } else {
                    None
                };
                let layers = match self.fence_layers(&layer_paths) {
                    Ok(layers) => layers,
                    Err((layer, e)) => {
                        unwatch(watch);
                        drop(lease);
                        return Err(self.layer_refused(list, &layer, e));
                    }
                };
                let generation = match self.read_generation(fd.as_fd(), path, 1) {
                    Ok(g) => g,
                    Err(e) => {
                        unwatch(watch);
                        self.unwatch(&layers);
                        return Err(e);
                    }
                };
                list.insert(Source {
                    key,
                    path: path.to_path_buf(),
                    fd,
                    fence: fence_kind,
                    lease,
                    watch,
                    layers,
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
        let result = self.populate(key);
        let list = lock(&self.list);
        let view = list.get(key).map(|s| self.source_view(s));
        drop(list);
        result?;
        let view = view.ok_or_else(|| Error::SourceChanged {
            path: path.to_path_buf(),
            what: "was dropped",
        })?;
        // Every target asked for is valid now, or nothing was replicated
        // for this caller (a writer came while another caller copied).
        let valid = |t: &Target| {
            view.replicas.iter().any(|r| {
                r.target == *t && r.generation == view.generation && r.state == ReplicaState::Valid
            })
        };
        if !targets.iter().all(valid) {
            return Err(Error::WriterArrived {
                path: path.to_path_buf(),
            });
        }
        Ok(view)
    }

    /// The error for a lease the kernel refused: `EAGAIN` means a writer
    /// holds the file, and the message names it.
    fn lease_refused(
        &self,
        list: MutexGuard<'_, ReplicaList>,
        path: &Path,
        key: SourceKey,
        e: std::io::Error,
    ) -> Error {
        drop(list);
        let why = if e.raw_os_error() == Some(libc::EAGAIN) {
            FenceFailure::OpenForWrite {
                writers: self.proc.writers_of(key.dev, key.ino),
            }
        } else {
            FenceFailure::LeaseRefused(e)
        };
        let e = Error::Unfenceable {
            path: path.to_path_buf(),
            why,
        };
        self.note_fence_failure(&e);
        e
    }

    pub(super) fn note_fence_failure(&self, e: &Error) {
        if let Error::Unfenceable { why, .. } = e {
            self.metrics
                .fence_failures
                .with_label_values(&[why.label()])
                .inc();
        }
    }

    /// An opened file as a source: it must be a regular file; one not open
    /// read-only (`O_WRONLY`, `O_RDWR`, `O_PATH`) is reopened read-only,
    /// and the original closed, so that our own fd does not refuse the
    /// lease.
    fn readonly_source(&self, file: File, path: &Path) -> Result<(File, SourceKey)> {
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let ft = meta.file_type();
        if !ft.is_file() {
            return Err(not_regular(ft, path));
        }
        let key = SourceKey {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        let flags = crate::sys::status_flags(file.as_fd()).map_err(|e| Error::io(path, e))?;
        if flags & libc::O_PATH == 0 && flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Ok((file, key));
        }
        let reopened =
            reopen_readonly(&self.proc, file.as_fd(), true).map_err(|e| Error::io(path, e))?;
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

    pub(super) fn read_generation(
        &self,
        fd: BorrowedFd<'_>,
        path: &Path,
        seq: u64,
    ) -> Result<Generation> {
        let st = self.ops.stat(fd).map_err(|e| Error::io(path, e))?;
        Ok(Generation {
            seq,
            size: st.size,
            mtime_ns: st.mtime_ns,
            ctime_ns: st.ctime_ns,
        })
    }

    /// Copy the current generation of `key` to every wanted target that
    /// lacks it. The fence must be held; copies run without the list lock.
    pub(super) fn populate(&self, key: SourceKey) -> Result<()> {
        let (fd, abort, ident, work) = {
            let mut list = lock(&self.list);
            loop {
                let Some(src) = list.get_mut(key) else {
                    return Ok(());
                };
                if !src.fenced() {
                    return Err(Error::WriterArrived {
                        path: src.path.clone(),
                    });
                }
                let work = src.missing_targets();
                if !work.is_empty() {
                    break self.start_copies(src, work);
                }
                // Another caller is copying a wanted target: wait for its
                // outcome (a failed copy leaves the target missing, and
                // this caller copies it itself).
                let in_flight = src.targets.iter().any(|t| {
                    src.current(*t)
                        .is_some_and(|r| r.state == ReplicaState::Populating)
                });
                if !in_flight {
                    return Ok(());
                }
                list = self
                    .copies_done
                    .wait(list)
                    .unwrap_or_else(|p| p.into_inner());
            }
        };

        // A panic while copying must not leave `copies` up: the next revoke
        // would wait for it for ever, and the writer with it.
        let copied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            work.iter()
                .map(|t| (*t, self.copy_one(*t, fd.as_fd(), &abort, &ident)))
                .collect::<Vec<_>>()
        }));
        let results: Vec<(Target, Result<(ReplicaFile, Placement)>)> = match copied {
            Ok(results) => results,
            Err(_) => {
                crate::warn_limited!(
                    "{}: the copy panicked; nothing replicated",
                    ident.path.display()
                );
                work.iter()
                    .map(|t| {
                        let e = Error::CopyPanicked {
                            path: ident.path.clone(),
                            target: *t,
                        };
                        (*t, Err(e))
                    })
                    .collect()
            }
        };
        // A source unlinked while we copied is dropped, not replicated.
        let unlinked = self.ops.stat(fd.as_fd()).is_ok_and(|st| st.nlink == 0);
        drop(fd);

        let mut list = lock(&self.list);
        let mut first_err = None;
        let seq = ident.generation;
        if let Some(src) = list.get_mut(key) {
            src.copies -= 1;
            let aborted = abort.load(Ordering::SeqCst) || !src.fenced();
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
                        crate::info_limited!(
                            "{}: generation {seq} valid on {target}",
                            src.path.display()
                        );
                    }
                    (Ok((file, _)), pos) => {
                        self.ops.truncate(file);
                        if let Some(i) = pos {
                            src.replicas.remove(i);
                        }
                        first_err.get_or_insert(if unlinked {
                            Error::SourceChanged {
                                path: src.path.clone(),
                                what: "was deleted",
                            }
                        } else {
                            Error::WriterArrived {
                                path: src.path.clone(),
                            }
                        });
                    }
                    (Err(e), pos) => {
                        if let Some(i) = pos {
                            src.replicas.remove(i);
                        }
                        // The copier stopped because a writer broke the
                        // fence (the source is still listed: not evicted).
                        let e = match e {
                            Error::SourceChanged { path, .. } if aborted && !unlinked => {
                                Error::WriterArrived { path }
                            }
                            e => e,
                        };
                        first_err.get_or_insert(e);
                    }
                }
            }
        } else {
            // Evicted meanwhile: the evictor waited for us; drop our copies.
            for (_, result) in results {
                if let Ok((file, _)) = result {
                    self.ops.truncate(file);
                }
            }
        }
        // The keeper holds every valid replica before any client is handed
        // one (the lock is still held).
        if let Some(src) = list.get(key) {
            self.keep(src);
        }
        self.copies_done.notify_all();
        self.publish(&list);
        // Only when this call tried every wanted target: a target another
        // caller added meanwhile is that caller's to copy.
        let nothing_left = list.get(key).is_some_and(|s| {
            s.replicas.is_empty()
                && s.copies == 0
                && s.attached() == 0
                && s.targets.iter().all(|t| work.contains(t))
        });
        if unlinked || (first_err.is_some() && nothing_left) {
            // Fence state matches the list: a source whose copy failed and
            // that has no replica left holds no lease.
            if list.get(key).is_some_and(|s| s.attached() == 0) {
                let reason = if unlinked {
                    Reason::Unlinked
                } else {
                    Reason::CopyFailed
                };
                let _ = self.drop_source(list, key, reason);
            }
        }
        match first_err {
            Some(e) => {
                self.metrics
                    .replication_failures
                    .with_label_values(&[e.replication_failure_label()])
                    .inc();
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Mark `work` populating on `src` (the list locked) and hand out what
    /// the copier needs: the source fd, the abort flag, the identity.
    fn start_copies(
        &self,
        src: &mut Source,
        work: Vec<Target>,
    ) -> (Arc<OwnedFd>, Arc<AtomicBool>, ReplicaIdent, Vec<Target>) {
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
            dev: src.key.dev,
            ino: src.key.ino,
            generation: src.generation.seq,
            size: src.generation.size,
            mtime_ns: src.generation.mtime_ns,
            ctime_ns: src.generation.ctime_ns,
        };
        (src.fd.clone(), src.abort.clone(), ident, work)
    }

    /// Create, fill, check and seal one replica file.
    fn copy_one(
        &self,
        target: Target,
        src: BorrowedFd<'_>,
        abort: &AtomicBool,
        ident: &ReplicaIdent,
    ) -> Result<(ReplicaFile, Placement)> {
        let Some(node) = target.node() else {
            return Err(Error::NoDeviceBackend { target });
        };
        let mut file = self.store.create(node, ident)?;
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
            let placement = self.placement_of(&file)?;
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
                self.ops.truncate(file);
                Err(e)
            }
        }
    }

    /// Where the replica's pages are (`move_pages`). Unit tests may make
    /// pages look misplaced, which this one-node machine never shows.
    fn placement_of(&self, file: &ReplicaFile) -> Result<Placement> {
        let placement = file.placement()?;
        #[cfg(test)]
        tests::during_copy();
        #[cfg(test)]
        if let Some(misplaced) = tests::misplace() {
            return Ok(Placement {
                misplaced: misplaced.min(placement.pages),
                ..placement
            });
        }
        Ok(placement)
    }
}

#[cfg(test)]
use super::tests;

/// A fresh read-only open file description of the file behind `fd`
/// (through `/proc/self/fd`: never the same description, so a client given
/// it cannot `F_SETLEASE F_UNLCK` ours). `nonblocking` for the daemon's
/// own lease fd; a client's way back gets the plain flags.
pub(super) fn reopen_readonly(
    proc: &replicad_procfs::ProcReader,
    fd: BorrowedFd<'_>,
    nonblocking: bool,
) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    let flags = libc::O_CLOEXEC | libc::O_NOCTTY | if nonblocking { libc::O_NONBLOCK } else { 0 };
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(proc.self_fd_path(fd.as_raw_fd()))
}

/// The error for a source that is not a regular file, naming what it is.
pub(super) fn not_regular(ft: std::fs::FileType, path: &Path) -> Error {
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
/// [`open_source`], refused unless the file opened is `key`.
pub(super) fn open_expected(path: &Path, key: SourceKey) -> Result<File> {
    let (file, found) = open_source(path)?;
    if found != key {
        return Err(Error::Replaced {
            path: path.to_path_buf(),
        });
    }
    Ok(file)
}

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
        return Err(not_regular(meta.file_type(), path));
    }
    Ok((
        file,
        SourceKey {
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}
