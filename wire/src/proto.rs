//! The control-socket protocol between replicad and its clients.
//!
//! The socket is `SOCK_SEQPACKET`: one message per packet, never split or
//! merged. Every message is a fixed 8-byte header followed by a JSON body:
//!
//! ```text
//!  0        4        6        8
//!  | "RPLD" | ver u16| kind u16 | JSON body (Request or Response) ...
//! ```
//!
//! `ver` is [`VERSION`]; a peer answering another version gets
//! [`ErrorKind::UnsupportedVersion`]. `kind` is 1 for a request and 2 for a
//! response. File descriptors travel beside the message by `SCM_RIGHTS`: a
//! [`Request::Map`] carries the caller's own read-only fd of the file (proof
//! that it may read it), and a [`Response::Mapped`] carries a read-only fd of
//! the replica; a [`Response::Attached`] (the answer to the preload shim's
//! [`Request::Hello`]) carries two per source: the replica's and a fresh
//! read-only one of the source. Nothing else carries fds; fds that arrive
//! with any other message are closed unread.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Magic at the start of every message.
pub const MAGIC: [u8; 4] = *b"RPLD";
/// Protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 8;
/// Largest request the daemon reads; larger packets are refused whole.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Largest response a client reads.
pub const MAX_RESPONSE: usize = 4 * 1024 * 1024;
/// Default path of the daemon's control socket.
pub const DEFAULT_SOCKET: &str = "/run/replicad/replicad.sock";
/// Environment variable that overrides [`DEFAULT_SOCKET`] for clients
/// (ignored by set-user-ID programs and others the kernel marks
/// `AT_SECURE`, as every `REPLICAD_*` variable is).
pub const SOCKET_ENV: &str = "REPLICAD_SOCKET";
/// Environment variable naming the uid of a daemon that does not run as
/// root, for clients to trust it besides root (ignored under `AT_SECURE`).
pub const DAEMON_UID_ENV: &str = "REPLICAD_DAEMON_UID";

const KIND_REQUEST: u16 = 1;
const KIND_RESPONSE: u16 = 2;

/// What went wrong decoding a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("message of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    Short(usize),
    #[error("message does not start with the replicad magic \"RPLD\"")]
    BadMagic,
    #[error("protocol version {0} is not supported (this side speaks {VERSION})")]
    UnsupportedVersion(u16),
    #[error("message kind {0} is not a {1}")]
    WrongKind(u16, &'static str),
    #[error("message of {len} bytes or more exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("malformed message body: {0}")]
    Malformed(String),
}

/// Which nodes a replicate request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeSelection {
    /// Every node of the machine.
    All,
    /// These nodes.
    List(Vec<u32>),
}

