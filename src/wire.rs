//! The one place where the engine's model becomes the wire format (and
//! back): node selections, status views, hello answers, error kinds, and
//! the published replica set the engine writes through a [`Publisher`].

use std::os::fd::OwnedFd;
use std::path::Path;

use replicad_replicator::engine::{Hello, HelloRange, ProcessAttach, MAX_SOURCES};
use replicad_replicator::model::{
    LeftAlone, NodeSelection, PublishedSource, Publisher, ReplicaState, ReplicaView, Skipped,
    SourceView, StatusView,
};
use replicad_replicator::Error;
use replicad_wire::proto::{self, ErrorKind, Response};
use replicad_wire::published::{self, nodes_mask, PublishedEntry};
use replicad_wire::sock;

// One hello answer carries two fds per source in one message.
const _: () = assert!(2 * MAX_SOURCES <= sock::MAX_MESSAGE_FDS);

/// Slots the published replica set starts with (128 KiB); it grows when
/// three quarters are used.
const PUBLISHED_CAPACITY: usize = 4096;

/// A request's node selection, for the engine.
pub fn nodes(w: &proto::NodeSelection) -> NodeSelection {
    match w {
        proto::NodeSelection::All => NodeSelection::All,
        proto::NodeSelection::List(l) => NodeSelection::List(l.clone()),
    }
}

fn state(s: ReplicaState) -> proto::ReplicaState {
    match s {
        ReplicaState::Populating => proto::ReplicaState::Populating,
        ReplicaState::Valid => proto::ReplicaState::Valid,
        ReplicaState::Revoking => proto::ReplicaState::Revoking,
        ReplicaState::Gone => proto::ReplicaState::Gone,
    }
}

fn replica(r: &ReplicaView) -> proto::ReplicaStatus {
    proto::ReplicaStatus {
        target: r.target.to_string(),
        generation: r.generation,
        bytes: r.bytes,
        state: state(r.state),
        attachments: r.attachments.clone(),
        file: r.file.clone(),
        pages: r.pages,
        pages_on_node: r.pages_on_node,
    }
}

/// One source of the status table.
pub fn source(s: &SourceView) -> proto::SourceStatus {
    proto::SourceStatus {
        path: s.path.clone(),
        dev: s.key.dev,
        ino: s.key.ino,
        generation: s.generation,
        size: s.size,
        fence: if s.fenced {
            s.fence.name().to_string()
        } else {
            "broken".to_string()
        },
        targets: s.targets.iter().map(|t| t.to_string()).collect(),
        replicas: s.replicas.iter().map(replica).collect(),
    }
}

fn left_alone(l: &LeftAlone) -> proto::LeftAlone {
    proto::LeftAlone {
        pid: l.pid,
        comm: l.comm.clone(),
        reason: l.reason.clone(),
    }
}

/// The whole status table, sources sorted by path, then device and inode.
pub fn status(v: &StatusView) -> proto::StatusReport {
    let mut sources: Vec<proto::SourceStatus> = v.sources.iter().map(source).collect();
    sources.sort_by(|a, b| (&a.path, a.dev, a.ino).cmp(&(&b.path, b.dev, b.ino)));
    proto::StatusReport {
        sources,
        left_alone: v.left_alone.iter().map(left_alone).collect(),
        next: None,
    }
}

/// Most bytes of JSON one status page carries: a `SOCK_SEQPACKET` message
/// must fit the socket's send buffer (212992 bytes by default).
pub const STATUS_PAGE_BYTES: usize = 128 * 1024;

