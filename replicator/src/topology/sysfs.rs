//! NUMA topology from sysfs text, under a root path (production: `/`; tests:
//! a fixture tree holding verbatim kernel output).
//!
//! ```text
//!  <root>/sys/devices/system/node/online           0-3
//!  <root>/sys/devices/system/node/node<N>/cpulist  0-7,64-71
//!  <root>/sys/devices/system/node/node<N>/meminfo  Node 0 MemTotal:       24567812 kB
//!  <root>/sys/devices/system/node/node<N>/distance 10 21 21 21
//! ```
//!
//! A kernel built without NUMA has no `node` directory: the machine is then
//! one node 0 holding every CPU of `<root>/sys/devices/system/cpu/online` and
//! the memory of `<root>/proc/meminfo`.
//!
//! The parsers are pure functions over text so they can be fed hostile input;
//! every error names the file (or, for [`parse_cpulist`], quotes the text)
//! and what was wrong with it.

use std::fmt::Display;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{Node, Topology};
use crate::{Error, Result};

/// The root a production reader reads under.
pub const DEFAULT_ROOT: &str = "/";

use replicad_procfs::parse_cpulist as parse_list;
pub use replicad_procfs::{format_cpulist, MAX_LIST_ID};

/// The distance of a node to itself (ACPI SLIT convention, and what Linux
/// reports for a machine without a distance table).
pub const LOCAL_DISTANCE: u32 = 10;

/// `node` directory, relative to the root.
const NODE_DIR: &str = "sys/devices/system/node";
/// Online CPUs, relative to the root; read only when NUMA is off.
const CPU_ONLINE: &str = "sys/devices/system/cpu/online";
/// Machine memory, relative to the root; read only when NUMA is off.
const PROC_MEMINFO: &str = "proc/meminfo";

/// How much of a hostile text an error message quotes.
const QUOTE_CHARS: usize = 64;

/// Reads the NUMA topology from the sysfs tree under one root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsReader {
    root: PathBuf,
}

impl Default for SysfsReader {
    fn default() -> Self {
        SysfsReader::new(DEFAULT_ROOT)
    }
}

impl SysfsReader {
    /// A reader of the tree under `root` (`/` for this machine).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        SysfsReader { root: root.into() }
    }

    /// The root this reader reads under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The whole topology: every online node with its CPUs, memory and
    /// distance row. `source` is "sysfs".
    pub fn read(&self) -> Result<Topology> {
        let Some(ids) = self.online_nodes()? else {
            return self.read_numa_off();
        };
        // Every node's CPUs and memory before any distance row, so a node
        // that is listed but missing is reported as such, not as a row that
        // is too long on another node.
        let mut nodes = Vec::with_capacity(ids.len());
        for &id in &ids {
            nodes.push(Node {
                id,
                cpus: self.node_cpus(id)?,
                memory_bytes: self.node_memory(id)?,
                distances: Vec::new(),
            });
        }
        for node in &mut nodes {
            node.distances = self.node_distances(node.id, ids.len())?;
        }
        Topology::checked(nodes, "sysfs")
    }

    /// Online node numbers, ascending; `None` when the kernel has no NUMA
    /// (no `node` directory).
    pub fn online_nodes(&self) -> Result<Option<Vec<u32>>> {
        let dir = self.root.join(NODE_DIR);
        match fs::metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(file_error(&dir, "is not a directory")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_error(&dir, format_args!("cannot read: {e}"))),
        }
        let path = dir.join("online");
        let ids = parse_list(&read(&path)?).map_err(|e| file_error(&path, e))?;
        if ids.is_empty() {
            return Err(file_error(&path, "lists no online node"));
        }
        Ok(Some(ids))
    }

    /// CPUs of node `id`, ascending (empty for a memory-only node).
    pub fn node_cpus(&self, id: u32) -> Result<Vec<u32>> {
        let path = self.node_file(id, "cpulist");
        parse_list(&read(&path)?).map_err(|e| file_error(&path, e))
    }

    /// Memory of node `id` in bytes (`MemTotal` of its `meminfo`).
    pub fn node_memory(&self, id: u32) -> Result<u64> {
        let path = self.node_file(id, "meminfo");
        parse_node_meminfo(&read(&path)?, id).map_err(|e| file_error(&path, e))
    }

    /// Distance row of node `id`, which must have one entry per online node.
    pub fn node_distances(&self, id: u32, online: usize) -> Result<Vec<u32>> {
        let path = self.node_file(id, "distance");
        parse_distance_row(&read(&path)?, online).map_err(|e| file_error(&path, e))
    }

    /// Distance rows of the nodes `ids` (online nodes, ascending). A kernel
    /// without NUMA has no distance files: its one node 0 gets
    /// [`LOCAL_DISTANCE`].
    pub fn distances(&self, ids: &[u32]) -> Result<Vec<Vec<u32>>> {
        if self.online_nodes()?.is_none() {
            if ids == [0] {
                return Ok(vec![vec![LOCAL_DISTANCE]]);
            }
            let dir = self.root.join(NODE_DIR);
            return Err(file_error(
                &dir,
                format_args!("does not exist, so there are no distances for nodes {ids:?}"),
            ));
        }
        ids.iter()
            .map(|&id| self.node_distances(id, ids.len()))
            .collect()
    }

    /// One node 0 with every online CPU and all of the machine's memory.
    fn read_numa_off(&self) -> Result<Topology> {
        let cpu_path = self.root.join(CPU_ONLINE);
        let cpus = parse_list(&read(&cpu_path)?).map_err(|e| file_error(&cpu_path, e))?;
        if cpus.is_empty() {
            return Err(file_error(&cpu_path, "lists no online CPU"));
        }
        let mem_path = self.root.join(PROC_MEMINFO);
        let memory_bytes =
            parse_proc_meminfo(&read(&mem_path)?).map_err(|e| file_error(&mem_path, e))?;
        tracing::debug!(
            root = %self.root.display(),
            "no {NODE_DIR} directory: NUMA is off, one node 0"
        );
        Topology::checked(
            vec![Node {
                id: 0,
                cpus,
                memory_bytes,
                distances: vec![LOCAL_DISTANCE],
            }],
            "sysfs",
        )
    }

    fn node_file(&self, id: u32, name: &str) -> PathBuf {
        self.root
            .join(NODE_DIR)
            .join(format!("node{id}"))
            .join(name)
    }
}

