//! One process's `/proc/<pid>` directory, held open.
//!
//! Reading `maps`, then `numa_maps`, then `status` by path looks the pid
//! up each time, and a pid reused between two reads mixes two processes.
//! Through one directory fd every file is the same process's: once it
//! exits, opening a file in the directory fails (`ENOENT`), and reading
//! an open one gives `ESRCH` or nothing, which read as vanished.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use crate::parse::{parse_cgroup, parse_cpus_allowed, parse_numa_maps_of, ParseError};
use crate::Result;
use crate::{gone_or, into_text, parsed, read_all, CgroupEntry, NumaMapsEntry};

/// An open `<root>/<pid>` directory (`O_PATH`): files read through it
/// belong to the process it was opened for, or read as vanished.
#[derive(Debug)]
pub struct Process {
    dir: OwnedFd,
    path: PathBuf,
}

impl Process {
    /// Open `path` (a `<root>/<pid>` directory); `None` if it is gone.
    pub(crate) fn open(path: PathBuf) -> Result<Option<Process>> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(&path);
        Ok(gone_or(&path, dir)?.map(|f| Process {
            dir: OwnedFd::from(f),
            path,
        }))
    }

    /// `<pid>` as opened.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The bytes of `name` in the directory; `None` if the process is gone.
    fn read(&self, name: &CStr) -> Result<Option<Vec<u8>>> {
        let path = self.path.join(name.to_string_lossy().as_ref());
        // SAFETY: `dir` is an open directory fd we own and `name` is
        // NUL-terminated; openat returns a new fd or -1.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return gone_or(&path, Err(std::io::Error::last_os_error()));
        }
        // SAFETY: openat just returned `fd`; nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        gone_or(&path, read_all(file))
    }

    fn read_parsed<T>(
        &self,
        name: &CStr,
        parse: impl FnOnce(&str) -> std::result::Result<T, ParseError>,
    ) -> Result<Option<T>> {
        let bytes = self.read(name)?;
        parsed(
            self.path.join(name.to_string_lossy().as_ref()),
            bytes,
            parse,
        )
    }

    /// `cgroup`, as [`crate::ProcReader::cgroups`].
    pub fn cgroups(&self) -> Result<Option<Vec<CgroupEntry>>> {
        self.read_parsed(c"cgroup", parse_cgroup)
    }

    /// The text of `maps`, lossy UTF-8, as [`crate::ProcReader::maps_text`]:
    /// parse it with [`crate::MapsLine::parse`] line by line to borrow the
    /// paths instead of copying each.
    pub fn maps_text(&self) -> Result<Option<String>> {
        Ok(self.read(c"maps")?.map(into_text))
    }

    /// `Cpus_allowed_list` of `status`, as [`crate::ProcReader::cpus_allowed`].
    pub fn cpus_allowed(&self) -> Result<Option<Vec<u32>>> {
        self.read_parsed(c"status", parse_cpus_allowed)
    }

    /// The `numa_maps` lines whose start `keep` accepts, parsed by
    /// [`crate::parse_numa_maps_of`].
    pub fn numa_maps_of(
        &self,
        keep: impl FnMut(u64) -> bool,
    ) -> Result<Option<Vec<NumaMapsEntry>>> {
        self.read_parsed(c"numa_maps", |t| parse_numa_maps_of(t, keep))
    }
}
