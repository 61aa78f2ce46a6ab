//! NUMA topology of this machine through hwloc 2 (the `hwlocality`
//! bindings). hwloc sees what sysfs shows and more (firmware tables,
//! memory-side caches, device locality); here it supplies the NUMA nodes,
//! their CPUs (PU OS indexes), memory and, where it has a matrix, distances.
//! What hwloc lacks (one-node machines have no distance matrix) comes from
//! the sysfs reader at `/`.

use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::distance::{Distances, DistancesKind};
use hwlocality::object::types::ObjectType;
use hwlocality::object::TopologyObject;
use hwlocality::topology::builder::BuildFlags;

use super::sysfs::SysfsReader;
use super::{Node, Topology};
use crate::{Error, Result};

/// Read this machine's topology through hwloc. `source` is "hwloc".
pub fn read() -> Result<Topology> {
    // The whole machine, not only the CPUs and nodes this process's cpuset
    // allows: sysfs reports them all, and the replicas serve other processes.
    let topo = hwlocality::Topology::builder()
        .with_flags(BuildFlags::INCLUDE_DISALLOWED)
        .map_err(|e| hwloc_error("setting build flags", e))?
        .build()
        .map_err(|e| hwloc_error("loading the topology", e))?;

    let mut objects: Vec<(u32, &TopologyObject)> = Vec::new();
    for obj in topo.objects_with_type(ObjectType::NUMANode) {
        objects.push((node_id(obj)?, obj));
    }
    if objects.is_empty() {
        return Err(Error::Topology(
            "hwloc: the topology has no NUMA node".into(),
        ));
    }
    objects.sort_by_key(|&(id, _)| id);

    let sysfs = SysfsReader::default();
    let mut nodes = Vec::with_capacity(objects.len());
    for &(id, obj) in &objects {
        nodes.push(Node {
            id,
            cpus: node_cpus(id, obj)?,
            memory_bytes: node_memory(id, obj, &sysfs)?,
            distances: Vec::new(),
        });
    }

    let ids: Vec<u32> = objects.iter().map(|&(id, _)| id).collect();
    let rows = match latency_matrix(&topo, &objects)? {
        Some(rows) => rows,
        None => {
            tracing::debug!("hwloc has no NUMA distance matrix; reading sysfs distances");
            sysfs.distances(&ids).map_err(|e| {
                Error::Topology(format!(
                    "hwloc has no NUMA distance matrix, and sysfs distances failed: {e}"
                ))
            })?
        }
    };
    for (node, row) in nodes.iter_mut().zip(rows) {
        node.distances = row;
    }
    Topology::checked(nodes, "hwloc")
}

/// The kernel's number of a NUMA node object.
fn node_id(obj: &TopologyObject) -> Result<u32> {
    let index = obj
        .os_index()
        .ok_or_else(|| Error::Topology("hwloc: a NUMA node has no OS index".into()))?;
    u32::try_from(index)
        .map_err(|_| Error::Topology(format!("hwloc: NUMA node OS index {index} is too large")))
}

/// CPUs (PU OS indexes; hwloc cpusets are indexed by them) of node `id`.
fn node_cpus(id: u32, obj: &TopologyObject) -> Result<Vec<u32>> {
    let Some(cpuset) = obj.cpuset() else {
        return Err(Error::Topology(format!(
            "hwloc: NUMA node {id} has no cpuset"
        )));
    };
    if cpuset.weight().is_none() {
        return Err(Error::Topology(format!(
            "hwloc: NUMA node {id} has an infinite cpuset"
        )));
    }
    cpuset
        .iter_set()
        .map(|pu| {
            let pu = usize::from(pu);
            u32::try_from(pu)
                .map_err(|_| Error::Topology(format!("hwloc: node {id}: PU {pu} is too large")))
        })
        .collect()
}

/// Local memory of node `id`; if hwloc could not tell, the node's sysfs
/// `meminfo`.
fn node_memory(id: u32, obj: &TopologyObject, sysfs: &SysfsReader) -> Result<u64> {
    if let Some(ObjectAttributes::NUMANode(attr)) = obj.attributes() {
        if let Some(bytes) = attr.local_memory() {
            return Ok(bytes.get());
        }
    }
    tracing::debug!(
        node = id,
        "hwloc does not know the node's memory; reading sysfs"
    );
    sysfs.node_memory(id)
}

/// hwloc's NUMA distance matrix in node order, preferring latencies (what
/// sysfs `distance` holds) over other kinds; `None` if it has none covering
/// every node.
fn latency_matrix(
    topo: &hwlocality::Topology,
    objects: &[(u32, &TopologyObject)],
) -> Result<Option<Vec<Vec<u32>>>> {
    let matrices = topo
        .distances_with_type(None, ObjectType::NUMANode)
        .map_err(|e| hwloc_error("reading NUMA distances", e))?;
    let mut best: Option<&Distances<'_>> = None;
    for matrix in &matrices {
        if matrix.num_objects() != objects.len() {
            continue;
        }
        let latency = matrix.kind().contains(DistancesKind::MEANS_LATENCY);
        if best.is_none() || latency {
            best = Some(matrix);
        }
        if latency {
            break;
        }
    }
    let Some(matrix) = best else {
        return Ok(None);
    };
    // Where each of our nodes sits in the matrix.
    let mut index = Vec::with_capacity(objects.len());
    for &(_, obj) in objects {
        match matrix.object_idx(obj) {
            Some(i) => index.push(i),
            None => return Ok(None),
        }
    }
    let n = matrix.num_objects();
    let values = matrix.distances();
    let mut rows = Vec::with_capacity(objects.len());
    for (&(from, _), &i) in objects.iter().zip(&index) {
        let mut row = Vec::with_capacity(objects.len());
        for (&(to, _), &j) in objects.iter().zip(&index) {
            let Some(&value) = values.get(i * n + j) else {
                return Err(Error::Topology(format!(
                    "hwloc: the {n}x{n} distance matrix has only {} values",
                    values.len()
                )));
            };
            let value = u32::try_from(value).map_err(|_| {
                Error::Topology(format!(
                    "hwloc: distance {value} from node {from} to node {to} is too large"
                ))
            })?;
            row.push(value);
        }
        rows.push(row);
    }
    Ok(Some(rows))
}

fn hwloc_error(doing: &str, e: impl std::fmt::Display) -> Error {
    Error::Topology(format!("hwloc: {doing}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hwloc works on any Linux machine with libhwloc: this must not fall
    /// back.
    #[test]
    fn topology_hwloc_reads_this_machine() {
        let t = read().unwrap();
        assert_eq!(t.source, "hwloc");
        assert!(!t.nodes.is_empty());
        assert!(t.nodes.iter().any(|n| !n.cpus.is_empty()));
        for node in &t.nodes {
            assert_eq!(node.distances.len(), t.nodes.len());
            assert!(node.memory_bytes > 0, "node {} has no memory", node.id);
        }
    }

    #[test]
    fn topology_hwloc_agrees_with_sysfs() {
        let hw = read().unwrap();
        let fs = SysfsReader::default().read().unwrap();
        assert_eq!(hw.node_list(), fs.node_list());
        for (h, s) in hw.nodes.iter().zip(&fs.nodes) {
            assert_eq!(h.cpus, s.cpus, "node {}", h.id);
            assert_eq!(h.distances, s.distances, "node {}", h.id);
            let diff = h.memory_bytes.abs_diff(s.memory_bytes);
            assert!(
                diff <= s.memory_bytes / 100,
                "node {}: {h:?} vs {s:?}",
                h.id
            );
        }
    }
}
