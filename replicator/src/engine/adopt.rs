//! Adoption: a daemon started on the run directory of one that died takes
//! over what that daemon's fence keeper kept fencing, copying nothing.
//!
//! ```text
//!  keeper ── Handed {source, lease fds, memfd replica fds,
//!                    tmpfs replica paths} ──▶ adopt_one
//!    1. each replica: identity, generation and node from its xattrs
//!       (a tmpfs one opened by its path, which must still name its
//!       inode), still in the store and whole (else truncated)
//!    2. the list locked: watch, take every lease over (F_SETLEASE again:
//!       breaks now reach this daemon; EAGAIN: a writer waits)
//!    3. the source's fstat still matches the replicas' generation
//!    4. listed Valid, held by the keeper again, published
//!  any step fails: every replica truncated, then every lease released
//! ```

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::{lock, Inner};
use crate::fence::keeper::Handed;
use crate::fence::Lease;
use crate::list::{Layer, Replica, Source};
use crate::model::{FenceKind, Generation, ReplicaState, Target};
use crate::store::{ReplicaFile, ReplicaIdent};
use crate::sys;

/// What one adoption did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Adopted {
    pub sources: usize,
    pub replicas: usize,
    pub bytes: u64,
    /// Sources revoked instead (a writer waited, the file changed, ...).
    pub revoked: usize,
}

impl Inner {
    /// Take over everything the keeper handed; what cannot be served is
    /// revoked.
    pub(super) fn adopt(&self, handed: Vec<Handed>) -> Adopted {
        let mut done = Adopted::default();
        for h in handed {
            let key = h.key;
            if let Some(k) = &self.keeper {
                k.nudge();
            }
            match self.adopt_one(h) {
                Ok((replicas, bytes)) => {
                    done.sources += 1;
                    done.replicas += replicas;
                    done.bytes += bytes;
                }
                Err(why) => {
                    done.revoked += 1;
                    // Neither the keeper nor systemd's store keeps it.
                    self.unkeep(key);
                    crate::warn_limited!(
                        "source {}:{} held by the fence keeper: {why}; its replicas revoked, \
                         its lease released",
                        key.dev,
                        key.ino
                    );
                }
            }
        }
        self.metrics.adopted_replicas.inc_by(done.replicas as u64);
        if done.replicas > 0 {
            self.find_attached();
        }
        let list = lock(&self.list);
        self.publish(&list);
        drop(list);
        if done.sources + done.revoked > 0 {
            tracing::info!(
                sources = done.sources,
                replicas = done.replicas,
                bytes = done.bytes,
                revoked = done.revoked,
                "took over the fence keeper of the daemon before: its replicas served again, \
                 nothing copied"
            );
        }
        done
    }

