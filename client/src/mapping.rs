//! [`map`]: a read-only mapping of a file backed by the caller's node copy.
//!
//! ```text
//!  open(path) ─ fstat ─ published set beside the socket (a trusted uid's,
//!     │                 written by no one else) lists no replica?
//!     │                     ── yes: range = mmap(file), no round trip
//!     │                 ─ connect: the daemon's uid trusted? ─ Map{node} + fd ──> replicad
//!     │                     │
//!     │        Mapped{node,generation,size} + replica fd: a regular file,
//!     │        open read-only, on tmpfs or hugetlbfs, owned by the daemon's uid?
//!     │                     ▼
//!     │   spare = mmap(file)      (the way back, no fd kept)
//!     │   range = mmap(replica)   (what the caller reads)
//!     │   fallback::attach(range, spare)
//!     │
//!     └─ anything else (no daemon, Original, refusal, garbage):
//!        range = mmap(file), Backing::File{reason}
//! ```
//!
//! Either way both fds are closed before [`map_with`] returns. The only
//! errors are about the file itself: it cannot be opened, is not a regular
//! file, is empty, or cannot be mapped. Whom it believes is
//! [`crate::trust`]'s.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::fallback;
use crate::trust::{self, Trust};
use crate::Error;
use replicad_wire::proto::{Request, Response};
use replicad_wire::published::{self, Lookup, Reader};

/// Environment variable that makes [`map`] print why it used the file itself
/// (and why it did not believe a published set); ignored under `AT_SECURE`.
pub const DEBUG_ENV: &str = "REPLICAD_DEBUG";

fn debugging() -> bool {
    trust::env_var(DEBUG_ENV).is_some_and(|v| v == "1")
}

/// What backs a [`Mapping`] when it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// The node's replica, at this generation.
    Replica { node: u32, generation: u64 },
    /// The file itself, and why.
    File { reason: String },
}

/// Options for [`map_with`].
#[derive(Debug, Clone)]
pub struct MapOptions {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// Ask for this node's replica instead of the caller's home node.
    pub node: Option<u32>,
    /// Time-out for the daemon's answer.
    pub timeout: Duration,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            socket: crate::socket_path(),
            node: None,
            timeout: Duration::from_secs(2),
        }
    }
}

/// A read-only mapping of a whole file.
///
/// The bytes are the file's: while the replica backs the mapping they are the
/// source's bytes at the replica's generation (replicad holds writers off);
/// after a revoke they are the file's current bytes, as with any shared
/// mapping of a file that someone else may write or shrink (touching past a
/// shrunk end raises SIGBUS, as it would without replicad).
#[derive(Debug)]
pub struct Mapping {
    ptr: *const u8,
    len: usize,
    backing: Backing,
    /// The registered replica (owns its mappings); `None` when the file
    /// itself is mapped at `ptr` (owned by this value).
    replica: Option<fallback::Replica>,
    /// Length of the mapping at `ptr`, whole pages.
    mapped_len: usize,
}

// SAFETY: the mapping is read-only memory owned by this value; the fallback
// slot it holds is made of atomics.
unsafe impl Send for Mapping {}
// SAFETY: the mapping is read-only memory owned by this value.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr/len describe a live read-only mapping owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The mapping's length in bytes (the file's size when it was mapped).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: empty files are refused with [`Error::Empty`].
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start address of the mapping.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// What backed the mapping when it was made.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// Whether the replica still backs the mapping: false for a mapping of
    /// the file itself, and false once a revoke made it fall back. The
    /// fallback happens at the first touch after the daemon revoked the
    /// replica, so this stays true until then.
    pub fn on_replica(&self) -> bool {
        self.replica.as_ref().is_some_and(|r| r.on_replica())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.replica.is_none() {
            // SAFETY: ptr/mapped_len is the file mapping this value owns;
            // nothing borrows it any more.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.mapped_len) };
        }
        // A replica unmaps its range (and spare) in its own Drop, after
        // taking its slot from the SIGBUS handler.
    }
}

