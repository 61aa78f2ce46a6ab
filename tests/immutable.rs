//! Replicas nobody can write, root included (issue 10). A root client
//! (this test) tries everything its replica fd, its mapping and the names
//! they show (`/proc/self/fd`, the store path) allow, on both store kinds
//! (tmpfs, memfd): every attempt fails and readers keep the source's
//! bytes. Each client gets an open file description of its own. Revoke,
//! adoption after `kill -9` and a keeper that must be killed still cut
//! every replica (the fence clears the immutable flag first).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use replicad_client::proto::{Request, Response};

/// The store kinds, and the config that gets each.
const STORES: [(&str, &str); 2] = [("tmpfs", ""), ("memfd", "[store]\nforce_memfd = true\n")];

const LEN: usize = 32 * 4096;

/// `FS_IMMUTABLE_FL` (linux/fs.h).
const FS_IMMUTABLE_FL: libc::c_int = 0x10;

/// Tests that kill daemons, trap keepers or lower lease-break-time run one
/// at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A daemon on `store`, a file of `LEN` bytes replicated on node 0.
fn replicated(store: &str, extra: &str, tag: &str) -> (Daemon, tempfile::TempDir, PathBuf) {
    let d = Daemon::start(extra);
    let dir = scratch(tag);
    let file = dir.path().join("f");
    make_file(&file, LEN, 3);
    d.ctl_ok(&["replicate", "--nodes", "0", file.to_str().unwrap()]);
    let label = replica_label(&d);
    assert_eq!(
        label.starts_with("memfd:"),
        store == "memfd",
        "{store}: the replica is {label}"
    );
    (d, dir, file)
}

/// The replica's file as status shows it (a store path, or `memfd:...`).
fn replica_label(d: &Daemon) -> String {
    d.status().sources[0].replicas[0].file.clone()
}

