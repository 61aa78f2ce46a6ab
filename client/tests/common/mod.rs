//! A tiny in-test replicad: a real `SOCK_SEQPACKET` listening socket in a
//! tempdir, answering each connection with whatever the test asks for.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use replicad_client::proto::{Request, Response};
use replicad_client::sock;

/// Whether skips are failures: `REPLICAD_STRICT=1` (scripts/test.sh sets it
/// in CI and when run as root); the same rule as tests/common.
pub fn strict() -> bool {
    std::env::var("REPLICAD_STRICT").is_ok_and(|v| v == "1")
}

/// Skip `test` because of `why` (a missing tool or privilege): prints
/// `SKIP`, or panics under `REPLICAD_STRICT=1`, where every such skip is
/// a failure.
pub fn skip(test: &str, why: &str) {
    assert!(
        !strict(),
        "{test} cannot run: {why} (REPLICAD_STRICT=1: a skip is a failure)"
    );
    println!("SKIP {test}: {why}");
}

/// Skip `test` for lack of hardware CI never has (a GPU): never a
/// failure, even under `REPLICAD_STRICT=1`.
pub fn skip_no_hardware(test: &str, why: &str) {
    println!("SKIP {test}: no hardware: {why}");
}

/// Name the replica memfds carry (`/proc/self/maps` shows `/memfd:<name>`).
pub const REPLICA_NAME: &str = "replicad-test-replica";

/// What the fake daemon does with one request.
pub enum Reply {
    /// Send these bytes with these fds, then close.
    Send(Vec<u8>, Vec<OwnedFd>),
    /// Close without answering.
    Close,
    /// Wait this long, then close.
    Stall(std::time::Duration),
}

/// What one connection brought: the decoded request (if it decoded) and its fds.
pub struct Incoming {
    pub request: Option<Request>,
    pub fds: Vec<OwnedFd>,
}

type Behaviour = dyn Fn(Incoming) -> Reply + Send + Sync;

pub struct FakeDaemon {
    dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// The replicas handed out so far (the daemon's own fds of them, so the
    /// test can revoke them by truncating to 0).
    pub replicas: Arc<Mutex<Vec<File>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn listen(path: &Path) -> OwnedFd {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: addr is a valid sockaddr_un of the given size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    // SAFETY: plain syscall on our socket.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), 64) };
    assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
    fd
}

impl FakeDaemon {
    /// A daemon that answers every connection with `behaviour`.
    pub fn start(behaviour: impl Fn(Incoming) -> Reply + Send + Sync + 'static) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("replicad.sock");
        let listener = listen(&socket);
        let stop = Arc::new(AtomicBool::new(false));
        let behaviour: Arc<Behaviour> = Arc::new(behaviour);
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || loop {
            // SAFETY: accept4 on our listening socket; the result is checked.
            let c = unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if stop2.load(Ordering::SeqCst) {
                if c >= 0 {
                    // SAFETY: c was just returned by accept4.
                    drop(unsafe { OwnedFd::from_raw_fd(c) });
                }
                return;
            }
            if c < 0 {
                continue;
            }
            // SAFETY: c was just returned by accept4 and is ours.
            let conn = unsafe { OwnedFd::from_raw_fd(c) };
            let Ok(Some(packet)) = sock::recv(conn.as_fd(), 64 * 1024) else {
                continue;
            };
            let request = Request::decode(&packet.data).ok();
            match behaviour(Incoming {
                request,
                fds: packet.fds,
            }) {
                Reply::Send(bytes, fds) => {
                    if bytes.len() > 200_000 {
                        force_sndbuf(&conn, bytes.len() * 2);
                    }
                    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
                    if let Err(e) = sock::send(conn.as_fd(), &bytes, &borrowed) {
                        eprintln!("fake daemon: send of {} bytes failed: {e}", bytes.len());
                    }
                }
                Reply::Close => {}
                Reply::Stall(d) => std::thread::sleep(d),
            }
        });
        FakeDaemon {
            dir,
            socket,
            replicas: Arc::new(Mutex::new(Vec::new())),
            stop,
            thread: Some(thread),
        }
    }

    /// A daemon that answers `Map` with `Mapped{node: 0, generation: 1}` and
    /// a memfd copy of the file whose fd came along, opened read-only (as
    /// the daemon hands its replicas).
    pub fn with_replicas() -> Self {
        let replicas: Arc<Mutex<Vec<File>>> = Arc::new(Mutex::new(Vec::new()));
        let r2 = replicas.clone();
        let mut d = FakeDaemon::start(move |inc| {
            let (Some(Request::Map { .. }), [src]) = (&inc.request, &inc.fds[..]) else {
                return Reply::Send(
                    Response::error(replicad_client::proto::ErrorKind::BadRequest, "bad").encode(),
                    vec![],
                );
            };
            let (replica, size) = replica_copy(src);
            let handed = read_only(&replica);
            r2.lock().unwrap().push(File::from(replica));
            Reply::Send(
                Response::Mapped {
                    node: 0,
                    generation: 1,
                    size,
                }
                .encode(),
                vec![handed],
            )
        });
        d.replicas = replicas;
        d
    }

    /// Truncate every replica handed out so far to 0, as the daemon's revoke does.
    pub fn revoke_all(&self) {
        for f in self.replicas.lock().unwrap().iter() {
            f.set_len(0).unwrap();
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept.
        let _ = sock::connect(&self.socket, std::time::Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn force_sndbuf(conn: &OwnedFd, size: usize) {
    let v = size as libc::c_int;
    // SAFETY: v is a valid int for the option. Root may exceed wmem_max with
    // SO_SNDBUFFORCE; failure is fine (the send then fails and is reported).
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A memfd named [`REPLICA_NAME`] holding `len` bytes copied from `src`.
pub fn memfd(name: &str) -> OwnedFd {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: name is a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just created and is ours.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Copy the file behind `src` (with pread: its offset is shared with the
/// client's fd) into a fresh memfd.
pub fn replica_copy(src: &OwnedFd) -> (OwnedFd, u64) {
    let src = File::from(src.try_clone().unwrap());
    let len = src.metadata().unwrap().len();
    let mut buf = vec![0u8; len as usize];
    src.read_exact_at(&mut buf, 0).unwrap();
    let fd = memfd(REPLICA_NAME);
    let mut f = File::from(fd.try_clone().unwrap());
    f.write_all(&buf).unwrap();
    (fd, len)
}

/// A new read-only open of the file behind `fd` (through `/proc/self/fd`,
/// as the daemon opens its memfd replicas for clients).
pub fn read_only(fd: &OwnedFd) -> OwnedFd {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    OwnedFd::from(File::open(path).unwrap())
}

/// A deterministic byte pattern, different per `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8) ^ seed) | 1)
        .collect()
}

/// Write `bytes` as a new file `name` in `dir`.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The `/proc/self/maps` line of the mapping that holds `addr`.
pub fn maps_line(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let range = line.split_whitespace().next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let a = usize::from_str_radix(a, 16).unwrap();
        let b = usize::from_str_radix(b, 16).unwrap();
        if a <= addr && addr < b {
            return line.to_string();
        }
    }
    panic!("no mapping holds {addr:#x}");
}

/// Read every byte through volatile loads (so each read really touches the
/// mapping) and return the index of the first one that differs.
pub fn first_mismatch(m: &[u8], want: &[u8]) -> Option<usize> {
    assert_eq!(m.len(), want.len());
    (0..m.len()).find(|&i| {
        // SAFETY: i < m.len(); m is a live mapping.
        let b = unsafe { std::ptr::read_volatile(m.as_ptr().add(i)) };
        b != want[i]
    })
}
