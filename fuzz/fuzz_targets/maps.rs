//! /proc/<pid>/maps and smaps text (hostile /proc contents): never panic;
//! a parsed line keeps end > start and four valid permission bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use replicad_procfs::{parse_smaps, MapsLine};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for line in text.lines() {
            if let Some(l) = MapsLine::parse(line) {
                assert!(l.end > l.start);
                assert!(l.perms_str().len() == 4);
            }
        }
        if let Ok(entries) = parse_smaps(text) {
            assert!(entries.iter().all(|e| e.end > e.start));
        }
    }
});
