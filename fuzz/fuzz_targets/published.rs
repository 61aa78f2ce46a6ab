//! The published replica set as a shim reads it, from arbitrary file
//! contents: opening either refuses the file or gives a reader whose
//! lookups never panic and always end.
#![no_main]
use libfuzzer_sys::fuzz_target;
use replicad_wire::published::Reader;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("replicad-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("replicas.set");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(reader) = Reader::open(&path) {
        for (dev, ino) in [(0, 1), (1, 2), (u64::MAX, u64::MAX), (2049, 12345)] {
            let _ = reader.lookup(dev, ino);
            let _ = reader.has_replica_on(dev, ino, 0);
            let _ = reader.has_replica_on(dev, ino, 70);
        }
    }
});
