//! Machine topology. STUB: replaced by the real implementation.

use std::path::Path;

use crate::{Error, Result};

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
    /// Detect the machine's topology.
    pub fn detect() -> Result<Topology> {
        Topology::from_sysfs(Path::new("/"))
    }

    /// Read the topology from a sysfs tree under `root`.
    pub fn from_sysfs(_root: &Path) -> Result<Topology> {
        Ok(Topology {
            nodes: vec![Node {
                id: 0,
                cpus: vec![0],
                memory_bytes: 0,
                distances: vec![10],
            }],
            source: "sysfs",
        })
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
        self.nodes
            .iter()
            .map(|n| n.id.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The one node holding every CPU in `cpus`, if there is one.
    pub fn home_node(&self, cpus: &[u32]) -> Option<u32> {
        let cpu = cpus.first()?;
        let first = self.nodes.iter().find(|n| n.cpus.contains(cpu))?;
        cpus.iter()
            .all(|c| first.cpus.contains(c))
            .then_some(first.id)
    }
}
