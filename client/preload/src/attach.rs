//! The shim's work: the hello, the checks, and the swap of each range.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use replicad_client::shim;
use replicad_client::trust::{self, Trust};
use replicad_procfs::MapsLine;
use replicad_wire::proto::{AttachRange, Request, Response};
use replicad_wire::published::{Lookup, Reader};
use replicad_wire::sock;

use crate::{debug, follow, ACTIVE, DEBUG, DEBUG_ENV, DISABLE_ENV, FOLLOW_ENV, NODE, NODE_ENV};

/// How long the shim waits for the daemon, at most, before the program
/// goes on without it. An absent daemon fails at once (no socket).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// Name of the published replica set beside the socket.
const PUBLISHED: &str = "replicas.set";

/// What the shim keeps between calls.
struct State {
    socket: PathBuf,
    /// Whose daemon, replicas and published set are believed (read once,
    /// at start).
    trust: Trust,
    /// The node asked for (`REPLICAD_NODE`), else `None`: the daemon picks.
    asked: Option<u32>,
    /// Never unmapped (the SIGBUS fallback may read its revoke count at
    /// any moment): one retired is replaced, and stays mapped.
    published: Option<&'static Reader>,
    /// Mappings (start, inode) the daemon looked at and did not offer
    /// (written private pages, no replica on our node ...): a later dlopen
    /// does not ask about them again.
    declined: BTreeSet<(u64, u64)>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// A hello was answered: `NODE` is ours. Until then (a lazy start, see
/// [`init`]) the published set is asked about any node.
static NODE_KNOWN: AtomicBool = AtomicBool::new(false);

/// Whether the published set may show a replica of `(dev, ino)` for us.
fn may_have_replica(reader: &Reader, dev: u64, ino: u64) -> bool {
    if NODE_KNOWN.load(Ordering::Relaxed) {
        reader.has_replica_on(dev, ino, NODE.load(Ordering::Relaxed)) != Some(false)
    } else {
        reader.lookup(dev, ino) != Lookup::Absent
    }
}

/// A `REPLICAD_*` flag: set, not empty and not `0`. Never under
/// `AT_SECURE` (see [`trust::env_var`]).
fn env_flag(name: &str) -> bool {
    trust::env_var(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The constructor: say hello, attach what the daemon offers.
pub(crate) fn init() {
    DEBUG.store(env_flag(DEBUG_ENV), Ordering::Relaxed);
    if env_flag(DISABLE_ENV) {
        debug!("{DISABLE_ENV} is set: not attaching");
        return;
    }
    let asked = match trust::env_var(NODE_ENV) {
        Some(v) => match v.to_str().and_then(|v| v.trim().parse::<u32>().ok()) {
            Some(n) => Some(n),
            None => {
                debug!("{NODE_ENV}={v:?} is not a node number: ignored");
                None
            }
        },
        None => None,
    };
    let trust = Trust::from_env();
    if let Some(v) = trust::env_var(trust::DAEMON_UID_ENV) {
        if trust.daemon_uid().is_none() {
            debug!(
                "{}={v:?} is not a uid: ignored (only root is trusted)",
                trust::DAEMON_UID_ENV
            );
        }
    }
    let socket = replicad_client::socket_path();
    let lazy = {
        let Ok(mut guard) = STATE.try_lock() else {
            return;
        };
        let st = guard.insert(State {
            socket,
            trust,
            asked,
            published: None,
            declined: BTreeSet::new(),
        });
        st.published = open_published(st);
        // What the watcher (crate::follow) starts from: the seq our maps are
        // checked against now, read before the check.
        let checked = st
            .published
            .and_then(|r| Some((r, r.seq_word()?.load(Ordering::Relaxed))));
        if trust::env_var(FOLLOW_ENV).is_some_and(|v| v == "0") {
            debug!("{FOLLOW_ENV}=0: replicas made later are not followed");
        } else if let Some(dir) = st.socket.parent() {
            follow::enable(dir.join(PUBLISHED), checked);
        }
        // Read once: decides the lazy start, then serves the hello's checks
        // (nothing changes our mappings in between: the constructor runs
        // alone, and the daemon only reads them). Without a published set
        // (no daemon, most likely) there is nothing to decide: no read.
        let usable = st.published.as_ref().is_some_and(|r| !r.is_retired());
        let maps = usable
            .then(|| replicad_procfs::ProcReader::default().self_maps_text().ok())
            .flatten();
        match maps {
            Some(m) if nothing_replicated(st, &m) => None,
            other => Some(other),
        }
    };
    let Some(maps) = lazy else {
        // Nothing we map has a replica: no round trip now. The first mmap
        // or dlopen of a file the published set lists says hello then.
        ACTIVE.store(true, Ordering::Relaxed);
        debug!("start: nothing this program maps is replicated: no hello until it maps something that is");
        return;
    };
    hello_with("start", maps);
}

/// Whether the published set shows that no file we map has a replica.
fn nothing_replicated(st: &State, maps: &str) -> bool {
    let Some(reader) = &st.published else {
        return false;
    };
    if reader.is_retired() {
        return false;
    }
    !maps
        .lines()
        .filter_map(MapsLine::parse)
        .any(|l| l.private_readonly_file() && may_have_replica(reader, l.dev, l.ino))
}

/// [`hello_with`], reading our maps after the answer.
fn hello(why: &str) {
    hello_with(why, None);
}

/// Ask the daemon which of our mappings its replicas may back, and swap
/// them, checking them against `maps` (our maps read before asking) or a
/// fresh read. Any failure leaves the program as it was.
fn hello_with(why: &str, maps: Option<String>) {
    let t0 = Instant::now();
    let Ok(mut guard) = STATE.try_lock() else {
        missed();
        return;
    };
    let Some(st) = guard.as_mut() else {
        return;
    };
    // The set as we ask: if it changes before we mark what was declined,
    // the answer may predate a replica the set now shows (see note_declined).
    let asked_at = set_seq(st.published);
    let answer = match ask(
        st,
        &Request::Hello {
            node: st.asked,
            table: shim::table_address(),
        },
        &[],
    ) {
        Ok(a) => a,
        Err(e) => {
            debug!("{why}: {e}; the program runs on its own mappings");
            ACTIVE.store(false, Ordering::Relaxed);
            return;
        }
    };
    let daemon_uid = answer.daemon_uid;
    match (answer.response, answer.fds) {
        (
            Response::Attached {
                node,
                sources,
                ranges,
                skipped,
            },
            fds,
        ) => {
            if fds.len() != 2 * sources as usize {
                debug!(
                    "{why}: the daemon sent {} fds for {sources} files: not attaching",
                    fds.len()
                );
                return;
            }
            NODE.store(node, Ordering::Relaxed);
            NODE_KNOWN.store(true, Ordering::Relaxed);
            ACTIVE.store(true, Ordering::Relaxed);
            if st.published.is_none_or(Reader::is_retired) {
                st.published = open_published(st);
            }
            for s in &skipped {
                debug!("{why}: left on the file: {s}");
            }
            let offered = ranges.len();
            // One read of our maps serves the checks and the bookkeeping.
            let maps = match maps.map_or_else(
                || replicad_procfs::ProcReader::default().self_maps_text(),
                Ok,
            ) {
                Ok(m) => m,
                Err(e) => {
                    debug!("{why}: cannot read /proc/self/maps ({e}): not attaching");
                    return;
                }
            };
            let Some(done) = remap(&ranges, &fds, &maps, daemon_uid) else {
                // The loader was busy: nothing swapped, nothing declined;
                // the watcher looks again shortly.
                debug!("{why}: the dynamic loader is loading or unloading: tried again shortly");
                missed();
                return;
            };
            note_declined(st, &maps, asked_at);
            debug!(
                "{why}: {done} of {offered} ranges now on node {node} replicas ({} files) in {:.2} ms",
                sources,
                t0.elapsed().as_secs_f64() * 1e3
            );
        }
        (Response::Original { reason }, _) => {
            debug!("{why}: left alone by replicad: {reason}");
            ACTIVE.store(false, Ordering::Relaxed);
        }
        (other, _) => {
            debug!("{why}: unexpected answer from replicad: {other:?}");
            ACTIVE.store(false, Ordering::Relaxed);
        }
    }
}

/// The published set beside the socket, if [`State::trust`] believes it
/// (its owner, its mode): a refused one is not read, and the daemon is
/// asked instead.
fn open_published(st: &State) -> Option<&'static Reader> {
    let path = st.socket.parent()?.join(PUBLISHED);
    match st.trust.open_published(&path) {
        Ok(r) => {
            let r: &'static Reader = Box::leak(Box::new(r));
            if let Some(word) = r.revoking_word() {
                shim::watch_revokes(word);
            }
            OPEN_SET.store(r as *const Reader as usize, Ordering::Release);
            Some(r)
        }
        Err(e @ replicad_client::Error::UntrustedSet { .. }) => {
            debug!("{e}; a hello asks replicad instead, and files mapped later are not attached");
            OPEN_SET.store(0, Ordering::Release);
            None
        }
        Err(e) => {
            debug!("{e}: files mapped later are not attached");
            OPEN_SET.store(0, Ordering::Release);
            None
        }
    }
}

/// One request to a daemon [`State::trust`] believes, one answer, with up
/// to 252 fds riding back.
fn ask(
    st: &State,
    req: &Request,
    fds: &[BorrowedFd<'_>],
) -> Result<replicad_client::Answer, String> {
    let limits = replicad_client::RequestLimits {
        connect: CONNECT_TIMEOUT,
        answer: ANSWER_TIMEOUT,
        max_fds: sock::MAX_MESSAGE_FDS,
    };
    replicad_client::request_trusting(&st.socket, req, fds, limits, &st.trust).map_err(
        |e| match e {
            replicad_client::Error::Connect { socket, source } => {
                format!("no replicad at {} ({source})", socket.display())
            }
            replicad_client::Error::Refused { kind, message } => {
                format!("replicad refused ({kind:?}): {message}")
            }
            e => e.to_string(),
        },
    )
}

/// The files never moved: the dynamic loader (its text runs while the
/// shim maps) and the shim itself (it holds the SIGBUS handler).
fn never_moved(lines: &[MapsLine<'_>]) -> BTreeSet<(u64, u64)> {
    // SAFETY: getauxval has no preconditions.
    let loader = unsafe { libc::getauxval(libc::AT_BASE) } as u64;
    let ours = never_moved as *const () as usize as u64;
    lines
        .iter()
        .filter(|l| (l.start <= loader && loader < l.end) || (l.start <= ours && ours < l.end))
        .map(|l| (l.dev, l.ino))
        .collect()
}

/// The published set's seq now (`None`: no set to read).
fn set_seq(reader: Option<&Reader>) -> Option<u64> {
    Some(reader?.seq_word()?.load(Ordering::Acquire))
}

/// Remember the mappings of replicated files that are not on replicas now:
/// the daemon just declined them. Only when the set is as it was when we
/// asked (`asked_at`): a replica made meanwhile is in the set but was not
/// in the answer, and marking it declined would keep the program off it
/// for good (a follower skips declined mappings).
fn note_declined(st: &mut State, maps: &str, asked_at: Option<u64>) {
    let Some(reader) = &st.published else {
        return;
    };
    if asked_at.is_none() || set_seq(Some(reader)) != asked_at {
        debug!("the published set changed while we asked: nothing marked declined");
        return;
    }
    let node = NODE.load(Ordering::Relaxed);
    for l in maps.lines().filter_map(MapsLine::parse) {
        if l.private_readonly_file()
            && reader.has_replica_on(l.dev, l.ino, node) != Some(false)
            && !shim::is_spare(l.start as usize)
            && !shim::live_at(l.start as usize)
        {
            st.declined.insert((l.start, l.ino));
        }
    }
}

/// Swap every range that still is what the daemon (running as
/// `daemon_uid`) saw, onto replicas that are the daemon's and from ways back
/// that are the files the ranges map. Returns how many, or `None` when the
/// dynamic loader was loading or unloading (nothing swapped).
fn remap(ranges: &[AttachRange], fds: &[OwnedFd], maps: &str, daemon_uid: u32) -> Option<usize> {
    let lines: Vec<MapsLine<'_>> = maps.lines().filter_map(MapsLine::parse).collect();
    let skip = never_moved(&lines);
    let mut stats: BTreeMap<u32, libc::stat> = BTreeMap::new();
    let mut each = |r: &AttachRange, lines: &[MapsLine<'_>]| -> bool {
        swap_range(r, lines, &skip, fds, &mut stats, daemon_uid)
    };
    if threads() == Some(1) {
        // Alone: nothing changes our mappings but us.
        return Some(ranges.iter().filter(|r| each(r, &lines)).count());
    }
    // With other threads running (the watcher's hello beside the
    // program, a dlopen in a threaded program), one of them may unmap a
    // range and map something else there meanwhile: each swap reads maps
    // again and checks under the map lock, which the program's
    // mmap/munmap/mremap/mprotect take too. The dynamic loader maps and
    // unmaps without those wrappers, so the swaps run with it held still
    // (see `loader_still`).
    let mut done = 0;
    let held = loader_still(&mut || {
        for r in ranges {
            let _lock = crate::MapLock::take();
            let fresh = replicad_procfs::ProcReader::default()
                .self_maps_text()
                .unwrap_or_default();
            let lines: Vec<MapsLine<'_>> = fresh
                .lines()
                .filter_map(MapsLine::parse)
                .filter(|l| l.start == r.start)
                .collect();
            done += usize::from(each(r, &lines));
        }
    });
    held.then_some(done)
}

/// One range of a hello's answer onto its replica, if `lines` (our maps)
/// still show it as the daemon saw it. Whether it was swapped.
fn swap_range(
    r: &AttachRange,
    lines: &[MapsLine<'_>],
    skip: &BTreeSet<(u64, u64)>,
    fds: &[OwnedFd],
    stats: &mut BTreeMap<u32, libc::stat>,
    daemon_uid: u32,
) -> bool {
    let Some(l) = lines.iter().find(|l| l.start == r.start) else {
        debug!("{:x}-{:x}: no longer mapped: left alone", r.start, r.end);
        return false;
    };
    if l.end != r.end
        || l.offset != r.offset
        || l.dev != r.dev
        || l.ino != r.ino
        || l.perms_str() != r.perms
        || !l.private_readonly_file()
    {
        debug!(
            "{:x}-{:x} {}: changed since the daemon looked: left alone",
            r.start, r.end, l.path
        );
        return false;
    }
    if skip.contains(&(l.dev, l.ino)) {
        return false;
    }
    if shim::is_spare(r.start as usize) || shim::live_at(r.start as usize) {
        return false;
    }
    let (Some(rfd), Some(sfd)) = (
        fds.get(2 * r.source as usize),
        fds.get(2 * r.source as usize + 1),
    ) else {
        debug!(
            "{:x}-{:x}: the daemon named a file it did not send",
            r.start, r.end
        );
        return false;
    };
    let prot = libc::PROT_READ
        | if l.perms[2] == b'x' {
            libc::PROT_EXEC
        } else {
            0
        };
    // One check per replica file, not per range: a revoke after it is
    // caught by the fallback like any other.
    let st = match stats.get(&r.source) {
        Some(st) => *st,
        None => match checked_pair(rfd.as_fd(), sfd.as_fd(), l.dev, l.ino, daemon_uid) {
            Ok(st) => {
                stats.insert(r.source, st);
                st
            }
            Err(e) => {
                debug!("{:x}-{:x} {}: {e}: left alone", r.start, r.end, l.path);
                return false;
            }
        },
    };
    let range = Range {
        start: r.start as usize,
        len: r.len(),
        prot,
        kind: libc::MAP_PRIVATE,
        offset: r.offset as libc::off_t,
    };
    match swap(&range, rfd.as_fd(), &st, sfd.as_fd()) {
        Ok(()) => true,
        Err(e) => {
            debug!("{:x}-{:x} {}: {e}: left alone", r.start, r.end, l.path);
            false
        }
    }
}

/// `struct r_debug` of `<link.h>`, and `r_next` of glibc's
/// `r_debug_extended` (read only when `r_version` is 2 or more): one per
/// link-map namespace.
#[repr(C)]
struct RDebug {
    r_version: c_int,
    r_map: *const c_void,
    r_brk: usize,
    r_state: c_int,
    r_ldbase: usize,
    r_next: *const RDebug,
}

/// `RT_CONSISTENT`: no object is being added or removed.
const RT_CONSISTENT: c_int = 0;

// SAFETY: both are glibc's: `dl_iterate_phdr` of libc, `_r_debug` of the
// dynamic loader (which this object needs, like every glibc program).
unsafe extern "C" {
    fn dl_iterate_phdr(
        callback: Option<unsafe extern "C" fn(*mut c_void, usize, *mut c_void) -> c_int>,
        data: *mut c_void,
    ) -> c_int;
    static _r_debug: RDebug;
}

/// Whether the loader's debugger interface shows every namespace
/// consistent: a `dlopen` sets `RT_ADD` before it maps anything, a
/// `dlclose` `RT_DELETE` before it unmaps, and both set `RT_CONSISTENT`
/// after.
fn loader_consistent() -> bool {
    // SAFETY: `_r_debug` lives as long as the process; its fields are read
    // volatile (the loader writes them without atomics), and `r_next` only
    // where `r_version` says the extended layout is there.
    unsafe {
        let mut r: *const RDebug = std::ptr::addr_of!(_r_debug);
        // glibc has at most 16 namespaces.
        for _ in 0..16 {
            if r.is_null() {
                return true;
            }
            if std::ptr::addr_of!((*r).r_state).read_volatile() != RT_CONSISTENT {
                return false;
            }
            if std::ptr::addr_of!((*r).r_version).read_volatile() < 2 {
                return true;
            }
            r = std::ptr::addr_of!((*r).r_next).read_volatile();
        }
    }
    true
}

/// Run `f` with the dynamic loader held still; false (and `f` not run)
/// when it is in the middle of loading or unloading.
///
/// `dl_iterate_phdr` calls back holding glibc's `dl_load_write_lock`,
/// which `dlclose` holds while it unmaps and `dlopen` while it adds an
/// object to its list (after mapping it, at addresses the kernel chose,
/// so never over a range we were offered). A load already under way shows
/// in `_r_debug` ([`loader_consistent`]): its half-built mapping (the
/// first `mmap` of the whole object, which `MAP_FIXED` segments then
/// replace) must not be swapped. `f` takes no loader lock, only the map
/// lock, which no loader path holds: no lock order to break.
fn loader_still(f: &mut dyn FnMut()) -> bool {
    struct Hold<'a> {
        f: Option<&'a mut dyn FnMut()>,
        ran: bool,
    }
    unsafe extern "C" fn first_object(_: *mut c_void, _: usize, data: *mut c_void) -> c_int {
        // SAFETY: `data` is the `Hold` below, alive for the whole call.
        let hold = unsafe { &mut *data.cast::<Hold<'_>>() };
        if let Some(f) = hold.f.take() {
            if loader_consistent() {
                // A panic must not unwind through the loader's frames.
                hold.ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_ok();
            }
        }
        1
    }
    let mut hold = Hold {
        f: Some(f),
        ran: false,
    };
    // SAFETY: a callback of the right signature and a pointer to a live
    // `Hold` that outlives the call.
    unsafe { dl_iterate_phdr(Some(first_object), (&mut hold as *mut Hold<'_>).cast()) };
    hold.ran
}

/// This process's thread count (field 20 of /proc/self/stat, a shorter
/// read than status).
fn threads() -> Option<usize> {
    let stat = replicad_procfs::ProcReader::default().self_stat().ok()?;
    usize::try_from(stat.num_threads).ok()
}

trait RangeLen {
    fn len(&self) -> usize;
}

impl RangeLen for AttachRange {
    fn len(&self) -> usize {
        self.end.saturating_sub(self.start) as usize
    }
}

/// A mapping of the program's, as mmap(2) describes it.
#[derive(Debug, Clone, Copy)]
struct Range {
    start: usize,
    len: usize,
    prot: c_int,
    /// `MAP_PRIVATE` or `MAP_SHARED`.
    kind: c_int,
    offset: libc::off_t,
}

/// The replica fd's `fstat`, if it is the daemon's ([`trust::check_replica`]).
fn replica_stat(replica: BorrowedFd<'_>, daemon_uid: u32) -> Result<libc::stat, String> {
    trust::check_replica(replica, daemon_uid).map_err(|e| e.to_string())
}

/// A hello's replica and source fds for one file: the replica's `fstat` if
/// it is the daemon's, and the source (the way back) is a regular file
/// with the `dev` and `ino` that the range maps.
fn checked_pair(
    replica: BorrowedFd<'_>,
    source: BorrowedFd<'_>,
    dev: u64,
    ino: u64,
    daemon_uid: u32,
) -> Result<libc::stat, String> {
    let st = replica_stat(replica, daemon_uid)?;
    // SAFETY: stat is plain old data; all-zero is a valid value.
    let mut sb: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a live fd and a valid stat buffer.
    if unsafe { libc::fstat(source.as_raw_fd(), &mut sb) } != 0 {
        return Err(format!(
            "fstat of the file to fall back to: {}",
            std::io::Error::last_os_error()
        ));
    }
    if sb.st_mode & libc::S_IFMT != libc::S_IFREG || sb.st_dev != dev || sb.st_ino != ino {
        return Err(format!(
            "the file to fall back to (device {:#x}, inode {}) is not the file the range \
             maps (device {dev:#x}, inode {ino})",
            sb.st_dev, sb.st_ino
        ));
    }
    Ok(st)
}

/// Map the original a second time (the way back) and the replica, register
/// the range, then move the replica over it in one `mremap`.
fn swap(
    range: &Range,
    replica: BorrowedFd<'_>,
    st: &libc::stat,
    source: BorrowedFd<'_>,
) -> Result<(), String> {
    let Range {
        start,
        len,
        prot,
        kind,
        offset,
    } = *range;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_size <= offset {
        return Err("the replica was revoked meanwhile".into());
    }
    let spare = raw_mmap(
        std::ptr::null_mut(),
        len,
        prot,
        kind,
        source.as_raw_fd(),
        offset,
    );
    if spare == libc::MAP_FAILED {
        return Err(format!(
            "cannot map the file a second time (the way back): {}",
            std::io::Error::last_os_error()
        ));
    }
    let rep = raw_mmap(
        std::ptr::null_mut(),
        len,
        prot,
        kind,
        replica.as_raw_fd(),
        offset,
    );
    if rep == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        // SAFETY: our own spare mapping.
        unsafe { libc::munmap(spare, len) };
        return Err(format!("cannot map the replica: {e}"));
    }
    let slot = match shim::register_mapping(
        start,
        len,
        spare as usize,
        offset as u64,
        libc::major(st.st_dev),
        libc::minor(st.st_dev),
        st.st_ino,
    ) {
        Ok(s) => s,
        Err(e) => {
            // SAFETY: our own mappings.
            unsafe {
                libc::munmap(rep, len);
                libc::munmap(spare, len);
            }
            return Err(e);
        }
    };
    // SAFETY: moves our replica mapping over the range the program mapped
    // and the checks above found unchanged; one syscall, so other threads
    // see either the original or the replica, never a hole.
    // The raw syscall: libc's mremap is our own wrapper, which would take
    // this range for one the program moves.
    let moved = unsafe {
        libc::syscall(
            libc::SYS_mremap,
            rep,
            len,
            len,
            (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as libc::c_long,
            start as *mut c_void,
        ) as *mut c_void
    };
    if moved as usize != start {
        let e = std::io::Error::last_os_error();
        // SAFETY: the replica mapping is still ours at `rep`.
        unsafe { libc::munmap(rep, len) };
        shim::unregister(slot);
        return Err(format!("mremap over the range failed: {e}"));
    }
    Ok(())
}

/// The kernel's mmap, without our wrapper.
pub(crate) fn raw_mmap(
    addr: *mut c_void,
    len: libc::size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: the mmap syscall with the caller's arguments; libc's
    // syscall() sets errno and returns -1 on failure (== MAP_FAILED).
    unsafe {
        libc::syscall(
            libc::SYS_mmap,
            addr,
            len,
            prot as libc::c_long,
            flags as libc::c_long,
            fd as libc::c_long,
            off,
        ) as *mut c_void
    }
}

/// After a `dlopen`: if the published set shows a replica of any file we
/// map and have not attached yet, say hello again.
pub(crate) fn after_dlopen() {
    let want = {
        let Ok(guard) = STATE.try_lock() else {
            missed();
            return;
        };
        let Some(st) = guard.as_ref() else {
            return;
        };
        match &st.published {
            None => true,
            Some(reader) => {
                let Ok(maps) = replicad_procfs::ProcReader::default().self_maps_text() else {
                    return;
                };
                replicated_off_replica(st, reader, &maps)
            }
        }
    };
    if want {
        hello("dlopen");
    }
}

/// After a `dlclose`: every range on a replica that our maps no longer
/// show as that replica, exactly, was unmapped by the loader: forgotten
/// (its entry freed, its spare unmapped), as our `munmap` would have.
pub(crate) fn after_dlclose() {
    let active = shim::active_ranges();
    if active.is_empty() {
        return;
    }
    // Checked and forgotten with the program's own mapping calls held off:
    // a range one of them maps again meanwhile is not taken for gone.
    let _lock = crate::MapLock::take();
    let Ok(maps) = replicad_procfs::ProcReader::default().self_maps_text() else {
        return;
    };
    let lines: Vec<MapsLine<'_>> = maps.lines().filter_map(MapsLine::parse).collect();
    for (start, len, dev, ino) in active {
        let (from, to) = (start as u64, start.saturating_add(len) as u64);
        let still = lines
            .iter()
            .any(|l| l.start == from && l.end == to && l.dev == dev && l.ino == ino);
        if !still {
            debug!("dlclose: {from:x}-{to:x} was unmapped by the loader: forgotten");
            shim::forget(start, len);
        }
    }
}

/// Whether `maps` (ours) holds a private read-only file mapping that is not
/// on a replica, was not declined, and whose file the published set shows
/// a replica of for us.
fn replicated_off_replica(st: &State, reader: &Reader, maps: &str) -> bool {
    maps.lines()
        .filter_map(MapsLine::parse)
        .filter(|l| l.private_readonly_file())
        .any(|l| {
            !st.declined.contains(&(l.start, l.ino))
                && may_have_replica(reader, l.dev, l.ino)
                && !shim::is_spare(l.start as usize)
                && !shim::live_at(l.start as usize)
        })
}

/// The shim's lock was taken: try again later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Busy;

/// A wrapper (or a hello) skipped its attach because the shim was busy
/// (the watcher, often): the watcher looks at our maps again.
static MISSED: AtomicBool = AtomicBool::new(false);

fn missed() {
    MISSED.store(true, Ordering::Release);
}

/// Whether an attach was skipped since the last call.
pub(crate) fn take_missed() -> bool {
    MISSED.swap(false, Ordering::AcqRel)
}

/// Whether an attach was skipped and nobody looked again yet.
pub(crate) fn missed_pending() -> bool {
    MISSED.load(Ordering::Acquire)
}

/// [`State::published`] as an address (0: none), for the watcher to read
/// without the lock: the program's wrappers skip while it is held.
static OPEN_SET: AtomicUsize = AtomicUsize::new(0);

/// Whether a published set is open (retired or not), read without the lock.
pub(crate) fn set_open() -> bool {
    OPEN_SET.load(Ordering::Acquire) != 0
}

/// The published set for the watcher to follow: the one open, else the
/// path opened again (the daemon started, restarted or grew the set);
/// `None` when there is none to believe.
pub(crate) fn watched_set() -> Result<Option<&'static Reader>, Busy> {
    let open = OPEN_SET.load(Ordering::Acquire);
    if open != 0 {
        // SAFETY: OPEN_SET only ever holds a leaked (never freed) Reader.
        let r: &'static Reader = unsafe { &*(open as *const Reader) };
        if !r.is_retired() {
            return Ok(Some(r));
        }
    }
    let Ok(mut guard) = STATE.try_lock() else {
        return Err(Busy);
    };
    let Some(st) = guard.as_mut() else {
        return Ok(None);
    };
    if st.published.is_none_or(Reader::is_retired) {
        st.published = open_published(st);
    }
    Ok(st.published.filter(|r| !r.is_retired()))
}

/// The published set changed: if it now shows a replica for a mapping of
/// ours that is not on one, say hello (the daemon decides, the hello
/// swaps).
pub(crate) fn follow() -> Result<(), Busy> {
    // Read before the lock: the program's wrappers skip while it is held.
    let Ok(maps) = replicad_procfs::ProcReader::default().self_maps_text() else {
        return Ok(());
    };
    let want = {
        let Ok(guard) = STATE.try_lock() else {
            return Err(Busy);
        };
        let Some(st) = guard.as_ref() else {
            return Ok(());
        };
        let Some(reader) = st.published.filter(|r| !r.is_retired()) else {
            return Ok(());
        };
        replicated_off_replica(st, reader, &maps)
    };
    if want {
        hello("follow");
    }
    Ok(())
}

/// A mapping the program just made of `fd`: if the published set shows a
/// replica on our node, ask for it and swap.
pub(crate) fn on_mmap(
    start: usize,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) {
    // SAFETY: stat is plain old data; all-zero is a valid value.
    let mut sb: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a live fd and a valid stat buffer.
    if unsafe { libc::fstat(fd, &mut sb) } != 0 || sb.st_mode & libc::S_IFMT != libc::S_IFREG {
        return;
    }
    if !NODE_KNOWN.load(Ordering::Relaxed) {
        // A lazy start: the first replicated file this program maps.
        let listed = {
            let Ok(guard) = STATE.try_lock() else {
                missed();
                return;
            };
            let Some(reader) = guard.as_ref().and_then(|st| st.published.as_ref()) else {
                return;
            };
            may_have_replica(reader, sb.st_dev, sb.st_ino)
        };
        if !listed {
            return;
        }
        // The hello attaches this mapping too, when it is private.
        hello("mmap");
        if !NODE_KNOWN.load(Ordering::Relaxed) || shim::live_at(start) {
            return;
        }
    }
    let Ok(guard) = STATE.try_lock() else {
        missed();
        return;
    };
    let Some(st) = guard.as_ref() else {
        return;
    };
    let Some(reader) = &st.published else {
        return;
    };
    // SAFETY: the program passed fd to mmap, which just succeeded with it.
    let file = unsafe { BorrowedFd::borrow_raw(fd) };
    let node = NODE.load(Ordering::Relaxed);
    if reader.has_replica_on(sb.st_dev, sb.st_ino, node) == Some(false) {
        return;
    }
    let kind = flags & (libc::MAP_SHARED | libc::MAP_PRIVATE | libc::MAP_SHARED_VALIDATE);
    if kind != libc::MAP_PRIVATE {
        // A shared mapping of a writable fd may be mprotect'ed writable
        // later; the read-only replica could not follow.
        // SAFETY: fcntl F_GETFL on a live fd.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if fl < 0 || fl & libc::O_ACCMODE != libc::O_RDONLY || kind != libc::MAP_SHARED {
            return;
        }
    }
    let answer = match ask(
        st,
        &Request::Map {
            node: Some(node),
            table: shim::table_address(),
            at: start as u64,
            len: len as u64,
        },
        &[file],
    ) {
        Ok(a) => a,
        Err(e) => {
            debug!("mmap of fd {fd}: {e}");
            return;
        }
    };
    let (daemon_uid, mut fds) = (answer.daemon_uid, answer.fds);
    let Response::Mapped { .. } = answer.response else {
        if let Response::Original { reason } = answer.response {
            debug!("mmap of fd {fd}: left on the file: {reason}");
        }
        return;
    };
    if fds.len() != 1 {
        return;
    }
    let replica = fds.remove(0);
    let page = page_size();
    let len = len.div_ceil(page) * page;
    let st = match replica_stat(replica.as_fd(), daemon_uid) {
        Ok(st) => st,
        Err(e) => {
            debug!("mmap of fd {fd}: {e}: left on the file");
            return;
        }
    };
    let range = Range {
        start,
        len,
        prot,
        kind,
        offset: off,
    };
    match swap(&range, replica.as_fd(), &st, file) {
        Ok(()) => debug!("mmap of fd {fd}: {len} bytes at {start:x} now on node {node}'s replica"),
        Err(e) => debug!("mmap of fd {fd}: {e}: left on the file"),
    }
}

use replicad_procfs::page_size;

/// `link_map` of `<link.h>` (the fields we read).
#[repr(C)]
struct LinkMap {
    l_addr: usize,
    l_name: *const c_char,
    l_ld: *const Dyn,
    l_next: *const LinkMap,
    l_prev: *const LinkMap,
}

#[repr(C)]
struct Dyn {
    d_tag: i64,
    d_val: u64,
}

const DT_NULL: i64 = 0;
const DT_RPATH: i64 = 15;
const DT_RUNPATH: i64 = 29;
const RTLD_DL_LINKMAP: c_int = 2;
const RTLD_DI_LMID: c_int = 1;

extern "C" {
    fn dladdr1(
        addr: *const c_void,
        info: *mut libc::Dl_info,
        extra: *mut *mut c_void,
        flags: c_int,
    ) -> c_int;
    fn dlinfo(handle: *mut c_void, request: c_int, arg: *mut c_void) -> c_int;
}

/// Whether `dlopen(file)` finds the same object whoever calls it: a path
/// with a `/` and no `$`, or a bare name when the caller (or, for an
/// unknown caller, the program) has no RPATH/RUNPATH, in the base
/// namespace.
pub(crate) fn caller_independent(file: *const c_char, caller: usize) -> bool {
    if file.is_null() {
        return true;
    }
    // SAFETY: dlopen's argument is a NUL-terminated string.
    let name = unsafe { CStr::from_ptr(file) }.to_bytes();
    if name.contains(&b'$') {
        return false;
    }
    if name.contains(&b'/') {
        return true;
    }
    // SAFETY: Dl_info is plain old data.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let mut map: *mut c_void = std::ptr::null_mut();
    // SAFETY: dladdr1 only reads the address; info and map are valid.
    let found = unsafe {
        dladdr1(
            caller as *const c_void,
            &mut info,
            &mut map,
            RTLD_DL_LINKMAP,
        )
    } != 0;
    let map = if found && !map.is_null() {
        map as *const LinkMap
    } else {
        // Unknown caller (JIT code): glibc uses the program's map.
        // SAFETY: dlopen(NULL) returns the main program's handle, which is
        // its link_map in glibc.
        let main = unsafe { libc::dlopen(std::ptr::null(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
        main as *const LinkMap
    };
    if map.is_null() {
        return false;
    }
    let mut lmid: libc::c_long = -1;
    // SAFETY: a link_map is a valid handle; lmid is a Lmid_t (long).
    let ok = unsafe {
        dlinfo(
            map as *mut c_void,
            RTLD_DI_LMID,
            (&mut lmid as *mut libc::c_long).cast(),
        )
    };
    if ok != 0 || lmid != 0 {
        return false;
    }
    // SAFETY: a live link_map's l_ld points at its dynamic section, an
    // array ended by DT_NULL.
    unsafe {
        let mut d = (*map).l_ld;
        if d.is_null() {
            return false;
        }
        for _ in 0..4096 {
            match (*d).d_tag {
                DT_NULL => return true,
                DT_RPATH | DT_RUNPATH => return false,
                _ => d = d.add(1),
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `threads()` against the task directory, read before and after it;
    /// the test harness starts and ends threads of its own meanwhile, so a
    /// read where the two task counts differ is taken again.
    fn stable_thread_count() -> (usize, Option<usize>) {
        let tasks = || std::fs::read_dir("/proc/self/task").unwrap().count();
        for _ in 0..1000 {
            let before = tasks();
            let n = threads();
            if tasks() == before {
                return (before, n);
            }
        }
        panic!("the thread count never held still");
    }

    #[test]
    fn thread_count_matches_the_task_directory() {
        let (tasks, n) = stable_thread_count();
        assert_eq!(n, Some(tasks));
        let t = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(200)));
        std::thread::sleep(Duration::from_millis(20));
        let (tasks, n) = stable_thread_count();
        assert_eq!(n, Some(tasks));
        assert!(tasks >= 2);
        t.join().unwrap();
    }

    #[test]
    fn caller_independence_follows_the_name() {
        // Paths are found the same whoever asks; `$ORIGIN` is the caller's.
        assert!(caller_independent(std::ptr::null(), 0));
        assert!(caller_independent(c"/usr/lib/x.so".as_ptr(), 0));
        assert!(!caller_independent(c"$ORIGIN/x.so".as_ptr(), 0));
        // A bare name from this test binary (no RPATH/RUNPATH of its own,
        // base namespace) is found the same from the shim.
        let here = caller_independent as *const () as usize;
        assert!(caller_independent(c"libz.so.1".as_ptr(), here));
    }
}
