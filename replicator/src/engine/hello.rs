//! The preload shim's hello: which of a process's mappings its node's
//! replicas may back.
//!
//! ```text
//!  shim ── Hello{node?} ──> daemon: node = asked, else the one node the
//!                           pid's CPUs lie on, else the policy's home node
//!                           for its cgroup, else "left alone"
//!                           read /proc/<pid>/maps (and pagemap for the
//!                           ranges of replicated files), then check the
//!                           peer (pidfd) still lives: the pid was not recycled
//!                           keep ranges: private, not writable, a file,
//!                           no private written page, whose source has a valid
//!                           replica of the current generation on the node
//!  shim <── Attached{ranges} + [replica fd, source fd] per source
//! ```
//!
//! The daemon never maps anything into a process: the shim remaps its own
//! ranges, after checking each one again in its own `/proc/self/maps`. A
//! process is only told about files it maps already.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, OwnedFd};

use replicad_procfs::{CgroupEntry, OwnedMapsLine};

use super::populate::reopen_readonly;
use super::{lock, Inner, Replicator};
use crate::model::{LeftAlone, ReplicaState, SourceKey, Target};
use crate::{Error, Result, Topology};

/// Most sources one answer carries: two fds each, and one message carries
/// at most 252 fds (`SCM_RIGHTS` limit, less margin).
pub const MAX_SOURCES: usize = 126;
/// Left-alone processes remembered for `status`.
const LEFT_ALONE_MAX: usize = 256;

/// The two fds a hello hands the shim for one source.
#[derive(Debug)]
pub struct SourceFds {
    /// The replica's read-only fd.
    pub replica: OwnedFd,
    /// A fresh read-only open of the source: the shim's way back.
    pub source: OwnedFd,
}

/// One mapping of the process that a replica may back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloRange {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    pub key: SourceKey,
    /// `r-xp` or `r--p`, as maps shows it.
    pub perms: String,
    /// Index into [`ProcessAttach::sources`].
    pub source: u32,
    pub generation: u64,
}

/// What a hello hands the shim.
#[derive(Debug)]
pub struct ProcessAttach {
    pub node: u32,
    pub ranges: Vec<HelloRange>,
    pub sources: Vec<SourceFds>,
    pub skipped: Vec<String>,
}

/// The answer to a hello.
#[derive(Debug)]
pub enum Hello {
    Attached(ProcessAttach),
    LeftAlone {
        reason: String,
    },
    /// The process exited (or its pid changed hands) during the hello:
    /// nobody is there to answer, and nothing went wrong.
    Vanished,
}

/// A policy entry: processes of this cgroup (or below it) whose CPUs span
/// several nodes use this node's replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeNode {
    /// Cgroup path as `/proc/<pid>/cgroup` shows it, e.g.
    /// `/system.slice/model-server.service`.
    pub cgroup: String,
    pub node: u32,
}

/// Whether `path` is `prefix` or below it, component-wise.
fn cgroup_under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The cgroup paths of a process, from its cgroup entries.
fn cgroup_paths(entries: &[CgroupEntry]) -> Vec<String> {
    let groups: Vec<String> = entries.iter().map(|e| e.path.clone()).collect();
    if groups.is_empty() {
        vec!["/".to_string()]
    } else {
        groups
    }
}

/// The node for a process allowed on `cpus`, in `groups`: the one node
/// holding all its CPUs, else the first home-node policy covering one of
/// its cgroups, else why it is left alone.
fn choose_node(
    topology: &Topology,
    cpus: &[u32],
    groups: &[String],
    home_nodes: &[HomeNode],
) -> Result<u32, String> {
    if let Some(n) = topology.home_node(cpus) {
        return Ok(n);
    }
    for h in home_nodes {
        if groups.iter().any(|g| cgroup_under(g, &h.cgroup)) && topology.node(h.node).is_ok() {
            return Ok(h.node);
        }
    }
    Err(format!(
        "its CPUs ({}) span several nodes and no home_node policy covers its cgroup ({}): \
         bind it to one node (replicactl run --node N) or add a [[home_node]] for the cgroup",
        replicad_procfs::format_cpulist(cpus),
        groups.first().map(String::as_str).unwrap_or("?")
    ))
}

