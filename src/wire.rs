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

/// Sources the published replica set holds (128 KiB); more are flagged
/// and the shim asks the daemon.
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

/// The whole status table.
pub fn status(v: &StatusView) -> proto::StatusReport {
    proto::StatusReport {
        sources: v.sources.iter().map(source).collect(),
        left_alone: v.left_alone.iter().map(left_alone).collect(),
    }
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
        Error::Io { .. }
        | Error::Immutable { .. }
        | Error::Mount { .. }
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
        Error::SourceChanged { .. } | Error::WriterArrived { .. } => ErrorKind::SourceChanged,
        Error::Misplaced { .. } => ErrorKind::Misplaced,
        Error::ShuttingDown => ErrorKind::ShuttingDown,
    }
}

/// An engine error as an answer.
pub fn error(e: &Error) -> Response {
    Response::error(error_kind(e), e.to_string())
}

/// The published replica set at `<run_dir>/replicas.set`, written for the
/// engine.
struct PublishedSet(Option<published::Writer>);

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
        let out = writer.publish(&entries);
        if out.overflow {
            replicad_replicator::warn_limited!(
                "the published replica set holds {} of {} sources: programs ask the \
                 daemon for the rest",
                out.sources,
                entries.len()
            );
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
        Ok(w) => Some(Box::new(PublishedSet(Some(w)))),
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