/// Parse a kernel CPU list (`0-3,8-11`, `5`, empty; a trailing newline and
/// surrounding whitespace are fine), as found in sysfs `cpulist` files and
/// `Cpus_allowed_list` of `/proc/<pid>/status`. Returns the CPUs ascending,
/// each once. Refuses anything else (garbage, backwards ranges, numbers above
/// [`MAX_LIST_ID`]) with an error quoting the text.
pub fn parse_cpulist(text: &str) -> Result<Vec<u32>> {
    parse_list(text).map_err(Error::Topology)
}

/// `MemTotal` in bytes from a node's `meminfo`
/// (`Node 0 MemTotal:       24567812 kB`).
fn parse_node_meminfo(text: &str, node: u32) -> std::result::Result<u64, String> {
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let ["Node", id, "MemTotal:", rest @ ..] = fields.as_slice() else {
            continue;
        };
        if *id != node.to_string() {
            return Err(format!(
                "MemTotal line {} is for node {id}, not node {node}",
                quote(line)
            ));
        }
        return parse_kb(rest).map_err(|e| format!("MemTotal line {}: {e}", quote(line)));
    }
    Err(format!("no \"Node {node} MemTotal:\" line"))
}

/// `MemTotal` in bytes from `/proc/meminfo` (`MemTotal:        4810528 kB`).
fn parse_proc_meminfo(text: &str) -> std::result::Result<u64, String> {
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let ["MemTotal:", rest @ ..] = fields.as_slice() {
            return parse_kb(rest).map_err(|e| format!("MemTotal line {}: {e}", quote(line)));
        }
    }
    Err("no \"MemTotal:\" line".to_string())
}

/// `["24567812", "kB"]` -> bytes.
fn parse_kb(fields: &[&str]) -> std::result::Result<u64, String> {
    let [value, "kB"] = fields else {
        return Err("expected a number followed by kB".to_string());
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{} is not a number", quote(value)));
    }
    value
        .parse::<u64>()
        .ok()
        .and_then(|kb| kb.checked_mul(1024))
        .ok_or_else(|| format!("{value} kB does not fit in 64 bits of bytes"))
}