/// A request to the daemon. Every variant is answered by exactly one
/// [`Response`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Give me a read-only fd of the replica of the file whose fd rides
    /// along, on `node` (or on the node the caller's CPUs are bound to).
    /// Answered by `Mapped` (with the replica fd) or `Original`.
    Map {
        node: Option<u32>,
        /// Where the caller keeps its fallback table
        /// (`replicad_procfs::slots`), 0 if it has none: the daemon reads it during
        /// a revoke to carry the caller's private pages to the way back.
        #[serde(default, skip_serializing_if = "is_zero")]
        table: u64,
        /// Where the caller mapped the file and how much (0: not said):
        /// the range the daemon looks at for private pages during a
        /// revoke.
        #[serde(default, skip_serializing_if = "is_zero")]
        at: u64,
        #[serde(default, skip_serializing_if = "is_zero")]
        len: u64,
    },
    /// Replicate a file onto nodes (root only). Answered by `Replicated`.
    Replicate { path: PathBuf, nodes: NodeSelection },
    /// Drop every replica of a file (root only). Answered by `Evicted`.
    Evict { path: PathBuf },
    /// The replica list, its first page. Answered by `Status`; when the
    /// report's `next` is set, `StatusFrom { after: next }` asks for the
    /// next page. Sources come sorted by path, then device and inode.
    Status,
    /// The page of the replica list after `after`. Answered by `Status`.
    StatusFrom { after: StatusCursor },
    /// The preload shim's hello: attach my file mappings to the replicas on
    /// `node` (or on the node my CPUs are bound to). The daemon reads the
    /// caller's own `/proc/<pid>/maps` and `pagemap` (the pid is the socket peer's; no
    /// request names another process) and answers `Attached` with two fds
    /// per source (the replica's, then a fresh one of the source for the
    /// way back), or `Original` when the process is left alone.
    Hello {
        node: Option<u32>,
        /// As in `Map`.
        #[serde(default, skip_serializing_if = "is_zero")]
        table: u64,
    },
    /// Replicate the files whose text `pid` maps (executable private file
    /// mappings: its program and libraries) onto `nodes` (root only).
    /// Answered by `ReplicatedPid`.
    ReplicatePid { pid: u32, nodes: NodeSelection },
    /// Per file and node: where the pages the covered processes map sit,
    /// who maps them, what is remote (all files the scanner saw, or those
    /// named). Answered by `Heat`.
    Heat { paths: Vec<PathBuf> },
    /// What the planner would do now. Answered by `Plan`.
    Plan,
    /// Move a file's page cache to `node` (root only). Answered by
    /// `Migrated`.
    Migrate { path: PathBuf, node: u32 },
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One file in a heat report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeatRow {
    // Maps are keyed by node number as text ("0"): JSON keys are text,
    // and the tagged response cannot read numbers back from them.
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    /// `text`, `data`.
    pub kinds: Vec<String>,
    /// Largest mapping of it, bytes.
    pub mapped_bytes: u64,
    /// Processes mapping it, by the node they run on.
    pub sharers: BTreeMap<String, u32>,
    /// Processes mapping it whose CPUs span nodes.
    pub sharers_spanning: u32,
    /// Pages mapped, by the node they sit on (the most one process maps).
    pub mapped_pages: BTreeMap<String, u64>,
    /// Bytes processes on each node map from other nodes.
    pub remote_bytes: BTreeMap<String, u64>,
    /// Pages of its valid replicas, by node.
    pub replica_pages: BTreeMap<String, u64>,
    /// The file's page cache, by node (every cached page, mapped or not;
    /// filled for files named in the request).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cached_pages: BTreeMap<String, u64>,
    pub writes_per_hour: u64,
    /// The policy deciding for it.
    pub policy: String,
}

/// `replicactl heat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HeatReport {
    pub rows: Vec<HeatRow>,
    /// Full scanner passes so far (0: the rows come from a pass made for
    /// this request).
    pub passes: u64,
    /// Processes and CPU time of the pass behind the rows.
    pub processes: u64,
    pub pass_cpu_us: u64,
}

/// One planner decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanRow {
    /// `replicate`, `migrate`, `evict`, `skip`.
    pub action: String,
    pub path: PathBuf,
    pub node: Option<u32>,
    /// Bytes a copy takes (replicate, evict), or pages to move (migrate).
    pub bytes: u64,
    /// Remote bytes a copy turns local.
    pub remote_bytes: u64,
    pub reason: String,
    pub policy: String,
    /// `observe` (reported only) or `replicate` (carried out).
    pub mode: String,
}

/// `replicactl plan`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PlanReport {
    pub actions: Vec<PlanRow>,
    /// Budget and bytes used by the planner's copies, per node.
    pub budget: BTreeMap<String, u64>,
    pub used: BTreeMap<String, u64>,
    /// Why there is no plan yet (the first pass is not done), else empty.
    pub note: String,
}

/// One mapping of the caller that a replica may back, in an `Attached`
/// answer. The shim re-checks all of it in `/proc/self/maps` before it
/// remaps, and leaves the range alone if anything differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRange {
    pub start: u64,
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// The source's device (`st_dev` encoding) and inode.
    pub dev: u64,
    pub ino: u64,
    /// `r-xp` or `r--p`, as `/proc/<pid>/maps` shows it.
    pub perms: String,
    /// Index of the source: fds `2*source` (replica) and `2*source+1`
    /// (source) ride along.
    pub source: u32,
    pub generation: u64,
}

/// A file `ReplicatePid` did not replicate, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// Why a request failed, for programs; the message is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The message could not be decoded.
    BadRequest,
    UnsupportedVersion,
    /// The caller lacks the privilege (admin requests need uid 0).
    PermissionDenied,
    NotFound,
    /// Directories, devices, sockets and other non-regular files.
    NotRegularFile,
    /// The file cannot be write-fenced (open for write, network, FUSE or
    /// pseudo filesystem).
    Unfenceable,
    /// A node that the machine does not have.
    NoSuchNode,
    /// The node's store has no room.
    NoSpace,
    /// The source changed, shrank or vanished while it was being copied.
    SourceChanged,
    /// Pages of the replica are not on the target node.
    Misplaced,
    /// The daemon is shutting down.
    ShuttingDown,
    /// One of the daemon's limits: the files its open-file limit leaves
    /// room for, or one user's connections or requests in flight.
    Limit,
    Internal,
}

