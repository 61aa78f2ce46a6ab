//! Copying a source file into a replica: the store's hot path.
//!
//! The source is never mapped (a writer truncating it would raise SIGBUS in
//! the daemon): it is read with `pread`, `splice` or `sendfile`
//! (`copy_file_range` from another filesystem into tmpfs is EXDEV on current
//! kernels). The destination is written with `pwrite`, by those
//! kernel-side copies, or by `pread` straight into a shared mapping of the
//! replica. The range is cut into chunks of at most [`CHUNK`] bytes that
//! worker threads take in turn; between chunks each worker checks the abort
//! flag the write fence sets. Every method is kept selectable
//! ([`CopyMethod`]); `benches/copy.rs` measures them and [`CopyMethod::DEFAULT`]
//! is the fastest there.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// The most bytes copied between two checks of the abort flag.
pub const CHUNK: u64 = 2 << 20;
/// Files at least this large are copied by several threads.
pub const PARALLEL_MIN: u64 = 32 << 20;
/// The bounce buffer of [`CopyMethod::PreadPwrite`]: small enough to stay
/// in a core's L2 cache between the read and the write.
const BOUNCE: usize = 256 << 10;
/// The pipe size asked for by [`CopyMethod::Splice`] (the default
/// `/proc/sys/fs/pipe-max-size`).
const PIPE_SIZE: libc::c_int = 1 << 20;

/// How the bytes travel from the source to the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CopyMethod {
    /// `pread` from the source straight into a shared, writable mapping of
    /// the replica (one copy; pages are populated chunk by chunk with
    /// `MADV_POPULATE_WRITE`, which fails cleanly when the store is full).
    PreadMapped,
    /// `pread` into a small buffer, `pwrite` to the replica (two copies).
    PreadPwrite,
    /// `splice` source -> pipe -> replica, with explicit offsets on both
    /// files (the pipe takes page references; one copy).
    Splice,
    /// `sendfile` with a source offset, each worker writing through its own
    /// open file description of the replica.
    Sendfile,
}

impl CopyMethod {
    /// Every method, in the order the bench reports them.
    pub const ALL: [CopyMethod; 4] = [
        CopyMethod::PreadMapped,
        CopyMethod::PreadPwrite,
        CopyMethod::Splice,
        CopyMethod::Sendfile,
    ];

    /// The fastest in `benches/copy.rs` on the reference machine (2-core
    /// VM, kernel 6.18; figures in BENCHMARKS.md): `splice` is at or near
    /// the top on tmpfs with 4 KiB pages (~1.3x `cp`, bounded by shmem page
    /// allocation under the inode lock), with `huge=within_size` (~5.5 GB/s)
    /// and on memfd; it needs no second open of the replica (`sendfile`
    /// does) and no page-table work (`pread-mapped` is the slowest with
    /// 4 KiB pages, where every page costs a fault).
    pub const DEFAULT: CopyMethod = CopyMethod::Splice;

    /// The name used in logs, the bench and `FromStr`.
    pub fn name(self) -> &'static str {
        match self {
            CopyMethod::PreadMapped => "pread-mapped",
            CopyMethod::PreadPwrite => "pread-pwrite",
            CopyMethod::Splice => "splice",
            CopyMethod::Sendfile => "sendfile",
        }
    }

    /// Whether the method writes through a mapping of the replica.
    pub fn needs_mapping(self) -> bool {
        self == CopyMethod::PreadMapped
    }
}

impl Default for CopyMethod {
    fn default() -> Self {
        CopyMethod::DEFAULT
    }
}

impl fmt::Display for CopyMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CopyMethod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CopyMethod::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = CopyMethod::ALL.iter().map(|m| m.name()).collect();
                format!("unknown copy method {s:?}; known: {}", names.join(", "))
            })
    }
}

/// Why a copy stopped. The store turns these into `crate::Error` with the
/// source path, replica and node.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The abort flag was set (a writer opened the source).
    #[error("aborted: the source was opened for writing")]
    Aborted,
    /// The source ended before `len` bytes.
    #[error("the source ended at byte {at}")]
    Shrank { at: u64 },
    /// The replica's filesystem is full.
    #[error("no space left for the replica: {0}")]
    NoSpace(io::Error),
    /// Reading the source failed.
    #[error("reading the source: {0}")]
    Read(io::Error),
    /// Writing the replica failed (or a kernel-side copy failed).
    #[error("writing the replica: {0}")]
    Write(io::Error),
}

