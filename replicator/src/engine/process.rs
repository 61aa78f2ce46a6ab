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
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use replicad_client::maps::MapsLine;
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

/// The cgroup paths of `pid` (v2 `0::/x`, v1 `N:ctrl:/x`). A kernel with
/// no hierarchy mounted lists none: the process is in the root, `/`.
fn cgroups(pid: u32) -> Vec<String> {
    let groups: Vec<String> = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2).map(str::to_string))
        .collect();
    if groups.is_empty() {
        vec!["/".to_string()]
    } else {
        groups
    }
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
        let Some(cpus) = affinity(pid).or_else(|| allowed_cpus(pid)) else {
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
        let proc_err = |file: &'static str, e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
                Error::NoSuchProcess { pid }
            } else {
                Error::Proc {
                    pid,
                    file,
                    reason: e.to_string(),
                }
            }
        };
        // maps, not smaps: smaps walks every page table of the process
        // (0.3-0.4 ms for a python); the written-pages check below reads
        // pagemap for the few ranges that matter.
        let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(|e| proc_err("maps", e))?;
        let mut lines = Vec::new();
        for (i, l) in text.lines().enumerate() {
            lines.push(MapsLine::parse(l).ok_or_else(|| Error::Proc {
                pid,
                file: "maps",
                reason: format!("line {} does not parse: {:?}", i + 1, l),
            })?);
        }
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
                pagemap = Some(
                    std::fs::File::open(format!("/proc/{pid}/pagemap"))
                        .map_err(|e| proc_err("pagemap", e))?,
                );
            }
            let written = pagemap
                .as_ref()
                .map(|f| written_pages(f, l.start, l.end))
                .unwrap_or(Ok(0))
                .map_err(|e| proc_err("pagemap", e))?;
            entries.push((l, written));
        }
        // The reads are done: if the peer still runs, the pid still names it.
        if !alive() {
            return Err(Error::NoSuchProcess { pid });
        }
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
                perms: e.perms_str().to_string(),
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

/// The CPUs `pid` may run on, by `sched_getaffinity` (a syscall, where
/// `/proc/<pid>/status` is a page of text to format and parse). `None` if
/// the call fails (no such pid, or more CPUs than a `cpu_set_t` holds).
fn affinity(pid: u32) -> Option<Vec<u32>> {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is valid for writes of the size given.
    let rc = unsafe {
        libc::sched_getaffinity(
            pid as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        )
    };
    if rc != 0 {
        return None;
    }
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads the set for cpu < its size.
    Some(
        (0..max)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .map(|c| c as u32)
            .collect(),
    )
}

/// Pages of `start..end` that hold private (anonymous) copies: present
/// and not file-backed, or swapped out, in `/proc/<pid>/pagemap` (bit 63
/// present, 62 swapped, 61 file page or shared).
fn written_pages(pagemap: &std::fs::File, start: u64, end: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    const PAGE: u64 = 4096;
    let mut written = 0;
    let mut buf = vec![0u8; 8 * 512];
    let mut page = start / PAGE;
    let last = end.div_ceil(PAGE);
    while page < last {
        let n = ((last - page) as usize).min(512);
        let got = pagemap.read_at(&mut buf[..8 * n], page * 8)?;
        if got < 8 {
            break;
        }
        for e in buf[..got - got % 8].chunks_exact(8) {
            let v = u64::from_ne_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            let present = v & (1 << 63) != 0;
            let swapped = v & (1 << 62) != 0;
            let file = v & (1 << 61) != 0;
            if swapped || (present && !file) {
                written += 1;
            }
        }
        page += (got / 8) as u64;
    }
    Ok(written)
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
        assert_eq!(written_pages(&pagemap, start, end).unwrap(), 1);
        assert_eq!(written_pages(&pagemap, start + 8192, end).unwrap(), 0);
        // SAFETY: our own mapping.
        unsafe { libc::munmap(p, 4 * 4096) };
        let me = affinity(std::process::id()).unwrap();
        assert!(!me.is_empty());
        assert_eq!(Some(me), allowed_cpus(std::process::id()));
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
