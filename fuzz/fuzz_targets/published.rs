//! The published replica set as a shim reads it, from arbitrary file
//! contents: opening either refuses the file or gives a reader whose
//! lookups never panic and always end. The keys looked up are the ones the
//! file's own slots name (so probes reach the slots that match), then a
//! few fixed ones.
//!
//! The file is `replicad-fuzz-<pid>/replicas.set` under the temp dir
//! (`$TMPDIR`: scripts/fuzz.sh makes it a scratch folder in
//! /dev/shm).
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use replicad_wire::published::{Reader, ENTRY_LEN, HEADER_LEN};

/// The scratch file every input is written to; `None` if its directory
/// cannot be made.
fn scratch() -> Option<&'static PathBuf> {
    static PATH: OnceLock<Option<PathBuf>> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("replicad-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        Some(dir.join("replicas.set"))
    })
    .as_ref()
}

/// Little-endian word `i` of `bytes`, 0 past its end.
fn word(bytes: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(b) = bytes.get(i * 8..i * 8 + 8) {
        w.copy_from_slice(b);
    }
    u64::from_le_bytes(w)
}

/// Slots of the file whose keys are looked up, at most.
const LISTED_KEYS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some(path) = scratch() else {
        return;
    };
    if std::fs::write(path, data).is_err() {
        return;
    }
    let Ok(reader) = Reader::open(path) else {
        return;
    };
    let listed = data
        .get(HEADER_LEN..)
        .unwrap_or(&[])
        .chunks_exact(ENTRY_LEN)
        .take(LISTED_KEYS)
        .map(|slot| (word(slot, 0), word(slot, 1)));
    let fixed = [(0, 1), (1, 2), (u64::MAX, u64::MAX), (2049, 12345)];
    for (dev, ino) in listed.chain(fixed) {
        let _ = reader.lookup(dev, ino);
        let _ = reader.has_replica_on(dev, ino, 0);
        let _ = reader.has_replica_on(dev, ino, 70);
    }
    let _ = reader.revoking();
    let _ = reader.is_retired();
});
