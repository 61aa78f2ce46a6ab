//! `/proc/<pid>/pagemap` (one native-endian u64 per page) as
//! `written_pages` reads it, for any range: never panics, always ends, and
//! counts no more pages than the range holds or the file has entries for.
//!
//! The input is the range's start and end (two native-endian u64), then
//! the file's entries. The file is `replicad-fuzz-<pid>/pagemap` under the
//! temp dir (`$TMPDIR`: scripts/fuzz.sh makes it a scratch folder in
//! /dev/shm).
#![no_main]
use std::fs::File;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use replicad_procfs::written_pages;

/// The page size `written_pages` indexes pagemap by.
const PAGE: u64 = 4096;

/// The scratch file every input is written to; `None` if it cannot be made.
fn scratch() -> Option<&'static File> {
    static FILE: OnceLock<Option<File>> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("replicad-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("pagemap"))
            .ok()
    })
    .as_ref()
}

fn word(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(b) = bytes.get(at..at + 8) {
        w.copy_from_slice(b);
    }
    u64::from_ne_bytes(w)
}

fuzz_target!(|data: &[u8]| {
    use std::os::unix::fs::FileExt;
    let Some(file) = scratch() else {
        return;
    };
    let (start, end) = (word(data, 0), word(data, 8));
    let entries = data.get(16..).unwrap_or(&[]);
    if file.set_len(0).is_err() || file.write_all_at(entries, 0).is_err() {
        return;
    }
    let Ok(written) = written_pages(file, start, end) else {
        return;
    };
    let in_range = end.div_ceil(PAGE).saturating_sub(start / PAGE);
    assert!(written <= in_range, "{written} pages of {in_range}");
    assert!(written <= (entries.len() / 8) as u64, "{written} pages");
});
