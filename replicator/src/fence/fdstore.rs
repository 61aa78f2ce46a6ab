//! systemd's file descriptor store (`FDSTORE=1`): under systemd every lease
//! fd and memfd replica fd the keeper holds is also handed to systemd (a
//! tmpfs replica needs none: the file stays in the store, found again by
//! its identity xattrs, [`crate::store::replicas_in`]), so that
//! when the daemon and its keeper die together the leases live on (a
//! writer waits, up to lease-break-time) until the restarted daemon takes
//! them back from `LISTEN_FDS` and adopts them as it would from a keeper.
//!
//! ```text
//!  keep(source)   FDSTORE=1 FDNAME=src-<dev>-<ino>  [the source's lease fd]
//!                 FDSTORE=1 FDNAME=lay-<dev>-<ino>  [its layers' lease fds]
//!                 FDSTORE=1 FDNAME=rep-<dev>-<ino>  [its memfd replicas]
//!  unkeep(source) FDSTOREREMOVE=1 FDNAME=... each
//!  main (first)   LISTEN_PID = us: fds 3.. named by LISTEN_FDNAMES taken
//!  engine start   adopted when no keeper survived
//! ```
//!
//! systemd keeps one copy of a descriptor passed again, and needs
//! `FileDescriptorStoreMax=` in the unit (deploy/systemd).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::sys::socket::{self as socket, AddressFamily, SockFlag, SockType, UnixAddr};

use super::keeper::Handed;
use crate::model::SourceKey;
use crate::sys;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// The notify socket, when systemd gave one.
#[derive(Debug)]
pub struct FdStore {
    addr: UnixAddr,
    sock: OwnedFd,
}

impl FdStore {
    /// The store systemd offers through `NOTIFY_SOCKET`, if any.
    pub fn from_env() -> Option<FdStore> {
        FdStore::at(std::env::var_os("NOTIFY_SOCKET")?)
    }