/// What a client is given for `file`: the node-0 replica's fd.
fn replica_fd(d: &Daemon, file: &Path) -> OwnedFd {
    let f = std::fs::File::open(file).unwrap();
    let (resp, mut fds) = replicad_client::request(
        &d.socket,
        &Request::Map {
            node: Some(0),
            table: 0,
            at: 0,
            len: 0,
        },
        &[f.as_fd()],
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(
        matches!(resp, Response::Mapped { size, .. } if size == LEN as u64),
        "{resp:?}"
    );
    assert_eq!(fds.len(), 1);
    fds.remove(0)
}

/// The result of a raw call returning -1 on failure.
fn rc(n: impl Into<i64>) -> Result<(), std::io::Error> {
    if n.into() < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn inode_flags(fd: BorrowedFd<'_>) -> libc::c_int {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int to the valid pointer given.
    let n = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    rc(n).unwrap();
    flags
}

/// Every way a root client might change the replica behind `rfd`: what
/// got through, by name.
fn writes_that_got_through(rfd: BorrowedFd<'_>, store_path: Option<&Path>) -> Vec<String> {
    let fd = rfd.as_raw_fd();
    let page = 4096;
    let mut tries: Vec<(String, Result<(), std::io::Error>)> = Vec::new();
    // SAFETY: each call passes a valid fd and buffers of the lengths
    // given; the mappings made are unmapped here.
    unsafe {
        tries.push((
            "write".into(),
            rc(libc::write(fd, b"X".as_ptr().cast(), 1) as i64),
        ));
        tries.push((
            "pwrite".into(),
            rc(libc::pwrite(fd, b"X".as_ptr().cast(), 1, 0) as i64),
        ));
        tries.push(("ftruncate".into(), rc(libc::ftruncate(fd, 0))));
        tries.push((
            "fallocate".into(),
            rc(libc::fallocate(fd, 0, 0, 2 * LEN as libc::off_t)),
        ));
        tries.push((
            "fallocate PUNCH_HOLE".into(),
            rc(libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                page,
            )),
        ));
        let p = libc::mmap(
            std::ptr::null_mut(),
            page as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        let mapped = if p == libc::MAP_FAILED {
            Err(std::io::Error::last_os_error())
        } else {
            libc::munmap(p, page as usize);
            Ok(())
        };
        tries.push(("mmap MAP_SHARED PROT_WRITE".into(), mapped));
        let p = libc::mmap(
            std::ptr::null_mut(),
            page as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "a read-only mapping of the replica");
        let protected = rc(libc::mprotect(
            p,
            page as usize,
            libc::PROT_READ | libc::PROT_WRITE,
        ));
        if protected.is_ok() {
            std::ptr::write_volatile(p.cast::<u8>(), b'X');
        }
        libc::munmap(p, page as usize);
        tries.push(("mprotect PROT_WRITE".into(), protected));
        // Its identity: what a daemon adopting it believes.
        let v = b"9:1:1:1";
        tries.push((
            "fsetxattr trusted.replicad.generation".into(),
            rc(libc::fsetxattr(
                fd,
                c"trusted.replicad.generation".as_ptr(),
                v.as_ptr().cast(),
                v.len(),
                0,
            )),
        ));
        tries.push(("fchmod 0666".into(), rc(libc::fchmod(fd, 0o666))));
    }
    // The names it shows: reopened, or truncated by name.
    let mut names = vec![PathBuf::from(format!("/proc/self/fd/{fd}"))];
    names.extend(store_path.map(Path::to_path_buf));
    for name in &names {
        let opens = [
            ("O_RDWR", libc::O_RDWR),
            ("O_WRONLY", libc::O_WRONLY),
            ("O_WRONLY|O_APPEND", libc::O_WRONLY | libc::O_APPEND),
            ("O_RDONLY|O_TRUNC", libc::O_RDONLY | libc::O_TRUNC),
        ];
        for (what, flags) in opens {
            let c = std::ffi::CString::new(name.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: open of a NUL-terminated path; a returned fd is closed.
            let got = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
            let result = rc(got);
            if got >= 0 {
                // SAFETY: a write of one byte to the fd just opened, then
                // its close.
                unsafe {
                    libc::pwrite(got, b"X".as_ptr().cast(), 1, 0);
                    libc::close(got);
                }
            }
            tries.push((format!("open {} {what}", name.display()), result));
        }
        let c = std::ffi::CString::new(name.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: truncate(2) of a NUL-terminated path.
        let r = rc(unsafe { libc::truncate(c.as_ptr(), 0) });
        tries.push((format!("truncate {}", name.display()), r));
    }
    if let Some(path) = store_path {
        tries.push((
            format!("unlink {}", path.display()),
            std::fs::remove_file(path),
        ));
    }
    tries
        .into_iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(what, _)| what)
        .collect()
}

/// A root client can change a replica's bytes through nothing it is
/// given; the replica, a new mapping and an old one all read the
/// source's bytes; a writer still revokes it and readers see the new
/// bytes.
#[test]
fn no_client_changes_a_replica_root_included() {
    if !root_or_skip("no_client_changes_a_replica_root_included") {
        return;
    }
    for (store, extra) in STORES {
        let (d, _dir, file) = replicated(store, extra, &format!("imm-{store}"));
        let want = std::fs::read(&file).unwrap();
        let before = map_on_replica(&d, &file);
        let rfd = replica_fd(&d, &file);
        let label = replica_label(&d);
        let store_path = (store == "tmpfs").then(|| PathBuf::from(&label));
        let through = writes_that_got_through(rfd.as_fd(), store_path.as_deref());
        assert!(
            through.is_empty(),
            "{store}: a root client changed the replica {label} through: {through:?}"
        );
        assert_ne!(
            inode_flags(rfd.as_fd()) & FS_IMMUTABLE_FL,
            0,
            "{store}: the replica is not immutable"
        );
        // The bytes are the source's, through the fd, old and new mappings.
        let f = std::fs::File::from(rfd.try_clone().unwrap());
        assert_eq!(f.metadata().unwrap().len(), LEN as u64, "{store}");
        let mut got = vec![0u8; LEN];
        f.read_exact_at(&mut got, 0).unwrap();
        assert!(got == want, "{store}: the replica's bytes changed");
        assert!(before.on_replica(), "{store}");
        assert!(before.as_slice() == want, "{store}: an old mapping changed");
        let after = map_on_replica(&d, &file);
        assert!(after.as_slice() == want, "{store}: a new mapping differs");
        // A writer still gets in, after the revoke; readers read its bytes.
        let t0 = Instant::now();
        let mut w = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        let waited = t0.elapsed();
        let new = vec![7u8; LEN];
        w.write_all(&new).unwrap();
        drop(w);
        assert!(
            waited < Duration::from_secs(5),
            "{store}: writer waited {waited:?}"
        );
        for (what, m) in [("old", &before), ("new", &after)] {
            let stale = m.as_slice().iter().filter(|&&b| b != 7).count();
            assert_eq!(
                stale, 0,
                "{store}: the {what} mapping read {stale} stale bytes"
            );
        }
        assert_eq!(f.metadata().unwrap().len(), 0, "{store}: not truncated");
        if let Some(p) = &store_path {
            assert!(!p.exists(), "{store}: {} not unlinked", p.display());
        }
        drop(rfd);
    }
}

/// Two clients' replica fds are two open file descriptions: status flags
/// (`F_SETFL`), the file offset and `flock` locks one sets are not the
/// other's.
#[test]
fn each_client_gets_its_own_open_file_description() {
    if !root_or_skip("each_client_gets_its_own_open_file_description") {
        return;
    }
    for (store, extra) in STORES {
        let (d, _dir, file) = replicated(store, extra, &format!("imm-desc-{store}"));
        let a = replica_fd(&d, &file);
        let b = replica_fd(&d, &file);
        let flags = |fd: &OwnedFd| {
            // SAFETY: F_GETFL on a valid fd.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) }
        };
        let b_before = flags(&b);
        let set = libc::O_APPEND | libc::O_NONBLOCK;
        // SAFETY: F_SETFL on a valid fd with an int argument.
        rc(unsafe { libc::fcntl(a.as_raw_fd(), libc::F_SETFL, set) }).unwrap();
        assert_eq!(flags(&a) & set, set, "{store}");
        assert_eq!(
            flags(&b),
            b_before,
            "{store}: F_SETFL on one client's replica fd showed on another's"
        );
        // SAFETY: lseek on valid fds.
        let (moved, at) = unsafe {
            (
                libc::lseek(a.as_raw_fd(), 8192, libc::SEEK_SET),
                libc::lseek(b.as_raw_fd(), 0, libc::SEEK_CUR),
            )
        };
        assert_eq!(
            (moved, at),
            (8192, 0),
            "{store}: one client moved another's offset"
        );
        // SAFETY: flock on a valid fd.
        rc(unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_EX) }).unwrap();
        // SAFETY: as above.
        let e = rc(unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) });
        assert_eq!(
            e.as_ref().map_err(|e| e.raw_os_error()),
            Err(Some(libc::EWOULDBLOCK)),
            "{store}: one client's flock lock on its replica fd was another's"
        );
        // Replicas are still served while one client holds a lock.
        let m = map_on_replica(&d, &file);
        assert!(m.as_slice() == std::fs::read(&file).unwrap(), "{store}");
    }
}