/// A node's `distance` row (`10 21 21 21`): one number per online node.
fn parse_distance_row(text: &str, online: usize) -> std::result::Result<Vec<u32>, String> {
    let mut row = Vec::new();
    for field in text.split_whitespace() {
        if !field.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("distance {} is not a number", quote(field)));
        }
        let distance = field
            .parse::<u32>()
            .map_err(|_| format!("distance {field} is too large"))?;
        row.push(distance);
    }
    if row.len() != online {
        return Err(format!(
            "has {} entries, expected {online} (one per online node)",
            row.len()
        ));
    }
    Ok(row)
}

/// Read a whole text file, or an error naming it.
fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| file_error(path, format_args!("cannot read: {e}")))
}

/// `Error::Topology` naming `path` and what was wrong with it.
fn file_error(path: &Path, what: impl Display) -> Error {
    Error::Topology(format!("{}: {what}", path.display()))
}

/// Quote (at most [`QUOTE_CHARS`] of) text from outside, escaped.
fn quote(text: &str) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(QUOTE_CHARS).collect();
    if chars.next().is_some() {
        format!("{head:?}...")
    } else {
        format!("{head:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/sysfs")
            .join(name)
    }

    fn read_fixture(name: &str) -> Result<Topology> {
        SysfsReader::new(fixture(name)).read()
    }

    /// The message of a fixture that must fail.
    fn fixture_error(name: &str) -> String {
        match read_fixture(name) {
            Ok(t) => panic!("{name} parsed, but must fail: {t:?}"),
            Err(Error::Topology(msg)) => msg,
            Err(e) => panic!("{name}: wrong error kind: {e}"),
        }
    }

    fn range(a: u32, b: u32) -> Vec<u32> {
        (a..=b).collect()
    }

    fn cat(parts: &[Vec<u32>]) -> Vec<u32> {
        parts.concat()
    }

    #[test]
    fn topology_fixture_1node() {
        let t = read_fixture("1node").unwrap();
        assert_eq!(t.source, "sysfs");
        assert_eq!(
            t.nodes,
            vec![Node {
                id: 0,
                cpus: vec![0, 1],
                memory_bytes: 4_810_528 * 1024,
                distances: vec![10],
            }]
        );
    }

    #[test]
    fn topology_fixture_2node() {
        let t = read_fixture("2node").unwrap();
        assert_eq!(t.node_list(), "0-1");
        assert_eq!(t.nodes[0].cpus, cat(&[range(0, 19), range(40, 59)]));
        assert_eq!(t.nodes[1].cpus, cat(&[range(20, 39), range(60, 79)]));
        assert_eq!(t.nodes[0].memory_bytes, 197_502_208 * 1024);
        assert_eq!(t.nodes[1].memory_bytes, 198_144_224 * 1024);
        assert_eq!(t.nodes[0].distances, vec![10, 21]);
        assert_eq!(t.nodes[1].distances, vec![21, 10]);
    }

    #[test]
    fn topology_fixture_4node() {
        let t = read_fixture("4node").unwrap();
        assert_eq!(t.node_list(), "0-3");
        for (i, node) in (0u32..).zip(&t.nodes) {
            assert_eq!(node.id, i);
            assert_eq!(
                node.cpus,
                cat(&[
                    range(i * 12, i * 12 + 11),
                    range(48 + i * 12, 48 + i * 12 + 11)
                ])
            );
            let row: Vec<u32> = (0..4).map(|j| if j == i { 10 } else { 21 }).collect();
            assert_eq!(node.distances, row);
            assert!(node.memory_bytes > 190 << 30 && node.memory_bytes < 193 << 30);
        }
    }

    #[test]
    fn topology_fixture_8node() {
        let t = read_fixture("8node").unwrap();
        assert_eq!(t.nodes.len(), 8);
        assert_eq!(t.node_list(), "0-7");
        for (i, node) in (0u32..).zip(&t.nodes) {
            assert_eq!(node.id, i);
            assert_eq!(node.cpus.len(), 16);
            assert_eq!(
                node.cpus,
                cat(&[range(i * 8, i * 8 + 7), range(64 + i * 8, 64 + i * 8 + 7)])
            );
            let row: Vec<u32> = (0..8)
                .map(|j| match (i == j, i / 4 == j / 4) {
                    (true, _) => 10,
                    (false, true) => 12,
                    (false, false) => 32,
                })
                .collect();
            assert_eq!(node.distances, row);
            assert!(node.memory_bytes > 62 << 30 && node.memory_bytes < 65 << 30);
        }
        let all: Vec<u32> = t.nodes.iter().flat_map(|n| n.cpus.clone()).collect();
        assert_eq!(format_cpulist(&all), "0-127");
    }

    #[test]
    fn topology_fixture_sparse_nodes_and_memory_only_node() {
        let t = read_fixture("sparse").unwrap();
        assert_eq!(t.node_list(), "0,2");
        assert_eq!(t.nodes[0].cpus, range(0, 31));
        assert!(t.nodes[1].cpus.is_empty());
        assert_eq!(t.nodes[1].distances, vec![20, 10]);
        assert_eq!(t.node(2).unwrap().memory_bytes, 134_217_728 * 1024);
        assert!(matches!(t.node(1), Err(Error::NoSuchNode { node: 1, .. })));
    }

    #[test]
    fn topology_fixture_numa_off_is_one_node_with_every_cpu() {
        let t = read_fixture("numa-off").unwrap();
        assert_eq!(
            t.nodes,
            vec![Node {
                id: 0,
                cpus: range(0, 7),
                memory_bytes: 32_765_424 * 1024,
                distances: vec![10],
            }]
        );
        let reader = SysfsReader::new(fixture("numa-off"));
        assert_eq!(reader.online_nodes().unwrap(), None);
        assert_eq!(reader.distances(&[0]).unwrap(), vec![vec![10]]);
        assert!(reader.distances(&[0, 1]).is_err());
    }

    #[test]
    fn topology_distances_match_node_rows() {
        let reader = SysfsReader::new(fixture("4node"));
        let t = reader.read().unwrap();
        let rows = reader.distances(&[0, 1, 2, 3]).unwrap();
        let from_nodes: Vec<Vec<u32>> = t.nodes.iter().map(|n| n.distances.clone()).collect();
        assert_eq!(rows, from_nodes);
    }

    #[test]
    fn topology_hostile_fixtures_name_the_file() {
        let cases = [
            (
                "hostile/bad-cpulist",
                "node1/cpulist",
                "not a decimal number",
            ),
            (
                "hostile/backwards-cpulist",
                "node1/cpulist",
                "runs backwards",
            ),
            ("hostile/absurd-cpulist", "node0/cpulist", "above the limit"),
            ("hostile/missing-meminfo", "node1/meminfo", "cannot read"),
            (
                "hostile/no-memtotal",
                "node0/meminfo",
                "no \"Node 0 MemTotal:\" line",
            ),
            (
                "hostile/wrong-node-meminfo",
                "node1/meminfo",
                "is for node 0, not node 1",
            ),
            (
                "hostile/short-distance",
                "node1/distance",
                "has 1 entries, expected 2",
            ),
            ("hostile/missing-node-dir", "node2/cpulist", "cannot read"),
            (
                "hostile/empty-online",
                "node/online",
                "lists no online node",
            ),
            (
                "hostile/garbage-online",
                "node/online",
                "not a decimal number",
            ),
            ("hostile/numa-off-no-cpus", "cpu/online", "cannot read"),
        ];
        for (tree, file, what) in cases {
            let msg = fixture_error(tree);
            assert!(msg.contains(file), "{tree}: {msg:?} does not name {file}");
            assert!(msg.contains(what), "{tree}: {msg:?} does not say {what:?}");
            assert!(
                msg.contains(&fixture(tree).display().to_string()),
                "{tree}: {msg:?} does not give the whole path"
            );
        }
    }

    #[test]
    fn topology_missing_root_is_an_error() {
        let msg = match read_fixture("does-not-exist") {
            Err(Error::Topology(msg)) => msg,
            other => panic!("{other:?}"),
        };
        assert!(msg.contains("cpu/online"), "{msg}");
    }

    #[test]
    fn topology_parse_cpulist_accepts_kernel_forms() {
        assert_eq!(
            parse_cpulist("0-3,8-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 9, 10, 11]
        );
        assert_eq!(parse_cpulist("5").unwrap(), vec![5]);
        assert_eq!(parse_cpulist("").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_cpulist("\n").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_cpulist("\t0-1\n").unwrap(), vec![0, 1]);
        assert_eq!(parse_cpulist("3,1,1-2").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_cpulist("7-7").unwrap(), vec![7]);
        assert_eq!(
            parse_cpulist(&MAX_LIST_ID.to_string()).unwrap(),
            vec![MAX_LIST_ID]
        );
    }

    #[test]
    fn topology_parse_cpulist_refuses_garbage() {
        for bad in [
            "x",
            "0-",
            "-3",
            "1,,2",
            "1,",
            ",1",
            "0-3-5",
            "+1",
            "1 2",
            "0x3",
            "3-1",
            "65536",
            "0-4294967295",
            "99999999999999999999",
            "0-7:2/4",
            "１",
        ] {
            match parse_cpulist(bad) {
                Err(Error::Topology(msg)) => {
                    assert!(msg.starts_with("cpu list "), "{bad:?}: {msg}")
                }
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        let long = "z".repeat(10_000);
        let Err(Error::Topology(msg)) = parse_cpulist(&long) else {
            panic!("garbage parsed")
        };
        assert!(msg.len() < 300, "message quotes too much: {}", msg.len());
    }

    #[test]
    fn topology_format_cpulist_compresses_runs() {
        assert_eq!(format_cpulist(&[]), "");
        assert_eq!(format_cpulist(&[5]), "5");
        assert_eq!(format_cpulist(&[4, 5]), "4-5");
        assert_eq!(format_cpulist(&[0, 1, 2, 3, 8, 9, 10, 11]), "0-3,8-11");
        assert_eq!(format_cpulist(&[11, 0, 2, 1, 2]), "0-2,11");
        assert_eq!(
            format_cpulist(&[u32::MAX - 1, u32::MAX]),
            "4294967294-4294967295"
        );
    }

    #[test]
    fn topology_cpulist_round_trip() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2000 {
            let mut cpus = Vec::new();
            for cpu in 0..300u32 {
                state = xorshift(state);
                if state.is_multiple_of(3) {
                    cpus.push(cpu);
                }
            }
            let text = format_cpulist(&cpus);
            assert_eq!(parse_cpulist(&text).unwrap(), cpus, "{text}");
            assert_eq!(parse_cpulist(&format!("{text}\n")).unwrap(), cpus);
        }
        for text in ["0-3,8-11", "5", "", "0,2,4-6", "0-127"] {
            assert_eq!(format_cpulist(&parse_cpulist(text).unwrap()), text);
        }
    }

    fn xorshift(mut x: u64) -> u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }

    /// Deterministic pseudo-random input, raw bytes and near-misses built
    /// from the parsers' own alphabet: every parser returns, none panics.
    #[test]
    fn topology_parsers_never_panic() {
        const ALPHABET: &[u8] = b"0123456789-,, \n\tkBNodeMemTotal:x\xff";
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for round in 0..20_000 {
            state = xorshift(state);
            let len = (state % 48) as usize;
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                state = xorshift(state);
                let b = (state >> 24) as u8;
                bytes.push(if round % 2 == 0 {
                    b
                } else {
                    ALPHABET[b as usize % ALPHABET.len()]
                });
            }
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(cpus) = parse_cpulist(&text) {
                assert!(cpus.windows(2).all(|w| w[0] < w[1]));
                assert!(cpus.iter().all(|&c| c <= MAX_LIST_ID));
            }
            let _ = parse_node_meminfo(&text, (state % 3) as u32);
            let _ = parse_node_meminfo(&format!("Node 0 MemTotal: {text}"), 0);
            let _ = parse_proc_meminfo(&text);
            let _ = parse_distance_row(&text, (state % 5) as usize);
        }
    }

    /// Random garbage written into a real tree: always an error or a
    /// topology, never a panic.
    #[test]
    fn topology_reader_never_panics_on_garbage_files() {
        const ALPHABET: &[u8] = b"01-, \nNode0MemTotal:kB\xc3";
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join(NODE_DIR);
        let mut state = 0xD1B5_4A32_D192_ED03u64;
        for _ in 0..200 {
            for file in ["online", "node0/cpulist", "node0/meminfo", "node0/distance"] {
                state = xorshift(state);
                let len = (state % 24) as usize;
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        state = xorshift(state);
                        ALPHABET[(state % ALPHABET.len() as u64) as usize]
                    })
                    .collect();
                let path = node.join(file);
                fs::create_dir_all(path.parent().unwrap()).unwrap();
                fs::write(&path, bytes).unwrap();
            }
            let _ = SysfsReader::new(dir.path()).read();
        }
    }
}