/// Map `path` read-only through the caller's node replica, or the file.
pub fn map(path: impl AsRef<Path>) -> Result<Mapping, Error> {
    map_with(path, &MapOptions::default())
}

/// [`map`] with options.
pub fn map_with(path: impl AsRef<Path>, opts: &MapOptions) -> Result<Mapping, Error> {
    let path = path.as_ref();
    let open_err = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.file_type().is_file() {
        return Err(Error::NotRegularFile {
            path: path.to_path_buf(),
        });
    }
    if meta.len() == 0 {
        return Err(Error::Empty {
            path: path.to_path_buf(),
        });
    }
    let map_err = |source| Error::Map {
        path: path.to_path_buf(),
        source,
    };
    let len = usize::try_from(meta.len())
        .map_err(|_| map_err(io::Error::from_raw_os_error(libc::EFBIG)))?;
    let mapped_len =
        round_to_pages(len).ok_or_else(|| map_err(io::Error::from_raw_os_error(libc::EFBIG)))?;

    let trust = Trust::from_env();
    let reason = match unlisted(&meta, opts, &trust) {
        Some(reason) => reason,
        None => match attach(file.as_fd(), len, mapped_len, opts, &trust) {
            Ok(m) => return Ok(m),
            Err(reason) => reason,
        },
    };
    if debugging() {
        eprintln!(
            "replicad: {}: using the file itself: {reason}",
            path.display()
        );
    }
    let ptr = mmap_ro(file.as_fd(), mapped_len).map_err(map_err)?;
    drop(file);
    Ok(Mapping {
        ptr: ptr as *const u8,
        len,
        backing: Backing::File { reason },
        replica: None,
        mapped_len,
    })
}

/// Why the daemon need not be asked: the published set beside its socket
/// lists no replica of the file (on the node asked for, if one was). A
/// program that re-maps after every revoke then costs the daemon nothing
/// until the next generation is published. `None`: ask.
fn unlisted(meta: &std::fs::Metadata, opts: &MapOptions, trust: &Trust) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let reader = published(&opts.socket, trust)?;
    let set = || {
        opts.socket
            .with_file_name(published::FILE_NAME)
            .display()
            .to_string()
    };
    match opts.node {
        Some(node) => {
            (reader.has_replica_on(meta.dev(), meta.ino(), node) == Some(false)).then(|| {
                format!(
                    "no replica on node{node} (the published set {} lists none; replicad was \
                     not asked)",
                    set()
                )
            })
        }
        None => (reader.lookup(meta.dev(), meta.ino()) == Lookup::Absent).then(|| {
            format!(
                "the file is not replicated (the published set {} lists no replica of it; \
                 replicad was not asked)",
                set()
            )
        }),
    }
}

/// Most daemons (sockets) one process keeps a published set open for.
const PUBLISHED_SETS: usize = 8;

/// The published set beside `socket`, opened once and kept for the
/// process's life: it is never unmapped, because the SIGBUS fallback may
/// read its revoke count at any moment ([`fallback::watch_revokes`]). A set
/// the daemon retired (it stopped or restarted) is replaced by the file now
/// there, and the old one stays mapped. `None` without a usable set, or
/// with one `trust` does not believe (then the daemon is asked, and the
/// set is looked at again next time).
fn published(socket: &Path, trust: &Trust) -> Option<&'static Reader> {
    static SETS: Mutex<Vec<(PathBuf, &'static Reader)>> = Mutex::new(Vec::new());
    let mut sets = SETS.lock().unwrap_or_else(|p| p.into_inner());
    let i = sets.iter().position(|(s, _)| s == socket);
    if let Some(i) = i {
        if let Some((_, r)) = sets.get(i).filter(|(_, r)| !r.is_retired()) {
            return Some(r);
        }
    } else if sets.len() >= PUBLISHED_SETS {
        return None;
    }
    let reader = match trust.open_published(&socket.with_file_name(published::FILE_NAME)) {
        Ok(r) => r,
        Err(e @ Error::UntrustedSet { .. }) => {
            if debugging() {
                eprintln!("replicad: {e}; replicad is asked instead");
            }
            return None;
        }
        Err(_) => return None,
    };
    let reader: &'static Reader = Box::leak(Box::new(reader));
    if let Some(word) = reader.revoking_word() {
        fallback::watch_revokes(word);
    }
    match i.and_then(|i| sets.get_mut(i)) {
        Some(entry) => entry.1 = reader,
        None => sets.push((socket.to_path_buf(), reader)),
    }
    Some(reader)
}

