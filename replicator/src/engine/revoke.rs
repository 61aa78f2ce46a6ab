//! Revoke and refence: the write fence's state machine.
//!
//! ```text
//!  break (or evict, unlink, shutdown)
//!    1. every replica Revoking, abort flag set: no new attach, copiers stop
//!    2. wait for in-flight copies (one chunk each)
//!    3. truncate every replica: the kernel unmaps it from every process
//!    4. release the lease: only now may the writer go on
//!    5. publish (after the writer was let go: not on its path)
//!  refence, after `settle` quiet: take the lease again (back off while a
//!  writer still holds the file), read the new generation, populate it
//! ```

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use super::{lock, Inner, Job, Reason, Replicator};
use crate::fence::{FenceEvent, Lease};
use crate::list::ReplicaList;
use crate::model::{FenceKind, ReplicaState, SourceKey};
use crate::{Error, Result};

impl Replicator {
    /// Drop every replica of `path` and its fence. Returns how many
    /// replicas were invalidated.
    pub fn evict(&self, path: &Path) -> Result<usize> {
        use std::os::unix::fs::MetadataExt;
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
}

impl Inner {
    /// Revoke every replica of `key` and release its fence, keeping the
    /// source listed (a writer broke in; a new generation follows).
    /// Returns the guard and how many replicas were invalidated.
    pub(super) fn revoke<'a>(
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
        while list.get(key).is_some_and(|src| src.copies > 0) {
            list = self
                .copies_done
                .wait(list)
                .unwrap_or_else(|p| p.into_inner());
        }
        let Some(src) = list.get_mut(key) else {
            return (list, 0);
        };
        // 3. Truncate: the kernel unmaps the pages from every process.
        let mut n = 0;
        for mut r in src.replicas.drain(..) {
            r.state = ReplicaState::Gone;
            if let Some(file) = r.file.take() {
                let t = r.target.to_string();
                self.metrics.replicas.with_label_values(&[t.as_str()]).dec();
                self.metrics
                    .replica_bytes
                    .with_label_values(&[t.as_str()])
                    .sub(r.generation.size as i64);
                self.ops.truncate(file);
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
        // A writer waits only on a break (a change seen without one let
        // nobody wait).
        let writer = signalled.filter(|_| reason == Reason::Write);
        if let Some(lease) = src.lease.take() {
            match self.release(lease) {
                Released::Yes => {
                    if let Some(at) = writer {
                        self.metrics
                            .writer_wait_seconds
                            .observe(at.elapsed().as_secs_f64());
                    }
                }
                Released::ByKeeper => {}
                Released::Forced => {
                    let limit = self.proc.lease_break_time();
                    if let Some(secs) = limit {
                        self.metrics.writer_wait_seconds.observe(secs as f64);
                    }
                    let limit = limit.map_or_else(|| "?".to_string(), |s| s.to_string());
                    crate::error_limited!(
                        "{}: the kernel broke the lease by force (lease-break-time, {limit} s, \
                         passed before replicad released it{}): the writer waited {limit} s and \
                         got in while {n} replicas were still mapped; revoked now",
                        src.path.display(),
                        signalled.map_or_else(String::new, |at| format!(
                            "; the break was seen {:?} ago",
                            at.elapsed()
                        ))
                    );
                }
                Released::Failed(e) => {
                    crate::warn_limited!("{}: releasing the lease: {e}", src.path.display())
                }
            }
        }
        for layer in &mut src.layers {
            let Some(lease) = layer.lease.take() else {
                continue;
            };
            match self.release(lease) {
                Released::Yes | Released::ByKeeper => {}
                Released::Forced => crate::error_limited!(
                    "{}: the kernel broke the lease on this layer of {} by force \
                     (lease-break-time passed before replicad released it): a writer of the \
                     layer got in while {n} replicas were still mapped; revoked now",
                    layer.path.display(),
                    src.path.display()
                ),
                Released::Failed(e) => {
                    crate::warn_limited!("{}: releasing the lease: {e}", layer.path.display())
                }
            }
        }
        self.unkeep(key);
        // 5. After the writer was let go: not on its path.
        self.publish(&list);
        (list, n)
    }

    /// Revoke and forget a source.
    pub(super) fn drop_source<'a>(
        &'a self,
        list: MutexGuard<'a, ReplicaList>,
        key: SourceKey,
        reason: Reason,
    ) -> (MutexGuard<'a, ReplicaList>, usize) {
        let (mut list, n) = self.revoke(list, key, reason, None);
        if let Some(src) = list.remove(key) {
            if let (Some(wd), Some(w)) = (src.watch, &self.watch) {
                w.remove(wd);
            }
            self.unwatch(&src.layers);
            crate::info_limited!(
                "{}: dropped ({}), {n} replicas invalidated",
                src.path.display(),
                reason.label()
            );
        }
        (list, n)
    }

