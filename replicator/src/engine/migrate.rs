//! Migrate: move the page cache of a file to one node (issue 11, "the page
//! cache is stuck on the wrong node"), with no extra memory: the pages the
//! file has cached move, nothing is copied and nothing is read in.
//!
//! ```text
//!  open O_RDONLY ── node in the topology? ── not a file of our own store?
//!     └─ residency::pass(to = node): mincore, populate resident runs,
//!        move_pages(MPOL_MF_MOVE_ALL) in batches ── a second pass: after
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::Replicator;
use crate::model::SourceKey;
use crate::residency;
use crate::{Error, Result};

/// What a migrate did to one file's page cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub path: PathBuf,
    /// The node the pages were moved to.
    pub node: u32,
    /// The file's size in pages.
    pub pages: u64,
    /// Resident pages per node before.
    pub resident_before: BTreeMap<u32, u64>,
    /// Pages moved to `node`.
    pub moved: u64,
    /// Pages that were on `node` already (`move_pages` reports them with
    /// `node` as their status, as it does a moved page; they are told apart
    /// by a query first).
    pub already: u64,
    /// Pages that could not be moved (a negative status such as `-EBUSY`,
    /// or `-ENOMEM` when `node` has no room).
    pub failed: u64,
    /// Resident pages per node after.
    pub resident_after: BTreeMap<u32, u64>,
}

impl Replicator {
    /// Move the resident page cache of `path` to `node`. Pages not cached
    /// stay uncached. A file of replicad's own store is refused: the store
    /// places those.
    pub fn migrate(&self, path: &Path, node: u32) -> Result<Migrated> {
        self.check_running()?;
        self.inner.topology.node(node)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        self.migrate_file(&file, path, node)
    }

    /// [`Replicator::migrate`] of `path` only while it still is `key` (see
    /// [`Replicator::replicate_expected`]).
    pub fn migrate_expected(&self, path: &Path, key: SourceKey, node: u32) -> Result<Migrated> {
        self.check_running()?;
        self.inner.topology.node(node)?;
        let file = super::populate::open_expected(path, key)?;
        self.migrate_file(&file, path, node)
    }

    /// [`Replicator::migrate`] of a file already open read-only.
    pub(super) fn migrate_file(&self, file: &File, path: &Path, node: u32) -> Result<Migrated> {
        self.inner.topology.node(node)?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.file_type().is_file() {
            return Err(super::populate::not_regular(meta.file_type(), path));
        }
        self.refuse_store_file(path)?;
        let io = |(step, source): (&'static str, std::io::Error)| Error::Migrate {
            path: path.to_path_buf(),
            step,
            source,
        };
        let done = residency::pass(file, Some(node)).map_err(io)?;
        let after = residency::pass(file, None).map_err(io)?;
        self.inner.metrics.migrated_pages.inc_by(done.moved);
        if done.failed > 0 {
            tracing::debug!(
                path = %path.display(),
                node,
                failed = done.failed,
                "some pages could not be migrated"
            );
        }
        Ok(Migrated {
            path: path.to_path_buf(),
            node,
            pages: done.before.pages,
            resident_before: done.before.per_node,
            moved: done.moved,
            already: done.already,
            failed: done.failed,
            resident_after: after.before.per_node,
        })
    }

    /// A replica of the store is placed by the store: not ours to move.
    fn refuse_store_file(&self, path: &Path) -> Result<()> {
        let dir = &self.inner.cfg.store.run_dir;
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let (file, store) = (canon(path), canon(dir));
        if file.starts_with(&store) || path.starts_with(dir) {
            return Err(Error::StoreFile {
                path: path.to_path_buf(),
                dir: dir.clone(),
            });
        }
        Ok(())
    }
}