/// Ask the daemon for a replica and map it with its way back. `Err` holds
/// the reason to use the file itself.
fn attach(
    file: BorrowedFd<'_>,
    len: usize,
    mapped_len: usize,
    opts: &MapOptions,
    trust: &Trust,
) -> Result<Mapping, String> {
    let socket = opts.socket.display();
    let answer = match crate::request_trusting(
        &opts.socket,
        &Request::Map {
            node: opts.node,
            table: 0,
            at: 0,
            len: 0,
        },
        &[file],
        crate::RequestLimits::new(opts.timeout),
        trust,
    ) {
        Ok(answer) => answer,
        Err(Error::Connect { source, .. }) => {
            return Err(format!("replicad not reachable at {socket}: {source}"))
        }
        // These name the socket themselves.
        Err(e @ (Error::Io { .. } | Error::NoAnswer { .. } | Error::UntrustedDaemon { .. })) => {
            return Err(format!("no replica: {e}"))
        }
        Err(e) => return Err(format!("no replica from replicad at {socket}: {e}")),
    };
    let (daemon_uid, mut fds) = (answer.daemon_uid, answer.fds);
    let (node, generation, size) = match answer.response {
        Response::Mapped {
            node,
            generation,
            size,
        } => (node, generation, size),
        Response::Original { reason } => {
            return Err(format!("replicad at {socket} has no replica: {reason}"))
        }
        other => {
            return Err(format!(
                "replicad at {socket} answered a map request with {}",
                response_name(&other)
            ))
        }
    };
    if fds.len() != 1 {
        return Err(format!(
            "replicad at {socket} sent {} fds with its replica, expected 1",
            fds.len()
        ));
    }
    if size != len as u64 {
        return Err(format!(
            "replicad at {socket} offered a replica of {size} bytes for a file of {len} bytes"
        ));
    }
    let replica: OwnedFd = fds.remove(0);
    check_replica(replica.as_fd(), size, daemon_uid)
        .map_err(|e| format!("replicad at {socket}: {e}"))?;

    let spare = mmap_ro(file, mapped_len)
        .map_err(|e| format!("cannot map the file a second time (the way back): {e}"))?;
    let range = match mmap_ro(replica.as_fd(), mapped_len) {
        Ok(r) => r,
        Err(e) => {
            munmap(spare, mapped_len);
            return Err(format!("cannot map the replica from {socket}: {e}"));
        }
    };
    drop(replica);
    match fallback::attach(range, mapped_len, spare) {
        Ok(reg) => Ok(Mapping {
            ptr: range as *const u8,
            len,
            backing: Backing::Replica { node, generation },
            replica: Some(reg),
            mapped_len,
        }),
        Err(e) => {
            munmap(range, mapped_len);
            munmap(spare, mapped_len);
            Err(format!("replica from {socket} not used: {e}"))
        }
    }
}

/// The replica fd must be one the daemon (running as `daemon_uid`) keeps
/// in its store ([`trust::check_replica`]) and hold at least `size` bytes:
/// anything shorter would fault at once.
fn check_replica(fd: BorrowedFd<'_>, size: u64, daemon_uid: u32) -> Result<(), String> {
    let st = trust::check_replica(fd, daemon_uid).map_err(|e| e.to_string())?;
    if (st.st_size as u64) < size {
        return Err(format!(
            "the replica holds {} bytes, not {size}",
            st.st_size
        ));
    }
    Ok(())
}

