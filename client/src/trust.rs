//! Whom the client API and the preload shim believe: only the real daemon.
//!
//! ```text
//!  environment ── AT_SECURE (set-user-ID, capabilities)? every REPLICAD_* ignored
//!       │
//!  connect(socket) ── SO_PEERCRED uid: root, or $REPLICAD_DAEMON_UID ── else refused,
//!       │                                    before anything is sent
//!  replica fd ── regular file, open read-only, on tmpfs or hugetlbfs (the
//!       │        daemon's store: its node tmpfs, its memfds), owned by that uid
//!  <run_dir>/replicas.set ── owned by a trusted uid, writable by no one else
//!                            (fstat of the open file, not the path)
//! ```
//!
//! Anything refused is simply not used: a refused daemon or replica leaves
//! the caller on the file itself, a refused published set makes the caller
//! ask the daemon. A program that runs with more privileges than its caller
//! (the kernel sets `AT_SECURE`) trusts root alone and reads no `REPLICAD_*`
//! variable at all, so whoever starts it cannot point it at a daemon, a
//! node or a debug stream of their own.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use replicad_wire::published::Reader;

use crate::Error;

/// Environment variable naming the uid of a daemon that runs as another
/// user than root; see [`Trust::from_env`].
pub const DAEMON_UID_ENV: &str = replicad_wire::proto::DAEMON_UID_ENV;

/// `statfs.f_type` of tmpfs, where the daemon's node stores and memfds live.
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// `statfs.f_type` of hugetlbfs (memfds made with `MFD_HUGETLB`).
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Whether the kernel marked this process `AT_SECURE`: it runs set-user-ID,
/// set-group-ID or with file capabilities, with more privileges than
/// whoever started it.
pub fn secure() -> bool {
    // SAFETY: getauxval has no preconditions.
    unsafe { libc::getauxval(libc::AT_SECURE) != 0 }
}

/// The environment variable `name`, or `None` under `AT_SECURE`, where
/// the caller's environment is not to be followed.
pub fn env_var(name: &str) -> Option<OsString> {
    if secure() {
        return None;
    }
    std::env::var_os(name)
}

/// The uids whose daemon, replicas and published set this process believes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trust {
    /// Trusted besides root.
    daemon_uid: Option<u32>,
    /// Made under `AT_SECURE` (root only, whatever the environment said).
    secure: bool,
}

impl Trust {
    /// Root alone.
    pub const fn root_only() -> Trust {
        Trust {
            daemon_uid: None,
            secure: false,
        }
    }

    /// Root and `uid`, the user a daemon runs as.
    pub const fn daemon_user(uid: u32) -> Trust {
        Trust {
            daemon_uid: Some(uid),
            secure: false,
        }
    }

    /// This process's trust: root, and the uid that `REPLICAD_DAEMON_UID`
    /// names (a number; anything else is ignored). Under `AT_SECURE` root
    /// alone.
    pub fn from_env() -> Trust {
        if secure() {
            return Trust {
                daemon_uid: None,
                secure: true,
            };
        }
        Trust {
            daemon_uid: std::env::var_os(DAEMON_UID_ENV).and_then(|v| parse_uid(&v)),
            secure: false,
        }
    }

    /// Whether a daemon (or a file) of `uid` is believed.
    pub fn trusts(&self, uid: u32) -> bool {
        uid == 0 || self.daemon_uid == Some(uid)
    }

    /// The uid trusted besides root, if any.
    pub fn daemon_uid(&self) -> Option<u32> {
        self.daemon_uid
    }

    /// The uid the daemon at the other end of `conn` runs as
    /// (`SO_PEERCRED`: the credentials it had when it called `listen`),
    /// if this process trusts it.
    pub fn check_daemon(&self, conn: BorrowedFd<'_>, socket: &Path) -> Result<u32, Error> {
        let peer = replicad_wire::sock::peer_cred(conn).map_err(|source| Error::Io {
            socket: socket.to_path_buf(),
            source,
        })?;
        if !self.trusts(peer.uid) {
            return Err(Error::UntrustedDaemon {
                socket: socket.to_path_buf(),
                uid: peer.uid,
                trust: *self,
            });
        }
        Ok(peer.uid)
    }

