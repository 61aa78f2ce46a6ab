//! CPU lists from sysfs and /proc/<pid>/status: never panic, and a parsed
//! list formats and parses back to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use replicad_replicator::topology::sysfs::{format_cpulist, parse_cpulist};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cpus) = parse_cpulist(text) {
            assert_eq!(parse_cpulist(&format_cpulist(&cpus)).ok(), Some(cpus));
        }
    }
});
