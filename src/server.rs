//! The control socket: `SOCK_SEQPACKET` at `<run_dir>/replicad.sock`, one
//! request per packet, peers known by `SO_PEERCRED`. Every request gets one
//! answer; a malformed, oversized or unexpected one gets an `Error` answer
//! and the connection stays usable. Engine calls run on blocking threads.
//!
//! No user can queue another: root's connections and requests are never
//! counted or refused; every other user may hold 64 connections and have 4
//! requests in flight (all of them together 512 and 32, which leaves the
//! runtime's 64 blocking threads free for root), and a connection of
//! theirs that sends nothing for 2 s after connecting is closed. A user
//! over its limit is told so (`Limit`) and its connection closed; what it
//! waits behind is its own requests.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Semaphore;

use replicad_procfs::ProcReader;
use replicad_replicator::engine::{Attach, Hello, Viewer};
use replicad_replicator::model::SourceKey;
use replicad_replicator::{debug_limited, warn_limited, Replicator};
use replicad_wire::proto::{ErrorKind, Request, Response, MAX_REQUEST};
use replicad_wire::sock::{self, PeerCred};

use crate::wire;

/// Connections of users other than root served at once, all users
/// together; root's are never counted or refused.
const MAX_USER_CONNECTIONS: usize = 512;
/// Connections one user other than root may hold at once.
const MAX_CONNECTIONS_PER_USER: usize = 64;
/// Requests of users other than root in flight at once (each takes one of
/// the runtime's blocking threads, which root's requests need too), all
/// users together, and one user's.
const MAX_USER_REQUESTS: usize = 32;
const MAX_REQUESTS_PER_USER: usize = 4;
/// A connection idle this long is closed.
const IDLE: Duration = Duration::from_secs(30);
/// A connection of a user other than root that sent no request this long
/// after connecting is closed.
const FIRST_REQUEST: Duration = Duration::from_secs(2);

/// The per-user accounting that keeps one user's flood from queueing
/// anyone else: connections and requests in flight, by uid. Root (uid 0)
/// is never limited.
struct Fairness {
    connections: std::sync::Mutex<std::collections::HashMap<u32, usize>>,
    requests: std::sync::Mutex<std::collections::HashMap<u32, Arc<Semaphore>>>,
    all_requests: Semaphore,
}

impl Fairness {
    fn new() -> Arc<Fairness> {
        Arc::new(Fairness {
            connections: Default::default(),
            requests: Default::default(),
            all_requests: Semaphore::new(MAX_USER_REQUESTS),
        })
    }

    /// Count a new connection of `uid`; `Err` says which limit it is over.
    fn connect(self: &Arc<Self>, uid: u32) -> Result<ConnectionSlot, String> {
        if uid == 0 {
            return Ok(ConnectionSlot(None));
        }
        let mut c = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = c.values().sum();
        let mine = c.entry(uid).or_insert(0);
        if *mine >= MAX_CONNECTIONS_PER_USER {
            return Err(format!(
                "uid {uid} already holds {MAX_CONNECTIONS_PER_USER} connections to replicad, \
                 the most one user may: close some"
            ));
        }
        if total >= MAX_USER_CONNECTIONS {
            return Err(format!(
                "replicad serves {MAX_USER_CONNECTIONS} connections of users other than root, \
                 the most it takes: try again later"
            ));
        }
        *mine += 1;
        Ok(ConnectionSlot(Some((self.clone(), uid))))
    }

    /// Wait for room for one more request of `uid` (at once for root).
    async fn request(&self, uid: u32) -> Option<RequestSlot<'_>> {
        if uid == 0 {
            return Some(RequestSlot(None));
        }
        let mine = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(uid)
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_REQUESTS_PER_USER)))
            .clone();
        // This user's own limit first: a flood waits behind itself, and
        // takes no share of the common one while it waits.
        let own = mine.acquire_owned().await.ok()?;
        let all = self.all_requests.acquire().await.ok()?;
        all.forget();
        Some(RequestSlot(Some((own, self))))
    }
}

/// One counted connection; uncounted on drop.
struct ConnectionSlot(Option<(Arc<Fairness>, u32)>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some((f, uid)) = &self.0 {
            let mut c = f.connections.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = c.get_mut(uid) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.remove(uid);
                }
            }
        }
    }
}

