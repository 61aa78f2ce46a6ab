//! replicad's client side: the API a program uses to read a file through
//! its node's replica, the C ABI over it, and the request code the CLI and
//! the preload shim share. The protocol itself is `replicad-wire`'s.
//!
//! ```text
//!  map(path) ── open(path, O_RDONLY) ──> fd ── Map{node} + fd ──> replicad
//!                                                                  │
//!         Mapped{generation,size} + replica fd <───────────────────┘
//!                  │                         (or Original{reason})
//!                  ▼
//!   [ replica mapping ]  [ spare mapping of the file itself ]
//!         │  SIGBUS after a writer revoked the replica
//!         └─ mremap(spare -> replica range): the reader goes on with the
//!            file's current bytes, no fd needed
//! ```
//!
//! Without a daemon, or when the daemon has no replica for the caller's
//! node, [`map`] maps the file itself: a program never fails because
//! replicad is absent. Nor because someone else answers in its place:
//! [`trust`] says whose daemon, replicas and published set are believed
//! (root's, or those of the uid `REPLICAD_DAEMON_UID` names), and a
//! set-user-ID program reads no `REPLICAD_*` variable.

pub mod capi;
mod fallback;
mod mapping;
pub mod trust;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use mapping::{map, map_with, Backing, MapOptions, Mapping};
/// The wire types this API speaks (control messages and fd passing), from
/// `replicad-wire`.
pub use replicad_wire::{proto, sock};

/// The SIGBUS fallback table as the preload shim (`replicad-preload`) uses
/// it. Not an API for programs.
#[doc(hidden)]
pub use fallback::shim;