    /// A lease break (or a signal-queue overflow, or a modification no
    /// break announced) from the fence thread.
    pub(super) fn on_fence_event(&self, ev: FenceEvent) {
        let known = |fd| lock(&self.list).by_fence_fd(fd).is_some();
        let (fds, at) = match ev {
            FenceEvent::Modified { wd, at } => return self.on_modified(Some(wd), at),
            FenceEvent::ModifiedUnknown { at } => return self.on_modified(None, at),
            FenceEvent::Break { fd, at } if known(fd) => (vec![fd], at),
            // A break naming no lease of ours (a late one for a source gone
            // from the list, or an fd number the kernel kept from the
            // process that leased it first): check every lease.
            FenceEvent::Break { at, .. } | FenceEvent::Overflow { at } => {
                // Unknown fd: every held lease with a break pending.
                let list = lock(&self.list);
                let fds = list
                    .iter()
                    .flat_map(|s| {
                        s.lease
                            .iter()
                            .chain(s.layers.iter().filter_map(|l| l.lease.as_ref()))
                    })
                    .filter(|l| l.break_pending())
                    .map(Lease::raw_fd)
                    .collect();
                (fds, at)
            }
        };
        for fd in fds {
            let list = lock(&self.list);
            let Some(key) = list.by_fence_fd(fd) else {
                continue;
            };
            if list.get(key).is_none_or(|s| s.lease.is_none()) {
                continue;
            }
            let (mut list, n) = self.revoke(list, key, Reason::Write, Some(at));
            let waited = at.elapsed();
            if let Some(src) = list.get_mut(key) {
                src.broken_at = Some(Instant::now());
                src.retries = 0;
                crate::info_limited!(
                    "{}: writer arrived; {n} replicas revoked, lease released after {:?}",
                    src.path.display(),
                    waited
                );
            }
            drop(list);
            self.jobs(Job::Refence(Instant::now() + self.cfg.settle, key));
        }
    }

    /// A watched inode changed (`None`: the watch's queue overflowed, so
    /// any may have). A source whose lease is still held let no writer in,
    /// so the change came without a break (`open(O_RDONLY | O_TRUNC)`):
    /// revoke at once. A change the current generation already holds (a
    /// late event of a writer that came through the fence) is left alone.
    fn on_modified(&self, wd: Option<nix::sys::inotify::WatchDescriptor>, at: Instant) {
        let keys = {
            let list = lock(&self.list);
            match wd {
                Some(wd) => list.by_watch(wd),
                None => list.keys(),
            }
        };
        for key in keys {
            let list = lock(&self.list);
            let Some(src) = list.get(key) else {
                continue;
            };
            if src.lease.is_none() {
                continue;
            }
            let g = src.generation;
            let same = self.ops.stat(src.fd.as_fd()).is_ok_and(|st| {
                (st.size, st.mtime_ns, st.ctime_ns) == (g.size, g.mtime_ns, g.ctime_ns)
                    // Unlinked (its ctime moved, IN_ATTRIB): its bytes can
                    // no longer change; prune and populate drop it.
                    || (st.nlink == 0 && (st.size, st.mtime_ns) == (g.size, g.mtime_ns))
            });
            if same {
                continue;
            }
            let (mut list, n) = self.revoke(list, key, Reason::Modified, Some(at));
            if let Some(src) = list.get_mut(key) {
                src.broken_at = Some(Instant::now());
                src.retries = 0;
                crate::warn_limited!(
                    "{}: changed without a lease break (open with O_RDONLY|O_TRUNC?); {n} \
                     replicas revoked {:?} after the change was seen",
                    src.path.display(),
                    at.elapsed()
                );
            }
            drop(list);
            self.jobs(Job::Refence(Instant::now() + self.cfg.settle, key));
        }
    }

