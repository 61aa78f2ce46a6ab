//! A read lease as a value: taken by [`Lease::take`], released by
//! [`Lease::release`] or, failing that, on drop.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use super::FenceOps;

/// A held read lease on a source fd. While it lives, a writer's open for
/// writing (or truncate) waits for the engine.
pub struct Lease {
    fd: Arc<OwnedFd>,
    ops: Arc<dyn FenceOps>,
    held: bool,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("fd", &self.fd.as_raw_fd())
            .field("held", &self.held)
            .finish()
    }
}

impl Lease {
    /// Take a read lease on `fd` (breaks to arrive as the fence signal).
    /// `EAGAIN`: someone holds the file open for writing.
    pub fn take(fd: Arc<OwnedFd>, ops: Arc<dyn FenceOps>) -> io::Result<Lease> {
        ops.take_lease(fd.as_fd())?;
        Ok(Lease {
            fd,
            ops,
            held: true,
        })
    }

    /// The fd the lease sits on (the one a break's `si_fd` names).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether a writer's break is pending on it.
    pub fn break_pending(&self) -> bool {
        self.ops.break_pending(self.fd.as_fd())
    }

    /// Release it now: a writer waiting on its break goes on.
    pub fn release(mut self) -> io::Result<()> {
        self.held = false;
        self.ops.release_lease(self.fd.as_fd())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.held {
            if let Err(e) = self.ops.release_lease(self.fd.as_fd()) {
                crate::warn_limited!("releasing a lease on drop: {e}");
            }
        }
    }
}
