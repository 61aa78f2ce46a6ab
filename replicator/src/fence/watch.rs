//! Writes the lease does not announce. The kernel breaks a read lease for
//! a write-mode open and for truncate(2), but not for
//! `open(O_RDONLY | O_TRUNC)`, which anyone with write permission may do:
//! the file is cut to nothing while the lease stays `F_RDLCK` and no
//! signal comes. A modify watch (inotify `IN_MODIFY`, which the kernel
//! raises for every size change) on every leased source catches it; the
//! engine then revokes at once. The gap between the truncation and the
//! revoke is the kernel's, measured in `tests/fence_paths.rs`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use replicad_procfs::ProcReader;

/// One inotify instance holding a modify watch per leased source.
#[derive(Debug)]
pub struct ModifyWatch {
    inotify: Inotify,
    proc: ProcReader,
}

impl ModifyWatch {
    pub fn new(proc: ProcReader) -> io::Result<ModifyWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        Ok(ModifyWatch { inotify, proc })
    }

    /// Watch the inode behind `fd` (the source's own fd, so a rename or an
    /// unlink of its path changes nothing).
    pub fn add(&self, fd: BorrowedFd<'_>) -> io::Result<WatchDescriptor> {
        let path = self.proc.self_fd_path(fd.as_raw_fd());
        Ok(self.inotify.add_watch(&path, AddWatchFlags::IN_MODIFY)?)
    }

    /// Stop watching (the source left the list). A watch the kernel
    /// dropped already (the inode is gone) is no error.
    pub fn remove(&self, wd: WatchDescriptor) {
        let _ = self.inotify.rm_watch(wd);
    }

    /// The watches that saw a modification since the last call (empty when
    /// none is pending).
    pub fn modified(&self) -> io::Result<Vec<WatchDescriptor>> {
        match self.inotify.read_events() {
            Ok(events) => Ok(events
                .into_iter()
                .filter(|e| e.mask.contains(AddWatchFlags::IN_MODIFY))
                .map(|e| e.wd)
                .collect()),
            Err(nix::errno::Errno::EAGAIN) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }
}

impl AsFd for ModifyWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }
}