    /// Try to take the fence of `key` back and copy a new generation.
    /// Returns when to try again, if needed.
    pub(super) fn refence(&self, key: SourceKey) -> Option<Duration> {
        // A copy-up may have made an upper file since: find the layers
        // again, outside the lock (mountinfo).
        let layer_paths = {
            let list = lock(&self.list);
            let src = list.get(key)?;
            if src.layers.is_empty() {
                None
            } else {
                Some((src.fd.clone(), src.path.clone()))
            }
        }
        .map(|(fd, path)| self.layer_paths(fd.as_fd(), &path, key.dev))
        .unwrap_or(Some(Vec::new()));
        let Some(layer_paths) = layer_paths else {
            // Its layers are no longer found: it cannot be fenced whole, so
            // no new generation is served until they are.
            if let Some(src) = lock(&self.list).get_mut(key) {
                src.retries += 1;
                crate::warn_limited!(
                    "{}: {}; retrying",
                    src.path.display(),
                    crate::fence::FenceFailure::OverlayLayers
                );
            }
            return Some(self.cfg.retry_max);
        };
        {
            let mut list = lock(&self.list);
            let src = list.get_mut(key)?;
            if src.fenced() || src.fence != FenceKind::Lease {
                return None;
            }
            // Quiet long enough since the last writer?
            if let Some(at) = src.broken_at {
                let quiet = at.elapsed();
                if quiet < self.cfg.settle {
                    return Some(self.cfg.settle - quiet);
                }
            }
            let lease = match Lease::take(src.fd.clone(), self.ops.clone()) {
                Ok(lease) => lease,
                Err(e) => {
                    src.retries += 1;
                    let backoff = self
                        .cfg
                        .settle
                        .saturating_mul(1 << src.retries.min(10))
                        .min(self.cfg.retry_max);
                    if e.raw_os_error() != Some(libc::EAGAIN) {
                        crate::warn_limited!(
                            "{}: cannot take the lease back: {e}; retrying",
                            src.path.display()
                        );
                    }
                    return Some(backoff);
                }
            };
            let layers = match self.fence_layers(&layer_paths) {
                Ok(layers) => layers,
                Err((layer, e)) => {
                    drop(lease);
                    src.retries += 1;
                    if e.raw_os_error() != Some(libc::EAGAIN) {
                        crate::warn_limited!(
                            "{}: cannot fence its layer {}: {e}; retrying",
                            src.path.display(),
                            layer.display()
                        );
                    }
                    return Some(
                        self.cfg
                            .settle
                            .saturating_mul(1 << src.retries.min(10))
                            .min(self.cfg.retry_max),
                    );
                }
            };
            let seq = src.generation.seq + 1;
            match self.read_generation(src.fd.as_fd(), &src.path, seq) {
                Ok(g) => src.generation = g,
                Err(e) => {
                    crate::warn_limited!("{e}");
                    // Released on drop: no lease without a generation.
                    drop(lease);
                    return Some(self.cfg.retry_max);
                }
            }
            src.lease = Some(lease);
            src.retries = 0;
            src.abort = Arc::new(AtomicBool::new(false));
            debug_assert_eq!(
                src.fd.as_raw_fd(),
                src.lease.as_ref().map_or(-1, Lease::raw_fd)
            );
            let old = list.set_layers(key, layers);
            drop(list);
            self.unwatch(&old);
        }
        if let Err(e) = self.populate(key) {
            crate::warn_limited!("new generation: {e}");
        }
        None
    }
}

/// How releasing a lease went.
enum Released {
    Yes,
    /// Gone already: a keeper that took the daemon for dead revoked and
    /// released it, then exited (no forced break).
    ByKeeper,
    /// Gone already, and no keeper released it: the kernel broke it by
    /// force (lease-break-time passed), and a writer got in while the
    /// replicas were mapped. Counted.
    Forced,
    Failed(std::io::Error),
}

impl Inner {
    /// Release `lease` and say how it went (a keeper still there, stopped
    /// or hung, released nothing: its lease gone means forced).
    fn release(&self, lease: Lease) -> Released {
        match lease.release() {
            Ok(()) => Released::Yes,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                if self.keeper.as_ref().is_some_and(|k| k.exited()) {
                    Released::ByKeeper
                } else {
                    self.metrics.forced_breaks.inc();
                    Released::Forced
                }
            }
            Err(e) => Released::Failed(e),
        }
    }
}