impl Replicator {
    /// Attach `pid`'s eligible mappings. `alive` says whether the peer that
    /// asked still runs (then `pid` is still that process).
    pub fn hello(&self, pid: u32, node: Option<u32>, alive: &dyn Fn() -> bool) -> Result<Hello> {
        let inner = &self.inner;
        let result = inner.hello(pid, node, alive);
        let label = match &result {
            Ok(Hello::Attached(a)) if !a.ranges.is_empty() => "replica",
            Ok(_) => "original",
            Err(_) => "refused",
        };
        inner.metrics.attaches.with_label_values(&[label]).inc();
        match &result {
            Ok(Hello::LeftAlone { reason }) => inner.note_left_alone(pid, reason),
            // It has a node now: no longer left alone.
            Ok(Hello::Attached(_)) => {
                super::relock(&inner.left_alone).retain(|(a, _, _)| a.pid != pid)
            }
            _ => {}
        }
        result
    }

    /// Processes left alone because they had no node (their CPUs spanned
    /// nodes, no home node named) that have one now (`taskset`, a cpuset
    /// or home node change): nudge followers once for them, and they ask
    /// again. Called once per planner interval; costs an affinity and a
    /// cgroup read per process left alone. Returns how many have a node.
    pub fn recheck_left_alone(&self) -> usize {
        let waiting: Vec<u32> = super::relock(&self.inner.left_alone)
            .iter()
            .filter(|(_, _, nudged)| !nudged)
            .map(|(a, _, _)| a.pid)
            .collect();
        let ready: Vec<u32> = waiting
            .into_iter()
            .filter(|&pid| matches!(self.inner.node_for(pid, None), Ok(Some(Ok(_)))))
            .collect();
        if ready.is_empty() {
            return 0;
        }
        for (a, _, nudged) in super::relock(&self.inner.left_alone).iter_mut() {
            if ready.contains(&a.pid) {
                *nudged = true;
            }
        }
        tracing::debug!(
            "pids {ready:?}, left alone for where they ran, have a node now: programs look again"
        );
        self.nudge_followers();
        ready.len()
    }
}

impl Inner {
    /// The node whose replicas `pid` should use, or why it has none;
    /// `None` if the process is gone.
    fn node_for(&self, pid: u32, asked: Option<u32>) -> Result<Option<Result<u32, String>>> {
        if let Some(n) = asked {
            self.topology.node(n)?;
            return Ok(Some(Ok(n)));
        }
        let cpus = match crate::sys::affinity(pid) {
            Some(cpus) => cpus,
            None => match self.proc.cpus_allowed(pid) {
                Ok(Some(cpus)) => cpus,
                Ok(None) => return Ok(None),
                Err(e) => return Err(Error::proc(pid, "status", e)),
            },
        };
        let groups = match self.proc.cgroups(pid) {
            Ok(Some(entries)) => cgroup_paths(&entries),
            Ok(None) => return Ok(None),
            // A cgroup file that cannot be read or parsed: the process is
            // taken to be in the root, as a kernel with no hierarchy shows.
            Err(e) => {
                crate::debug_limited!("{e}: taking pid {pid} to be in the root cgroup");
                cgroup_paths(&[])
            }
        };
        let home_nodes = self.home_nodes.read().unwrap_or_else(|p| p.into_inner());
        Ok(Some(choose_node(
            &self.topology,
            &cpus,
            &groups,
            &home_nodes,
        )))
    }

    fn note_left_alone(&self, pid: u32, reason: &str) {
        let a = self.attachment(pid);
        let comm = self.proc.comm(pid).ok().flatten().unwrap_or_default();
        let mut left = super::relock(&self.left_alone);
        left.retain(|(old, _, _)| old.pid != pid);
        if left.len() >= LEFT_ALONE_MAX {
            left.remove(0);
        }
        left.push((
            a,
            LeftAlone {
                pid,
                comm,
                reason: reason.to_string(),
            },
            false,
        ));
    }