/// A daemon killed with -9: the next one adopts its replicas from the
/// keeper as they are, immutable, and fences them: a writer revokes them
/// (flag cleared, truncated, unlinked) and the reader reads its bytes.
#[test]
fn an_adopted_replica_stays_immutable_and_is_revoked() {
    if !root_or_skip("an_adopted_replica_stays_immutable_and_is_revoked") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    for (store, extra) in STORES {
        let (mut d, _dir, file) = replicated(store, extra, &format!("imm-adopt-{store}"));
        let reader = map_on_replica(&d, &file);
        let label = replica_label(&d);
        let held = std::fs::File::from(replica_fd(&d, &file));
        wait_for("a keeper", Duration::from_secs(5), || {
            keeper_of(d.pid()).is_some()
        });
        d.crash();
        d.restart();
        assert!(
            d.metric("replicad_adopted_replicas_total") >= 1.0,
            "{store}: nothing adopted:\n{}",
            d.log()
        );
        assert_eq!(replica_label(&d), label, "{store}: not the same replica");
        let rfd = replica_fd(&d, &file);
        let through = writes_that_got_through(rfd.as_fd(), None);
        assert!(
            through.is_empty(),
            "{store}: adopted, then changed through {through:?}"
        );
        assert_ne!(
            inode_flags(rfd.as_fd()) & FS_IMMUTABLE_FL,
            0,
            "{store}: the adopted replica is not immutable"
        );
        drop(rfd);
        let mut w = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        w.write_all(&vec![9u8; LEN]).unwrap();
        drop(w);
        let stale = reader.as_slice().iter().filter(|&&b| b != 9).count();
        assert_eq!(stale, 0, "{store}: the reader read {stale} stale bytes");
        assert_eq!(held.metadata().unwrap().len(), 0, "{store}: not truncated");
        if store == "tmpfs" {
            assert!(!Path::new(&label).exists(), "{store}: {label} not unlinked");
        }
    }
}