    /// Open and map the published set at `path` if a trusted uid owns it
    /// and neither its group nor others may write it, as the open file
    /// shows (a path swapped after the check changes nothing).
    pub fn open_published(&self, path: &Path) -> Result<Reader, Error> {
        let no_set = |source| Error::NoPublishedSet {
            path: path.to_path_buf(),
            source,
        };
        let file = Reader::open_file(path).map_err(no_set)?;
        let meta = file.metadata().map_err(no_set)?;
        let refused = |rule| Error::UntrustedSet {
            path: path.to_path_buf(),
            owner: meta.uid(),
            rule,
        };
        if !self.trusts(meta.uid()) {
            return Err(refused(Rule::UntrustedOwner { trust: *self }));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(refused(Rule::Writable {
                mode: meta.mode() & 0o7777,
            }));
        }
        Reader::from_file(&file, path).map_err(no_set)
    }
}

impl fmt::Display for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.daemon_uid {
            Some(uid) if uid != 0 => {
                write!(f, "trusted: root (uid 0) and uid {uid} ({DAEMON_UID_ENV})")
            }
            _ if self.secure => f.write_str(
                "trusted: root (uid 0) only, as this program runs with more privileges than \
                 its caller (AT_SECURE), where REPLICAD_* variables are ignored",
            ),
            _ => write!(
                f,
                "trusted: root (uid 0) only; {DAEMON_UID_ENV} names the uid of a daemon \
                 that runs as another user"
            ),
        }
    }
}

/// A uid as `REPLICAD_DAEMON_UID` gives it: a decimal number other than
/// `(uid_t)-1`.
pub fn parse_uid(v: &OsStr) -> Option<u32> {
    v.to_str()?
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|&u| u != u32::MAX)
}

/// The rule a replica fd or a published set broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// A system call on the fd failed (its errno).
    Unreadable { call: &'static str, errno: i32 },
    /// Not a regular file.
    NotRegularFile,
    /// Not open read-only: its `F_GETFL` flags.
    NotReadOnly { flags: i32 },
    /// Not on tmpfs or hugetlbfs: its filesystem's `f_type`.
    NotOnStore { magic: i64 },
    /// A replica owned by another uid than the daemon's.
    NotTheDaemons { owner: u32 },
    /// A published set owned by a uid that `trust` does not trust.
    UntrustedOwner { trust: Trust },
    /// Group or others may write it: its mode bits.
    Writable { mode: u32 },
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Rule::Unreadable { call, errno } => {
                write!(f, "{call} failed: {}", io::Error::from_raw_os_error(errno))
            }
            Rule::NotRegularFile => f.write_str("it is not a regular file"),
            Rule::NotReadOnly { flags } => {
                let how = if flags & libc::O_PATH != 0 {
                    "as a path only (O_PATH)"
                } else if flags & libc::O_ACCMODE == libc::O_WRONLY {
                    "write-only"
                } else {
                    "read-write"
                };
                write!(f, "it is open {how}, not read-only")
            }
            Rule::NotOnStore { magic } => write!(
                f,
                "it is on a filesystem of type {magic:#x}, not on tmpfs or hugetlbfs, where \
                 replicad keeps replicas"
            ),
            Rule::NotTheDaemons { owner } => {
                write!(f, "it is owned by uid {owner}, not by the daemon's uid")
            }
            Rule::UntrustedOwner { trust } => write!(f, "that uid is not trusted ({trust})"),
            Rule::Writable { mode } => {
                write!(f, "group or others may write it (mode {mode:04o})")
            }
        }
    }
}

