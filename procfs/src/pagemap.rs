//! `/proc/<pid>/pagemap`: one native-endian u64 per virtual page (bit 63
//! present, 62 swapped, 61 file page or shared anonymous; see the kernel's
//! `Documentation/admin-guide/mm/pagemap.rst`).

use std::os::unix::fs::FileExt;

/// Entries read per `pread`.
pub const PAGEMAP_CHUNK: usize = 512;

/// The page size pagemap indexes by.
const PAGE: u64 = 4096;

/// Pages of `start..end` that hold private (anonymous) copies in `pagemap`
/// (opened by [`crate::ProcReader::pagemap`]): present and not
/// file-backed, or swapped out. Asked with `PAGEMAP_SCAN` (the kernel
/// skips the file pages: a hello's python text costs one ioctl, not 730
/// entries copied out); kernels without it are read [`PAGEMAP_CHUNK`]
/// entries per `pread`, stopping early at a short read (the end of the
/// address space).
pub fn written_pages(pagemap: &std::fs::File, start: u64, end: u64) -> std::io::Result<u64> {
    Ok(private_runs(pagemap, start, end)?
        .iter()
        .map(|(from, to)| (to - from) / PAGE)
        .sum())
}

/// `PAGEMAP_SCAN`'s argument (`struct pm_scan_arg`, Linux 6.7+), for
/// callers that make the ioctl with raw syscalls (the shim).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PmScanArg {
    /// `size_of::<PmScanArg>()`.
    pub size: u64,
    /// 0: only report.
    pub flags: u64,
    /// The range to scan, page-aligned.
    pub start: u64,
    /// One past its end.
    pub end: u64,
    /// Where the walk stopped (set by the kernel).
    pub walk_end: u64,
    /// Address of `vec_len` [`PageRegion`]s to fill.
    pub vec: u64,
    /// How many regions fit at `vec`.
    pub vec_len: u64,
    /// 0: no limit.
    pub max_pages: u64,
    /// Categories whose meaning is inverted in `category_mask`.
    pub category_inverted: u64,
    /// Pages must have all of these (after inversion).
    pub category_mask: u64,
    /// Pages must have at least one of these.
    pub category_anyof_mask: u64,
    /// Categories reported in each region.
    pub return_mask: u64,
}

/// One run of matching pages from `PAGEMAP_SCAN`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageRegion {
    /// First address of the run.
    pub start: u64,
    /// One past its end.
    pub end: u64,
    /// The categories asked for in `return_mask` that it has.
    pub categories: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
pub const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | (0x66 << 8) | 16;
/// A page of a file (not an anonymous copy).
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// A page in memory.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// A page in swap.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;

impl PmScanArg {
    /// A scan of `start..end` for private (anonymous) pages, present or
    /// swapped, into `vec_len` regions at `vec`.
    pub fn private_pages(start: u64, end: u64, vec: u64, vec_len: u64) -> PmScanArg {
        PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start,
            end,
            vec,
            vec_len,
            category_inverted: PAGE_IS_FILE,
            category_mask: PAGE_IS_FILE,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..PmScanArg::default()
        }
    }
}

/// Runs of private (anonymous) pages in `start..end` of the process whose
/// `pagemap` this is: present and not file-backed, or swapped; what a
/// `MAP_PRIVATE` file mapping holds where the process (or a debugger)
/// wrote. One `PAGEMAP_SCAN` ioctl per 64 runs; kernels without it (before
/// 6.7) are read entry by entry.
pub fn private_runs(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
) -> std::io::Result<Vec<(u64, u64)>> {
    scan_runs(pagemap, start, end, true)
}

/// Whether `start..end` holds any private page ([`private_runs`]), asked
/// with one `PAGEMAP_SCAN` that stops at the first. For ranges someone
/// else names: no entry-by-entry fallback (a kernel without the ioctl, or
/// a range it refuses, is an error, never a walk of the whole range).
pub fn has_private(pagemap: &std::fs::File, start: u64, end: u64) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut vec = [PageRegion::default(); 1];
    let mut arg = PmScanArg::private_pages(start, end, vec.as_mut_ptr() as u64, 1);
    arg.max_pages = 1;
    // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most one region into
    // `vec`, both live on this stack frame.
    let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n > 0)
}

/// Runs of pages in `start..end` that are in memory or swap, of any
/// kind: the pages a read would not have to fault in. Kernels without
/// `PAGEMAP_SCAN` get the whole range.
pub fn present_runs(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
) -> std::io::Result<Vec<(u64, u64)>> {
    scan_runs(pagemap, start, end, false)
}