impl CopyError {
    /// Which error to report when several workers failed: the one that says
    /// most about the cause.
    fn rank(&self) -> u8 {
        match self {
            CopyError::NoSpace(_) => 4,
            CopyError::Shrank { .. } => 3,
            CopyError::Read(_) | CopyError::Write(_) => 2,
            CopyError::Aborted => 1,
        }
    }
}

/// A shared mapping of a file, unmapped on drop. Only its address is ever
/// handed to syscalls: the daemon's own code never loads or stores through
/// it, so a concurrent truncate cannot raise SIGBUS in the daemon.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain process memory owned by this value; it is
// only passed by address to syscalls, which the kernel serialises as needed.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` gives no access to the bytes themselves.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `mmap(NULL, len, prot, MAP_SHARED | extra, fd, 0)`. `len` must be
    /// non-zero.
    pub fn shared(
        fd: BorrowedFd<'_>,
        len: usize,
        prot: libc::c_int,
        extra: libc::c_int,
    ) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED), so no
        // existing memory is replaced; fd is valid for the call.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED | extra,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len })
    }

    /// The mapping's first byte.
    pub fn as_ptr(&self) -> *mut libc::c_void {
        self.ptr
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty mappings are refused by [`Mapping::shared`].
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address `off` bytes in; `off` must be within the mapping.
    fn at(&self, off: u64) -> *mut u8 {
        debug_assert!(off <= self.len as u64);
        // SAFETY: callers stay within [0, len], so the result is inside (or
        // one past) the same allocation.
        unsafe { self.ptr.cast::<u8>().add(off as usize) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned and nothing else
        // unmaps them.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// One copy: `len` bytes from offset 0 of `src` to offset 0 of `dst`.
#[derive(Debug)]
pub struct CopyJob<'a> {
    pub src: BorrowedFd<'a>,
    pub dst: BorrowedFd<'a>,
    /// A writable shared mapping of `dst` covering `len`; required by
    /// [`CopyMethod::PreadMapped`].
    pub dst_map: Option<&'a Mapping>,
    pub len: u64,
    pub method: CopyMethod,
    /// Workers for files of at least [`PARALLEL_MIN`] bytes.
    pub threads: usize,
    /// Set by the write fence; checked between chunks.
    pub abort: &'a AtomicBool,
}

/// Run `job`. Returns only after every worker has stopped.
pub fn copy(job: &CopyJob<'_>) -> Result<(), CopyError> {
    if job.abort.load(Ordering::Acquire) {
        return Err(CopyError::Aborted);
    }
    if job.len == 0 {
        return Ok(());
    }
    if job.method.needs_mapping() {
        match job.dst_map {
            Some(m) if m.len() as u64 >= job.len => {}
            _ => {
                return Err(CopyError::Write(io::Error::other(
                    "pread-mapped needs a mapping of the whole replica",
                )))
            }
        }
    }
    let chunks = job.len.div_ceil(CHUNK);
    let threads = if job.len >= PARALLEL_MIN {
        (job.threads.max(1) as u64).min(chunks) as usize
    } else {
        1
    };
    let shared = Shared {
        next: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
    };
    if threads == 1 {
        worker(job, &shared);
    } else {
        std::thread::scope(|s| {
            let mut spawned = 0;
            for i in 1..threads {
                let shared = &shared;
                let spawn = std::thread::Builder::new()
                    .name(format!("replicad-copy{i}"))
                    .spawn_scoped(s, move || worker(job, shared));
                match spawn {
                    Ok(_) => spawned += 1,
                    Err(e) => {
                        crate::warn_limited!(
                            "cannot start a copy thread ({e}); copying with {spawned}"
                        );
                        break;
                    }
                }
            }
            worker(job, &shared);
        });
    }
    match shared.error.into_inner() {
        Ok(None) => Ok(()),
        Ok(Some(e)) => Err(e),
        Err(poisoned) => match poisoned.into_inner() {
            Some(e) => Err(e),
            None => Err(CopyError::Write(io::Error::other("a copy thread panicked"))),
        },
    }
}

struct Shared {
    next: AtomicU64,
    stop: AtomicBool,
    error: Mutex<Option<CopyError>>,
}

impl Shared {
    fn fail(&self, e: CopyError) {
        self.stop.store(true, Ordering::Release);
        let mut slot = match self.error.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if slot.as_ref().is_none_or(|old| e.rank() > old.rank()) {
            *slot = Some(e);
        }
    }
}

/// What one worker owns for its method.
enum Lane {
    Mapped,
    Bounce(Vec<u8>),
    Pipe { r: OwnedFd, w: OwnedFd, size: usize },
    Reopened(OwnedFd),
}

fn worker(job: &CopyJob<'_>, shared: &Shared) {
    let mut lane = match Lane::new(job) {
        Ok(l) => l,
        Err(e) => return shared.fail(e),
    };
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        if job.abort.load(Ordering::Acquire) {
            return shared.fail(CopyError::Aborted);
        }
        let off = shared.next.fetch_add(CHUNK, Ordering::Relaxed);
        if off >= job.len {
            return;
        }
        let n = CHUNK.min(job.len - off);
        if let Err(e) = lane.copy_chunk(job, off, n) {
            return shared.fail(e);
        }
    }
}

impl Lane {
    fn new(job: &CopyJob<'_>) -> Result<Lane, CopyError> {
        Ok(match job.method {
            CopyMethod::PreadMapped => Lane::Mapped,
            CopyMethod::PreadPwrite => Lane::Bounce(vec![0u8; BOUNCE]),
            CopyMethod::Splice => {
                let (r, w) = pipe().map_err(CopyError::Write)?;
                // SAFETY: fcntl on a valid pipe fd with an integer argument.
                let size = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
                let size = if size > 0 { size as usize } else { 64 << 10 };
                Lane::Pipe { r, w, size }
            }
            CopyMethod::Sendfile => Lane::Reopened(reopen_for_write(job.dst)?),
        })
    }

    fn copy_chunk(&mut self, job: &CopyJob<'_>, off: u64, n: u64) -> Result<(), CopyError> {
        match self {
            Lane::Mapped => match job.dst_map {
                Some(map) => pread_mapped(job.src, job.dst, map, off, n),
                None => Err(CopyError::Write(io::Error::from_raw_os_error(libc::EINVAL))),
            },
            Lane::Bounce(buf) => pread_pwrite(job.src, job.dst, buf, off, n),
            Lane::Pipe { r, w, size } => splice_chunk(job.src, job.dst, r, w, *size, off, n),
            Lane::Reopened(dst) => sendfile_chunk(job.src, dst, off, n),
        }
    }
}

/// The error of the last failed call, retrying on EINTR is left to callers.
fn last() -> io::Error {
    io::Error::last_os_error()
}

fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

fn write_error(e: io::Error) -> CopyError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => CopyError::NoSpace(e),
        _ => CopyError::Write(e),
    }
}