    /// The ranges of `pid`'s maps that replicas may back, read without the
    /// list lock: private, read-only file mappings of replicated sources,
    /// each with its count of privately written pages. `None`: the process
    /// is gone.
    fn hello_candidates(&self, pid: u32) -> Result<Option<Vec<(OwnedMapsLine, u64)>>> {
        // maps, not smaps: smaps walks every page table of the process
        // (0.3-0.4 ms for a python); the written-pages check below reads
        // pagemap for the few ranges that matter.
        let lines = match self.proc.maps(pid) {
            Ok(Some(lines)) => lines,
            Ok(None) => return Ok(None),
            Err(e) => return Err(Error::proc(pid, "maps", e)),
        };
        let replicated: BTreeSet<SourceKey> = lock(&self.list).keys().into_iter().collect();
        let mut pagemap = None;
        let mut entries = Vec::new();
        for l in lines {
            let key = SourceKey {
                dev: l.dev,
                ino: l.ino,
            };
            if !l.private_readonly_file() || !replicated.contains(&key) {
                continue;
            }
            if pagemap.is_none() {
                pagemap = match self.proc.pagemap(pid) {
                    Ok(Some(f)) => Some(f),
                    Ok(None) => return Ok(None),
                    Err(e) => return Err(Error::proc(pid, "pagemap", e)),
                };
            }
            let written = match pagemap.as_ref() {
                Some(f) => {
                    replicad_procfs::written_pages(f, l.start, l.end).map_err(|e| Error::Proc {
                        pid,
                        file: "pagemap",
                        reason: e.to_string(),
                    })?
                }
                None => 0,
            };
            entries.push((l, written));
        }
        Ok(Some(entries))
    }