/// One request in flight; its room is given back on drop.
struct RequestSlot<'a>(Option<(tokio::sync::OwnedSemaphorePermit, &'a Fairness)>);

impl Drop for RequestSlot<'_> {
    fn drop(&mut self) {
        if let Some((_, f)) = &self.0 {
            f.all_requests.add_permits(1);
        }
    }
}

/// Bind the control socket at `path` (mode 0666: any user may ask for
/// replicas of files it can read). A live daemon already there is an
/// error; a stale socket file is replaced.
pub fn bind(path: &Path) -> anyhow::Result<OwnedFd> {
    if path.exists() {
        if sock::connect(path, Duration::from_millis(200)).is_ok() {
            bail!(
                "another replicad is already serving {}: stop it first, or set daemon.socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let fd = sock::listen(path, 256).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(fd)
}

/// Serve the control socket until the task is dropped.
pub async fn serve(listener: OwnedFd, engine: Replicator, socket: PathBuf) -> anyhow::Result<()> {
    // SAFETY: the AsyncFd owns the fd, so it stays open until the AsyncFd
    // deregisters it on drop.
    let listener = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }?;
    let fair = Fairness::new();
    tracing::info!("control socket listening at {}", socket.display());
    loop {
        let conn = listener
            .async_io(Interest::READABLE, |fd| sock::accept(fd.as_fd()))
            .await;
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // Per connection (EMFILE, ENOBUFS): limited.
                warn_limited!("accept on {}: {e}", socket.display());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Counted (or refused) here, before a task is spawned: a user over
        // its limit costs the accept loop one peer lookup and one send.
        let peer = match sock::peer_cred(conn.as_fd()) {
            Ok(p) => p,
            Err(e) => {
                debug_limited!("control connection: SO_PEERCRED: {e}");
                continue;
            }
        };
        let slot = match fair.connect(peer.uid) {
            Ok(slot) => slot,
            Err(why) => {
                debug_limited!(
                    "pid {} (uid {}): connection refused: {why}",
                    peer.pid,
                    peer.uid
                );
                // Said once, without waiting: a full socket buffer drops it.
                let _ = sock::send(
                    conn.as_fd(),
                    &Response::error(ErrorKind::Limit, why).encode(),
                    &[],
                );
                continue;
            }
        };
        let engine = engine.clone();
        let fair = fair.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(conn, peer, engine, fair).await {
                debug_limited!("control connection: {e}");
            }
            drop(slot);
        });
    }
}

async fn connection(
    conn: OwnedFd,
    peer: PeerCred,
    engine: Replicator,
    fair: Arc<Fairness>,
) -> io::Result<()> {
    let alive = Arc::new(PeerAlive::new(conn.as_fd(), peer.pid));
    // SAFETY: the AsyncFd owns the fd, so it stays open until the AsyncFd
    // deregisters it on drop.
    let conn = unsafe { AsyncFd::register(conn) }?;
    let mut first = true;
    loop {
        let wait = if first && peer.uid != 0 {
            FIRST_REQUEST
        } else {
            IDLE
        };
        first = false;
        let packet = tokio::time::timeout(
            wait,
            conn.async_io(Interest::READABLE, |fd| {
                sock::recv(fd.as_fd(), MAX_REQUEST + 1)
            }),
        )
        .await;
        let packet = match packet {
            Err(_) => return Ok(()), // idle
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => return Ok(()), // peer closed
            Ok(Err(e)) => return Err(e),
        };
        let (response, fds) = if packet.truncated || packet.len > MAX_REQUEST {
            (
                Response::error(
                    ErrorKind::BadRequest,
                    format!(
                        "request of {} bytes exceeds the limit of {MAX_REQUEST} bytes",
                        packet.len
                    ),
                ),
                Vec::new(),
            )
        } else {
            match Request::decode(&packet.data) {
                Err(e) => {
                    let kind = match e {
                        replicad_wire::proto::ProtoError::UnsupportedVersion(_) => {
                            ErrorKind::UnsupportedVersion
                        }
                        _ => ErrorKind::BadRequest,
                    };
                    (Response::error(kind, e.to_string()), Vec::new())
                }
                Ok(req) => {
                    let engine = engine.clone();
                    let fds = packet.fds;
                    let alive = alive.clone();
                    let Some(slot) = fair.request(peer.uid).await else {
                        return Ok(());
                    };
                    let answer = tokio::task::spawn_blocking(move || {
                        handle(&engine, peer, &alive, req, fds)
                    })
                    .await
                    .unwrap_or_else(|e| {
                        (
                            Response::error(ErrorKind::Internal, format!("handler failed: {e}")),
                            Vec::new(),
                        )
                    });
                    drop(slot);
                    answer
                }
            }
        };
        let bytes = response.encode();
        let out: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        conn.async_io(Interest::WRITABLE, |sockfd| {
            sock::send(sockfd.as_fd(), &bytes, &out)
        })
        .await?;
        drop(out);
        drop(fds);
    }
}