/// The page of `full` (sorted as [`status`] sorts) that starts after
/// `after` (from the start without), at most `budget` bytes of JSON, and
/// at least one source. `left_alone` goes with the first page only.
pub fn status_page(
    full: &proto::StatusReport,
    after: Option<&proto::StatusCursor>,
    budget: usize,
) -> proto::StatusReport {
    let start = after.map_or(0, |c| {
        full.sources
            .partition_point(|s| (&s.path, s.dev, s.ino) <= (&c.path, c.dev, c.ino))
    });
    let mut used = 256;
    let mut left_alone = Vec::new();
    if after.is_none() {
        for l in &full.left_alone {
            used += json_len(l);
            if used > budget / 4 {
                break;
            }
            left_alone.push(l.clone());
        }
    }
    let mut sources = Vec::new();
    let mut rest = full.sources.iter().skip(start).peekable();
    while let Some(s) = rest.peek() {
        let n = json_len(*s);
        if !sources.is_empty() && used + n > budget {
            break;
        }
        used += n;
        if let Some(s) = rest.next() {
            sources.push(s.clone());
        }
    }
    let next = match (rest.peek(), sources.last()) {
        (Some(_), Some(last)) => Some(proto::StatusCursor::of(last)),
        _ => None,
    };
    proto::StatusReport {
        sources,
        left_alone,
        next,
    }
}

/// Bytes of `v`'s JSON encoding, and a comma.
fn json_len<T: serde::Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(0, |v| v.len()) + 1
}

/// Files `replicate --pid` passed over.
pub fn skipped(s: &[Skipped]) -> Vec<proto::Skipped> {
    s.iter()
        .map(|s| proto::Skipped {
            path: s.path.clone(),
            reason: s.reason.clone(),
        })
        .collect()
}

fn range(r: &HelloRange) -> proto::AttachRange {
    proto::AttachRange {
        start: r.start,
        end: r.end,
        offset: r.offset,
        dev: r.key.dev,
        ino: r.key.ino,
        perms: r.perms.clone(),
        source: r.source,
        generation: r.generation,
    }
}

/// A hello's answer and the fds that ride along: per source, the
/// replica's and then the source's (fds `2*i` and `2*i+1`).
pub fn hello(pid: u32, h: Hello) -> (Response, Vec<OwnedFd>) {
    match h {
        Hello::Attached(ProcessAttach {
            node,
            ranges,
            sources,
            skipped,
        }) => {
            let count = sources.len() as u32;
            let fds = sources
                .into_iter()
                .flat_map(|s| [s.replica, s.source])
                .collect();
            (
                Response::Attached {
                    node,
                    sources: count,
                    ranges: ranges.iter().map(range).collect(),
                    skipped,
                },
                fds,
            )
        }
        Hello::LeftAlone { reason } => (Response::Original { reason }, Vec::new()),
        Hello::Vanished => (error(&Error::NoSuchProcess { pid }), Vec::new()),
    }
}

/// The protocol's kind for an engine error, for clients.
pub fn error_kind(e: &Error) -> ErrorKind {
    match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => {
            ErrorKind::PermissionDenied
        }
        Error::ClientFdNotReadable { .. } => ErrorKind::PermissionDenied,
        Error::Migrate { source, .. } | Error::PageCache { source, .. }
            if source.raw_os_error() == Some(libc::EPERM) =>
        {
            ErrorKind::PermissionDenied
        }
        Error::Migrate { .. } | Error::PageCache { .. } => ErrorKind::Internal,
        // Not a file migrate acts on (the wire has no closer kind yet).
        Error::StoreFile { .. } => ErrorKind::NotRegularFile,
        Error::Io { .. }
        | Error::Immutable { .. }
        | Error::Mount { .. }
        | Error::StoreDirUnsafe { .. }
        | Error::Topology(_)
        | Error::Metrics(_)
        | Error::Proc { .. }
        | Error::ClientFd { .. }
        | Error::NoDeviceBackend { .. }
        | Error::CopyPanicked { .. }
        | Error::FenceNotPrepared
        | Error::Thread { .. } => ErrorKind::Internal,
        Error::NotFound { .. } | Error::NotReplicated { .. } | Error::NoSuchProcess { .. } => {
            ErrorKind::NotFound
        }
        Error::NotRegularFile { .. } | Error::ClientFdNotRegular { .. } => {
            ErrorKind::NotRegularFile
        }
        Error::Unfenceable { .. } => ErrorKind::Unfenceable,
        Error::NoSuchNode { .. } => ErrorKind::NoSuchNode,
        Error::NoSpace { .. } => ErrorKind::NoSpace,
        Error::SourceChanged { .. } | Error::WriterArrived { .. } | Error::Replaced { .. } => {
            ErrorKind::SourceChanged
        }
        Error::Misplaced { .. } => ErrorKind::Misplaced,
        Error::ShuttingDown => ErrorKind::ShuttingDown,
        Error::TooManySources { .. } => ErrorKind::Limit,
    }
}