/// Check a replica fd from a daemon running as `daemon_uid` (as
/// [`Trust::check_daemon`] found it): a regular file, open read-only, on
/// tmpfs or hugetlbfs, owned by that uid. Returns its `fstat`.
pub fn check_replica(fd: BorrowedFd<'_>, daemon_uid: u32) -> Result<libc::stat, Error> {
    let refused = |rule| Error::UntrustedReplica {
        path: fd_path(fd),
        daemon_uid,
        rule,
    };
    let failed = |call| {
        refused(Rule::Unreadable {
            call,
            errno: io::Error::last_os_error().raw_os_error().unwrap_or(0),
        })
    };
    // SAFETY: stat is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a live fd and st is valid for writes.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(failed("fstat"));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(refused(Rule::NotRegularFile));
    }
    // SAFETY: F_GETFL on a live fd; no pointer is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(failed("fcntl(F_GETFL)"));
    }
    if flags & libc::O_PATH != 0 || flags & libc::O_ACCMODE != libc::O_RDONLY {
        return Err(refused(Rule::NotReadOnly { flags }));
    }
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a live fd and sfs is valid for writes.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut sfs) } != 0 {
        return Err(failed("fstatfs"));
    }
    let magic = sfs.f_type as i64;
    if magic != TMPFS_MAGIC && magic != HUGETLBFS_MAGIC {
        return Err(refused(Rule::NotOnStore { magic }));
    }
    if st.st_uid != daemon_uid {
        return Err(refused(Rule::NotTheDaemons { owner: st.st_uid }));
    }
    Ok(st)
}

