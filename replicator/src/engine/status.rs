//! The replica list as views, for `status` and for answers, and what of it
//! each caller may see.
//!
//! Root sees everything. Another user sees the sources it could read
//! itself (read permission on the file and search permission on every
//! directory above it, by mode bits, with its uid, gid and supplementary
//! groups), and of the processes only its own. An anonymous caller (the
//! HTTP endpoint: anyone who can connect to it) sees the sources anyone
//! could read, and no process. ACLs are not consulted: a file readable
//! only through an ACL entry is hidden from non-root callers.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{lock, relock, Inner, Replicator};
use crate::list::Source;
use crate::model::{ReplicaView, SourceKey, SourceView, StatusView};

/// Who asks for the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    /// uid 0: everything.
    Root,
    /// A user, with its gid and supplementary groups.
    User {
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
    },
    /// Nobody in particular: what anyone could read, no processes.
    Anonymous,
}

impl Viewer {
    fn may(&self, meta: &std::fs::Metadata, bits: u32) -> bool {
        let mode = meta.mode();
        let (owner, group, other) = ((mode >> 6) & 7, (mode >> 3) & 7, mode & 7);
        match self {
            Viewer::Root => true,
            Viewer::Anonymous => other & bits == bits,
            Viewer::User { uid, gid, groups } => {
                let granted = if meta.uid() == *uid {
                    owner
                } else if meta.gid() == *gid || groups.contains(&meta.gid()) {
                    group
                } else {
                    other
                };
                granted & bits == bits
            }
        }
    }

    /// Whether this viewer may read the file at `path` that is `key`: it
    /// is still that file, readable, and every directory above it lets the
    /// viewer through. `dirs` remembers directories already checked.
    fn may_read(&self, path: &Path, key: SourceKey, dirs: &mut HashMap<PathBuf, bool>) -> bool {
        if *self == Viewer::Root {
            return true;
        }
        let Ok(meta) = std::fs::metadata(path) else {
            return false;
        };
        if (meta.dev(), meta.ino()) != (key.dev, key.ino) || !self.may(&meta, 4) {
            return false;
        }
        path.ancestors().skip(1).all(|dir| {
            if dir.as_os_str().is_empty() {
                return true;
            }
            *dirs.entry(dir.to_path_buf()).or_insert_with(|| {
                std::fs::metadata(dir).is_ok_and(|m| m.is_dir() && self.may(&m, 1))
            })
        })
    }
}

impl Replicator {
    /// What `viewer` may see of the replica list (see the module doc).
    pub fn status_for(&self, viewer: &Viewer) -> StatusView {
        let mut view = self.status();
        if *viewer == Viewer::Root {
            return view;
        }
        let mut dirs = HashMap::new();
        view.sources
            .retain(|s| viewer.may_read(&s.path, s.key, &mut dirs));
        let own = |pid: &u32| match viewer {
            Viewer::User { uid, .. } => {
                self.inner.proc.proc_owner_uid(*pid).ok().flatten() == Some(*uid)
            }
            Viewer::Root => true,
            Viewer::Anonymous => false,
        };
        for s in &mut view.sources {
            for r in &mut s.replicas {
                r.attachments.retain(own);
            }
        }
        view.left_alone.retain(|l| own(&l.pid));
        view
    }

    /// The whole replica list, after pruning dead attachments.
    pub fn status(&self) -> StatusView {
        self.inner.prune();
        let list = lock(&self.inner.list);
        let sources = list.iter().map(|s| self.inner.source_view(s)).collect();
        drop(list);
        let left_alone = relock(&self.inner.left_alone)
            .iter()
            .map(|(_, l, _)| l.clone())
            .collect();
        StatusView {
            sources,
            left_alone,
        }
    }
}

impl Inner {
    pub(super) fn source_view(&self, src: &Source) -> SourceView {
        SourceView {
            path: src.path.clone(),
            key: src.key,
            generation: src.generation.seq,
            size: src.generation.size,
            fence: src.fence,
            fenced: src.fenced(),
            targets: src.targets.clone(),
            replicas: src
                .replicas
                .iter()
                .map(|r| ReplicaView {
                    target: r.target,
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