/// An engine error as an answer.
pub fn error(e: &Error) -> Response {
    Response::error(error_kind(e), e.to_string())
}

/// The published replica set at `<run_dir>/replicas.set`, written for the
/// engine. It grows when the sources outgrow it: a bigger file is renamed
/// over the old one, which is marked retired, so readers reopen the path.
struct PublishedSet(Option<published::Writer>, std::path::PathBuf);

impl Publisher for PublishedSet {
    fn publish(&mut self, sources: &[PublishedSource]) {
        let entries: Vec<PublishedEntry> = sources
            .iter()
            .map(|s| PublishedEntry {
                dev: s.key.dev,
                ino: s.key.ino,
                nodes: nodes_mask(s.nodes.iter().copied()),
                generation: s.generation,
            })
            .collect();
        let Some(writer) = self.0.as_mut() else {
            return;
        };
        let mut out = writer.publish(&entries);
        if out.overflow && writer.capacity() < published::MAX_CAPACITY {
            // Three quarters of the slots at most are used: room for twice
            // as many as there are now.
            let capacity = entries.len().saturating_mul(8) / 3;
            match published::Writer::create(&self.1, capacity) {
                Ok(mut bigger) => {
                    out = bigger.publish(&entries);
                    tracing::info!(
                        "the published replica set grew to {} slots for {} sources",
                        bigger.capacity(),
                        entries.len()
                    );
                    *writer = bigger;
                }
                Err(e) => replicad_replicator::warn_limited!(
                    "cannot grow the published replica set at {}: {e}",
                    self.1.display()
                ),
            }
        }
        if out.overflow {
            replicad_replicator::warn_limited!(
                "the published replica set holds {} of {} sources: programs ask the \
                 daemon for the rest",
                out.sources,
                entries.len()
            );
        }
    }

    fn nudge(&mut self) {
        if let Some(writer) = self.0.as_mut() {
            writer.nudge();
        }
    }

    fn revoke_began(&mut self) {
        if let Some(writer) = self.0.as_mut() {
            writer.revoke_began();
        }
    }

    fn revoke_ended(&mut self) {
        if let Some(writer) = self.0.as_mut() {
            writer.revoke_ended();
        }
    }

    fn retire(&mut self) {
        // Marked retired first, so readers stop trusting it, then removed.
        if let Some(writer) = self.0.take() {
            if let Err(e) = writer.remove() {
                tracing::warn!("removing the published replica set: {e}");
            }
        }
    }
}

/// The publisher for a daemon whose run directory is `run_dir`; `None`
/// (with a warning) where the set cannot be created.
pub fn publisher(run_dir: &Path) -> Option<Box<dyn Publisher>> {
    let set = run_dir.join(published::FILE_NAME);
    match published::Writer::create(&set, PUBLISHED_CAPACITY) {
        Ok(w) => Some(Box::new(PublishedSet(Some(w), set))),
        Err(e) => {
            tracing::warn!(
                "cannot publish the replica set at {}: {e}; programs under the preload \
                 shim attach at start and after dlopen, not on mmap",
                set.display()
            );
            None
        }
    }
}