/// What `/proc/self/fd` says `fd` is (`/memfd:<name> (deleted)`, a path
/// in the store), or the link's own path when it cannot be read.
fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    let link = replicad_procfs::ProcReader::default().self_fd_path(fd.as_raw_fd());
    std::fs::read_link(&link).unwrap_or(link)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::PermissionsExt;

    fn memfd(bytes: &[u8]) -> OwnedFd {
        // SAFETY: a valid name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"trust-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        // SAFETY: just created, ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        std::fs::File::from(fd.try_clone().unwrap())
            .write_all(bytes)
            .unwrap();
        fd
    }

    /// A new read-only open of what `fd` is (as the daemon hands replicas).
    fn read_only(fd: &OwnedFd) -> OwnedFd {
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        OwnedFd::from(std::fs::File::open(path).unwrap())
    }

    fn uid() -> u32 {
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() }
    }

    #[test]
    fn a_read_only_memfd_of_the_daemons_uid_is_a_replica() {
        let rw = memfd(b"replica bytes");
        let st = check_replica(read_only(&rw).as_fd(), uid()).unwrap();
        assert_eq!(st.st_size, 13);
    }

    #[test]
    fn a_writable_replica_is_refused() {
        let rw = memfd(b"replica bytes");
        let e = check_replica(rw.as_fd(), uid()).unwrap_err();
        let Error::UntrustedReplica { path, rule, .. } = &e else {
            panic!("{e}");
        };
        assert!(
            matches!(rule, Rule::NotReadOnly { flags } if flags & libc::O_ACCMODE == libc::O_RDWR),
            "{e}"
        );
        assert!(
            path.to_string_lossy().starts_with("/memfd:trust-test"),
            "{e}"
        );
        assert!(e.to_string().contains("read-write, not read-only"), "{e}");
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/self/fd/{}", rw.as_raw_fd()))
            .unwrap();
        let e = check_replica(w.as_fd(), uid()).unwrap_err();
        assert!(e.to_string().contains("write-only, not read-only"), "{e}");
    }

    #[test]
    fn a_replica_on_another_filesystem_is_refused() {
        // The crate's own directory: a disk filesystem, never tmpfs here.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let p = dir.path().join("replica");
        std::fs::write(&p, b"replica bytes").unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let e = check_replica(f.as_fd(), uid()).unwrap_err();
        let Error::UntrustedReplica { path, rule, .. } = &e else {
            panic!("{e}");
        };
        assert!(matches!(rule, Rule::NotOnStore { .. }), "{e}");
        assert_eq!(path, &p);
        assert!(e.to_string().contains("not on tmpfs or hugetlbfs"), "{e}");
    }

    #[test]
    fn a_replica_of_another_uid_is_refused() {
        let rw = memfd(b"replica bytes");
        let other = uid().wrapping_add(1);
        let e = check_replica(read_only(&rw).as_fd(), other).unwrap_err();
        assert!(
            matches!(e, Error::UntrustedReplica { rule: Rule::NotTheDaemons { owner }, daemon_uid, .. }
                if owner == uid() && daemon_uid == other),
            "{e}"
        );
        assert!(
            e.to_string().contains(&format!(
                "from replicad running as uid {other} is refused: it is owned by uid {}, not by \
                 the daemon's uid",
                uid()
            )),
            "{e}"
        );
    }

    #[test]
    fn a_pipe_is_no_replica() {
        let mut fds = [0; 2];
        // SAFETY: fds has room for two fds.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both were just created and are ours.
        let (r, _w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let e = check_replica(r.as_fd(), uid()).unwrap_err();
        assert!(
            matches!(
                e,
                Error::UntrustedReplica {
                    rule: Rule::NotRegularFile,
                    ..
                }
            ),
            "{e}"
        );
    }

    fn set_in(dir: &Path) -> PathBuf {
        let p = dir.join(replicad_wire::published::FILE_NAME);
        drop(replicad_wire::published::Writer::create(&p, 8).unwrap());
        p
    }

    #[test]
    fn a_published_set_must_be_owned_by_a_trusted_uid_and_written_by_no_one_else() {
        let dir = tempfile::tempdir().unwrap();
        let p = set_in(dir.path());
        let me = uid();
        Trust::daemon_user(me).open_published(&p).unwrap();
        for mode in [0o664, 0o646, 0o666] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Trust::daemon_user(me).open_published(&p).unwrap_err();
            assert!(
                matches!(&e, Error::UntrustedSet { rule: Rule::Writable { mode: m }, path, owner }
                    if *m == mode && path == &p && *owner == me),
                "{e}"
            );
            assert!(
                e.to_string()
                    .contains(&format!("group or others may write it (mode {mode:04o})")),
                "{e}"
            );
        }
    }

    #[test]
    fn a_published_set_of_another_uid_is_refused() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: chown needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = set_in(dir.path());
        std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
        let e = Trust::root_only().open_published(&p).unwrap_err();
        assert!(
            matches!(
                &e,
                Error::UntrustedSet {
                    owner: 65534,
                    rule: Rule::UntrustedOwner { .. },
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains(", owned by uid 65534, is not used: that uid is not trusted"),
            "{e}"
        );
        Trust::daemon_user(65534).open_published(&p).unwrap();
    }

    #[test]
    fn uids_parse_as_numbers_only() {
        assert_eq!(parse_uid(OsStr::new("999")), Some(999));
        assert_eq!(parse_uid(OsStr::new(" 0 ")), Some(0));
        assert_eq!(parse_uid(OsStr::new("replicad")), None);
        assert_eq!(parse_uid(OsStr::new("-1")), None);
        assert_eq!(parse_uid(OsStr::new("4294967295")), None);
        assert!(Trust::root_only().trusts(0));
        assert!(!Trust::root_only().trusts(999));
        assert!(Trust::daemon_user(999).trusts(999));
        assert!(Trust::daemon_user(999).trusts(0));
        assert!(!Trust::daemon_user(999).trusts(998));
    }

    #[test]
    fn tests_do_not_run_secure() {
        assert!(!secure());
        assert_eq!(
            env_var("PATH"),
            std::env::var_os("PATH"),
            "outside AT_SECURE the environment is read"
        );
    }
}
