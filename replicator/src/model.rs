//! The engine's own model: what a source, a generation, a target, a replica
//! and an attachment are. The wire format (`replicad-wire`) has types of
//! its own; the daemon translates at its edge, so the engine never changes
//! shape because a message did.
//!
//! ```text
//!  Source (dev, ino) ── Generation (seq, size, mtime, ctime), read under the fence
//!     └─ Replica on a Target (Node n | Device d), in a ReplicaState
//!           └─ Attachment: a process (pid + start time) handed it
//! ```

use std::collections::BTreeSet;
use std::path::PathBuf;

/// A source file's identity: `(st_dev, st_ino)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub dev: u64,
    pub ino: u64,
}

/// One state of a source's bytes, read while its fence is held. `seq`
/// counts generations of this source in this daemon; the rest is what
/// `fstat` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation {
    pub seq: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// Which kind of accelerator a device replica lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKind {
    Cuda,
    OpenCl,
}

/// One accelerator: its backend and its index there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId {
    pub kind: DeviceKind,
    pub index: u32,
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            DeviceKind::Cuda => "cuda",
            DeviceKind::OpenCl => "opencl",
        };
        write!(f, "{kind}:{}", self.index)
    }
}

/// Where a replica lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Node-local memory of a NUMA node.
    Node(u32),
    /// Memory of an accelerator (no backend populates these yet).
    Device(DeviceId),
}

impl Target {
    /// The node, for a CPU replica.
    pub fn node(self) -> Option<u32> {
        match self {
            Target::Node(n) => Some(n),
            Target::Device(_) => None,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Node(n) => write!(f, "node{n}"),
            Target::Device(d) => d.fmt(f),
        }
    }
}

/// A replica's life: `Populating -> Valid -> Revoking -> Gone`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Being copied; nobody is handed it.
    Populating,
    /// Equal to its source's bytes at its generation, fence held.
    Valid,
    /// A writer (or an evict) is on its way: no new attaches, and it is
    /// truncated before the fence is released.
    Revoking,
    /// Truncated and unlinked.
    Gone,
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplicaState::Populating => "populating",
            ReplicaState::Valid => "valid",
            ReplicaState::Revoking => "revoking",
            ReplicaState::Gone => "gone",
        })
    }
}

/// How writes to a source are kept out.
///
/// Every file that can ever become writable is leased: a read-only mount
/// can be remounted read-write, a read-only bind mount has a writable twin,
/// an immutable file can be made mutable, and leases work on all three.
/// Only files that can never be written go without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceKind {
    /// A read lease on the source fd; writers wait for its release.
    Lease,
    /// A filesystem that cannot be written at all (squashfs, erofs,
    /// iso9660): nothing to fence.
    NeverWritable { fs: &'static str },
    /// fs-verity: contents are fixed for the life of the inode.
    Verity,
}

impl FenceKind {
    /// Name for the status table.
    pub fn name(self) -> &'static str {
        match self {
            FenceKind::Lease => "lease",
            FenceKind::NeverWritable { fs } => fs,
            FenceKind::Verity => "verity",
        }
    }
}

/// A process that was handed a replica: pid and its start time (so a
/// recycled pid is not mistaken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    pub pid: u32,
    pub start_time: u64,
}

/// Which nodes a replicate request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeSelection {
    /// Every node of the machine.
    All,
    /// These nodes.
    List(Vec<u32>),
}

/// One replica as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaView {
    pub target: Target,
    pub generation: u64,
    pub bytes: u64,
    pub state: ReplicaState,
    /// Pids handed this replica that still run.
    pub attachments: Vec<u32>,
    /// The replica file in the store (or `memfd:...`).
    pub file: String,
    /// Pages of the replica, and how many `move_pages` found on the
    /// target node after the copy.
    pub pages: u64,
    pub pages_on_node: u64,
}

/// One source as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceView {
    pub path: PathBuf,
    pub key: SourceKey,
    pub generation: u64,
    pub size: u64,
    pub fence: FenceKind,
    /// Whether the fence is held now (false while a writer holds the file).
    pub fenced: bool,
    pub targets: BTreeSet<Target>,
    pub replicas: Vec<ReplicaView>,
}

/// A process the engine left on its own mappings, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftAlone {
    pub pid: u32,
    pub comm: String,
    pub reason: String,
}

/// The whole replica list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusView {
    pub sources: Vec<SourceView>,
    pub left_alone: Vec<LeftAlone>,
}

/// A file `replicate_pid` did not replicate, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// One source's valid replicas of its current generation, as the
/// published replica set carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedSource {
    pub key: SourceKey,
    pub generation: u64,
    pub nodes: Vec<u32>,
}

/// Where the engine publishes which sources have valid replicas on which
/// nodes (the daemon writes the shim's shared-memory table). Called with
/// the replica list locked, after every change of validity, so tables go
/// out in list order; it must not block.
pub trait Publisher: Send {
    fn publish(&mut self, sources: &[PublishedSource]);
    /// The engine is shutting down: withdraw what was published.
    fn retire(&mut self);
    /// Ask programs that follow the set to look at their maps again, the
    /// set unchanged: a process's node or a cgroup's home node changed.
    fn nudge(&mut self);
    /// A revoke starts truncating replicas; programs falling back hold
    /// their remap until [`Publisher::revoke_ended`] (timing only).
    fn revoke_began(&mut self);
    /// That revoke's writer was let go.
    fn revoke_ended(&mut self);
}