fn scan_runs(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
    private: bool,
) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    const BATCH: usize = 64;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut from = start;
    while from < end {
        let mut vec = [PageRegion::default(); BATCH];
        let mut arg = PmScanArg::private_pages(from, end, vec.as_mut_ptr() as u64, BATCH as u64);
        if !private {
            arg.category_inverted = 0;
            arg.category_mask = 0;
        }
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len`
        // regions into `vec`, both live on this stack frame.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOTTY) | Some(libc::EINVAL) if private => {
                    runs_by_entries(pagemap, start, end)
                }
                Some(libc::ENOTTY) | Some(libc::EINVAL) => Ok(vec![(start, end)]),
                _ => Err(e),
            };
        }
        for r in vec.iter().take(n as usize) {
            match runs.last_mut() {
                Some(last) if last.1 == r.start => last.1 = r.end,
                _ => runs.push((r.start, r.end)),
            }
        }
        if arg.walk_end <= from || (n as usize) < BATCH {
            break;
        }
        from = arg.walk_end;
    }
    Ok(runs)
}

/// [`private_runs`] for kernels without `PAGEMAP_SCAN`.
fn runs_by_entries(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
) -> std::io::Result<Vec<(u64, u64)>> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; 8 * PAGEMAP_CHUNK];
    let mut page = start / PAGE;
    let last = end.div_ceil(PAGE);
    while page < last {
        let n = usize::try_from(last - page)
            .unwrap_or(PAGEMAP_CHUNK)
            .min(PAGEMAP_CHUNK);
        let Some(chunk) = buf.get_mut(..8 * n) else {
            break;
        };
        let Some(offset) = page.checked_mul(8) else {
            break;
        };
        let got = pagemap.read_at(chunk, offset)?;
        if got < 8 {
            break;
        }
        for (i, e) in chunk
            .get(..got - got % 8)
            .unwrap_or(&[])
            .chunks_exact(8)
            .enumerate()
        {
            let mut w = [0u8; 8];
            w.copy_from_slice(e);
            let v = u64::from_ne_bytes(w);
            let private = v & (1 << 62) != 0 || (v & (1 << 63) != 0 && v & (1 << 61) == 0);
            if private {
                let at = (page + i as u64) * PAGE;
                match runs.last_mut() {
                    Some(last) if last.1 == at => last.1 = at + PAGE,
                    _ => runs.push((at, at + PAGE)),
                }
            }
        }
        page += (got / 8) as u64;
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn private_runs_find_pages_written_through_mem_and_after_mprotect() {
        let pages = 8;
        let len = pages * PAGE as usize;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; len]).unwrap();
        // SAFETY: a private read-only mapping of our own temp file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        } as u64;
        assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
        for i in 0..pages as u64 {
            // SAFETY: inside our own mapping.
            unsafe { std::ptr::read_volatile((p + i * PAGE) as *const u8) };
        }
        // A debugger's write: through mem, into the read-only mapping.
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/proc/self/mem")
            .unwrap();
        mem.write_at(&[0xcc], p + 2 * PAGE + 5).unwrap();
        // And a write after mprotect, on two adjacent pages.
        // SAFETY: our own mapping.
        unsafe {
            libc::mprotect(
                (p + 5 * PAGE) as *mut libc::c_void,
                2 * PAGE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
            );
            *((p + 5 * PAGE) as *mut u8) = 1;
            *((p + 6 * PAGE + 9) as *mut u8) = 1;
        }
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let want = vec![(p + 2 * PAGE, p + 3 * PAGE), (p + 5 * PAGE, p + 7 * PAGE)];
        assert_eq!(private_runs(&pagemap, p, p + len as u64).unwrap(), want);
        assert_eq!(runs_by_entries(&pagemap, p, p + len as u64).unwrap(), want);
        assert_eq!(
            private_runs(&pagemap, p + 3 * PAGE, p + 5 * PAGE).unwrap(),
            vec![]
        );
        assert_eq!(written_pages(&pagemap, p, p + len as u64).unwrap(), 3);
        // Every page was touched: all of it is present.
        assert_eq!(
            present_runs(&pagemap, p, p + len as u64).unwrap(),
            vec![(p, p + len as u64)]
        );
        // SAFETY: our own mapping.
        unsafe { libc::munmap(p as *mut libc::c_void, len) };
    }
}