/// A keeper this test traps with ptrace; killed on drop if it still runs.
struct Trapped(libc::pid_t, std::cell::Cell<bool>);

impl Trapped {
    /// Seize it and stop it (a ptrace stop: SIGCONT does not end it).
    fn trap(&self) {
        // SAFETY: ptrace of the keeper this test's daemon started; null
        // address and data are valid for SEIZE and INTERRUPT.
        unsafe {
            rc(libc::ptrace(libc::PTRACE_SEIZE, self.0, 0usize, 0usize)).unwrap();
            rc(libc::ptrace(libc::PTRACE_INTERRUPT, self.0, 0usize, 0usize)).unwrap();
        }
        let mut status = 0;
        // SAFETY: waiting for the tracee's stop; status is valid for writes.
        let n = unsafe { libc::waitpid(self.0, &mut status, libc::__WALL) };
        assert!(n == self.0 && libc::WIFSTOPPED(status), "{status:#x}");
    }

    /// Whether it was killed (its exit reported to us, its tracer) within
    /// `limit`.
    fn killed(&self, limit: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            let mut status = 0;
            // SAFETY: as above, without waiting.
            let n = unsafe { libc::waitpid(self.0, &mut status, libc::__WALL | libc::WNOHANG) };
            if n == self.0 && libc::WIFSIGNALED(status) {
                self.1.set(true);
                return true;
            }
            if n < 0 || t0.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Trapped {
    fn drop(&mut self) {
        if !self.1.get() && !self.killed(Duration::ZERO) {
            // SAFETY: a signal to the keeper this test trapped (SIGKILL
            // ends a traced process too), then collecting its exit.
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
                libc::waitpid(self.0, std::ptr::null_mut(), libc::__WALL);
            }
        }
    }
}

/// The keeper a killed daemon left cannot hand over (it is trapped by
/// ptrace here: SIGTERM and SIGCONT do not reach it): the next daemon
/// truncates its replicas through `/proc/<keeper>/fd` (clearing the flag
/// first: an immutable file cannot be opened for writing), kills it, and
/// a memfd replica, which nothing else names, is cut too: the reader
/// reads what a writer wrote.
#[test]
fn a_keeper_that_does_not_hand_over_has_its_immutable_replicas_cut() {
    if !root_or_skip("a_keeper_that_does_not_hand_over_has_its_immutable_replicas_cut") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    for (store, extra) in STORES {
        let (mut d, _dir, file) = replicated(store, extra, &format!("imm-trap-{store}"));
        let reader = map_on_replica(&d, &file);
        let held = std::fs::File::from(replica_fd(&d, &file));
        wait_for("a keeper", Duration::from_secs(5), || {
            keeper_of(d.pid()).is_some()
        });
        let keeper = Trapped(
            keeper_of(d.pid()).unwrap() as libc::pid_t,
            Default::default(),
        );
        d.crash();
        // Orphaned, it listens for the next daemon; then it is trapped.
        let sock = d.run_dir.path().join("keeper.sock");
        wait_for(
            "the orphaned keeper's socket",
            Duration::from_secs(5),
            || sock.exists(),
        );
        keeper.trap();
        let t0 = Instant::now();
        d.restart();
        eprintln!("{store}: the next daemon was up after {:?}", t0.elapsed());
        assert!(
            keeper.killed(Duration::from_secs(5)),
            "{store}: the keeper lives"
        );
        assert!(
            d.log().contains("does not hand over")
                || d.log().contains("cannot take over the fence keeper"),
            "{store}:\n{}",
            d.log()
        );
        assert_eq!(d.metric("replicad_adopted_replicas_total"), 0.0, "{store}");
        assert_eq!(held.metadata().unwrap().len(), 0, "{store}: not truncated");
        // No lease is left: a writer goes straight in.
        let mut w = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        w.write_all(&vec![5u8; LEN]).unwrap();
        drop(w);
        let stale = reader.as_slice().iter().filter(|&&b| b != 5).count();
        assert_eq!(stale, 0, "{store}: the reader read {stale} stale bytes");
    }
}
