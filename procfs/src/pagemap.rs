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
/// file-backed, or swapped out. Reads [`PAGEMAP_CHUNK`] entries per
/// `pread`; stops early at a short read (the end of the address space).
pub fn written_pages(pagemap: &std::fs::File, start: u64, end: u64) -> std::io::Result<u64> {
    let mut written = 0;
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
        for e in chunk.get(..got - got % 8).unwrap_or(&[]).chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(e);
            let v = u64::from_ne_bytes(w);
            let present = v & (1 << 63) != 0;
            let swapped = v & (1 << 62) != 0;
            let file = v & (1 << 61) != 0;
            if swapped || (present && !file) {
                written += 1;
            }
        }
        page += (got / 8) as u64;
    }
    Ok(written)
}