/// Whether the process that connected still runs: a pidfd taken from the
/// socket (`SO_PEERPIDFD`, Linux 6.5+) or, on older kernels, opened at
/// accept. The daemon answers a hello from the pid's maps and pagemap; checking
/// after the read that the peer is still alive means the pid was not
/// recycled to another process meanwhile (a pid is reused only after its
/// process is gone).
struct PeerAlive {
    pidfd: Option<OwnedFd>,
}

impl PeerAlive {
    fn new(conn: BorrowedFd<'_>, pid: u32) -> PeerAlive {
        PeerAlive {
            pidfd: sock::peer_pidfd(conn, pid).ok(),
        }
    }

    fn check(&self) -> bool {
        self.pidfd
            .as_ref()
            .is_some_and(|fd| sock::pidfd_alive(fd.as_fd()))
    }
}

/// What the peer may see of the replica list: root everything; another
/// user what it could read itself, with the groups its process has now
/// (`/proc/<pid>/status`; the connection's gid alone if it is gone).
fn viewer(peer: &PeerCred) -> Viewer {
    if peer.uid == 0 {
        return Viewer::Root;
    }
    let groups = ProcReader::default()
        .status(peer.pid)
        .ok()
        .flatten()
        .map(|s| s.groups)
        .unwrap_or_default();
    Viewer::User {
        uid: peer.uid,
        gid: peer.gid,
        groups,
    }
}

/// How long the list a first status page was cut from serves the pages
/// that follow it: a caller paging through gets one consistent list, and
/// the list is built once, not once a page.
const STATUS_SNAPSHOT: Duration = Duration::from_secs(2);

/// The list the last first page was cut from, for whom, and when.
type Snapshot = (
    std::time::Instant,
    Viewer,
    Arc<replicad_wire::proto::StatusReport>,
);
static SNAPSHOT: std::sync::Mutex<Option<Snapshot>> = std::sync::Mutex::new(None);

/// One page of what `peer` may see of the status: the first from a list
/// built now, the next ones from the same list while it is fresh.
fn status_page(
    engine: &Replicator,
    peer: &PeerCred,
    after: Option<&replicad_wire::proto::StatusCursor>,
) -> replicad_wire::proto::StatusReport {
    let viewer = viewer(peer);
    let cached = after.and_then(|_| {
        let guard = SNAPSHOT.lock().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .filter(|(at, v, _)| *v == viewer && at.elapsed() < STATUS_SNAPSHOT)
            .map(|(_, _, full)| full.clone())
    });
    let full = match cached {
        Some(full) => full,
        None => {
            let full = Arc::new(wire::status(&engine.status_for(&viewer)));
            *SNAPSHOT.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((std::time::Instant::now(), viewer, full.clone()));
            full
        }
    };
    wire::status_page(&full, after, wire::STATUS_PAGE_BYTES)
}

/// Whether `pid` is a process that a peer which connected as `uid` could
/// inspect itself. The kernel has `/proc/<pid>` owned by the process's
/// effective uid while it is dumpable, and by root once it has run a
/// set-user-ID, file-capability or unreadable program (or turned dumping
/// off). A hello is answered from the pid's maps, but the answer (fds of
/// every replicated file the process maps) goes to whoever holds the
/// connection: without this check, a process could connect, fork, and
/// exec a set-user-ID program under the pid the daemon knows the
/// connection by, and its child would be handed that program's files.
fn inspectable_by(pid: u32, uid: u32) -> bool {
    uid == 0 || ProcReader::default().proc_owner_uid(pid).ok().flatten() == Some(uid)
}

