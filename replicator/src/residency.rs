//! Where a file's page cache lives: how many of its pages are resident, on
//! which NUMA node, and moving them to another node (issue 11: "the page
//! cache is stuck on the wrong node").
//!
//! ```text
//!  window of the file (64 Ki pages) ── mmap PROT_READ MAP_SHARED
//!     └─ mincore: which pages are cached ── fstat: clamp to the size now
//!         └─ MADV_POPULATE_READ each resident run: map them into our page
//!            table (cached, so no I/O); EFAULT past EOF, never SIGBUS
//!             └─ move_pages in batches of 1024: query, or move to a node
//!  munmap ── next window
//! ```
//!
//! Nothing here touches the mapped memory itself: the kernel reads the
//! mapping (mincore, madvise, move_pages), so a file truncated under us
//! gives an error code or a short count, not a SIGBUS. Memory stays bounded
//! for any file size: one window is mapped at a time, with one byte of
//! `mincore` output per page and 1024 addresses per `move_pages` call.
//!
//! Pages the kernel evicts between `mincore` and the populate are read back
//! in by it (a small race; nothing else ever reads a page that was not
//! cached). `mincore` reports page-cache residency only to a caller that
//! owns the file, may write it, or has `CAP_FOWNER`; for others it reports
//! only pages already mapped in our page tables (so: fewer pages seen).
//! Moving pages other processes map too (`MPOL_MF_MOVE_ALL`) needs
//! `CAP_SYS_NICE`; without it only the pages no one else maps move.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::numa;
use crate::{Error, Result};

/// Pages of the file looked at in one mapping.
const WINDOW_PAGES: usize = 64 * 1024;
/// Addresses given to one `move_pages` call.
const BATCH: usize = 1024;

/// How much of a file's page cache is resident, and where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Residency {
    /// The file's size in pages (rounded up).
    pub pages: u64,
    /// Pages resident in the page cache (the sum of `per_node`).
    pub resident: u64,
    /// Resident pages per NUMA node.
    pub per_node: BTreeMap<u32, u64>,
}

/// What one pass over a file found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Pass {
    /// Where the pages were before this pass.
    pub before: Residency,
    /// Pages moved to the target node.
    pub moved: u64,
    /// Pages already on the target node.
    pub already: u64,
    /// Pages that could not be moved (a negative status: `-EBUSY`, ...).
    pub failed: u64,
}

/// How many of `file`'s page-cache pages are resident on each NUMA node.
/// Reads nothing that is not cached already. A file truncated meanwhile
/// counts the pages up to its new size.
pub fn resident_pages(file: &File) -> Result<Residency> {
    pass(file, None)
        .map(|p| p.before)
        .map_err(|(step, source)| Error::PageCache { step, source })
}

/// One pass over `file`: find its resident pages and, with `to`, move them
/// to that node (`MPOL_MF_MOVE_ALL`). An error names the step that failed.
pub(crate) fn pass(file: &File, to: Option<u32>) -> Result<Pass, (&'static str, io::Error)> {
    let page = page_size();
    let size = file_size(file).map_err(|e| ("fstat", e))?;
    let mut out = Pass::default();
    out.before.pages = size.div_ceil(page as u64);
    let mut start: u64 = 0;
    while start < out.before.pages {
        let want = (out.before.pages - start).min(WINDOW_PAGES as u64) as usize;
        if !window(file, start, want, page, to, &mut out)? {
            break;
        }
        start += want as u64;
    }
    Ok(out)
}

