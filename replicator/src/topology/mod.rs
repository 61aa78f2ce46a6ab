//! Machine topology: the NUMA nodes, the CPUs and memory of each, and the
//! distances between them.
//!
//! ```text
//!  Topology { source: "hwloc" | "sysfs" }
//!     └─ Node { id, cpus, memory_bytes, distances[one per node] }
//! ```
//!
//! [`Topology::detect`] asks hwloc first (cargo feature `hwloc`, see
//! [`hwloc`]) and falls back to reading sysfs at `/` ([`sysfs`]), which is
//! also what tests feed fixture trees to through [`Topology::from_sysfs`].
//! Every topology has at least one node, nodes ascend by id, and every node
//! has one distance per node, in node order.

use std::fmt::Write as _;
use std::path::Path;

use crate::{Error, Result};

#[cfg(feature = "hwloc")]
pub mod hwloc;
pub mod sysfs;

pub use sysfs::{format_cpulist, parse_cpulist, SysfsReader};

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Node {
    /// Node number as the kernel numbers it.
    pub id: u32,
    /// CPUs of this node, ascending.
    pub cpus: Vec<u32>,
    /// Memory of the node in bytes.
    pub memory_bytes: u64,
    /// Distance to each node, in the order of `Topology::nodes`.
    pub distances: Vec<u32>,
}

/// The machine's NUMA nodes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Topology {
    /// Nodes, ascending by id.
    pub nodes: Vec<Node>,
    /// Where this came from: "hwloc" or "sysfs".
    pub source: &'static str,
}

impl Topology {
    /// Detect the machine's topology: through hwloc when built with it,
    /// else (or when hwloc fails, with a warning saying why) from sysfs at `/`.
    pub fn detect() -> Result<Topology> {
        #[cfg(feature = "hwloc")]
        match hwloc::read() {
            Ok(topology) => return Ok(topology),
            Err(e) => tracing::warn!(error = %e, "hwloc topology failed; reading sysfs instead"),
        }
        Topology::from_sysfs(Path::new(sysfs::DEFAULT_ROOT))
    }

    /// Read the topology from a sysfs tree under `root`.
    pub fn from_sysfs(root: &Path) -> Result<Topology> {
        SysfsReader::new(root).read()
    }

    /// A topology from `nodes`, after checking what every reader must hold:
    /// at least one node, ids ascending, each distance row one per node.
    pub(crate) fn checked(nodes: Vec<Node>, source: &'static str) -> Result<Topology> {
        if nodes.is_empty() {
            return Err(Error::Topology(format!("{source}: no NUMA node")));
        }
        if let Some(w) = nodes.windows(2).find(|w| w[0].id >= w[1].id) {
            return Err(Error::Topology(format!(
                "{source}: node {} listed after node {}",
                w[1].id, w[0].id
            )));
        }
        if let Some(n) = nodes.iter().find(|n| n.distances.len() != nodes.len()) {
            return Err(Error::Topology(format!(
                "{source}: node {} has {} distances for {} nodes",
                n.id,
                n.distances.len(),
                nodes.len()
            )));
        }
        Ok(Topology { nodes, source })
    }

