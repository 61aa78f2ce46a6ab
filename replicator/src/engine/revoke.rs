//! Revoke and refence: the write fence's state machine.
//!
//! ```text
//!  break (or evict, unlink, shutdown)
//!    1. every replica Revoking, abort flag set: no new attach, copiers stop
//!    2. wait for in-flight copies (one chunk each)
//!    3. truncate every replica: the kernel unmaps it from every process
//!       (the published set's revoke count is up from here to the end of 4:
//!       programs that fault meanwhile wait before they remap)
//!    4. release the lease: only now may the writer go on
//!    5. publish (after the writer was let go: not on its path)
//!  refence, after `settle` quiet: take the lease again (back off while a
//!  writer still holds the file), read the new generation, populate it
//! ```

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::carry::Truncating;
use super::{lock, relock, Inner, Job, Reason, Replicator};
use crate::fence::{FenceEvent, Lease};
use crate::list::ReplicaList;
use crate::model::{FenceKind, Publisher, ReplicaState, SourceKey};
use crate::{Error, Result};
use nix::sys::inotify::WatchDescriptor;
use replicad_procfs::slots;

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
        if matches!(reason, Reason::Write | Reason::Modified) {
            let mut breaks = relock(&self.write_breaks);
            if breaks.len() >= super::WRITE_BREAKS_MAX {
                breaks.remove(0);
            }
            breaks.push(key);
        }
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
        // Programs that fault meanwhile hold their fallback's remap until
        // the gate opens (it would contend with the unmap).
        let gate = src
            .replicas
            .iter()
            .any(|r| r.file.is_some())
            .then(|| RevokeGate::close(&self.publisher));
        // 3a. The truncate drops, with the replica's pages, every page a
        // program wrote privately over them (a debugger's breakpoint): copy
        // those to each program's way back first (`carry.rs`).
        let truncating: Vec<Truncating> = src
            .replicas
            .iter()
            .filter(|r| !r.attachments.is_empty())
            .filter_map(|r| {
                let (dev, ino) = r.file.as_ref()?.dev_ino();
                Some(Truncating {
                    dev: slots::dev_word(dev),
                    ino,
                    size: r.generation.size,
                    attached: r.attachments.iter().copied().collect(),
                })
            })
            .collect();
        if !truncating.is_empty() {
            // Without the list lock: the copier may take up to its
            // deadline, and nobody needs this source meanwhile (its
            // replicas are Revoking: no attach, no copy). A revoke of it
            // from another thread meanwhile leaves nothing to truncate.
            drop(list);
            self.carry_private(key, &truncating);
            list = lock(&self.list);
        }
        let Some(src) = list.get_mut(key) else {
            return (list, 0);
        };
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
        // The gate stays up until that writer is seen opening the file
        // (it runs again): programs falling back would otherwise take the
        // CPUs it needs to get going.
        let gate_wd = match (&gate, writer, src.watch, &self.watch) {
            (Some(_), Some(_), Some(wd), Some(w)) => {
                w.watch_opens(src.fd.as_fd(), true).is_ok().then_some(wd)
            }
            _ => None,
        };
        let mut writer_let_go = false;
        if let Some(lease) = src.lease.take() {
            match self.release(lease) {
                Released::Yes => {
                    writer_let_go = true;
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
        match (gate, gate_wd) {
            (Some(gate), Some(wd)) if writer_let_go => {
                gate.hold();
                relock(&self.held_gates).push(HeldGate {
                    wd,
                    until: Instant::now() + GATE_HOLD,
                });
            }
            (gate, wd) => {
                if let (Some(_), Some(w)) = (wd, &self.watch) {
                    let _ = w.watch_opens(src.fd.as_fd(), false);
                }
                drop(gate);
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
        // Any change or open of a source may be a writer let go running
        // again; a held gate also ends when its time is up.
        self.open_gates(match ev {
            FenceEvent::Opened { wd } | FenceEvent::Modified { wd, .. } => Touched::Source(wd),
            FenceEvent::ModifiedUnknown { .. } => Touched::Any,
            _ => Touched::Nothing,
        });
        let known = |fd| lock(&self.list).by_fence_fd(fd).is_some();
        let (fds, at) = match ev {
            FenceEvent::Opened { .. } | FenceEvent::Tick => return,
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

    /// Lower the held gates whose writer was seen (an open or change of
    /// its source), or whose time is up, and stop watching those sources'
    /// opens.
    fn open_gates(&self, touched: Touched) {
        let now = Instant::now();
        let done: Vec<HeldGate> = {
            let mut held = relock(&self.held_gates);
            if held.is_empty() {
                return;
            }
            let (done, kept) = std::mem::take(&mut *held).into_iter().partition(|g| {
                g.until <= now
                    || match touched {
                        Touched::Source(wd) => g.wd == wd,
                        Touched::Any => true,
                        Touched::Nothing => false,
                    }
            });
            *held = kept;
            done
        };
        if done.is_empty() {
            return;
        }
        if let Some(w) = &self.watch {
            let list = lock(&self.list);
            for g in &done {
                for key in list.by_watch(g.wd) {
                    if let Some(src) = list.get(key) {
                        let _ = w.watch_opens(src.fd.as_fd(), false);
                    }
                }
            }
        }
        let mut publisher = relock(&self.publisher);
        for g in done {
            if g.until <= now {
                tracing::debug!("a revoke gate ended without seeing its writer open the file");
            }
            if let Some(p) = publisher.as_mut() {
                p.revoke_ended();
            }
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

/// Longest a gate is held for a writer that was let go and never seen
/// opening the file (its open failed after the break, or the inotify
/// queue lost the event); a fallback waits 4 ms at most anyway.
pub(super) const GATE_HOLD: Duration = Duration::from_millis(5);

/// A revoke in progress, as the published set tells programs' fallbacks
/// (`replicad_wire::published`): raised before the first truncate; lowered
/// (and its waiters woken) when dropped, or, when a writer was let go,
/// held ([`RevokeGate::hold`]) until that writer is seen opening the file.
///
/// Why: on a machine whose CPUs are all busy, the writer woken by the
/// release waits for a CPU, and dozens of programs that fall back at once
/// (each moving the original over its range and faulting it in) are what
/// it waits behind: measured with 64 readers on 2 CPUs, release to the
/// writer running was 1.0 ms at the median and 7 ms at p99. Held, those
/// programs sleep until the writer's open raised `IN_OPEN`.
struct RevokeGate<'a>(&'a Mutex<Option<Box<dyn Publisher>>>);

impl<'a> RevokeGate<'a> {
    fn close(publisher: &'a Mutex<Option<Box<dyn Publisher>>>) -> Self {
        if let Some(p) = relock(publisher).as_mut() {
            p.revoke_began();
        }
        RevokeGate(publisher)
    }

    /// Keep the gate up past this value: a [`HeldGate`] lowers it.
    fn hold(self) {
        std::mem::forget(self);
    }
}

/// A gate held for a writer that was let go.
pub(super) struct HeldGate {
    /// The source's modify watch, which takes its opens meanwhile.
    wd: WatchDescriptor,
    /// Lowered then even if the writer was not seen.
    until: Instant,
}

/// What a fence event says about the held gates' writers.
#[derive(Clone, Copy)]
enum Touched {
    Source(WatchDescriptor),
    /// The watch lost events: any writer may have run.
    Any,
    Nothing,
}

impl Drop for RevokeGate<'_> {
    fn drop(&mut self) {
        if let Some(p) = relock(self.0).as_mut() {
            p.revoke_ended();
        }
    }
}