    /// Adopt one source: `Ok((replicas, bytes))`, or why not (then it was
    /// revoked: replicas truncated first, leases released after).
    fn adopt_one(&self, h: Handed) -> Result<(usize, u64), String> {
        let Handed {
            key,
            leases,
            replicas,
            paths,
            ..
        } = h;
        let release = |leases: &[Arc<OwnedFd>]| {
            for l in leases {
                let _ = sys::release_lease(l.as_fd());
            }
        };
        let leases: Vec<Arc<OwnedFd>> = leases.into_iter().map(Arc::new).collect();
        let Some(source) = leases.first().cloned() else {
            return Err("no lease fd".into());
        };
        // 1. The replicas, each checked on its own.
        let mut files: Vec<(ReplicaFile, ReplicaIdent)> = Vec::new();
        let mut adopted = Vec::with_capacity(replicas.len() + paths.len());
        for fd in replicas {
            adopted.push(self.store.adopt(fd).map_err(|(fd, why)| {
                crate::warn_limited!("a replica of {}:{}: {why}: revoked", key.dev, key.ino);
                let _ = sys::truncate_to_zero(fd.as_fd());
            }));
        }
        for at in paths {
            adopted.push(self.store.adopt_path(at).map_err(|(at, why)| {
                crate::warn_limited!("a replica of {}:{}: {why}: revoked", key.dev, key.ino);
                if let Err(e) = at.revoke() {
                    crate::warn_limited!("{e}");
                }
            }));
        }
        for result in adopted {
            match result {
                Ok((file, ident)) if (ident.dev, ident.ino) == (key.dev, key.ino) => {
                    files.push((file, ident));
                }
                Ok((file, ident)) => {
                    crate::warn_limited!(
                        "replica {} says it copies {}:{}, not {}:{}: revoked",
                        file.label(),
                        ident.dev,
                        ident.ino,
                        key.dev,
                        key.ino
                    );
                    self.ops.truncate(file);
                }
                Err(()) => {}
            }
        }
        // Replicas first, then every lease (ours through `Lease`, the rest
        // raw: any duplicate of the open file description may release).
        let revoke_all = |files: Vec<(ReplicaFile, ReplicaIdent)>, taken: Vec<Lease>, why| {
            for (f, _) in files {
                self.ops.truncate(f);
            }
            let n = taken.len();
            for l in taken {
                let _ = l.release();
            }
            release(leases.get(n..).unwrap_or_default());
            Err(why)
        };
        let Some(first) = files.first().map(|(_, i)| i.clone()) else {
            release(&leases);
            return Err("no replica left to serve".into());
        };
        if files.iter().any(|(_, i)| {
            (i.generation, i.size, i.mtime_ns, i.ctime_ns)
                != (first.generation, first.size, first.mtime_ns, first.ctime_ns)
        }) {
            return revoke_all(
                files,
                Vec::new(),
                "its replicas disagree on the generation".into(),
            );
        }
        let mut list = lock(&self.list);
        if list.get(key).is_some() {
            drop(list);
            return revoke_all(files, Vec::new(), "it is listed already".into());
        }
        // 2. Watch first (a change between it and the check below is seen),
        //    then take every lease over.
        let mut watches = Vec::new();
        if let Some(w) = &self.watch {
            for l in &leases {
                match w.add(l.as_fd()) {
                    Ok(wd) => watches.push(Some(wd)),
                    Err(e) => {
                        drop(list);
                        self.unwatch_all(&watches);
                        return revoke_all(files, Vec::new(), format!("cannot watch it: {e}"));
                    }
                }
            }
        } else {
            watches.resize(leases.len(), None);
        }
        let mut taken = Vec::with_capacity(leases.len());
        for l in &leases {
            match Lease::take(l.clone(), self.ops.clone()) {
                Ok(lease) => taken.push(lease),
                Err(e) => {
                    drop(list);
                    self.unwatch_all(&watches);
                    let why = if e.raw_os_error() == Some(libc::EAGAIN) {
                        "a writer is waiting for it".to_string()
                    } else {
                        format!("cannot take its lease over: {e}")
                    };
                    return revoke_all(files, taken, why);
                }
            }
        }
        // 3. The file is still the generation the replicas copy.
        let same = self.ops.stat(source.as_fd()).is_ok_and(|st| {
            (st.dev, st.ino, st.size, st.mtime_ns, st.ctime_ns)
                == (key.dev, key.ino, first.size, first.mtime_ns, first.ctime_ns)
        }) && files.iter().all(|(f, _)| {
            // Still whole: a keeper that gave up meanwhile cut it.
            f.size().is_ok_and(|size| size == first.size)
        });
        if !same || taken.iter().any(Lease::break_pending) {
            drop(list);
            self.unwatch_all(&watches);
            return revoke_all(files, taken, "it changed while no daemon ran".into());
        }
        // 4. Listed, kept, counted.
        let generation = Generation {
            seq: first.generation,
            size: first.size,
            mtime_ns: first.mtime_ns,
            ctime_ns: first.ctime_ns,
        };
        let mut taken = taken.into_iter();
        let mut watches = watches.into_iter();
        let lease = taken.next();
        let watch = watches.next().flatten();
        let layers: Vec<Layer> = leases
            .iter()
            .skip(1)
            .zip(taken.zip(watches))
            .map(|(fd, (lease, watch))| Layer {
                path: std::fs::read_link(self.proc.self_fd_path(fd.as_raw_fd()))
                    .unwrap_or_else(|_| PathBuf::from("?")),
                fd: fd.clone(),
                lease: Some(lease),
                watch,
            })
            .collect();
        let mut targets = BTreeSet::new();
        let mut reps = Vec::with_capacity(files.len());
        let mut bytes = 0;
        for (file, _) in files {
            let target = Target::Node(file.node());
            let placement = file.placement().ok();
            let t = target.to_string();
            self.metrics.add_target(&t);
            self.metrics.replicas.with_label_values(&[t.as_str()]).inc();
            self.metrics
                .replica_bytes
                .with_label_values(&[t.as_str()])
                .add(generation.size as i64);
            bytes += generation.size;
            targets.insert(target);
            reps.push(Replica {
                target,
                generation,
                state: ReplicaState::Valid,
                file: Some(file),
                attachments: BTreeSet::new(),
                placement,
            });
        }
        let n = reps.len();
        crate::info_limited!(
            "{}: generation {} taken over from the fence keeper on {n} targets",
            first.path.display(),
            generation.seq
        );
        list.insert(Source {
            key,
            path: first.path,
            fd: source,
            fence: FenceKind::Lease,
            lease,
            watch,
            layers,
            generation,
            targets,
            replicas: reps,
            copies: 0,
            abort: Arc::new(AtomicBool::new(false)),
            broken_at: None,
            retries: 0,
        });
        if let Some(src) = list.get(key) {
            self.keep(src);
        }
        Ok((n, bytes))
    }

    /// The processes that still map an adopted replica (they attached under
    /// the daemon before): one read of every process's maps, at start only.
    fn find_attached(&self) {
        use std::collections::HashMap;
        let files: HashMap<(u64, u64), (crate::model::SourceKey, Target)> = {
            let list = lock(&self.list);
            list.iter()
                .flat_map(|s| {
                    s.replicas
                        .iter()
                        .filter_map(move |r| Some((r.file.as_ref()?.dev_ino(), (s.key, r.target))))
                })
                .collect()
        };
        let mut found = Vec::new();
        for pid in self.proc.pids().unwrap_or_default() {
            let Ok(Some(maps)) = self.proc.maps(pid) else {
                continue;
            };
            let mut mine: Vec<_> = maps
                .iter()
                .filter_map(|m| files.get(&(m.dev, m.ino)).copied())
                .collect();
            mine.sort();
            mine.dedup();
            if !mine.is_empty() {
                found.push((self.attachment(pid), mine));
            }
        }
        let mut list = lock(&self.list);
        let mut n = 0;
        for (a, replicas) in found {
            for (key, target) in replicas {
                if let Some(r) = list
                    .get_mut(key)
                    .and_then(|s| s.replicas.iter_mut().find(|r| r.target == target))
                {
                    n += usize::from(r.attachments.insert(a));
                }
            }
        }
        if n > 0 {
            tracing::info!(attachments = n, "processes still on adopted replicas found");
        }
    }

    fn unwatch_all(&self, watches: &[Option<nix::sys::inotify::WatchDescriptor>]) {
        if let Some(w) = &self.watch {
            for wd in watches.iter().flatten() {
                w.remove(*wd);
            }
        }
    }
}
