//! Sources on overlayfs: their layers' own files are fenced beside them
//! (see [`crate::fence::overlay`]), taken with the source's lease and
//! released with it.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard};

use super::Inner;
use crate::fence::overlay::{layer_files, OVERLAYFS_MAGIC};
use crate::fence::{FenceFailure, Lease};
use crate::list::{Layer, ReplicaList};
use crate::{sys, Error};

impl Inner {
    /// The layer files behind a source, if it is on overlayfs (else none).
    /// `None`: on overlayfs, but its layers were not found, so it cannot
    /// be fenced whole. Reads mountinfo: call without the list lock.
    pub(super) fn layer_paths(
        &self,
        fd: BorrowedFd<'_>,
        path: &Path,
        dev: u64,
    ) -> Option<Vec<PathBuf>> {
        match sys::fs_info(fd) {
            Ok(fs) if fs.magic == OVERLAYFS_MAGIC => {
                let files = layer_files(&self.proc, path, dev);
                (!files.is_empty()).then_some(files)
            }
            _ => Some(Vec::new()),
        }
    }

    /// Open, lease and watch each layer file (quick: no /proc). On a
    /// refusal the leases taken so far are released (on drop).
    pub(super) fn fence_layers(
        &self,
        paths: &[PathBuf],
    ) -> Result<Vec<Layer>, (PathBuf, io::Error)> {
        let mut layers = Vec::with_capacity(paths.len());
        let taken = self.fence_each(paths, &mut layers);
        if let Err(e) = taken {
            // Leases go with the drop; the watches taken so far are given back.
            self.unwatch(&layers);
            return Err(e);
        }
        Ok(layers)
    }

    fn fence_each(
        &self,
        paths: &[PathBuf],
        layers: &mut Vec<Layer>,
    ) -> Result<(), (PathBuf, io::Error)> {
        for p in paths {
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(p)
                .map_err(|e| (p.clone(), e))?;
            let fd = Arc::new(OwnedFd::from(file));
            let lease = Lease::take(fd.clone(), self.ops.clone()).map_err(|e| (p.clone(), e))?;
            let watch = match &self.watch {
                Some(w) => Some(w.add(fd.as_fd()).map_err(|e| (p.clone(), e))?),
                None => None,
            };
            layers.push(Layer {
                path: p.clone(),
                fd,
                lease: Some(lease),
                watch,
            });
        }
        Ok(())
    }

    /// The error for a layer file that could not be fenced (named outside
    /// the list lock: finding its writers reads all of /proc).
    pub(super) fn layer_refused(
        &self,
        list: MutexGuard<'_, ReplicaList>,
        layer: &Path,
        e: io::Error,
    ) -> Error {
        drop(list);
        let why = if e.raw_os_error() == Some(libc::EAGAIN) {
            let writers = std::fs::metadata(layer)
                .map(|m| self.proc.writers_of(m.dev(), m.ino()))
                .unwrap_or_default();
            FenceFailure::OpenForWrite { writers }
        } else {
            FenceFailure::LeaseRefused(e)
        };
        let e = Error::Unfenceable {
            path: layer.to_path_buf(),
            why,
        };
        self.note_fence_failure(&e);
        e
    }

    /// Stop watching layers that left the list.
    pub(super) fn unwatch(&self, layers: &[Layer]) {
        if let Some(w) = &self.watch {
            for wd in layers.iter().filter_map(|l| l.watch) {
                w.remove(wd);
            }
        }
    }
}