/// `pread` that retries EINTR and reports 0 (end of file) as `Shrank`.
fn pread_some(src: BorrowedFd<'_>, buf: *mut u8, n: usize, off: u64) -> Result<usize, CopyError> {
    loop {
        // SAFETY: callers pass a buffer valid for writes of n bytes (their
        // own Vec, or a chunk of a live writable mapping of the replica; the
        // kernel reports EFAULT if that mapping cannot take the bytes).
        let r = unsafe { libc::pread(src.as_raw_fd(), buf.cast(), n, off as libc::off_t) };
        if r > 0 {
            return Ok(r as usize);
        }
        if r == 0 {
            return Err(CopyError::Shrank { at: off });
        }
        let e = last();
        if !interrupted(&e) {
            return Err(CopyError::Read(e));
        }
    }
}

fn pread_mapped(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    map: &Mapping,
    off: u64,
    n: u64,
) -> Result<(), CopyError> {
    populate_write(dst, map, off, n)?;
    let mut done = 0;
    while done < n {
        let at = off + done;
        match pread_some(src, map.at(at), (n - done) as usize, at) {
            Ok(r) => done += r as u64,
            // The kernel could not write into the replica's pages.
            Err(CopyError::Read(e)) if e.raw_os_error() == Some(libc::EFAULT) => {
                return Err(mapped_fault(dst, e, n - done))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Allocate the replica's pages for `[off, off + n)` before copying into
/// them, so a full store is an error here rather than a fault later.
fn populate_write(dst: BorrowedFd<'_>, map: &Mapping, off: u64, n: u64) -> Result<(), CopyError> {
    // The mapping starts page-aligned and every chunk starts at a multiple
    // of CHUNK, so `off` is page-aligned too.
    loop {
        // SAFETY: the range lies inside our writable shared mapping;
        // MADV_POPULATE_WRITE only faults its pages in (as writes would).
        let rc =
            unsafe { libc::madvise(map.at(off).cast(), n as usize, libc::MADV_POPULATE_WRITE) };
        if rc == 0 {
            return Ok(());
        }
        let e = last();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // Kernels before 5.14: pread's own faults populate instead.
            Some(libc::EINVAL) => return Ok(()),
            Some(libc::EFAULT) => return Err(mapped_fault(dst, e, n)),
            _ => return Err(write_error(e)),
        }
    }
}

/// A fault writing the replica's mapping: the store is full (tmpfs returns
/// ENOSPC to the fault, which becomes SIGBUS/EFAULT), or something else.
fn mapped_fault(dst: BorrowedFd<'_>, e: io::Error, needed: u64) -> CopyError {
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: st is valid for writes; dst is a valid fd.
    let rc = unsafe { libc::fstatvfs(dst.as_raw_fd(), &mut st) };
    if rc == 0 && st.f_blocks > 0 && (st.f_bavail as u64).saturating_mul(st.f_frsize) < needed {
        CopyError::NoSpace(io::Error::from_raw_os_error(libc::ENOSPC))
    } else {
        CopyError::Write(e)
    }
}

fn pwrite_all(dst: BorrowedFd<'_>, buf: &[u8], off: u64) -> Result<(), CopyError> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: rest is a valid buffer of rest.len() bytes.
        let w = unsafe {
            libc::pwrite(
                dst.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                (off + done as u64) as libc::off_t,
            )
        };
        if w > 0 {
            done += w as usize;
        } else if w == 0 {
            return Err(CopyError::Write(io::ErrorKind::WriteZero.into()));
        } else {
            let e = last();
            if !interrupted(&e) {
                return Err(write_error(e));
            }
        }
    }
    Ok(())
}

fn pread_pwrite(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    buf: &mut [u8],
    off: u64,
    n: u64,
) -> Result<(), CopyError> {
    let mut done = 0;
    while done < n {
        let want = (n - done).min(buf.len() as u64) as usize;
        let at = off + done;
        let got = pread_some(src, buf.as_mut_ptr(), want, at)?;
        pwrite_all(dst, &buf[..got], at)?;
        done += got as u64;
    }
    Ok(())
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is valid for two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(last());
    }
    // SAFETY: pipe2 returned two fresh fds that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[allow(clippy::too_many_arguments)]
fn splice_chunk(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    r: &OwnedFd,
    w: &OwnedFd,
    pipe_size: usize,
    off: u64,
    n: u64,
) -> Result<(), CopyError> {
    let mut off_in = off as libc::loff_t;
    let mut off_out = off as libc::loff_t;
    let end = (off + n) as libc::loff_t;
    while off_in < end {
        let want = ((end - off_in) as usize).min(pipe_size);
        // SAFETY: valid fds; off_in is a valid loff_t the kernel advances.
        let got = unsafe {
            libc::splice(
                src.as_raw_fd(),
                &mut off_in,
                w.as_raw_fd(),
                std::ptr::null_mut(),
                want,
                libc::SPLICE_F_MOVE,
            )
        };
        if got == 0 {
            return Err(CopyError::Shrank { at: off_in as u64 });
        }
        if got < 0 {
            let e = last();
            if interrupted(&e) {
                continue;
            }
            return Err(CopyError::Read(e));
        }
        let mut left = got as usize;
        while left > 0 {
            // SAFETY: valid fds; off_out is a valid loff_t the kernel
            // advances.
            let put = unsafe {
                libc::splice(
                    r.as_raw_fd(),
                    std::ptr::null_mut(),
                    dst.as_raw_fd(),
                    &mut off_out,
                    left,
                    libc::SPLICE_F_MOVE,
                )
            };
            if put > 0 {
                left -= put as usize;
            } else if put == 0 {
                return Err(CopyError::Write(io::ErrorKind::WriteZero.into()));
            } else {
                let e = last();
                if !interrupted(&e) {
                    return Err(write_error(e));
                }
            }
        }
    }
    Ok(())
}

/// A second open file description of `dst`, so that a worker's `sendfile`
/// writes at its own file position.
fn reopen_for_write(dst: BorrowedFd<'_>) -> Result<OwnedFd, CopyError> {
    use std::os::unix::ffi::OsStrExt;
    let path = replicad_procfs::ProcReader::default().self_fd_path(dst.as_raw_fd());
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| CopyError::Write(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: path is NUL-terminated; open returns a fresh fd or -1.
    let fd = unsafe { libc::open(path.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(CopyError::Write(last()));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sendfile_chunk(src: BorrowedFd<'_>, dst: &OwnedFd, off: u64, n: u64) -> Result<(), CopyError> {
    // SAFETY: lseek on a valid fd.
    if unsafe { libc::lseek(dst.as_raw_fd(), off as libc::off_t, libc::SEEK_SET) } < 0 {
        return Err(CopyError::Write(last()));
    }
    let mut off_in = off as libc::off_t;
    let end = (off + n) as libc::off_t;
    while off_in < end {
        // SAFETY: valid fds; off_in is a valid off_t the kernel advances.
        let got = unsafe {
            libc::sendfile(
                dst.as_raw_fd(),
                src.as_raw_fd(),
                &mut off_in,
                (end - off_in) as usize,
            )
        };
        if got == 0 {
            return Err(CopyError::Shrank { at: off_in as u64 });
        }
        if got < 0 {
            let e = last();
            if !interrupted(&e) {
                return Err(write_error(e));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn source(bytes: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile_in("/var/tmp").unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn run(
        method: CopyMethod,
        src: &std::fs::File,
        dst: &std::fs::File,
        len: u64,
        abort: &AtomicBool,
    ) -> Result<(), CopyError> {
        dst.set_len(len).unwrap();
        let map = (len > 0).then(|| {
            Mapping::shared(
                dst.as_fd(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                0,
            )
            .unwrap()
        });
        copy(&CopyJob {
            src: src.as_fd(),
            dst: dst.as_fd(),
            dst_map: map.as_ref(),
            len,
            method,
            threads: 3,
            abort,
        })
    }

    #[test]
    fn names_round_trip() {
        for m in CopyMethod::ALL {
            assert_eq!(m.name().parse::<CopyMethod>().unwrap(), m);
        }
        assert!("memcpy".parse::<CopyMethod>().is_err());
        assert_eq!(CopyMethod::default(), CopyMethod::DEFAULT);
    }

    #[test]
    fn every_method_copies_exactly() {
        let no = AtomicBool::new(false);
        for len in [0usize, 1, 4095, 4097, (2 << 20) + 3, (33 << 20) + 5] {
            let bytes = pattern(len, len as u64);
            let src = source(&bytes);
            for m in CopyMethod::ALL {
                let mut dst = tempfile::tempfile_in("/dev/shm").unwrap();
                run(m, &src, &dst, len as u64, &no).unwrap_or_else(|e| panic!("{m} {len}: {e}"));
                let mut got = Vec::new();
                dst.rewind().unwrap();
                dst.read_to_end(&mut got).unwrap();
                assert!(got == bytes, "{m}: {len} bytes differ");
            }
        }
    }

    #[test]
    fn short_source_is_shrank_and_abort_is_aborted() {
        let src = source(&pattern(5000, 7));
        for m in CopyMethod::ALL {
            let dst = tempfile::tempfile_in("/dev/shm").unwrap();
            match run(m, &src, &dst, 9000, &AtomicBool::new(false)) {
                Err(CopyError::Shrank { at }) => assert!((4096..=5000).contains(&at), "{m}: {at}"),
                other => panic!("{m}: {other:?}"),
            }
            let dst = tempfile::tempfile_in("/dev/shm").unwrap();
            assert!(matches!(
                run(m, &src, &dst, 5000, &AtomicBool::new(true)),
                Err(CopyError::Aborted)
            ));
        }
    }
}