/// A per-node map as the wire carries it: node numbers as text (JSON keys).
pub fn by_node<T: Copy>(
    m: &std::collections::BTreeMap<u32, T>,
) -> std::collections::BTreeMap<String, T> {
    m.iter().map(|(n, v)| (n.to_string(), *v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{SourceStatus, StatusCursor, StatusReport};

    fn src(i: u64, path_len: usize) -> SourceStatus {
        SourceStatus {
            path: format!("/d/{}{i:05}", "x".repeat(path_len)).into(),
            dev: 1,
            ino: i,
            generation: 1,
            size: 4096,
            fence: "lease".into(),
            targets: vec!["node0".into()],
            replicas: vec![],
        }
    }

    fn report(n: u64, path_len: usize) -> StatusReport {
        StatusReport {
            sources: (0..n).map(|i| src(i, path_len)).collect(),
            left_alone: vec![proto::LeftAlone {
                pid: 7,
                comm: "x".into(),
                reason: "y".into(),
            }],
            next: None,
        }
    }

    /// Every page within the budget, every source once, in order.
    #[test]
    fn pages_cover_the_list_once_within_the_budget() {
        let full = report(5000, 40);
        let budget = 16 * 1024;
        let mut seen = Vec::new();
        let mut after: Option<StatusCursor> = None;
        let mut pages = 0;
        loop {
            let page = status_page(&full, after.as_ref(), budget);
            let encoded = proto::Response::Status {
                report: page.clone(),
            }
            .encode();
            assert!(encoded.len() <= budget, "page of {} bytes", encoded.len());
            assert_eq!(page.left_alone.len(), usize::from(pages == 0));
            pages += 1;
            seen.extend(page.sources.iter().map(|s| s.ino));
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert!(pages > 10, "{pages} pages");
        assert_eq!(seen, (0..5000).collect::<Vec<_>>());
    }

    /// Past three quarters of its slots the set is replaced by a bigger
    /// one, and a reader of the old one is told to reopen.
    #[test]
    fn the_published_set_grows_with_the_sources() {
        use replicad_replicator::model::PublishedSource;
        use replicad_replicator::SourceKey;
        use replicad_wire::published::{Lookup, Reader};
        let dir = tempfile::tempdir().unwrap();
        let mut p = publisher(dir.path()).unwrap();
        let path = dir.path().join(published::FILE_NAME);
        let old = Reader::open(&path).unwrap();
        let sources: Vec<PublishedSource> = (1..=5000)
            .map(|ino| PublishedSource {
                key: SourceKey { dev: 9, ino },
                generation: 1,
                nodes: vec![0],
            })
            .collect();
        p.publish(&sources);
        assert!(old.is_retired());
        let new = Reader::open(&path).unwrap();
        assert!(!new.is_retired());
        for ino in [1, 2500, 5000] {
            assert!(
                matches!(new.lookup(9, ino), Lookup::Present { nodes: 1, .. }),
                "{ino}"
            );
        }
        assert_eq!(new.lookup(9, 5001), Lookup::Absent);
        p.retire();
    }

    /// A source bigger than the budget still goes, alone; a cursor whose
    /// source is gone meanwhile starts at the next one.
    #[test]
    fn a_huge_source_goes_alone_and_a_gone_cursor_moves_on() {
        let full = report(3, 4000);
        let page = status_page(&full, None, 1024);
        assert_eq!(page.sources.len(), 1);
        let next = page.next.unwrap();
        let mut fewer = full.clone();
        fewer.sources.remove(1);
        let page = status_page(&fewer, Some(&next), 1 << 20);
        assert_eq!(page.sources.iter().map(|s| s.ino).collect::<Vec<_>>(), [2]);
        assert!(page.next.is_none());
        // Past the end: empty, no next.
        let last = StatusCursor::of(&full.sources[2]);
        let page = status_page(&full, Some(&last), 1 << 20);
        assert!(page.sources.is_empty() && page.next.is_none());
    }
}