fn response_name(r: &Response) -> &'static str {
    match r {
        Response::Mapped { .. } => "mapped",
        Response::Original { .. } => "original",
        Response::Replicated { .. } => "replicated",
        Response::Evicted { .. } => "evicted",
        Response::Status { .. } => "status",
        Response::Attached { .. } => "attached",
        Response::ReplicatedPid { .. } => "replicated_pid",
        Response::Heat { .. } => "heat",
        Response::Plan { .. } => "plan",
        Response::Migrated { .. } => "migrated",
        Response::Error { .. } => "error",
    }
}

use replicad_procfs::page_size;

fn round_to_pages(len: usize) -> Option<usize> {
    let page = page_size();
    len.checked_add(page - 1).map(|l| l & !(page - 1))
}

/// `mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0)`, as a raw system
/// call: these mappings (the replica, the spare original that is the way
/// back, the file itself) are this module's own, and the preload shim,
/// which interposes `mmap` in a program it is loaded into, must not see
/// them. Were it to move a replica over the spare, a revoke would swap in
/// a revoked replica, and the program would get the SIGBUS.
fn mmap_ro(fd: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: a new mapping at an address the kernel picks; fd is live for
    // the call. The result is checked.
    let p = unsafe {
        libc::syscall(
            libc::SYS_mmap,
            0 as libc::c_long,
            len as libc::c_long,
            libc::PROT_READ as libc::c_long,
            libc::MAP_SHARED as libc::c_long,
            fd.as_raw_fd() as libc::c_long,
            0 as libc::c_long,
        )
    };
    if p == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(p as usize)
}

fn munmap(addr: usize, len: usize) {
    // SAFETY: only called on mappings this module just made and nobody else
    // knows about.
    unsafe { libc::munmap(addr as *mut libc::c_void, len) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data");
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        (dir, p)
    }

    fn no_daemon(dir: &tempfile::TempDir) -> MapOptions {
        MapOptions {
            socket: dir.path().join("no-such.sock"),
            node: None,
            timeout: Duration::from_millis(500),
        }
    }

    #[test]
    fn without_daemon_maps_the_file() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (dir, p) = file_with(&data);
        let opts = no_daemon(&dir);
        let m = map_with(&p, &opts).unwrap();
        assert_eq!(m.as_slice(), &data[..]);
        assert_eq!(m.len(), data.len());
        assert!(!m.on_replica());
        match m.backing() {
            Backing::File { reason } => {
                assert!(reason.contains("not reachable"), "{reason}");
                assert!(
                    reason.contains(&opts.socket.display().to_string()),
                    "{reason}"
                );
            }
            other => panic!("unexpected backing {other:?}"),
        }
    }

    #[test]
    fn file_errors_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let opts = no_daemon(&dir);
        let missing = dir.path().join("missing");
        match map_with(&missing, &opts) {
            Err(Error::Open { path, .. }) => assert_eq!(path, missing),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            map_with(dir.path(), &opts),
            Err(Error::NotRegularFile { .. })
        ));
        let (_d, empty) = file_with(b"");
        assert!(matches!(map_with(&empty, &opts), Err(Error::Empty { .. })));
        assert!(matches!(
            map_with("/dev/null", &opts),
            Err(Error::NotRegularFile { .. })
        ));
    }

    #[test]
    fn pages_round_up() {
        let page = page_size();
        assert_eq!(round_to_pages(1), Some(page));
        assert_eq!(round_to_pages(page), Some(page));
        assert_eq!(round_to_pages(page + 1), Some(2 * page));
        assert_eq!(round_to_pages(usize::MAX), None);
    }
}
