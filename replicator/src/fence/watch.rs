//! Writes the lease does not announce. The kernel breaks a read lease for
//! a write-mode open and for truncate(2), but not for
//! `open(O_RDONLY | O_TRUNC)`, which anyone with write permission may do:
//! the file is cut to nothing while the lease stays `F_RDLCK` and no
//! signal comes. A modify watch (inotify `IN_MODIFY`, which the kernel
//! raises for every size change) on every leased source catches it; the
//! engine then revokes at once. The gap between the truncation and the
//! revoke is the kernel's, measured in `tests/fence_paths.rs`.
//!
//! The watch also takes `IN_ATTRIB`: a metadata change (`chmod`, `chown`,
//! `setxattr`, `utime`) moves the generation's ctime, and on overlayfs it
//! copies the file up without any lease break, making an upper file a
//! writer can reach directly. The engine revokes, and the refence finds
//! and fences the new layer file.
//!
//! For a moment after a revoke the watch of that source also takes
//! `IN_OPEN` ([`ModifyWatch::watch_opens`]): the kernel raises it in the
//! writer's own open, right after the lease break let it through, which is
//! how the engine learns that the writer it let go is running again (see
//! the revoke gate in `engine/revoke.rs`).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Mutex;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use replicad_procfs::ProcReader;

/// One inotify instance holding a modify watch per leased inode. inotify
/// gives one watch per inode per instance, and two sources can share an
/// inode (an overlay's lower file replicated through two overlays, or
/// also by its own path): each watch is counted, and removed with its
/// last user.
#[derive(Debug)]
pub struct ModifyWatch {
    inotify: Inotify,
    proc: ProcReader,
    users: Mutex<HashMap<WatchDescriptor, usize>>,
}

/// What a modify watch is on: content and metadata changes.
pub const WATCHED: AddWatchFlags = AddWatchFlags::IN_MODIFY.union(AddWatchFlags::IN_ATTRIB);

/// What the watch saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Modified(WatchDescriptor),
    /// Someone opened the inode (only while [`ModifyWatch::watch_opens`]
    /// is on for it).
    Opened(WatchDescriptor),
    /// The kernel's event queue overflowed: some modification may be lost.
    Overflow,
}

impl ModifyWatch {
    pub fn new(proc: ProcReader) -> io::Result<ModifyWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        Ok(ModifyWatch {
            inotify,
            proc,
            users: Mutex::new(HashMap::new()),
        })
    }

    /// Watch the inode behind `fd` (the source's own fd, so a rename or an
    /// unlink of its path changes nothing).
    pub fn add(&self, fd: BorrowedFd<'_>) -> io::Result<WatchDescriptor> {
        let path = self.proc.self_fd_path(fd.as_raw_fd());
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let wd = self.inotify.add_watch(&path, WATCHED).map_err(|e| {
            if e == nix::errno::Errno::ENOSPC {
                io::Error::other(
                    "no inotify watch left for the modify watch: raise \
                     fs.inotify.max_user_watches",
                )
            } else {
                io::Error::from(e)
            }
        })?;
        *users.entry(wd).or_insert(0) += 1;
        Ok(wd)
    }

    /// Take `IN_OPEN` too on the watch of the inode behind `fd` (already
    /// watched with [`ModifyWatch::add`]), or stop taking it. The mask is
    /// replaced; the watch descriptor stays the same.
    pub fn watch_opens(&self, fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
        let path = self.proc.self_fd_path(fd.as_raw_fd());
        let mask = if on {
            WATCHED | AddWatchFlags::IN_OPEN
        } else {
            WATCHED
        };
        self.inotify.add_watch(&path, mask)?;
        Ok(())
    }

    /// One user of `wd` is done with it; the last removes the watch. A
    /// watch the kernel dropped already (the inode is gone) is no error.
    pub fn remove(&self, wd: WatchDescriptor) {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        match users.get_mut(&wd) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                users.remove(&wd);
                let _ = self.inotify.rm_watch(wd);
            }
        }
    }

    /// What was seen since the last call (empty when nothing is pending).
    pub fn modified(&self) -> io::Result<Vec<Seen>> {
        match self.inotify.read_events() {
            Ok(events) => Ok(events
                .into_iter()
                .filter_map(|e| {
                    if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                        Some(Seen::Overflow)
                    } else if e.mask.intersects(WATCHED) {
                        Some(Seen::Modified(e.wd))
                    } else if e.mask.contains(AddWatchFlags::IN_OPEN) {
                        Some(Seen::Opened(e.wd))
                    } else {
                        None
                    }
                })
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
