//! One reader of `/proc`, with a root path, shared by the daemon, the CLI,
//! the engine, the client and the preload shim, so they all read the
//! kernel's text the same way.
//!
//! ```text
//!   ProcReader { root }            root = "/proc", or a fixture tree in tests
//!     │
//!     ├─ <root>/<pid>/{maps,smaps,numa_maps,stat,status,cgroup,comm,auxv,
//!     │               fd/,fdinfo/<fd>,pagemap,map_files/<start>-<end>,mountinfo}
//!     │     read ──► bytes ──► pure parser (parse_stat, parse_status, ...)
//!     │                          │                 └─ ParseError {line, reason}
//!     │                          ▼
//!     │      Ok(Some(value))   Ok(None): the pid does not exist or exited
//!     │                        mid-read (ENOENT, ESRCH)
//!     │      Err(Error::Io {path})        any other read failure (EACCES ...)
//!     │      Err(Error::Parse {path, line}) text that does not parse
//!     │
//!     └─ writers_of(dev, ino) ── pids() ─► holds_for_write(pid, dev, ino)
//!                                           fd/ + fdinfo flags, maps rw?s
//! ```
//!
//! The parsers are pure functions (exported for the fuzz target and for
//! callers holding text already) and never panic on any input. Nothing here
//! starts a thread, blocks on anything but a `/proc` read, or pulls in more
//! than `libc`: the preload shim uses it too. [`SELF_MAPS_C`] is for the
//! shim's SIGBUS handler, which may only call `open(2)`/`read(2)` itself.

#![warn(missing_docs)]

mod cpulist;
pub mod maps;
mod pagemap;
mod parse;
mod process;
pub mod slots;
#[cfg(test)]
mod test;

use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub use cpulist::{format_cpulist, parse_cpulist, MAX_LIST_ID};
pub use maps::{parse_smaps, MapsLine, OwnedMapsLine, SmapsEntry, SmapsError};
pub use pagemap::{
    has_private, present_runs, private_runs, written_pages, PageRegion, PmScanArg, PAGEMAP_CHUNK,
    PAGEMAP_SCAN, PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED,
};
pub use parse::{
    parse_auxv, parse_cgroup, parse_cpus_allowed, parse_fdinfo, parse_mountinfo, parse_numa_maps,
    parse_numa_maps_of, parse_stat, parse_status, unescape_octal, CgroupEntry, FdInfo, MountInfo,
    NumaMapsEntry, ParseError, Stat, Status, AT_BASE, AT_NULL,
};
pub use process::Process;

/// Where procfs is mounted.
pub const PROC_ROOT: &str = "/proc";

/// NUL-terminated `"/proc/self/maps"` for an async-signal-safe raw
/// `open(2)` (the shim's SIGBUS handler), which cannot build a path.
pub const SELF_MAPS_C: &[u8] = b"/proc/self/maps\0";
/// NUL-terminated `"/proc/self/pagemap"`, as [`SELF_MAPS_C`].
pub const SELF_PAGEMAP_C: &[u8] = b"/proc/self/pagemap\0";
/// NUL-terminated `"/proc/self/mem"`, as [`SELF_MAPS_C`].
pub const SELF_MEM_C: &[u8] = b"/proc/self/mem\0";

/// How a message names a process's file: `/proc/<pid>/<file>`, the name
/// people know it by, whatever root the reader has.
pub fn display_path(pid: u32, file: &str) -> String {
    format!("{PROC_ROOT}/{pid}/{file}")
}

