//! The preload shim's hello: which of a process's mappings its node's
//! replicas may back.
//!
//! ```text
//!  shim ── Hello{node?} ──> daemon: node = asked, else the one node the
//!                           pid's CPUs lie on, else the policy's home node
//!                           for its cgroup, else "left alone"
//!                           read /proc/<pid>/smaps, then check the peer
//!                           (pidfd) still lives: the pid was not recycled
//!                           keep ranges: private, not writable, a file,
//!                           Anonymous: 0 kB, whose source has a valid
//!                           replica of the current generation on the node
//!  shim <── Attached{ranges} + [replica fd, source fd] per source
//! ```
//!
//! The daemon never maps anything into a process: the shim remaps its own
//! ranges, after checking each one again in its own `/proc/self/maps`. A
//! process is only told about files it maps already.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use replicad_client::maps::parse_smaps;
use replicad_client::proto::{AttachRange, LeftAlone};

use super::{allowed_cpus, lock, start_time, Inner};
use crate::list::{Attachment, SourceKey, Target};
use crate::{Error, Replicator, Result, Topology};

/// Most sources one answer carries: two fds each, and one message carries
/// at most 252 fds.
pub const MAX_SOURCES: usize = replicad_client::sock::MAX_MESSAGE_FDS / 2;
/// Left-alone processes remembered for `status`.
const LEFT_ALONE_MAX: usize = 256;

/// What a hello hands the shim.
#[derive(Debug)]
pub struct ProcessAttach {
    pub node: u32,
    pub ranges: Vec<AttachRange>,
    /// Two per source: the replica's read-only fd, then a fresh read-only
    /// fd of the source (the shim's way back).
    pub fds: Vec<OwnedFd>,
    pub skipped: Vec<String>,
}

/// The answer to a hello.
#[derive(Debug)]
pub enum Hello {
    Attached(ProcessAttach),
    LeftAlone { reason: String },
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

/// The cgroup paths of `pid` (v2 `0::/x`, v1 `N:ctrl:/x`).
fn cgroups(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2).map(str::to_string))
        .collect()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
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
        crate::topology::sysfs::format_cpulist(cpus),
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
        if let Ok(Hello::LeftAlone { reason }) = &result {
            inner.note_left_alone(pid, reason);
        }
        result
    }
}

impl Inner {
    /// The node whose replicas `pid` should use, or why it has none.
    pub(super) fn node_for(&self, pid: u32, asked: Option<u32>) -> Result<Result<u32, String>> {
        if let Some(n) = asked {
            self.topology.node(n)?;
            return Ok(Ok(n));
        }
        let Some(cpus) = allowed_cpus(pid) else {
            return Err(Error::NoSuchProcess { pid });
        };
        let home_nodes = self.home_nodes.read().unwrap_or_else(|p| p.into_inner());
        Ok(choose_node(
            &self.topology,
            &cpus,
            &cgroups(pid),
            &home_nodes,
        ))
    }

    fn note_left_alone(&self, pid: u32, reason: &str) {
        let a = Attachment {
            pid,
            start_time: start_time(pid).unwrap_or(0),
        };
        let mut left = self.left_alone.lock().unwrap_or_else(|p| p.into_inner());
        left.retain(|(old, _)| old.pid != pid);
        if left.len() >= LEFT_ALONE_MAX {
            left.remove(0);
        }
        left.push((
            a,
            LeftAlone {
                pid,
                comm: comm(pid),
                reason: reason.to_string(),
            },
        ));
    }

    fn hello(&self, pid: u32, asked: Option<u32>, alive: &dyn Fn() -> bool) -> Result<Hello> {
        let node = match self.node_for(pid, asked)? {
            Ok(n) => n,
            Err(reason) => return Ok(Hello::LeftAlone { reason }),
        };
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NoSuchProcess { pid }
            } else {
                Error::Proc {
                    pid,
                    file: "smaps",
                    reason: e.to_string(),
                }
            }
        })?;
        // The read is done: if the peer still runs, the pid still names it.
        if !alive() {
            return Err(Error::NoSuchProcess { pid });
        }
        let entries = parse_smaps(&text).map_err(|e| Error::Proc {
            pid,
            file: "smaps",
            reason: e.to_string(),
        })?;
        let target = Target::Node(node);
        let attachment = Attachment {
            pid,
            start_time: start_time(pid).unwrap_or(0),
        };
        let mut ranges = Vec::new();
        let mut fds = Vec::new();
        let mut skipped = Vec::new();
        // Source key -> index in the answer (None: known not to attach).
        let mut index: BTreeMap<SourceKey, Option<u32>> = BTreeMap::new();
        let mut list = lock(&self.list);
        for e in &entries {
            let line = e.line();
            if !line.private_readonly_file() {
                continue;
            }
            let key = SourceKey {
                dev: e.dev,
                ino: e.ino,
            };
            let Some(src) = list.get_mut(key) else {
                continue;
            };
            if e.anonymous_kb != Some(0) {
                skipped.push(format!(
                    "{:x}-{:x} {}: has private written pages (Anonymous: {} kB)",
                    e.start,
                    e.end,
                    e.path,
                    e.anonymous_kb.map_or("?".into(), |k| k.to_string())
                ));
                continue;
            }
            let slot = match index.get(&key) {
                Some(slot) => *slot,
                None => {
                    let slot = if index.values().flatten().count() >= super::process::MAX_SOURCES {
                        skipped.push(format!(
                            "{}: more than {MAX_SOURCES} replicated files in one answer",
                            e.path
                        ));
                        None
                    } else if !src.fenced {
                        skipped.push(format!("{}: a writer holds it", e.path));
                        None
                    } else {
                        let seq = src.generation.seq;
                        let valid = src.replicas.iter_mut().find(|r| {
                            r.target == target
                                && r.generation.seq == seq
                                && r.state == replicad_client::proto::ReplicaState::Valid
                        });
                        match valid.and_then(|r| r.file.as_ref().map(|f| (f, &mut r.attachments))) {
                            None => {
                                skipped.push(format!("{}: no valid replica on {target}", e.path));
                                None
                            }
                            Some((file, attachments)) => {
                                let source = reopen(&src.fd);
                                match (file.open_readonly(), source) {
                                    (Ok(r), Ok(s)) => {
                                        attachments.insert(attachment);
                                        fds.push(r);
                                        fds.push(s);
                                        Some((fds.len() / 2 - 1) as u32)
                                    }
                                    (Err(err), _) | (_, Err(err)) => {
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
            ranges.push(AttachRange {
                start: e.start,
                end: e.end,
                offset: e.offset,
                dev: e.dev,
                ino: e.ino,
                perms: line.perms_str().to_string(),
                source,
                generation: list.get(key).map_or(0, |s| s.generation.seq),
            });
        }
        drop(list);
        Ok(Hello::Attached(ProcessAttach {
            node,
            ranges,
            fds,
            skipped,
        }))
    }
}

/// A new open file description of the source (never the lease's own: a
/// client could `F_SETLEASE F_UNLCK` a shared one and drop the fence).
fn reopen(fd: &OwnedFd) -> std::io::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(OwnedFd::from(file))
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
    fn cgroup_prefixes_match_by_component() {
        assert!(cgroup_under("/system.slice/a.service", "/system.slice"));
        assert!(cgroup_under("/system.slice", "/system.slice/"));
        assert!(!cgroup_under("/system.slice2/a", "/system.slice"));
        assert!(cgroup_under("/anything", "/"));
        assert!(!cgroup_under("/a", "/a/b"));
    }
}
