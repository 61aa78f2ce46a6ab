//! The kernel calls the fence state machine makes, behind one small trait:
//! [`KernelOps`] makes them for real; unit tests put a recorder in its
//! place to see their order without root.

use std::io;
use std::os::fd::BorrowedFd;

use super::fence_signal;
use crate::store::ReplicaFile;
use crate::sys;

/// What `fstat` says of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub nlink: u64,
}

/// The kernel, as the fence and the engine's revoke, refence and attach
/// paths use it.
pub trait FenceOps: Send + Sync + 'static {
    /// `F_SETSIG` to the fence signal, `F_SETLEASE F_RDLCK`, then
    /// `F_SETOWN` to this process: not the calling thread, which may exit
    /// (see [`sys::set_owner`]).
    /// `EAGAIN`: the file is open for writing.
    fn take_lease(&self, fd: BorrowedFd<'_>) -> io::Result<()>;
    /// `F_SETLEASE F_UNLCK`: a writer waiting on the break goes on.
    fn release_lease(&self, fd: BorrowedFd<'_>) -> io::Result<()>;
    /// `F_GETLEASE` says `F_UNLCK` on a lease we hold: a break is pending.
    fn break_pending(&self, fd: BorrowedFd<'_>) -> bool;
    /// `fstat` of a source.
    fn stat(&self, fd: BorrowedFd<'_>) -> io::Result<FileStat>;
    /// Truncate a replica to nothing (the kernel unmaps it from every
    /// process) and unlink it.
    fn truncate(&self, replica: ReplicaFile);
}

/// The real kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelOps;

impl FenceOps for KernelOps {
    fn take_lease(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        sys::set_lease_signal(fd, fence_signal())?;
        sys::set_read_lease(fd)?;
        sys::set_owner(fd)
    }

    fn release_lease(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        sys::release_lease(fd)
    }

    fn break_pending(&self, fd: BorrowedFd<'_>) -> bool {
        sys::get_lease(fd).ok() == Some(libc::F_UNLCK)
    }

    fn stat(&self, fd: BorrowedFd<'_>) -> io::Result<FileStat> {
        let st = nix::sys::stat::fstat(fd)?;
        Ok(FileStat {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: sys::nanos(st.st_mtime, st.st_mtime_nsec),
            ctime_ns: sys::nanos(st.st_ctime, st.st_ctime_nsec),
            nlink: st.st_nlink,
        })
    }

    fn truncate(&self, replica: ReplicaFile) {
        replica.remove();
    }
}
