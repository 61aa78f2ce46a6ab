//! The engine's side of the fence keeper ([`crate::fence::keeper`]): what
//! it is told to hold, the link thread that pings it, and what happens
//! when it is lost.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Instant;

use super::{lock, Inner, Job, Reason};
use crate::fence::keeper::PING;
use crate::list::Source;
use crate::model::ReplicaState;
use crate::store::ReplicaPath;

impl Inner {
    /// Tell the keeper to hold `src`'s lease and valid replicas (the list
    /// locked: before any client can be handed one). A failure is the link
    /// thread's to notice.
    pub(super) fn keep(&self, src: &Source) {
        if src.lease.is_none() || (self.keeper.is_none() && self.fd_store.is_none()) {
            return;
        }
        // memfds by fd; tmpfs replicas (no fd once populated) by path.
        let valid: Vec<&crate::store::ReplicaFile> = src
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Valid)
            .filter_map(|r| r.file.as_ref())
            .collect();
        if valid.is_empty() {
            return;
        }
        let paths: Vec<ReplicaPath> = valid.iter().filter_map(|f| f.replica_path()).collect();
        let replicas: Vec<BorrowedFd<'_>> = valid
            .iter()
            .filter(|f| f.replica_path().is_none())
            .filter_map(|f| f.fd())
            .collect();
        let leases: Vec<BorrowedFd<'_>> = std::iter::once(src.fd.as_fd())
            .chain(
                src.layers
                    .iter()
                    .filter(|l| l.lease.is_some())
                    .map(|l| l.fd.as_fd()),
            )
            .collect();
        if let Some(k) = &self.keeper {
            let g = src.generation;
            if let Err(e) = k.hold(
                src.key,
                (g.size, g.mtime_ns, g.ctime_ns),
                &leases,
                &replicas,
                &paths,
            ) {
                crate::warn_limited!(
                    "{}: the fence keeper did not take it: {e}",
                    src.path.display()
                );
            }
        }
        if let Some(store) = &self.fd_store {
            if let Err(e) = store.store(src.key, &leases, &replicas) {
                crate::warn_limited!(
                    "{}: systemd's fd store did not take it: {e} (is FileDescriptorStoreMax= \
                     set in the unit?)",
                    src.path.display()
                );
            }
        }
    }

    /// Tell the keeper `key` is revoked.
    pub(super) fn unkeep(&self, key: crate::model::SourceKey) {
        if let Some(k) = &self.keeper {
            let _ = k.release(key);
        }
        if let Some(store) = &self.fd_store {
            store.remove(key);
        }
    }

    /// The keeper died or stopped answering: it may have revoked and
    /// released what it held. Revoke everything ourselves, start a new one;
    /// every source is fenced and copied again as after a write.
    fn keeper_lost(&self, why: &std::io::Error) {
        let Some(k) = &self.keeper else {
            return;
        };
        crate::error_limited!(
            "the fence keeper is lost ({why}): revoking every replica, starting a new keeper"
        );
        let mut list = lock(&self.list);
        let keys: Vec<_> = list
            .iter()
            .filter(|s| s.lease.is_some())
            .map(|s| s.key)
            .collect();
        for key in &keys {
            list = self.revoke(list, *key, Reason::KeeperLost, None).0;
            if let Some(src) = list.get_mut(*key) {
                src.broken_at = Some(Instant::now());
            }
        }
        drop(list);
        if let Err(e) = k.respawn() {
            crate::error_limited!("cannot start a new fence keeper: {e}; retrying");
        }
        for key in keys {
            self.jobs(Job::Refence(Instant::now() + self.cfg.settle, key));
        }
    }
}

/// Ping the keeper while the engine runs; a lost keeper is replaced.
pub(super) fn link_thread(inner: Weak<Inner>) {
    loop {
        std::thread::sleep(PING);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let Some(k) = &inner.keeper else {
            return;
        };
        if let Err(e) = k.ping(crate::fence::keeper::deadline(&inner.proc)) {
            inner.keeper_lost(&e);
        }
    }
}