/// Everything the client API can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot map {path}: {source}")]
    Map {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is empty: there is nothing to map")]
    Empty { path: PathBuf },
    #[error("{path} is not a regular file")]
    NotRegularFile { path: PathBuf },
    #[error(
        "cannot reach replicad at {socket}: {source} (is the daemon running? \
         set {env} to its socket)",
        env = proto::SOCKET_ENV
    )]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to replicad at {socket}: {source}")]
    Io {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("replicad at {socket} closed the connection without an answer")]
    NoAnswer { socket: PathBuf },
    #[error("replicad sent an answer this client cannot read: {0}")]
    Protocol(#[from] proto::ProtoError),
    #[error("replicad refused: {message}")]
    Refused {
        kind: proto::ErrorKind,
        message: String,
    },
    #[error("replicad at {socket} answered {asked} with {answer}")]
    Unexpected {
        socket: PathBuf,
        asked: &'static str,
        answer: String,
    },
    #[error("replicad at {socket} runs as uid {uid}, which is not trusted ({trust})")]
    UntrustedDaemon {
        socket: PathBuf,
        uid: u32,
        trust: trust::Trust,
    },
    #[error("the replica {path} from replicad running as uid {daemon_uid} is refused: {rule}")]
    UntrustedReplica {
        path: PathBuf,
        daemon_uid: u32,
        rule: trust::Rule,
    },
    #[error("the published set {path}, owned by uid {owner}, is not used: {rule}")]
    UntrustedSet {
        path: PathBuf,
        owner: u32,
        rule: trust::Rule,
    },
    #[error("no published replica set: {source}")]
    NoPublishedSet {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The whole replica list the daemon shows this caller, asked for page by
/// page (`Status`, then `StatusFrom` while the report says more follow).
pub fn status(socket: &Path, timeout: Duration) -> Result<proto::StatusReport, Error> {
    let unexpected = |answer: proto::Response| Error::Unexpected {
        socket: socket.to_path_buf(),
        asked: "a status request",
        answer: format!("{answer:?}"),
    };
    let mut report = match request(socket, &proto::Request::Status, &[], timeout)?.0 {
        proto::Response::Status { report } => report,
        other => return Err(unexpected(other)),
    };
    while let Some(after) = report.next.take() {
        let page = match request(
            socket,
            &proto::Request::StatusFrom {
                after: after.clone(),
            },
            &[],
            timeout,
        )?
        .0
        {
            proto::Response::Status { report } => report,
            other => return Err(unexpected(other)),
        };
        // Every page must move on: a cursor that does not is an answer
        // this client cannot page through.
        if page
            .sources
            .first()
            .is_some_and(|s| proto::StatusCursor::of(s) <= after)
            || page.next.as_ref().is_some_and(|n| *n <= after)
        {
            return Err(unexpected(proto::Response::Status { report: page }));
        }
        report.sources.extend(page.sources);
        report.next = page.next;
    }
    Ok(report)
}

/// The socket clients use: `$REPLICAD_SOCKET`, else the default path. Under
/// `AT_SECURE` (a set-user-ID program) always the default path.
pub fn socket_path() -> PathBuf {
    trust::env_var(proto::SOCKET_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(proto::DEFAULT_SOCKET))
}

/// How long a [`request`] may take, and how many fds its answer may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// For connecting and for sending.
    pub connect: Duration,
    /// For the answer, once the request is sent.
    pub answer: Duration,
    /// Most fds the answer may carry; more are closed unread.
    pub max_fds: usize,
}

impl RequestLimits {
    /// One time-out for everything, and the few fds a `Map` answer carries.
    pub fn new(timeout: Duration) -> Self {
        RequestLimits {
            connect: timeout,
            answer: timeout,
            max_fds: sock::MAX_FDS,
        }
    }
}

/// Send one request (with fds) and wait for its answer and the fds that
/// ride along. An `Error` response is returned as [`Error::Refused`].
pub fn request(
    socket: &Path,
    req: &proto::Request,
    fds: &[BorrowedFd<'_>],
    timeout: Duration,
) -> Result<(proto::Response, Vec<OwnedFd>), Error> {
    request_with(socket, req, fds, RequestLimits::new(timeout))
}

/// [`request`] with separate connect and answer time-outs and a limit on
/// the fds that come back (the preload shim's hello takes up to
/// [`sock::MAX_MESSAGE_FDS`]).
pub fn request_with(
    socket: &Path,
    req: &proto::Request,
    fds: &[BorrowedFd<'_>],
    limits: RequestLimits,
) -> Result<(proto::Response, Vec<OwnedFd>), Error> {
    request_trusting(socket, req, fds, limits, &trust::Trust::from_env())
        .map(|a| (a.response, a.fds))
}

/// An answer from a daemon this process trusts.
#[derive(Debug)]
pub struct Answer {
    pub response: proto::Response,
    /// The fds that rode along.
    pub fds: Vec<OwnedFd>,
    /// The uid the daemon runs as: its replicas must be owned by it
    /// ([`trust::check_replica`]).
    pub daemon_uid: u32,
}

/// [`request_with`], believing only a daemon that `trust` trusts: the
/// socket's `SO_PEERCRED` uid is checked before the request (and the fds
/// with it) is sent, so an untrusted daemon gets nothing.
pub fn request_trusting(
    socket: &Path,
    req: &proto::Request,
    fds: &[BorrowedFd<'_>],
    limits: RequestLimits,
    trust: &trust::Trust,
) -> Result<Answer, Error> {
    let conn = sock::connect(socket, limits.connect).map_err(|source| Error::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    let daemon_uid = trust.check_daemon(conn.as_fd(), socket)?;
    let io_err = |source| Error::Io {
        socket: socket.to_path_buf(),
        source,
    };
    sock::set_recv_timeout(conn.as_fd(), limits.answer).map_err(io_err)?;
    sock::send(conn.as_fd(), &req.encode(), fds).map_err(io_err)?;
    let packet = sock::recv_fds(conn.as_fd(), proto::MAX_RESPONSE + 1, limits.max_fds)
        .map_err(io_err)?
        .ok_or_else(|| Error::NoAnswer {
            socket: socket.to_path_buf(),
        })?;
    if packet.truncated {
        return Err(proto::ProtoError::TooLarge {
            len: packet.len,
            limit: proto::MAX_RESPONSE,
        }
        .into());
    }
    match proto::Response::decode(&packet.data)? {
        proto::Response::Error { kind, message } => Err(Error::Refused { kind, message }),
        response => Ok(Answer {
            response,
            fds: packet.fds,
            daemon_uid,
        }),
    }
}