    /// The store at a notify socket path (`@name`: abstract).
    pub fn at(path: OsString) -> Option<FdStore> {
        let bytes = path.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => UnixAddr::new_abstract(name).ok()?,
            None => UnixAddr::new(bytes).ok()?,
        };
        let sock = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .ok()?;
        Some(FdStore { addr, sock })
    }

    /// Send one notification with `fds` riding along.
    pub fn notify(&self, state: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        if fds.len() > sys::MAX_SEND_FDS {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let raw: Vec<RawFd> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let iov = [io::IoSlice::new(state.as_bytes())];
        let cmsg = [socket::ControlMessage::ScmRights(&raw)];
        let cmsgs: &[socket::ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        socket::sendmsg(
            std::os::fd::AsRawFd::as_raw_fd(&self.sock),
            &iov,
            cmsgs,
            socket::MsgFlags::MSG_NOSIGNAL,
            Some(&self.addr),
        )?;
        Ok(())
    }

    /// Store `key`'s lease fds (the source's first) and memfd replicas
    /// (none for a source whose replicas are all tmpfs).
    pub fn store(
        &self,
        key: SourceKey,
        leases: &[BorrowedFd<'_>],
        replicas: &[BorrowedFd<'_>],
    ) -> io::Result<()> {
        let (first, layers) = leases.split_first().ok_or(io::ErrorKind::InvalidInput)?;
        self.notify(&entry("FDSTORE=1", "src", key), &[*first])?;
        if !layers.is_empty() {
            self.notify(&entry("FDSTORE=1", "lay", key), layers)?;
        }
        if replicas.is_empty() {
            return Ok(());
        }
        self.notify(&entry("FDSTORE=1", "rep", key), replicas)
    }

    /// Forget everything stored for `key` (revoked, or gone from the list).
    pub fn remove(&self, key: SourceKey) {
        for kind in ["src", "lay", "rep"] {
            let _ = self.notify(&entry("FDSTOREREMOVE=1", kind, key), &[]);
        }
    }
}

fn entry(verb: &str, kind: &str, key: SourceKey) -> String {
    format!("{verb}\nFDNAME={kind}-{}-{}", key.dev, key.ino)
}

/// What [`capture`] took from systemd, until the engine starts.
static CAPTURED: std::sync::Mutex<Vec<Handed>> = std::sync::Mutex::new(Vec::new());

/// The most fds taken from `LISTEN_FDS` (systemd's own default store
/// limit is far lower; more means a garbage count).
const MAX_LISTEN_FDS: usize = 1 << 16;

/// Take the fds systemd passed us from the store (`LISTEN_PID` is us), at
/// the very start of `main`, before any thread or fd of ours exists: each
/// is checked to be open, made close-on-exec (no child inherits them), and
/// grouped as a keeper would have handed them; the `LISTEN_*` variables
/// are removed. [`take_captured`] hands them to the engine.
pub fn capture() {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let n: usize = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // Single-threaded still (the first thing main does).
        std::env::remove_var(var);
    }
    if !pid_ok || n == 0 {
        return;
    }
    let names: Vec<&str> = names.split(':').collect();
    // A count beyond the names given is garbage: only named fds are ours.
    let n = n.min(names.len()).min(MAX_LISTEN_FDS);
    let mut fds = Vec::with_capacity(n);
    for (i, name) in names.iter().enumerate().take(n) {
        let Some(fd) = RawFd::try_from(i)
            .ok()
            .and_then(|i| LISTEN_FDS_START.checked_add(i))
        else {
            break;
        };
        // SAFETY: F_GETFD on any number only asks whether it is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            continue;
        }
        // SAFETY: systemd passed fds 3..3+LISTEN_FDS to this process, for
        // it alone; it is open (above), and nothing of ours exists yet.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        fds.push((*name, owned));
    }
    let handed = group(fds);
    *CAPTURED.lock().unwrap_or_else(|p| p.into_inner()) = handed;
}

/// What [`capture`] took (once; empty after).
pub fn take_captured() -> Vec<Handed> {
    std::mem::take(&mut *CAPTURED.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Group named fds (`src-`, `lay-`, `rep-<dev>-<ino>`) by source; sources
/// without a lease fd are dropped (their fds close). A source with no
/// replica fd may have tmpfs replicas, which stay in the store: the engine
/// finds them by path (and revokes a source with none).
pub fn group<'a>(fds: impl IntoIterator<Item = (&'a str, OwnedFd)>) -> Vec<Handed> {
    #[derive(Default)]
    struct Parts {
        src: Option<OwnedFd>,
        layers: Vec<OwnedFd>,
        replicas: Vec<OwnedFd>,
        duplicate: bool,
    }
    let mut by: BTreeMap<SourceKey, Parts> = BTreeMap::new();
    for (name, fd) in fds {
        let Some((kind, key)) = parse_name(name) else {
            continue;
        };
        let p = by.entry(key).or_default();
        match kind {
            // Two lease fds for one source: an entry left from an earlier
            // fence. Which one holds the lease is not known here, so the
            // source is not adopted (its replicas are truncated as
            // leftovers, and their lease fds close).
            "src" if p.src.is_some() => p.duplicate = true,
            "src" => p.src = Some(fd),
            "lay" => p.layers.push(fd),
            _ => p.replicas.push(fd),
        }
    }
    by.into_iter()
        .filter_map(|(key, p)| {
            let src = p.src?;
            if p.duplicate {
                return None;
            }
            let mut leases = vec![src];
            leases.extend(p.layers);
            Some(Handed {
                key,
                leases,
                replicas: p.replicas,
                paths: Vec::new(),
                stamp: None,
            })
        })
        .collect()
}

fn parse_name(name: &str) -> Option<(&str, SourceKey)> {
    let mut parts = name.splitn(3, '-');
    let kind = parts.next()?;
    if !matches!(kind, "src" | "lay" | "rep") {
        return None;
    }
    let dev = parts.next()?.parse().ok()?;
    let ino = parts.next()?.parse().ok()?;
    Some((kind, SourceKey { dev, ino }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn fd() -> OwnedFd {
        OwnedFd::from(std::fs::File::open("/dev/null").unwrap())
    }

    #[test]
    fn names_group_into_sources() {
        let got = group([
            ("rep-1-2", fd()),
            ("src-1-2", fd()),
            ("lay-1-2", fd()),
            ("rep-1-2", fd()),
            ("src-3-4", fd()), // no replica fd: its tmpfs replicas are in the store
            ("src-7-8", fd()), // two lease fds: dropped
            ("src-7-8", fd()),
            ("rep-7-8", fd()),
            ("rep-5-6", fd()), // no lease: dropped
            ("other", fd()),
            ("src-x-1", fd()),
        ]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].key, SourceKey { dev: 1, ino: 2 });
        assert_eq!(got[0].leases.len(), 2);
        assert_eq!(got[0].replicas.len(), 2);
        assert_eq!(got[1].key, SourceKey { dev: 3, ino: 4 });
        assert_eq!((got[1].leases.len(), got[1].replicas.len()), (1, 0));
        assert_eq!(
            parse_name("rep-18446744073709551615-1").map(|p| p.1.dev),
            Some(u64::MAX)
        );
        assert_eq!(parse_name("src--1-2"), None);
    }

    #[test]
    fn notifications_carry_names_and_fds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let store = FdStore::at(path.into_os_string()).unwrap();
        let (a, b) = (fd(), fd());
        let key = SourceKey { dev: 9, ino: 10 };
        store.store(key, &[a.as_fd()], &[b.as_fd()]).unwrap();
        let mut buf = [0u8; 256];
        let mut texts = Vec::new();
        for _ in 0..2 {
            let (n, fds) = sys::recv_with_fds(rx.as_fd(), &mut buf).unwrap().unwrap();
            texts.push((String::from_utf8_lossy(&buf[..n]).into_owned(), fds.len()));
        }
        assert_eq!(
            texts,
            [
                ("FDSTORE=1\nFDNAME=src-9-10".to_string(), 1),
                ("FDSTORE=1\nFDNAME=rep-9-10".to_string(), 1)
            ]
        );
        store.remove(key);
        let (n, fds) = sys::recv_with_fds(rx.as_fd(), &mut buf).unwrap().unwrap();
        assert_eq!(&buf[..n], b"FDSTOREREMOVE=1\nFDNAME=src-9-10");
        assert!(fds.is_empty());
    }
}