/// One window of `count` pages from page `start`. False when the file
/// turned out shorter than the window (truncated): stop there.
fn window(
    file: &File,
    start: u64,
    count: usize,
    page: usize,
    to: Option<u32>,
    out: &mut Pass,
) -> Result<bool, (&'static str, io::Error)> {
    let offset = start
        .checked_mul(page as u64)
        .and_then(|o| libc::off_t::try_from(o).ok())
        .ok_or_else(|| ("mmap", io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
    let map = Mapping::new(file, offset, count * page).map_err(|e| ("mmap", e))?;
    let cached = map.mincore(count, page).map_err(|e| ("mincore", e))?;
    // Never go past the size as it is now, after mincore.
    let size = file_size(file).map_err(|e| ("fstat", e))?;
    let now = size
        .div_ceil(page as u64)
        .saturating_sub(start)
        .min(count as u64) as usize;
    let mut whole = now == count;
    let mut addrs: Vec<*const libc::c_void> = Vec::with_capacity(BATCH);
    let mut i = 0;
    while i < now {
        if cached[i] & 1 == 0 {
            i += 1;
            continue;
        }
        let run = i;
        while i < now && cached[i] & 1 != 0 {
            i += 1;
        }
        match map.populate(run * page, (i - run) * page) {
            Ok(()) => {}
            // Truncated since the fstat: the pages below the new end got
            // mapped, the rest is gone. Count what is there and stop.
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => whole = false,
            Err(e) => return Err(("madvise(MADV_POPULATE_READ)", e)),
        }
        for p in run..i {
            addrs.push(map.at(p * page));
            if addrs.len() == BATCH {
                batch(&addrs, to, out)?;
                addrs.clear();
            }
        }
        if !whole {
            break;
        }
    }
    batch(&addrs, to, out)?;
    Ok(whole)
}

/// Query (and with `to`, move) one batch of populated pages.
fn batch(
    addrs: &[*const libc::c_void],
    to: Option<u32>,
    out: &mut Pass,
) -> Result<(), (&'static str, io::Error)> {
    if addrs.is_empty() {
        return Ok(());
    }
    let nodes = numa::page_nodes(addrs).map_err(|e| ("move_pages (query)", e))?;
    // Every resident page goes to move_pages, those on the target already
    // too (a no-op for them; it reports the target node for both kinds, so
    // the query above tells them apart).
    let mut movers = Vec::new();
    let mut was_there = Vec::new();
    for (&addr, &node) in addrs.iter().zip(&nodes) {
        // Negative: not present (evicted meanwhile, or past a new EOF).
        let Ok(node) = u32::try_from(node) else {
            continue;
        };
        out.before.resident += 1;
        *out.before.per_node.entry(node).or_insert(0) += 1;
        if let Some(target) = to {
            movers.push(addr);
            was_there.push(node == target);
        }
    }
    if let (Some(target), false) = (to, movers.is_empty()) {
        // MOVE_ALL (pages other processes map too) needs CAP_SYS_NICE;
        // without it, move the pages only we map (flags 0).
        let status = match numa::move_pages_to(&movers, target, numa::MF_MOVE_ALL) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                numa::move_pages_to(&movers, target, 0)
            }
            r => r,
        }
        .map_err(|e| ("move_pages", e))?;
        for (s, there) in status.into_iter().zip(was_there) {
            match (u32::try_from(s).is_ok_and(|n| n == target), there) {
                (true, true) => out.already += 1,
                (true, false) => out.moved += 1,
                (false, _) => out.failed += 1,
            }
        }
    }
    Ok(())
}

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system; no memory is touched.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

fn file_size(file: &File) -> io::Result<u64> {
    Ok(file.metadata()?.len())
}

