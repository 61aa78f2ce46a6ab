//! The NUMA topology from sysfs text (`node/online`, each node's
//! `cpulist`, `meminfo` and `distance`; `cpu/online` and `/proc/meminfo`
//! when NUMA is off), read by `SysfsReader` from a scratch tree: never
//! panics, and a topology that reads keeps its invariants.
//!
//! The input is files separated by NUL bytes, each its path (one of
//! [`FILES`]) on the first line and its text after; a part naming another
//! path is ignored. The tree is `replicad-fuzz-<pid>/sysfs` under the temp
//! dir (`$TMPDIR`: scripts/fuzz.sh makes it a scratch folder in
//! /dev/shm).
#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use replicad_replicator::topology::SysfsReader;

/// The files the reader reads, relative to its root (nodes 0 to 3).
const FILES: &[&str] = &[
    "sys/devices/system/node/online",
    "sys/devices/system/node/node0/cpulist",
    "sys/devices/system/node/node0/meminfo",
    "sys/devices/system/node/node0/distance",
    "sys/devices/system/node/node1/cpulist",
    "sys/devices/system/node/node1/meminfo",
    "sys/devices/system/node/node1/distance",
    "sys/devices/system/node/node2/cpulist",
    "sys/devices/system/node/node2/meminfo",
    "sys/devices/system/node/node2/distance",
    "sys/devices/system/node/node3/cpulist",
    "sys/devices/system/node/node3/meminfo",
    "sys/devices/system/node/node3/distance",
    "sys/devices/system/cpu/online",
    "proc/meminfo",
];

/// The root of the scratch tree; `None` if it cannot be named.
fn scratch() -> Option<&'static PathBuf> {
    static ROOT: OnceLock<Option<PathBuf>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("replicad-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        Some(dir.join("sysfs"))
    })
    .as_ref()
}

fuzz_target!(|data: &[u8]| {
    let Some(root) = scratch() else {
        return;
    };
    let _ = std::fs::remove_dir_all(root);
    for part in data.split(|&b| b == 0) {
        let (name, text) = match part.iter().position(|&b| b == b'\n') {
            Some(i) => (&part[..i], &part[i + 1..]),
            None => (part, &[][..]),
        };
        let Some(file) = FILES.iter().find(|f| f.as_bytes() == name) else {
            continue;
        };
        let path = root.join(file);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::write(&path, text);
    }
    let Ok(topology) = SysfsReader::new(root).read() else {
        return;
    };
    let nodes = &topology.nodes;
    assert!(!nodes.is_empty());
    assert!(nodes.windows(2).all(|w| w[0].id < w[1].id));
    for node in nodes {
        assert_eq!(node.distances.len(), nodes.len());
        assert!(node.cpus.windows(2).all(|w| w[0] < w[1]));
    }
});