/// The size of a page, in bytes (pagemap has one entry per page).
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// What a read of `/proc` can fail with. A process that does not exist or
/// vanished is not an error: the readers return `Ok(None)` for it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading `path` failed for another reason than ENOENT/ESRCH
    /// (EACCES for another user's process, say).
    #[error("{path}: {source}", path = path.display())]
    Io {
        /// The file or directory read.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The text of `path` does not parse.
    #[error("{path}: line {line}: {reason}", path = path.display())]
    Parse {
        /// The file read.
        path: PathBuf,
        /// 1-based line (0: the file as a whole; for `auxv`, the pair).
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    fn parse(path: PathBuf, e: ParseError) -> Self {
        Error::Parse {
            path,
            line: e.line,
            reason: e.reason,
        }
    }
}

/// What the readers return.
pub type Result<T> = std::result::Result<T, Error>;

/// ENOENT (no such pid, or file) or ESRCH (the process exited while we
/// read): the process is gone, not an error.
fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// `Ok(None)` for a vanished process, else the error with its path.
fn gone_or<T>(path: &Path, r: io::Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if vanished(&e) => Ok(None),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The whole of a `/proc` file, in as few reads as the kernel allows.
///
/// `std::fs::read` sizes its buffer from `st_size` (one more `statx`),
/// which is 0 here, and grows it from 32 bytes: nine `read` calls for a
/// 7 KiB `maps`, each taking the target's mmap lock again. Starting with
/// room for 64 KiB makes that three (seq_file hands out at most a page, or
/// its longest record, a call, and says it is done with a read of 0).
fn read_whole(path: &Path) -> io::Result<Vec<u8>> {
    read_all(std::fs::File::open(path)?)
}

/// The rest of `f`, as [`read_whole`] reads it.
fn read_all(f: std::fs::File) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(64 << 10);
    // Through `Take` read_to_end neither stats the file nor probes.
    f.take(u64::MAX).read_to_end(&mut buf)?;
    Ok(buf)
}

/// `bytes` as text, lossy UTF-8 (a path need not be UTF-8), without a
/// copy when they are UTF-8 already.
fn into_text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// `bytes` (lossy UTF-8) of `path` parsed by `parse`; `None` stays `None`.
fn parsed<T>(
    path: PathBuf,
    bytes: Option<Vec<u8>>,
    parse: impl FnOnce(&str) -> std::result::Result<T, ParseError>,
) -> Result<Option<T>> {
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    // from_utf8 checks ASCII a word at a time; the lossy path byte by byte.
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => std::borrow::Cow::Borrowed(t),
        Err(_) => String::from_utf8_lossy(&bytes),
    };
    parse(&text).map(Some).map_err(|e| Error::parse(path, e))
}

/// The lines of a `maps` text; one that does not parse is
/// [`Error::Parse`] naming `path` and its 1-based line.
fn maps_lines(path: &Path, text: &str) -> Result<Vec<OwnedMapsLine>> {
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.is_empty() {
            continue;
        }
        let Some(m) = OwnedMapsLine::parse(l) else {
            return Err(Error::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                reason: format!("not a maps line: {}", cpulist::quote(l)),
            });
        };
        out.push(m);
    }
    Ok(out)
}

/// Reads `/proc` (or a tree shaped like it) under one root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcReader {
    root: PathBuf,
}

impl Default for ProcReader {
    /// The reader of [`PROC_ROOT`].
    fn default() -> Self {
        ProcReader::new(PROC_ROOT)
    }
}

