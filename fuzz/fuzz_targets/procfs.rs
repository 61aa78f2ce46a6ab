//! /proc/<pid>/{stat,status,cgroup,numa_maps,mountinfo,fdinfo,auxv} text
//! (hostile /proc contents, or a hostile comm): never panic, and what
//! parses keeps its invariants.
#![no_main]
use libfuzzer_sys::fuzz_target;
use replicad_procfs::{
    parse_auxv, parse_cgroup, parse_cpus_allowed, parse_fdinfo, parse_mountinfo, parse_numa_maps,
    parse_numa_maps_of, parse_stat, parse_status, unescape_octal, AT_NULL,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = parse_auxv(data) {
        assert!(v.len() <= data.len() / 16);
        assert!(v.iter().all(|&(k, _)| k != AT_NULL));
    }
    let text = String::from_utf8_lossy(data);
    if let Ok(s) = parse_stat(&text) {
        // The comm is all between the first '(' and the last ')'.
        assert!(text.contains(&format!("({})", s.comm)));
    }
    if let Ok(s) = parse_status(&text) {
        assert!(s.cpus_allowed.windows(2).all(|w| w[0] < w[1]));
    }
    let _ = parse_cpus_allowed(&text);
    if let Ok(c) = parse_cgroup(&text) {
        assert!(!c.is_empty());
    }
    if let Ok(all) = parse_numa_maps(&text) {
        // The lines a filter keeps are those lines of the whole, parsed
        // the same way (the scanner asks for a few of each process's).
        let odd = parse_numa_maps_of(&text, |s| s % 2 == 1);
        let want: Vec<_> = all.into_iter().filter(|e| e.start % 2 == 1).collect();
        assert_eq!(odd.ok(), Some(want));
    }
    let _ = parse_mountinfo(&text);
    let _ = parse_fdinfo(&text);
    assert!(unescape_octal(&text).len() <= text.len() * 3);
});