/// Tell the engine where the peer keeps its fallback table and which of
/// its ranges replicas back now (its Hello or Map said so), if the peer
/// still runs and is still its uid's to inspect: a revoke looks at those
/// ranges for private pages and may write the peer's memory (`carry.rs`).
fn note_table(
    engine: &Replicator,
    peer: &PeerCred,
    alive: &PeerAlive,
    table: u64,
    ranges: &[(SourceKey, u64, u64)],
) {
    let ranges: Vec<_> = ranges.iter().filter(|r| r.1 < r.2).copied().collect();
    if table != 0 && !ranges.is_empty() && alive.check() && inspectable_by(peer.pid, peer.uid) {
        engine.note_table(peer.pid, peer.uid, table, &ranges);
    }
}

/// The device, inode and size of a client's fd.
fn source_key(fd: std::os::fd::BorrowedFd<'_>) -> Option<(SourceKey, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::File::from(fd.try_clone_to_owned().ok()?)
        .metadata()
        .ok()?;
    Some((
        SourceKey {
            dev: meta.dev(),
            ino: meta.ino(),
        },
        meta.len(),
    ))
}

/// The range a Map says the client mapped (`at`, `len`, the length
/// rounded up to a page as the kernel maps it), as `(start, end)`, if it
/// can be one: page-aligned, in user space, no longer than the file
/// (rounded up to a page). A revoke scans it; a client may not make that
/// scan longer than its own mapping of the file could be.
fn client_range(at: u64, len: u64, size: u64) -> Option<(u64, u64)> {
    const USER_END: u64 = 1 << 57;
    let page = replicad_procfs::page_size() as u64;
    let len = len.checked_next_multiple_of(page)?;
    let end = at.checked_add(len)?;
    let fits = at != 0
        && len != 0
        && at.is_multiple_of(page)
        && len <= size.div_ceil(page) * page
        && end <= USER_END;
    fits.then_some((at, end))
}