    /// The node with this id.
    pub fn node(&self, id: u32) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| Error::NoSuchNode {
                node: id,
                have: self.node_list(),
            })
    }

    /// Node ids as a list for people: "0-3" or "0,2".
    pub fn node_list(&self) -> String {
        let ids: Vec<u32> = self.nodes.iter().map(|n| n.id).collect();
        format_cpulist(&ids)
    }

    /// The one node holding every CPU in `cpus`, if there is one (`None`
    /// for an empty list, an unknown CPU, or CPUs spanning nodes).
    pub fn home_node(&self, cpus: &[u32]) -> Option<u32> {
        let cpu = cpus.first()?;
        let first = self.nodes.iter().find(|n| n.cpus.contains(cpu))?;
        cpus.iter()
            .all(|c| first.cpus.contains(c))
            .then_some(first.id)
    }

    /// The table `replicactl topology` prints: a header, one row per node
    /// (id, CPUs, memory in GiB, distance row), and the source.
    ///
    /// ```text
    /// node  cpus       memory  distances
    ///    0  0-19,40-59  188.4 GiB  10 21
    ///    1  20-39,60-79 189.0 GiB  21 10
    /// source: sysfs
    /// ```
    pub fn render_table(&self) -> String {
        const GIB: f64 = (1u64 << 30) as f64;
        let rows: Vec<[String; 3]> = self
            .nodes
            .iter()
            .map(|n| {
                let cpus = if n.cpus.is_empty() {
                    "-".to_string()
                } else {
                    format_cpulist(&n.cpus)
                };
                let memory = format!("{:.1} GiB", n.memory_bytes as f64 / GIB);
                [n.id.to_string(), cpus, memory]
            })
            .collect();
        let width = |col: usize, header: &str| {
            rows.iter()
                .map(|r| r[col].len())
                .chain([header.len()])
                .max()
                .unwrap_or_default()
        };
        let (w_node, w_cpus, w_mem) = (width(0, "node"), width(1, "cpus"), width(2, "memory"));
        let w_dist = self
            .nodes
            .iter()
            .flat_map(|n| &n.distances)
            .map(|d| d.to_string().len())
            .max()
            .unwrap_or(2);

        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:>w_node$}  {:<w_cpus$}  {:>w_mem$}  distances",
            "node", "cpus", "memory"
        );
        for (row, node) in rows.iter().zip(&self.nodes) {
            let distances: Vec<String> = node
                .distances
                .iter()
                .map(|d| format!("{d:>w_dist$}"))
                .collect();
            let _ = writeln!(
                out,
                "{:>w_node$}  {:<w_cpus$}  {:>w_mem$}  {}",
                row[0],
                row[1],
                row[2],
                distances.join(" ")
            );
        }
        let _ = writeln!(out, "source: {}", self.source);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Topology {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/sysfs")
            .join(name);
        Topology::from_sysfs(&root).unwrap()
    }

    #[test]
    fn topology_home_node_on_2node_fixture() {
        let t = fixture("2node");
        assert_eq!(t.home_node(&[0, 1, 2]), Some(0));
        assert_eq!(t.home_node(&[40, 59, 0]), Some(0));
        assert_eq!(t.home_node(&[20, 79]), Some(1));
        assert_eq!(t.home_node(&[19, 20]), None);
        assert_eq!(t.home_node(&[0, 60]), None);
        assert_eq!(t.home_node(&[]), None);
        assert_eq!(t.home_node(&[80]), None);
        assert_eq!(t.home_node(&[0, 80]), None);
    }

    #[test]
    fn topology_node_lookup() {
        let t = fixture("4node");
        assert_eq!(t.node(3).unwrap().id, 3);
        match t.node(4) {
            Err(e @ Error::NoSuchNode { node: 4, .. }) => {
                assert_eq!(
                    e.to_string(),
                    "node 4 does not exist: this machine has nodes 0-3"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn topology_render_table_2node() {
        let table = fixture("2node").render_table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("node  cpus"), "{table}");
        assert!(lines[0].ends_with("distances"), "{table}");
        assert_eq!(lines[3], "source: sysfs");
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["0", "0-19,40-59", "188.4", "GiB", "10", "21"]
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["1", "20-39,60-79", "189.0", "GiB", "21", "10"]
        );
        // Columns line up: every row as wide as the header up to distances.
        let at = lines[0].find("distances").unwrap();
        assert!(
            lines[1..3].iter().all(|l| l[at - 2..at] == *"  "),
            "{table}"
        );
    }

    #[test]
    fn topology_render_table_every_fixture() {
        for name in ["1node", "2node", "4node", "8node", "sparse", "numa-off"] {
            let t = fixture(name);
            let table = t.render_table();
            assert_eq!(table.lines().count(), t.nodes.len() + 2, "{name}:\n{table}");
            assert!(table.ends_with("source: sysfs\n"), "{name}:\n{table}");
        }
        let table = fixture("sparse").render_table();
        assert!(table.lines().nth(2).unwrap().contains(" - "), "{table}");
    }

    #[test]
    fn topology_checked_refuses_bad_shapes() {
        let node = |id, distances: Vec<u32>| Node {
            id,
            cpus: vec![],
            memory_bytes: 0,
            distances,
        };
        assert!(Topology::checked(vec![], "test").is_err());
        assert!(
            Topology::checked(vec![node(1, vec![10, 20]), node(0, vec![20, 10])], "test").is_err()
        );
        assert!(Topology::checked(vec![node(0, vec![10]), node(1, vec![20, 10])], "test").is_err());
        assert!(
            Topology::checked(vec![node(0, vec![10, 20]), node(1, vec![20, 10])], "test").is_ok()
        );
    }

    /// This machine: `detect()` works and agrees with the sysfs reader.
    #[test]
    fn topology_detect_agrees_with_sysfs_on_this_machine() {
        let detected = Topology::detect().unwrap();
        let sysfs = Topology::from_sysfs(Path::new("/")).unwrap();
        if cfg!(feature = "hwloc") {
            assert_eq!(detected.source, "hwloc");
        } else {
            assert_eq!(detected.source, "sysfs");
        }
        assert_eq!(detected.nodes.len(), sysfs.nodes.len());
        for (d, s) in detected.nodes.iter().zip(&sysfs.nodes) {
            assert_eq!(d.id, s.id);
            assert_eq!(d.cpus, s.cpus, "node {}", d.id);
        }
        // Every online CPU is on exactly one node.
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
        let mut cpus: Vec<u32> = sysfs.nodes.iter().flat_map(|n| n.cpus.clone()).collect();
        cpus.sort_unstable();
        assert_eq!(cpus, parse_cpulist(&online).unwrap());
    }
}