/// A read-only shared mapping of part of a file, unmapped on drop. Its
/// memory is never read from userspace (see the module docs).
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(file: &File, offset: libc::off_t, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh read-only mapping at an address the kernel picks;
        // no existing memory is affected. The fd is valid for the call.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len })
    }

    /// One `mincore` byte for each of the first `count` pages.
    fn mincore(&self, count: usize, page: usize) -> io::Result<Vec<u8>> {
        let mut vec = vec![0u8; count];
        let len = (count * page).min(self.len);
        // SAFETY: the range lies inside our mapping; `vec` holds one byte
        // per page of it. mincore only reads page-cache state.
        let rc = unsafe { libc::mincore(self.ptr, len, vec.as_mut_ptr()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(vec)
    }

    /// Map `[offset, offset + len)` of the mapping into our page tables
    /// (`MADV_POPULATE_READ`, Linux 5.14+): `EFAULT` where a fault would
    /// raise SIGBUS (past EOF), `EINVAL` on an older kernel.
    fn populate(&self, offset: usize, len: usize) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: the range lies inside our mapping (checked above); the
        // kernel faults it in as a read would, and reports a failed fault
        // as an error instead of a signal. Nothing of ours is written.
        let rc = unsafe {
            libc::madvise(
                self.ptr.cast::<u8>().add(offset).cast(),
                len,
                libc::MADV_POPULATE_READ,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The address `offset` bytes into the mapping (never dereferenced).
    fn at(&self, offset: usize) -> *const libc::c_void {
        self.ptr
            .cast::<u8>()
            .wrapping_add(offset)
            .cast_const()
            .cast()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by Mapping::new and is unmapped once;
        // no reference into it outlives it (only addresses for syscalls).
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::Write;
    use std::os::fd::AsRawFd;

    use super::*;

    /// `pages` pages written and read back (so cached) in `dir`.
    fn cached_file(dir: &std::path::Path, pages: usize) -> (tempfile::NamedTempFile, File) {
        let mut t = tempfile::NamedTempFile::new_in(dir).unwrap();
        t.write_all(&vec![7u8; pages * page_size()]).unwrap();
        t.as_file().sync_all().unwrap();
        let data = std::fs::read(t.path()).unwrap();
        assert_eq!(data.len(), pages * page_size());
        let f = File::open(t.path()).unwrap();
        (t, f)
    }

    fn drop_cache(f: &File) {
        // SAFETY: plain syscall on a valid fd; no memory is involved.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
    }

    #[test]
    fn a_cached_file_is_all_resident_on_node0_and_dontneed_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_t, f) = cached_file(dir.path(), 300);
        let r = resident_pages(&f).unwrap();
        assert_eq!(r.pages, 300);
        assert_eq!(r.resident, 300, "{r:?}");
        assert_eq!(r.per_node, BTreeMap::from([(0, 300)]));
        drop_cache(&f);
        let r = resident_pages(&f).unwrap();
        assert_eq!(r.pages, 300);
        assert!(r.resident < 300, "DONTNEED dropped nothing: {r:?}");
        assert_eq!(r.per_node.values().sum::<u64>(), r.resident);
    }

    #[test]
    fn looking_reads_nothing_in() {
        let dir = tempfile::tempdir().unwrap();
        let (_t, f) = cached_file(dir.path(), 64);
        drop_cache(&f);
        // SAFETY: plain syscall on a valid fd; no memory is involved.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        assert_eq!(rc, 0);
        // One page read back in (readahead off), the rest not cached.
        let mut byte = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut byte, 10 * page_size() as u64).unwrap();
        let first = resident_pages(&f).unwrap();
        assert!(
            (1..64).contains(&first.resident),
            "the page read is resident, not all: {first:?}"
        );
        let second = resident_pages(&f).unwrap();
        assert_eq!(first, second, "looking read pages in");
    }

    #[test]
    fn a_tmpfs_file_is_resident_and_a_partial_page_counts() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![1u8; 5 * page_size() + 1]).unwrap();
        let r = resident_pages(&File::open(&p).unwrap()).unwrap();
        assert_eq!((r.pages, r.resident), (6, 6), "{r:?}");
        assert_eq!(r.per_node, BTreeMap::from([(0, 6)]));
    }

    #[test]
    fn an_empty_or_truncated_file_is_all_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let (t, f) = cached_file(dir.path(), 8);
        t.as_file().set_len(0).unwrap();
        assert_eq!(resident_pages(&f).unwrap(), Residency::default());
        let empty = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        assert_eq!(
            resident_pages(&File::open(empty.path()).unwrap()).unwrap(),
            Residency::default()
        );
    }

    #[test]
    fn a_file_bigger_than_a_window_is_counted_across_windows() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let p = dir.path().join("f");
        let pages = WINDOW_PAGES + 3;
        std::fs::write(&p, vec![1u8; pages * page_size()]).unwrap();
        let r = resident_pages(&File::open(&p).unwrap()).unwrap();
        assert_eq!((r.pages, r.resident), (pages as u64, pages as u64));
    }

    #[test]
    fn truncating_while_a_window_is_mapped_gives_efault_not_sigbus() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![1u8; 16 * page_size()]).unwrap();
        let f = File::open(&p).unwrap();
        let map = Mapping::new(&f, 0, 16 * page_size()).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
        let e = map.populate(0, 16 * page_size()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT), "{e}");
        let nodes = numa::page_nodes(&[map.at(0)]).unwrap();
        assert!(nodes[0] < 0, "{nodes:?}");
    }
}
