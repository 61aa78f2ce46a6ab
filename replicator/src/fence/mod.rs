//! The write fence: a read lease on each source, and the thread that hears
//! writers arrive.
//!
//! ```text
//!  source fd (O_RDONLY) ── Lease (RAII: F_SETSIG + F_SETLEASE F_RDLCK,
//!        │                        F_UNLCK on release or drop)
//!        │ writer opens for write / truncate(2)
//!        ▼
//!  kernel: lease break ── realtime signal (si_fd) ── signalfd ── FenceThread
//!                                                     └─ FenceEvent::Break{fd}
//!  (queue overflow: SIGIO without fd ── FenceEvent::Overflow: check them all)
//!
//!  open(O_RDONLY|O_TRUNC): no break ── inotify IN_MODIFY ── ModifyWatch
//!                                          └─ FenceEvent::Modified{wd}
//! ```
//!
//! A read lease is refused while anyone holds the file open for writing,
//! and while it is held the kernel blocks the next write-open or truncate
//! until it is released. The engine releases only after every replica is
//! gone ([`crate::engine`]). The kernel calls the revoke/refence/attach
//! state machine makes go through [`FenceOps`], so unit tests drive it
//! without root and record its order; [`KernelOps`] is the real kernel.
//!
//! Both signals must be blocked in every thread of the process, so
//! [`prepare`] runs first thing in `main`, before any thread starts.

mod failure;
pub mod fdstore;
pub mod keeper;
mod lease;
mod ops;
pub mod overlay;
mod thread;
mod watch;

use std::os::fd::BorrowedFd;
use std::path::Path;

pub use failure::FenceFailure;
pub use keeper::KeeperLink;
pub use lease::Lease;
pub use ops::{FenceOps, FileStat, KernelOps};
pub use thread::{fence_signal, prepare, prepared, FenceEvent, FenceThread};
pub use watch::{ModifyWatch, Seen};

use crate::model::FenceKind;
use crate::{sys, Error, Result};

/// How writes to the file behind `fd` can be kept out, or why they cannot.
/// A read-only mount and an immutable file are leased like any other:
/// both can become writable (`mount -o remount,rw`, `chattr -i`, a
/// writable bind mount of the same inode).
pub fn fence_kind(fd: BorrowedFd<'_>, path: &Path) -> Result<FenceKind> {
    let fs = sys::fs_info(fd).map_err(|e| Error::io(path, e))?;
    if let Some(name) = sys::unfenceable_fs(fs.magic) {
        return Err(Error::Unfenceable {
            path: path.to_path_buf(),
            why: FenceFailure::Filesystem { name },
        });
    }
    if let Some(fs) = sys::never_writable_fs(fs.magic) {
        return Ok(FenceKind::NeverWritable { fs });
    }
    let attrs = sys::statx_attrs(fd).map_err(|e| Error::io(path, e))?;
    if attrs.verity {
        return Ok(FenceKind::Verity);
    }
    Ok(FenceKind::Lease)
}