impl ProcReader {
    /// A reader of the tree at `root` (`/proc`, or a fixture).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ProcReader { root: root.into() }
    }

    /// The root it reads.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<pid>`.
    pub fn pid_dir(&self, pid: u32) -> PathBuf {
        self.root.join(pid.to_string())
    }

    /// `<root>/<pid>/<name>`.
    fn file(&self, pid: u32, name: &str) -> PathBuf {
        self.pid_dir(pid).join(name)
    }

    /// `<root>/self/fd/<fd>`: opening it makes a new open file description
    /// of what `fd` refers to (with new flags, its own offset and lease).
    pub fn self_fd_path(&self, fd: RawFd) -> PathBuf {
        self.root.join("self").join("fd").join(fd.to_string())
    }

    /// `<root>/self/<file>`: a file of the calling process itself.
    pub fn self_path(&self, file: &str) -> PathBuf {
        self.root.join("self").join(file)
    }

    /// The text of the calling process's own maps.
    pub fn self_maps_text(&self) -> io::Result<String> {
        read_whole(&self.self_path("maps")).map(into_text)
    }

    /// `sys/fs/lease-break-time`: seconds the kernel waits for a lease
    /// holder to release before it breaks the lease by force.
    pub fn lease_break_time(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.root.join("sys/fs/lease-break-time")).ok()?;
        text.trim().parse().ok()
    }

    /// The calling process's own stat.
    pub fn self_stat(&self) -> Result<Stat> {
        let path = self.self_path("stat");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        parse_stat(&text).map_err(|e| Error::parse(path, e))
    }

    /// The bytes of a per-process file; `None` if the process is gone.
    fn read(&self, pid: u32, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.file(pid, name);
        gone_or(&path, read_whole(&path))
    }

    /// The text (lossy UTF-8) of a per-process file, parsed by `parse`.
    fn read_parsed<T>(
        &self,
        pid: u32,
        name: &str,
        parse: impl FnOnce(&str) -> std::result::Result<T, ParseError>,
    ) -> Result<Option<T>> {
        let path = self.file(pid, name);
        let bytes = gone_or(&path, read_whole(&path))?;
        parsed(path, bytes, parse)
    }

    /// `<pid>`'s directory, opened once: see [`Process`]. `None` if the
    /// process is gone.
    pub fn process(&self, pid: u32) -> Result<Option<Process>> {
        Process::open(self.pid_dir(pid))
    }

    /// The pids in the root (its numeric entries), unsorted.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let io = |source| Error::Io {
            path: self.root.clone(),
            source,
        };
        let mut pids = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(io)? {
            let entry = entry.map_err(io)?;
            if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    /// The text of `<pid>/maps`, lossy UTF-8 (a path need not be UTF-8).
    pub fn maps_text(&self, pid: u32) -> Result<Option<String>> {
        Ok(self.read(pid, "maps")?.map(into_text))
    }

    /// `<pid>/maps`, parsed. A line that does not parse is
    /// [`Error::Parse`] naming `<root>/<pid>/maps` and the 1-based line.
    pub fn maps(&self, pid: u32) -> Result<Option<Vec<OwnedMapsLine>>> {
        let Some(text) = self.maps_text(pid)? else {
            return Ok(None);
        };
        maps_lines(&self.file(pid, "maps"), &text).map(Some)
    }

    /// `<pid>/smaps`, parsed by [`parse_smaps`].
    pub fn smaps(&self, pid: u32) -> Result<Option<Vec<SmapsEntry>>> {
        self.read_parsed(pid, "smaps", |t| {
            parse_smaps(t).map_err(|e| ParseError {
                line: e.line,
                reason: e.to_string(),
            })
        })
    }

    /// `<pid>/stat`, parsed by [`parse_stat`].
    pub fn stat(&self, pid: u32) -> Result<Option<Stat>> {
        self.read_parsed(pid, "stat", parse_stat)
    }

    /// Field 22 of `<pid>/stat`: with the pid, names one process for good.
    pub fn start_time(&self, pid: u32) -> Result<Option<u64>> {
        Ok(self.stat(pid)?.map(|s| s.start_time))
    }

    /// `<pid>/status`, parsed by [`parse_status`].
    pub fn status(&self, pid: u32) -> Result<Option<Status>> {
        self.read_parsed(pid, "status", parse_status)
    }

    /// `Cpus_allowed_list` of `<pid>/status`, sorted.
    pub fn cpus_allowed(&self, pid: u32) -> Result<Option<Vec<u32>>> {
        self.read_parsed(pid, "status", parse_cpus_allowed)
    }

    /// `<pid>/cgroup`, parsed by [`parse_cgroup`] (an empty file is the
    /// root, `/`, of hierarchy 0).
    pub fn cgroups(&self, pid: u32) -> Result<Option<Vec<CgroupEntry>>> {
        self.read_parsed(pid, "cgroup", parse_cgroup)
    }

    /// `<pid>/comm` without its trailing newline (spaces kept).
    pub fn comm(&self, pid: u32) -> Result<Option<String>> {
        self.read_parsed(pid, "comm", |t| {
            Ok(t.strip_suffix('\n').unwrap_or(t).to_string())
        })
    }

    /// `<pid>/auxv`, parsed by [`parse_auxv`].
    pub fn auxv(&self, pid: u32) -> Result<Option<Vec<(u64, u64)>>> {
        let path = self.file(pid, "auxv");
        let Some(bytes) = gone_or(&path, read_whole(&path))? else {
            return Ok(None);
        };
        parse_auxv(&bytes)
            .map(Some)
            .map_err(|e| Error::parse(path, e))
    }

    /// `AT_BASE` of `<pid>/auxv`, the dynamic loader's base address;
    /// `Ok(None)` also when it is absent or 0 (a static program).
    pub fn at_base(&self, pid: u32) -> Result<Option<u64>> {
        Ok(self.auxv(pid)?.and_then(|v| {
            v.iter()
                .find_map(|&(k, v)| (k == AT_BASE && v != 0).then_some(v))
        }))
    }

    /// `<pid>/map_files/<start>-<end>`: lowercase hex without padding (the
    /// kernel refuses padded names). Opening it needs `CAP_SYS_ADMIN`.
    pub fn map_files_path(&self, pid: u32, start: u64, end: u64) -> PathBuf {
        self.file(pid, "map_files")
            .join(format!("{start:x}-{end:x}"))
    }

    /// The children of every thread of `pid` (`<pid>/task/<tid>/children`,
    /// which kernels built with `CONFIG_PROC_CHILDREN` have), sorted; an
    /// empty list where the kernel has no such file.
    pub fn children(&self, pid: u32) -> Result<Option<Vec<u32>>> {
        let path = self.file(pid, "task");
        let Some(dir) = gone_or(&path, std::fs::read_dir(&path))? else {
            return Ok(None);
        };
        let mut children = Vec::new();
        for entry in dir {
            let Some(entry) = gone_or(&path, entry)? else {
                return Ok(None);
            };
            let file = entry.path().join("children");
            // A thread that ended meanwhile, or no such file: none.
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            children.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        children.sort_unstable();
        children.dedup();
        Ok(Some(children))
    }

    /// The open fd numbers in `<pid>/fd`, sorted.
    pub fn fds(&self, pid: u32) -> Result<Option<Vec<u32>>> {
        let path = self.file(pid, "fd");
        let Some(dir) = gone_or(&path, std::fs::read_dir(&path))? else {
            return Ok(None);
        };
        let mut fds = Vec::new();
        for entry in dir {
            let Some(entry) = gone_or(&path, entry)? else {
                return Ok(None);
            };
            if let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                fds.push(fd);
            }
        }
        fds.sort_unstable();
        Ok(Some(fds))
    }

    /// `<pid>/fd/<fd>`: stat or open it to reach what the fd refers to.
    pub fn fd_path(&self, pid: u32, fd: u32) -> PathBuf {
        self.file(pid, "fd").join(fd.to_string())
    }

    /// `<pid>/fdinfo/<fd>`, parsed by [`parse_fdinfo`]; `Ok(None)` also
    /// when the fd was closed.
    pub fn fdinfo(&self, pid: u32, fd: u32) -> Result<Option<FdInfo>> {
        self.read_parsed(pid, &format!("fdinfo/{fd}"), parse_fdinfo)
    }

    /// `<pid>/pagemap` opened read-only, for [`written_pages`].
    pub fn pagemap(&self, pid: u32) -> Result<Option<std::fs::File>> {
        let path = self.file(pid, "pagemap");
        gone_or(&path, std::fs::File::open(&path))
    }

    /// `<pid>/mem`, open for reading and writing (ptrace access: root, or
    /// the process's own user while it is not dumpable-protected).
    pub fn mem(&self, pid: u32) -> Result<Option<std::fs::File>> {
        let path = self.file(pid, "mem");
        gone_or(
            &path,
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path),
        )
    }

    /// `<pid>/numa_maps`, parsed by [`parse_numa_maps`].
    pub fn numa_maps(&self, pid: u32) -> Result<Option<Vec<NumaMapsEntry>>> {
        self.read_parsed(pid, "numa_maps", parse_numa_maps)
    }

    /// `<pid>/mountinfo`, or `<root>/self/mountinfo` for `None`, parsed by
    /// [`parse_mountinfo`]. A missing file is [`Error::Io`] here: the
    /// callers ask about a mount namespace that must exist.
    pub fn mountinfo(&self, pid: Option<u32>) -> Result<Vec<MountInfo>> {
        let path = match pid {
            Some(pid) => self.file(pid, "mountinfo"),
            None => self.root.join("self").join("mountinfo"),
        };
        let bytes = read_whole(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        parse_mountinfo(&String::from_utf8_lossy(&bytes)).map_err(|e| Error::parse(path, e))
    }

    /// The owner (`st_uid`) of `<pid>`: the process's effective uid, or
    /// root when it is not dumpable (set-id programs, `PR_SET_DUMPABLE 0`).
    pub fn proc_owner_uid(&self, pid: u32) -> Result<Option<u32>> {
        let path = self.pid_dir(pid);
        Ok(gone_or(&path, std::fs::metadata(&path))?.map(|m| m.uid()))
    }

    /// Whether `pid` can write the file `(dev, ino)`: an fd of it whose
    /// `fdinfo` flags are not `O_RDONLY`, or a `rw?s` mapping of the same
    /// dev AND ino. Best effort: what cannot be read is skipped.
    pub fn holds_for_write(&self, pid: u32, dev: u64, ino: u64) -> bool {
        if let Ok(Some(fds)) = self.fds(pid) {
            for fd in fds {
                let Ok(meta) = std::fs::metadata(self.fd_path(pid, fd)) else {
                    continue;
                };
                if meta.dev() != dev || meta.ino() != ino {
                    continue;
                }
                if let Ok(Some(info)) = self.fdinfo(pid, fd) {
                    if info.writable() {
                        return true;
                    }
                }
            }
        }
        let Ok(Some(text)) = self.maps_text(pid) else {
            return false;
        };
        text.lines().filter_map(MapsLine::parse).any(|l| {
            l.perms[0] == b'r'
                && l.perms[1] == b'w'
                && l.perms[3] == b's'
                && l.dev == dev
                && l.ino == ino
        })
    }

    /// `(pid, comm)` of every process that [`holds_for_write`] the file
    /// `(dev, ino)`, by pid. Best effort: empty if the root cannot be
    /// listed; a comm that cannot be read is "".
    ///
    /// [`holds_for_write`]: ProcReader::holds_for_write
    pub fn writers_of(&self, dev: u64, ino: u64) -> Vec<(u32, String)> {
        let mut pids = self.pids().unwrap_or_default();
        pids.sort_unstable();
        pids.into_iter()
            .filter(|&pid| self.holds_for_write(pid, dev, ino))
            .map(|pid| (pid, self.comm(pid).ok().flatten().unwrap_or_default()))
            .collect()
    }
}
