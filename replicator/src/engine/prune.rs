//! Pruning and the generation worker: forget attachments of processes
//! that exited (a vanished process is simply gone, never an error), drop
//! sources that were unlinked and have no attachment left, and take fences
//! back after writers leave.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Weak};
use std::time::Instant;

use super::{lock, relock, Inner, Job, Reason};
use crate::model::{Attachment, SourceKey};

impl Inner {
    /// Attach fork children of attached processes (`carry.rs`), forget
    /// attachments of processes that exited, and drop sources that were
    /// unlinked and have no attachment left.
    pub(super) fn prune(&self) {
        self.adopt_children();
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
            .filter(|a| !self.still_runs(a))
            .collect();
        let unlinked: Vec<SourceKey> = fds
            .into_iter()
            .filter(|(_, fd)| self.ops.stat(fd.as_fd()).is_ok_and(|st| st.nlink == 0))
            .map(|(key, _)| key)
            .collect();
        let left: Vec<Attachment> = relock(&self.left_alone)
            .iter()
            .map(|(a, _, _)| *a)
            .collect();
        let gone: BTreeSet<Attachment> = left.into_iter().filter(|a| !self.still_runs(a)).collect();
        relock(&self.left_alone).retain(|(a, _, _)| !gone.contains(a));
        let tables: Vec<Attachment> = relock(&self.tables).keys().copied().collect();
        let exited: BTreeSet<Attachment> =
            tables.into_iter().filter(|a| !self.still_runs(a)).collect();
        relock(&self.tables).retain(|a, _| !exited.contains(a));
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
}

/// The generation worker: takes fences back after writers leave, and
/// prunes periodically.
pub(super) fn generation_worker(inner: Weak<Inner>, rx: mpsc::Receiver<Job>) {
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
