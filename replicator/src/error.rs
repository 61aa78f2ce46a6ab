//! The engine's one error type. Every variant names the file, node or
//! directory it concerns, and where there is one, the fix.

use std::io;
use std::path::PathBuf;

use replicad_client::proto::ErrorKind;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },

    #[error("{path} does not exist")]
    NotFound { path: PathBuf },

    #[error("{path} is a {kind}, not a regular file: only regular files are replicated")]
    NotRegularFile { path: PathBuf, kind: &'static str },

    #[error("{path} cannot be write-fenced: {reason}")]
    Unfenceable { path: PathBuf, reason: String },

    #[error("node {node} does not exist: this machine has nodes {have}")]
    NoSuchNode { node: u32, have: String },

    #[error(
        "the store for node {node} ({dir}) is full while copying {path}: \
         raise the store size or replicate less"
    )]
    NoSpace {
        node: u32,
        dir: PathBuf,
        path: PathBuf,
    },

    #[error("{path} {what} while it was being copied; nothing was replicated")]
    SourceChanged { path: PathBuf, what: &'static str },

    #[error(
        "replica of {path} for node {node}: {misplaced} of {pages} pages are not on node {node}"
    )]
    Misplaced {
        path: PathBuf,
        node: u32,
        pages: u64,
        misplaced: u64,
    },

    #[error("cannot mount the store for node {node} at {dir}: {source}")]
    Mount {
        node: u32,
        dir: PathBuf,
        source: io::Error,
    },

    #[error("topology: {0}")]
    Topology(String),

    #[error("{path}: not replicated (run `replicactl replicate {path}` first)", path = .path.display())]
    NotReplicated { path: PathBuf },

    #[error("replicad is shutting down")]
    ShuttingDown,

    #[error("pid {pid}: no such process (it may have exited)")]
    NoSuchProcess { pid: u32 },

    #[error("/proc/{pid}/{file}: {reason}")]
    Proc {
        pid: u32,
        file: &'static str,
        reason: String,
    },

    #[error("{0}")]
    Metrics(#[from] prometheus::Error),
}

impl Error {
    /// An `Io` error for `path`, turning ENOENT into `NotFound`.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if source.kind() == io::ErrorKind::NotFound {
            Error::NotFound { path }
        } else {
            Error::Io { path, source }
        }
    }

    /// The protocol's kind for this error, for clients.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
                ErrorKind::PermissionDenied
            }
            Error::Io { .. } | Error::Mount { .. } | Error::Topology(_) | Error::Metrics(_) => {
                ErrorKind::Internal
            }
            Error::NotFound { .. } | Error::NotReplicated { .. } | Error::NoSuchProcess { .. } => {
                ErrorKind::NotFound
            }
            Error::Proc { .. } => ErrorKind::Internal,
            Error::NotRegularFile { .. } => ErrorKind::NotRegularFile,
            Error::Unfenceable { .. } => ErrorKind::Unfenceable,
            Error::NoSuchNode { .. } => ErrorKind::NoSuchNode,
            Error::NoSpace { .. } => ErrorKind::NoSpace,
            Error::SourceChanged { .. } => ErrorKind::SourceChanged,
            Error::Misplaced { .. } => ErrorKind::Misplaced,
            Error::ShuttingDown => ErrorKind::ShuttingDown,
        }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