    fn hello(&self, pid: u32, asked: Option<u32>, alive: &dyn Fn() -> bool) -> Result<Hello> {
        let node = match self.node_for(pid, asked)? {
            Some(Ok(n)) => n,
            Some(Err(reason)) => return Ok(Hello::LeftAlone { reason }),
            None => return Ok(Hello::Vanished),
        };
        let Some(entries) = self.hello_candidates(pid)? else {
            return Ok(Hello::Vanished);
        };
        // The reads are done: if the peer still runs, the pid still names it.
        if !alive() {
            return Ok(Hello::Vanished);
        }
        let target = Target::Node(node);
        let attachment = self.attachment(pid);
        let mut ranges = Vec::new();
        let mut sources: Vec<SourceFds> = Vec::new();
        let mut skipped = Vec::new();
        // Source key -> index in the answer (None: known not to attach).
        let mut index: BTreeMap<SourceKey, Option<u32>> = BTreeMap::new();
        let mut list = lock(&self.list);
        for (e, written) in &entries {
            let key = SourceKey {
                dev: e.dev,
                ino: e.ino,
            };
            let Some(src) = list.get_mut(key) else {
                continue;
            };
            if *written > 0 {
                skipped.push(format!(
                    "{:x}-{:x} {}: has {written} private written pages (RELRO or relocated)",
                    e.start, e.end, e.path,
                ));
                continue;
            }
            let slot = match index.get(&key) {
                Some(slot) => *slot,
                None => {
                    let slot = if sources.len() >= MAX_SOURCES {
                        skipped.push(format!(
                            "{}: more than {MAX_SOURCES} replicated files in one answer",
                            e.path
                        ));
                        None
                    } else if !src.fenced() {
                        skipped.push(format!("{}: a writer holds it", e.path));
                        None
                    } else {
                        let seq = src.generation.seq;
                        let valid = src.replicas.iter_mut().find(|r| {
                            r.target == target
                                && r.generation.seq == seq
                                && r.state == ReplicaState::Valid
                        });
                        match valid.and_then(|r| r.file.as_ref().map(|f| (f, &mut r.attachments))) {
                            None => {
                                skipped.push(format!("{}: no valid replica on {target}", e.path));
                                None
                            }
                            Some((file, attachments)) => {
                                let source = reopen_readonly(&self.proc, src.fd.as_fd(), false);
                                match (file.open_readonly(), source) {
                                    (Ok(replica), Ok(source)) => {
                                        attachments.insert(attachment);
                                        sources.push(SourceFds {
                                            replica,
                                            source: OwnedFd::from(source),
                                        });
                                        Some((sources.len() - 1) as u32)
                                    }
                                    // The replica's error names its file.
                                    (Err(err), _) => {
                                        skipped.push(format!("{}: {err}", e.path));
                                        None
                                    }
                                    (_, Err(err)) => {
                                        skipped.push(format!("{}: {err}", e.path));
                                        None
                                    }
                                }
                            }
                        }
                    };
                    index.insert(key, slot);
                    slot
                }
            };
            let Some(source) = slot else {
                continue;
            };
            ranges.push(HelloRange {
                start: e.start,
                end: e.end,
                offset: e.offset,
                key,
                perms: e.perms_str().to_string(),
                source,
                generation: list.get(key).map_or(0, |s| s.generation.seq),
            });
        }
        drop(list);
        Ok(Hello::Attached(ProcessAttach {
            node,
            ranges,
            sources,
            skipped,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_nodes() -> Topology {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/sysfs/2node");
        Topology::from_sysfs(&root).unwrap()
    }

    #[test]
    fn a_process_on_one_node_uses_it_and_a_spanning_one_needs_a_policy() {
        let t = two_nodes();
        let groups = vec!["/system.slice/m.service".to_string()];
        assert_eq!(choose_node(&t, &[20, 21], &groups, &[]), Ok(1));
        let why = choose_node(&t, &[0, 20], &groups, &[]).unwrap_err();
        assert!(why.contains("span several nodes"), "{why}");
        assert!(why.contains("/system.slice/m.service"), "{why}");
        assert!(why.contains("0,20"), "{why}");
        let policy = [
            HomeNode {
                cgroup: "/other.slice".into(),
                node: 0,
            },
            HomeNode {
                cgroup: "/system.slice".into(),
                node: 1,
            },
        ];
        assert_eq!(choose_node(&t, &[0, 20], &groups, &policy), Ok(1));
        // A policy naming a node the machine lacks is passed over.
        let bad = [HomeNode {
            cgroup: "/system.slice".into(),
            node: 7,
        }];
        assert!(choose_node(&t, &[0, 20], &groups, &bad).is_err());
    }

    #[test]
    fn pagemap_counts_private_written_pages() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; 4 * 4096]).unwrap();
        // SAFETY: a private mapping of our own temp file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let start = p as u64;
        let end = start + 4 * 4096;
        // SAFETY: reads and one write inside our own mapping.
        unsafe {
            for i in 0..4 {
                std::ptr::read_volatile((p as *const u8).add(i * 4096));
            }
            *(p as *mut u8).add(4096) = 1;
            libc::mprotect(p, 4 * 4096, libc::PROT_READ);
        }
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let written = replicad_procfs::written_pages;
        assert_eq!(written(&pagemap, start, end).unwrap(), 1);
        assert_eq!(written(&pagemap, start + 8192, end).unwrap(), 0);
        // SAFETY: our own mapping.
        unsafe { libc::munmap(p, 4 * 4096) };
        let me = crate::sys::affinity(std::process::id()).unwrap();
        assert!(!me.is_empty());
        let proc = replicad_procfs::ProcReader::default();
        assert_eq!(Some(me), proc.cpus_allowed(std::process::id()).unwrap());
    }

    #[test]
    fn cgroup_prefixes_match_by_component() {
        assert!(cgroup_under("/system.slice/a.service", "/system.slice"));
        assert!(cgroup_under("/system.slice", "/system.slice/"));
        assert!(!cgroup_under("/system.slice2/a", "/system.slice"));
        assert!(cgroup_under("/anything", "/"));
        assert!(!cgroup_under("/a", "/a/b"));
    }
}