/// State of one replica, as the status table shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    Populating,
    Valid,
    Revoking,
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

/// One replica in the status table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// `node0`, `node1`, ... (devices come later).
    pub target: String,
    pub generation: u64,
    pub bytes: u64,
    pub state: ReplicaState,
    /// Pids that were given this replica and still run.
    pub attachments: Vec<u32>,
    /// Path of the replica file in the store (or `memfd:...`).
    pub file: String,
    /// Pages of the replica, and how many of them `move_pages` found on
    /// the target node after the copy (replicad's placement check).
    #[serde(default)]
    pub pages: u64,
    #[serde(default)]
    pub pages_on_node: u64,
}

/// One source file in the status table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    /// Current generation number (0 before the first copy).
    pub generation: u64,
    pub size: u64,
    /// How writes are fenced: `lease`; `squashfs`, `erofs`, `iso9660` or
    /// `verity` for files nobody can write (no fence); `broken` while a
    /// writer holds the file.
    pub fence: String,
    /// Wanted targets.
    pub targets: Vec<String>,
    pub replicas: Vec<ReplicaStatus>,
}

/// A process the daemon left on its own mappings, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftAlone {
    pub pid: u32,
    pub comm: String,
    pub reason: String,
}

/// Where a page of the replica list ended: its last source.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusCursor {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
}

impl StatusCursor {
    /// The cursor that ends at `s`.
    pub fn of(s: &SourceStatus) -> Self {
        StatusCursor {
            path: s.path.clone(),
            dev: s.dev,
            ino: s.ino,
        }
    }
}

/// The replica list, or one page of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StatusReport {
    pub sources: Vec<SourceStatus>,
    /// Processes that said hello and were left alone (still running); on
    /// the first page only.
    #[serde(default)]
    pub left_alone: Vec<LeftAlone>,
    /// More sources follow: ask `StatusFrom { after: next }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<StatusCursor>,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// A read-only replica fd rides along: map `size` bytes of it.
    Mapped {
        node: u32,
        generation: u64,
        size: u64,
    },
    /// No replica for this caller: use the file itself.
    Original {
        reason: String,
    },
    Replicated {
        source: SourceStatus,
    },
    Evicted {
        replicas: usize,
    },
    Status {
        report: StatusReport,
    },
    /// The ranges to remap; `2 * sources` fds ride along.
    Attached {
        node: u32,
        sources: u32,
        ranges: Vec<AttachRange>,
        /// Mappings of replicated files left on the file, and why (for
        /// `REPLICAD_DEBUG`).
        skipped: Vec<String>,
    },
    ReplicatedPid {
        sources: Vec<SourceStatus>,
        skipped: Vec<Skipped>,
    },
    Heat {
        report: HeatReport,
    },
    Plan {
        report: PlanReport,
    },
    Migrated {
        path: PathBuf,
        node: u32,
        /// Resident pages before and after, by node.
        before: BTreeMap<String, u64>,
        after: BTreeMap<String, u64>,
        moved: u64,
        failed: u64,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

impl Response {
    /// An error response.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Response::Error {
            kind,
            message: message.into(),
        }
    }
}

fn encode<T: Serialize>(kind: u16, body: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    // Serializing these plain enums cannot fail: no maps with non-string
    // keys, no custom Serialize impls.
    if serde_json::to_writer(&mut out, body).is_err() {
        out.truncate(HEADER_LEN);
        out.extend_from_slice(b"null");
    }
    out
}

fn decode<'a, T: Deserialize<'a>>(
    buf: &'a [u8],
    kind: u16,
    what: &'static str,
    limit: usize,
) -> Result<T, ProtoError> {
    if buf.len() > limit {
        return Err(ProtoError::TooLarge {
            len: buf.len(),
            limit,
        });
    }
    if buf.len() < HEADER_LEN {
        return Err(ProtoError::Short(buf.len()));
    }
    if buf[0..4] != MAGIC {
        return Err(ProtoError::BadMagic);
    }
    let version = u16::from_le_bytes([buf[4], buf[5]]);
    if version != VERSION {
        return Err(ProtoError::UnsupportedVersion(version));
    }
    let got = u16::from_le_bytes([buf[6], buf[7]]);
    if got != kind {
        return Err(ProtoError::WrongKind(got, what));
    }
    serde_json::from_slice(&buf[HEADER_LEN..]).map_err(|e| ProtoError::Malformed(e.to_string()))
}

