//! The engine's one error type. Every variant names the file, node, pid or
//! thread it concerns, and where there is one, the fix. How an error
//! travels to a client (its wire kind) is the daemon's business.

use std::io;
use std::path::PathBuf;

use crate::fence::FenceFailure;
use crate::model::Target;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },

    #[error("the page cache of a file: {step}: {source}")]
    PageCache {
        step: &'static str,
        source: io::Error,
    },

    #[error("{path}: moving its page cache: {step}: {source}", path = .path.display())]
    Migrate {
        path: PathBuf,
        step: &'static str,
        source: io::Error,
    },

    #[error(
        "{path} is a replica in replicad's own store ({dir}): its pages are placed by the \
         store; migrate its source instead"
    )]
    StoreFile { path: PathBuf, dir: PathBuf },

    #[error("{path} does not exist")]
    NotFound { path: PathBuf },

    #[error("{path} is a {kind}, not a regular file: only regular files are replicated")]
    NotRegularFile { path: PathBuf, kind: &'static str },

    #[error("{path} cannot be write-fenced: {why}")]
    Unfenceable { path: PathBuf, why: FenceFailure },

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
        "{path} is no longer the file the scan saw (renamed over or replaced since): left \
         alone; the next scan sees what is there now"
    )]
    Replaced { path: PathBuf },

    #[error(
        "{path} was opened for writing while it was being copied: this generation was not \
         replicated; the next one is copied once the writer is done and the file has been \
         quiet for fence.settle_ms"
    )]
    WriterArrived { path: PathBuf },

    #[error(
        "replica of {path} for node {node}: {misplaced} of {pages} pages are not on node {node}"
    )]
    Misplaced {
        path: PathBuf,
        node: u32,
        pages: u64,
        misplaced: u64,
    },

    #[error(
        "{path}: cannot make the replica immutable: {source} (tmpfs takes FS_IMMUTABLE_FL from \
         Linux 6.0, and setting it needs CAP_LINUX_IMMUTABLE); a replica root could write is \
         not served"
    )]
    Immutable { path: PathBuf, source: io::Error },

    #[error(
        "the replica store directory {dir} {why}: populated tmpfs replicas are held by their \
         path there, so nobody but replicad's uid may write it (chown it to that uid, chmod \
         go-w)"
    )]
    StoreDirUnsafe { dir: PathBuf, why: String },

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

    #[error(
        "{path}: not replicated: replicad already fences {sources} files, the most its open-file \
         limit allows (RLIMIT_NOFILE {nofile}, {per_source} open files a file); raise the \
         limit (LimitNOFILE= in its systemd unit, or `ulimit -n` before starting it) and \
         restart it, or evict files first",
        path = .path.display()
    )]
    TooManySources {
        path: PathBuf,
        sources: usize,
        nofile: u64,
        per_source: u64,
    },

    #[error("replicad is shutting down")]
    ShuttingDown,

    #[error("pid {pid}: no such process (it may have exited)")]
    NoSuchProcess { pid: u32 },

    #[error("{}: {reason}", replicad_procfs::display_path(*pid, file))]
    Proc {
        pid: u32,
        file: &'static str,
        reason: String,
    },

    #[error("the fd pid {pid} passed: {reason}")]
    ClientFd { pid: u32, reason: String },

    #[error(
        "the fd pid {pid} passed is not open for reading (O_PATH or O_WRONLY): open the file \
         O_RDONLY and pass that fd"
    )]
    ClientFdNotReadable { pid: u32 },

    #[error("the fd pid {pid} passed is a {kind}, not a regular file: only regular files are replicated")]
    ClientFdNotRegular { pid: u32, kind: &'static str },

    #[error(
        "copying {path} onto {target} panicked (a bug: please report it); nothing was replicated"
    )]
    CopyPanicked { path: PathBuf, target: Target },

    #[error("no device backend can hold a replica on {target}")]
    NoDeviceBackend { target: Target },

    #[error(
        "the fence signals are not blocked: call replicad_replicator::fence::prepare() at the \
         start of main, before any thread starts"
    )]
    FenceNotPrepared,

    #[error("cannot start the {what}: {source}")]
    Thread {
        what: &'static str,
        source: io::Error,
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

    /// A `/proc/<pid>/<file>` that could not be read or parsed.
    pub fn proc(pid: u32, file: &'static str, e: replicad_procfs::Error) -> Self {
        let reason = match e {
            replicad_procfs::Error::Io { source, .. } => format!("cannot read it: {source}"),
            replicad_procfs::Error::Parse { line, reason, .. } => format!("line {line}: {reason}"),
        };
        Error::Proc { pid, file, reason }
    }

    /// The `reason` label of `replicad_replication_failures_total`.
    pub fn replication_failure_label(&self) -> &'static str {
        match self {
            Error::NoSpace { .. } => "no_space",
            Error::SourceChanged { .. } | Error::WriterArrived { .. } | Error::Replaced { .. } => {
                "source_changed"
            }
            Error::Misplaced { .. } => "misplaced",
            _ => "io",
        }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