/// Run one request on a blocking thread.
fn handle(
    engine: &Replicator,
    peer: PeerCred,
    alive: &PeerAlive,
    req: Request,
    fds: Vec<OwnedFd>,
) -> (Response, Vec<OwnedFd>) {
    if req.is_admin() && peer.uid != 0 {
        return (
            Response::error(
                ErrorKind::PermissionDenied,
                format!(
                    "this request needs root (uid 0); pid {} runs as uid {}",
                    peer.pid, peer.uid
                ),
            ),
            Vec::new(),
        );
    }
    let wants_fds = matches!(req, Request::Map { .. });
    if !wants_fds && !fds.is_empty() {
        return (
            Response::error(
                ErrorKind::BadRequest,
                format!("this request carries no fds, but {} came along", fds.len()),
            ),
            Vec::new(),
        );
    }
    let from_engine = |e: replicad_replicator::Error| wire::error(&e);
    match req {
        Request::Map {
            node,
            table,
            at,
            len,
        } => {
            if fds.len() != 1 {
                return (
                    Response::error(
                        ErrorKind::BadRequest,
                        format!(
                            "map needs exactly one fd (the file, opened O_RDONLY), got {}",
                            fds.len()
                        ),
                    ),
                    Vec::new(),
                );
            }
            match engine.attach(peer.pid, fds[0].as_fd(), node) {
                Ok(Attach::Replica {
                    fd,
                    node,
                    generation,
                    size,
                }) => {
                    if let Some((key, size)) = source_key(fds[0].as_fd()) {
                        if let Some(range) = client_range(at, len, size) {
                            note_table(engine, &peer, alive, table, &[(key, range.0, range.1)]);
                        }
                    }
                    (
                        Response::Mapped {
                            node,
                            generation,
                            size,
                        },
                        vec![fd],
                    )
                }
                Ok(Attach::Original { reason }) => (Response::Original { reason }, Vec::new()),
                Err(e) => (from_engine(e), Vec::new()),
            }
        }
        Request::Replicate { path, nodes } => match engine.replicate(&path, &wire::nodes(&nodes)) {
            Ok(source) => (
                Response::Replicated {
                    source: wire::source(&source),
                },
                Vec::new(),
            ),
            Err(e) => {
                warn_limited!("replicate requested by pid {}: {e}", peer.pid);
                (from_engine(e), Vec::new())
            }
        },
        Request::Evict { path } => match engine.evict(&path) {
            Ok(replicas) => (Response::Evicted { replicas }, Vec::new()),
            Err(e) => (from_engine(e), Vec::new()),
        },
        Request::Status => (
            Response::Status {
                report: status_page(engine, &peer, None),
            },
            Vec::new(),
        ),
        Request::StatusFrom { after } => (
            Response::Status {
                report: status_page(engine, &peer, Some(&after)),
            },
            Vec::new(),
        ),
        Request::Hello { .. } if !inspectable_by(peer.pid, peer.uid) => (
            Response::error(
                ErrorKind::PermissionDenied,
                format!(
                    "pid {} is no longer uid {}'s to inspect (since it connected it ran a \
                     set-user-ID, file-capability or unreadable program, or made itself \
                     non-dumpable): not attached",
                    peer.pid, peer.uid
                ),
            ),
            Vec::new(),
        ),
        // The check again after the engine's maps read (`alive` runs
        // then): an exec between the first check and the read is caught.
        Request::Hello { node, table } => match engine.hello(peer.pid, node, &|| {
            alive.check() && inspectable_by(peer.pid, peer.uid)
        }) {
            Ok(h) => {
                if let Hello::Attached(a) = &h {
                    let ranges: Vec<_> = a.ranges.iter().map(|r| (r.key, r.start, r.end)).collect();
                    note_table(engine, &peer, alive, table, &ranges);
                }
                wire::hello(peer.pid, h)
            }
            Err(e) => (from_engine(e), Vec::new()),
        },
        Request::Heat { paths } => (
            Response::Heat {
                report: crate::planner::heat(engine, &paths),
            },
            Vec::new(),
        ),
        Request::Plan => (
            Response::Plan {
                report: crate::planner::plan(),
            },
            Vec::new(),
        ),
        Request::Migrate { path, node } => match engine.migrate(&path, node) {
            Ok(m) => (
                Response::Migrated {
                    path: m.path,
                    node: m.node,
                    before: wire::by_node(&m.resident_before),
                    after: wire::by_node(&m.resident_after),
                    moved: m.moved,
                    failed: m.failed,
                },
                Vec::new(),
            ),
            Err(e) => (from_engine(e), Vec::new()),
        },
        Request::ReplicatePid { pid, nodes } => {
            match engine.replicate_pid(pid, &wire::nodes(&nodes)) {
                Ok((sources, skipped)) => (
                    Response::ReplicatedPid {
                        sources: sources.iter().map(wire::source).collect(),
                        skipped: wire::skipped(&skipped),
                    },
                    Vec::new(),
                ),
                Err(e) => {
                    warn_limited!("replicate --pid {pid} requested by pid {}: {e}", peer.pid);
                    (from_engine(e), Vec::new())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::client_range;

    #[test]
    fn a_client_range_is_page_aligned_user_space_and_no_longer_than_the_file() {
        let mib = 1 << 20;
        assert_eq!(
            client_range(0x7f00_0000_0000, mib, mib),
            Some((0x7f00_0000_0000, 0x7f00_0010_0000))
        );
        // The kernel maps whole pages: 10000 bytes are three.
        assert_eq!(client_range(0x1000, 10000, 10000), Some((0x1000, 0x4000)));
        assert_eq!(client_range(0x1001, 4096, mib), None, "unaligned");
        assert_eq!(client_range(0, 4096, mib), None, "address 0");
        assert_eq!(client_range(0x1000, 0, mib), None, "empty");
        assert_eq!(
            client_range(0x1000, 2 * mib, mib),
            None,
            "longer than the file"
        );
        assert_eq!(client_range(1 << 57, 4096, mib), None, "past user space");
        assert_eq!(client_range(u64::MAX - 4095, 4096, mib), None, "wraps");
        assert_eq!(client_range(0x1000, u64::MAX, u64::MAX), None, "wraps");
    }
}