impl Request {
    /// Encode for the wire.
    pub fn encode(&self) -> Vec<u8> {
        encode(KIND_REQUEST, self)
    }

    /// Decode one received packet.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtoError> {
        decode(buf, KIND_REQUEST, "request", MAX_REQUEST)
    }

    /// Whether this request must come from root.
    pub fn is_admin(&self) -> bool {
        matches!(
            self,
            Request::Replicate { .. }
                | Request::Evict { .. }
                | Request::ReplicatePid { .. }
                | Request::Heat { .. }
                | Request::Plan
                | Request::Migrate { .. }
        )
    }
}

impl Response {
    /// Encode for the wire.
    pub fn encode(&self) -> Vec<u8> {
        encode(KIND_RESPONSE, self)
    }

    /// Decode one received packet.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtoError> {
        decode(buf, KIND_RESPONSE, "response", MAX_RESPONSE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Map {
                node: Some(1),
                table: 0,
                at: 0,
                len: 0,
            },
            Request::Map {
                node: None,
                table: 0x7f00_1234_5000,
                at: 0x7f00_2000_0000,
                len: 1 << 20,
            },
            Request::Replicate {
                path: "/usr/lib/x".into(),
                nodes: NodeSelection::List(vec![0, 1]),
            },
            Request::Replicate {
                path: "/a".into(),
                nodes: NodeSelection::All,
            },
            Request::Evict { path: "/a".into() },
            Request::Status,
            Request::StatusFrom {
                after: StatusCursor {
                    path: "/a".into(),
                    dev: 1,
                    ino: 2,
                },
            },
            Request::Hello {
                node: None,
                table: 0,
            },
            Request::Hello {
                node: Some(3),
                table: 0x5555_0000_1000,
            },
            Request::ReplicatePid {
                pid: 42,
                nodes: NodeSelection::All,
            },
        ];
        for r in reqs {
            assert_eq!(Request::decode(&r.encode()), Ok(r.clone()));
        }
    }

    #[test]
    fn responses_round_trip() {
        let r = Response::Mapped {
            node: 0,
            generation: 3,
            size: 4096,
        };
        assert_eq!(Response::decode(&r.encode()), Ok(r));
        let a = Response::Attached {
            node: 1,
            sources: 1,
            ranges: vec![AttachRange {
                start: 0x7f00_0000_0000,
                end: 0x7f00_0001_0000,
                offset: 0x1000,
                dev: 0x801,
                ino: 42,
                perms: "r-xp".into(),
                source: 0,
                generation: 2,
            }],
            skipped: vec!["x".into()],
        };
        assert_eq!(Response::decode(&a.encode()), Ok(a));
        let e = Response::error(ErrorKind::NoSuchNode, "node 7 does not exist");
        assert_eq!(Response::decode(&e.encode()), Ok(e));
    }

    #[test]
    fn header_errors_are_named() {
        assert_eq!(Request::decode(b"RPL"), Err(ProtoError::Short(3)));
        assert_eq!(
            Request::decode(b"XXXX\x01\x00\x01\x00{}"),
            Err(ProtoError::BadMagic)
        );
        assert_eq!(
            Request::decode(b"RPLD\x09\x00\x01\x00{}"),
            Err(ProtoError::UnsupportedVersion(9))
        );
        assert_eq!(
            Request::decode(&Response::Evicted { replicas: 1 }.encode()),
            Err(ProtoError::WrongKind(2, "request"))
        );
        let big = vec![b' '; MAX_REQUEST + 1];
        assert!(matches!(
            Request::decode(&big),
            Err(ProtoError::TooLarge { .. })
        ));
        assert!(matches!(
            Request::decode(b"RPLD\x01\x00\x01\x00{\"op\":\"map\",\"node\":1,\"x\":2}"),
            Err(ProtoError::Malformed(_))
        ));
    }

    /// Arbitrary bytes never panic the decoder (the fuzz target does this at
    /// scale; this keeps a deterministic slice of it in every test run).
    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid = Request::Replicate {
            path: "/a/b".into(),
            nodes: NodeSelection::List(vec![0, 1, 2]),
        }
        .encode();
        for _ in 0..20_000 {
            let mut buf = valid.clone();
            let flips = (next() % 6) as usize;
            for _ in 0..=flips {
                let i = (next() as usize) % buf.len();
                buf[i] = next() as u8;
            }
            let cut = (next() as usize) % (buf.len() + 1);
            let _ = Request::decode(&buf[..cut]);
            let _ = Response::decode(&buf[..cut]);
        }
    }
}
