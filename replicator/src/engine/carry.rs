//! Private pages across a revoke: what a program wrote privately in a
//! replica-backed range (a debugger's breakpoint, a `/proc/self/mem`
//! write) survives the revoke, as it would without replicad.
//!
//! ```text
//!  revoke, gate closed (faulting programs wait before they remap),
//!  before the truncate (which drops every private page with the file's):
//!   for each process attached to a replica of the source, that told us
//!   where its fallback table is (Hello/Map `table`):
//!     open <pid>/mem, <pid>/pagemap; the pid still names that process?
//!     read the table; for each ACTIVE slot on this replica:
//!       PAGEMAP_SCAN start..start+len for private pages (not the file's)
//!       copy each run: range -> the same offsets of the slot's spare
//!   (a MAP_PRIVATE mapping of the source: the write makes private pages
//!   there, exactly as a debugger's write does; the fallback moves the
//!   spare over the range and they come with it)
//! ```
//!
//! The table is the program's memory, so nothing in it is believed beyond
//! the program's own address space: bytes of the program go to an
//! address of the program, a slot's range is at most the replica's size,
//! and each process gets at most [`MAX_SLOTS`] slots and [`MAX_BYTES`]
//! copied per revoke (a breakpoint is one page). Reading and writing
//! another process's memory can wait on whatever backs it (a FUSE file a
//! hostile program mapped where it said its table is), and even pagemap
//! waits for the process's `mmap_lock`: the scans and copies run on a
//! thread of their own, and the revoke waits for them at most
//! [`DEADLINE`], then truncates anyway (the thread, told to stop, writes
//! nothing more once it wakes). A thread still busy at the next revoke is
//! stuck: a new one takes its place, and the uid of the process it waits
//! on is carried for no more; while [`MAX_STUCK`] such threads wait,
//! nothing is carried. The scan costs about 15 ns per 4 KiB page mapped
//! (a 2 MiB page is one entry), so the deadline also ends carrying for
//! very large 4 KiB-mapped ranges. A program writing
//! privately while its replica is being revoked may lose that one write
//! (between the copy and the truncate); one whose daemon died (the keeper
//! fences alone) keeps nothing.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use replicad_procfs::{slots, ProcReader};

use super::Inner;
use crate::model::{Attachment, SourceKey};

/// Slots of one process looked at per revoke.
const MAX_SLOTS: usize = 64;
/// Bytes carried for one process per revoke.
const MAX_BYTES: u64 = 16 << 20;
/// One copy's buffer.
const CHUNK: usize = 64 << 10;
/// Longest a revoke waits for the copies.
pub(super) const DEADLINE: Duration = Duration::from_millis(20);
/// Copy threads past their deadline and still running, at most.
const MAX_STUCK: usize = 16;
/// Ranges remembered per process.
const MAX_RANGES: usize = 1024;
/// Copy threads running now.
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// A replica about to be truncated: its file's `dev` (as the table stores
/// it), inode and size, and the processes attached to it.
#[derive(Debug, Clone)]
pub(super) struct Truncating {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub attached: Vec<Attachment>,
}

/// Processes (and uids) whose memory kept a copier past its deadline:
/// carried no more. A uid with [`UID_STRIKES`] such processes is banned
/// whole (one user cannot cost every revoke a deadline with one process
/// after another).
#[derive(Debug, Default)]
pub(super) struct Banned {
    pids: std::collections::BTreeSet<u32>,
    strikes: BTreeMap<u32, u32>,
    uids: std::collections::BTreeSet<u32>,
}

/// Processes of one uid banned before the uid is.
const UID_STRIKES: u32 = 3;

impl Banned {
    /// Ban the process (`pid`, `uid`) a copier was on past its deadline.
    pub(super) fn strike(&mut self, pid: u32, uid: u32) {
        if !self.pids.insert(pid) {
            return;
        }
        let n = self.strikes.entry(uid).or_insert(0);
        *n += 1;
        if *n >= UID_STRIKES && self.uids.insert(uid) {
            crate::warn_limited!(
                "{UID_STRIKES} processes of uid {uid} kept the copy of private pages past its \
                 deadline: that uid's programs keep no private pages across revokes from now on"
            );
        }
    }

    pub(super) fn covers(&self, pid: u32, uid: u32) -> bool {
        self.pids.contains(&pid) || self.uids.contains(&uid)
    }
}

/// `on`'s value for a process: its pid and the uid it connected as.
fn packed(pid: u32, uid: u32) -> u64 {
    (u64::from(pid) << 32) | u64::from(uid)
}

/// What a process told us: where its table is, the uid it connected as,
/// and the ranges (source, start, end) its Hello and Map requests put on
/// replicas, oldest first (some may since be unmapped: they cost a scan
/// that finds nothing of ours).
#[derive(Debug, Clone)]
pub(super) struct Carrying {
    table: u64,
    uid: u32,
    ranges: Vec<(SourceKey, u64, u64)>,
    /// Its pagemap, opened when it told us (for the first [`MAX_CACHED`]
    /// processes; the others' is opened at the revoke): one open less on
    /// the writer's path.
    pagemap: Option<Arc<Cached>>,
}

/// A pagemap kept open, counted against [`MAX_CACHED`].
#[derive(Debug)]
pub(super) struct Cached(std::fs::File);

impl Drop for Cached {
    fn drop(&mut self) {
        CACHED.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Pagemaps kept open at most (out of the daemon's reserve of open files).
const MAX_CACHED: usize = 64;
static CACHED: AtomicUsize = AtomicUsize::new(0);

/// `pid`'s pagemap to keep, if fewer than [`MAX_CACHED`] are kept.
fn cache_pagemap(proc: &ProcReader, pid: u32) -> Option<Arc<Cached>> {
    if CACHED.fetch_add(1, Ordering::AcqRel) >= MAX_CACHED {
        CACHED.fetch_sub(1, Ordering::AcqRel);
        return None;
    }
    match proc.pagemap(pid) {
        Ok(Some(f)) => Some(Arc::new(Cached(f))),
        _ => {
            CACHED.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }
}

/// One process's share: where its table is and the uid it connected as,
/// its pagemap if kept, its ranges of the source, and its replicas.
type Work = Vec<(
    Attachment,
    (u64, u32),
    Option<Arc<Cached>>,
    Vec<(u64, u64)>,
    Vec<Truncating>,
)>;

impl Inner {
    /// Remember where `pid` (which connected as `uid`) keeps its fallback
    /// table, and `ranges` (source, start, end) it has on replicas now.
    pub(super) fn note_table(
        &self,
        pid: u32,
        uid: u32,
        table: u64,
        ranges: &[(SourceKey, u64, u64)],
    ) {
        if table == 0 {
            return;
        }
        let a = self.attachment(pid);
        if a.start_time == 0 {
            return;
        }
        // Opened anew each time: after an exec the old one shows the old
        // image.
        let pagemap = cache_pagemap(&self.proc, pid);
        let mut tables = super::relock(&self.tables);
        let c = tables.entry(a).or_insert_with(|| Carrying {
            table,
            uid,
            ranges: Vec::new(),
            pagemap: None,
        });
        c.table = table;
        c.uid = uid;
        if pagemap.is_some() {
            c.pagemap = pagemap;
        }
        for r in ranges {
            if !c.ranges.contains(r) {
                if c.ranges.len() >= MAX_RANGES {
                    c.ranges.remove(0);
                }
                c.ranges.push(*r);
            }
        }
        drop(tables);
        // The copier starts here, not on a revoke's path.
        let mut current = super::relock(&self.carrier);
        if current.is_none() {
            *current = self.spawn_carrier();
            if let Some(c) = current.as_ref() {
                c.busy.store(false, Ordering::Release);
            }
        }
    }

    /// Fork children of processes that told us their table. A child has
    /// its parent's address space (its ranges on replicas, its table at the
    /// same address) but never says hello: each child that still maps one
    /// of its parent's replicas (it did not exec) and is still the parent's
    /// uid's is attached to its parent's replicas, with its parent's record
    /// copied, so that a revoke carries its private pages too. Run with
    /// every prune (`prune_every`): a child younger than that at a revoke
    /// keeps none; grandchildren come a prune later.
    pub(super) fn adopt_children(&self) {
        let parents: Vec<(Attachment, Carrying)> = super::relock(&self.tables)
            .iter()
            .filter(|(_, c)| !c.ranges.is_empty())
            .map(|(a, c)| (*a, c.clone()))
            .collect();
        if parents.is_empty() {
            return;
        }
        // The replicas each parent is attached to: (dev, ino) of the files.
        let replicas_of = |a: &Attachment| -> Vec<(u64, u64)> {
            super::lock(&self.list)
                .iter()
                .flat_map(|s| s.replicas.iter())
                .filter(|r| r.attachments.contains(a))
                .filter_map(|r| r.file.as_ref().map(|f| f.dev_ino()))
                .collect()
        };
        let known: std::collections::BTreeSet<Attachment> =
            super::relock(&self.tables).keys().copied().collect();
        let mut found: Vec<(Attachment, Attachment, Carrying)> = Vec::new();
        for (parent, c) in &parents {
            let Ok(Some(kids)) = self.proc.children(parent.pid) else {
                continue;
            };
            for pid in kids {
                let child = self.attachment(pid);
                if child.start_time == 0 || known.contains(&child) {
                    continue;
                }
                let ours =
                    c.uid == 0 || self.proc.proc_owner_uid(pid).ok().flatten() == Some(c.uid);
                let files = replicas_of(parent);
                let maps_one = ours
                    && matches!(self.proc.maps(pid), Ok(Some(lines))
                        if lines.iter().any(|l| files.contains(&(l.dev, l.ino))));
                // One that exec'd, or is not its parent's uid's any more, is
                // remembered with no ranges: looked at no more.
                let ranges = if maps_one {
                    c.ranges.clone()
                } else {
                    Vec::new()
                };
                found.push((
                    *parent,
                    child,
                    Carrying {
                        table: c.table,
                        uid: c.uid,
                        ranges,
                        pagemap: None,
                    },
                ));
            }
        }
        if found.is_empty() {
            return;
        }
        for (_, child, c) in &mut found {
            if !c.ranges.is_empty() {
                c.pagemap = cache_pagemap(&self.proc, child.pid);
            }
        }
        {
            let mut tables = super::relock(&self.tables);
            for (_, child, c) in &found {
                tables.entry(*child).or_insert_with(|| c.clone());
            }
        }
        let mut list = super::lock(&self.list);
        for r in list.iter_mut().flat_map(|s| s.replicas.iter_mut()) {
            for (parent, child, c) in &found {
                if !c.ranges.is_empty() && r.attachments.contains(parent) {
                    r.attachments.insert(*child);
                }
            }
        }
    }

    /// Carry the private pages of every process attached to `replicas` to
    /// its spares, waiting at most [`DEADLINE`]. Returns the pages
    /// carried.
    pub(super) fn carry_private(&self, key: SourceKey, replicas: &[Truncating]) -> u64 {
        let mut per_process: BTreeMap<Attachment, (Carrying, Vec<Truncating>)> = BTreeMap::new();
        {
            let tables = super::relock(&self.tables);
            for r in replicas {
                for a in &r.attached {
                    if let Some(c) = tables.get(a) {
                        per_process
                            .entry(*a)
                            .or_insert_with(|| (c.clone(), Vec::new()))
                            .1
                            .push(r.clone());
                    }
                }
            }
        }
        let work: Work = per_process
            .into_iter()
            .map(|(a, (c, on))| {
                let ranges = c
                    .ranges
                    .iter()
                    .filter(|r| r.0 == key)
                    .map(|r| (r.1, r.2))
                    .collect::<Vec<_>>();
                (a, (c.table, c.uid), c.pagemap.clone(), ranges, on)
            })
            .filter(|w| !w.3.is_empty())
            .collect();
        let work: Work = {
            let banned = super::relock(&self.carry_banned);
            work.into_iter()
                .filter(|w| !banned.covers(w.0.pid, w.1 .1))
                .collect()
        };
        if work.is_empty() {
            return 0;
        }
        let pids = pids(&work);
        let Some(worker) = self.carrier() else {
            crate::warn_limited!(
                "{MAX_STUCK} copiers of private pages are still waiting on process memory: \
                 this revoke carries none (pids {pids})"
            );
            return 0;
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (done, result) = mpsc::sync_channel(1);
        let job = CarryJob {
            work,
            stop: stop.clone(),
            done,
        };
        if worker.jobs.send(job).is_err() {
            worker.busy.store(false, Ordering::Release);
            return 0;
        }
        match result.recv_timeout(DEADLINE) {
            Ok(pages) => pages,
            Err(_) => {
                stop.store(true, Ordering::Release);
                worker.late.store(true, Ordering::Release);
                let on = worker.on.load(Ordering::Acquire);
                if on != u64::MAX {
                    let (pid, uid) = ((on >> 32) as u32, on as u32);
                    crate::warn_limited!(
                        "pid {pid} (uid {uid}) kept the copy of private pages past {DEADLINE:?}: \
                         it keeps no private pages across revokes from now on"
                    );
                    super::relock(&self.carry_banned).strike(pid, uid);
                }
                crate::warn_limited!(
                    "carrying private pages of pids {pids} took over {DEADLINE:?} (their memory \
                     waits on something): revoking without the rest"
                );
                0
            }
        }
    }

    /// A copier thread for one revoke, claimed (busy) for it: the kept
    /// one if it is idle. One busy within its deadline serves another
    /// revoke (they run at once only from different threads): this one
    /// gets a thread of its own, kept by nobody. One busy past its
    /// deadline is stuck on some process's memory: a new one is kept in
    /// its place, and the uid it waits on is carried for no more (a
    /// program can make reading its memory wait forever; it must not take
    /// carrying away from everyone else). `None` if [`MAX_STUCK`] threads
    /// run already or none can be started.
    pub(super) fn carrier(&self) -> Option<Carrier> {
        let mut current = super::relock(&self.carrier);
        if let Some(c) = current.as_ref() {
            if c.busy
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                // Whatever a revoke that gave up on its last job said.
                c.late.store(false, Ordering::Release);
                return Some(c.clone());
            }
            if !c.late.load(Ordering::Acquire) {
                drop(current);
                return self.spawn_carrier();
            }
            // Stuck past its deadline (the process it waits on is banned
            // already): replaced.
        }
        // None yet, or stuck: a new one kept (the stuck one ends once it
        // wakes, its queue gone).
        *current = None;
        let c = self.spawn_carrier()?;
        *current = Some(c.clone());
        Some(c)
    }

    /// A new copier thread, busy (claimed by the caller).
    fn spawn_carrier(&self) -> Option<Carrier> {
        if RUNNING.load(Ordering::Acquire) >= MAX_STUCK {
            return None;
        }
        let (jobs, queue) = mpsc::channel::<CarryJob>();
        let c = Carrier {
            jobs,
            busy: Arc::new(AtomicBool::new(true)),
            late: Arc::new(AtomicBool::new(false)),
            on: Arc::new(AtomicU64::new(u64::MAX)),
        };
        let proc = self.proc.clone();
        let counter = self.metrics.carried_pages.clone();
        let mine = c.clone();
        RUNNING.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new()
            .name("carry".into())
            .spawn(move || {
                let Carrier { busy, late, on, .. } = mine;
                // As the fence thread it serves: a revoke waits for it.
                if let Err(e) = crate::sys::realtime_thread() {
                    tracing::debug!("private-page copier without SCHED_FIFO: {e}");
                }
                let mut buf = vec![0u8; slots::TABLE_BYTES];
                while let Ok(job) = queue.recv() {
                    let mut pages = 0;
                    for (a, table, pagemap, ranges, replicas) in &job.work {
                        on.store(packed(a.pid, table.1), Ordering::Release);
                        let told = Told {
                            a: *a,
                            table: *table,
                            pagemap: pagemap.as_deref(),
                            ranges,
                        };
                        match carry_one(&proc, &told, replicas, &job.stop, &mut buf) {
                            Ok(n) => pages += n,
                            Err(why) => crate::debug_limited!(
                                "pid {}: private pages not carried before the revoke: {why}",
                                a.pid
                            ),
                        }
                    }
                    on.store(u64::MAX, Ordering::Release);
                    counter.inc_by(pages);
                    let _ = job.done.send(pages);
                    late.store(false, Ordering::Release);
                    busy.store(false, Ordering::Release);
                }
                RUNNING.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            RUNNING.fetch_sub(1, Ordering::AcqRel);
            crate::warn_limited!("cannot start a thread to carry private pages: {e}");
            return None;
        }
        Some(c)
    }
}

/// The copier thread's queue, and whether it is working on a job.
#[derive(Debug, Clone)]
pub(super) struct Carrier {
    jobs: mpsc::Sender<CarryJob>,
    /// Claimed for a revoke, until its job is done.
    pub(super) busy: Arc<AtomicBool>,
    /// Its revoke stopped waiting for it.
    pub(super) late: Arc<AtomicBool>,
    /// The process it works on (`pid << 32 | uid`), `u64::MAX` between
    /// them.
    pub(super) on: Arc<AtomicU64>,
}

/// One revoke's copies.
#[derive(Debug)]
struct CarryJob {
    work: Work,
    stop: Arc<AtomicBool>,
    done: mpsc::SyncSender<u64>,
}

fn pids(work: &Work) -> String {
    let v: Vec<String> = work.iter().map(|w| w.0.pid.to_string()).collect();
    v.join(", ")
}

/// What one process told us, as a revoke's copier reads it.
struct Told<'a> {
    a: Attachment,
    /// Its table's address, and the uid it connected as.
    table: (u64, u32),
    pagemap: Option<&'a Cached>,
    ranges: &'a [(u64, u64)],
}

/// The slots of a table (`bytes`) that map one of `on`, each with the
/// length it may cover (at most its replica's size), at most
/// [`MAX_SLOTS`].
fn matching(bytes: &[u8], on: &[Truncating]) -> Vec<Mine> {
    let page = replicad_procfs::page_size() as u64;
    let mut found = Vec::new();
    for r in on {
        let cap = r.size.div_ceil(page) * page;
        // The shim's ranges and spares are whole pages; anything else is
        // not one of its slots.
        let whole = |(_, v): &(usize, slots::SlotView)| {
            v.start.is_multiple_of(page)
                && v.spare.is_multiple_of(page)
                && v.len.is_multiple_of(page)
        };
        found.extend(
            slots::active_on(bytes, r.dev, r.ino)
                .filter(whole)
                .map(|(i, s)| Mine {
                    index: i,
                    slot: s,
                    len: s.len.min(cap),
                }),
        );
    }
    if found.len() > MAX_SLOTS {
        crate::debug_limited!(
            "{} ranges on replicas being revoked in one process: the first {MAX_SLOTS} are \
             looked at for private pages",
            found.len()
        );
        found.truncate(MAX_SLOTS);
    }
    found
}

/// The process's `carrying` word, set while this lives (its table's
/// [`slots::CARRYING_OFFSET`], written through its checked `mem`).
struct CarryingFlag<'a> {
    mem: &'a std::fs::File,
    at: u64,
}

impl Carrying {
    fn flag(mem: &std::fs::File, table: u64) -> CarryingFlag<'_> {
        let at = table + slots::CARRYING_OFFSET;
        let _ = mem.write_at(&1u64.to_ne_bytes(), at);
        CarryingFlag { mem, at }
    }
}

impl Drop for CarryingFlag<'_> {
    fn drop(&mut self) {
        let _ = self.mem.write_at(&0u64.to_ne_bytes(), self.at);
    }
}

/// A slot of the table that maps a replica being revoked: its index, what
/// it said, and how much of its range may be looked at.
#[derive(Debug, Clone, Copy)]
struct Mine {
    index: usize,
    slot: slots::SlotView,
    len: u64,
}

/// A slot and the runs of private pages in its range.
type SlotRuns = (Mine, Vec<(u64, u64)>);

/// Whether slot `m` of the table at `table` still holds the word it held
/// (the same range, not moved or unmapped since), read through `mem`.
fn unchanged(mem: &std::fs::File, m: &Mine, table: u64) -> bool {
    let mut w = [0u8; 8];
    let at = table + slots::word_offset(m.index);
    matches!(mem.read_at(&mut w, at), Ok(8)) && u64::from_ne_bytes(w) == m.slot.word
}

/// Of `mine`, the slots with private pages, and their runs.
fn private_slots(mine: &[Mine], pagemap: &std::fs::File) -> Result<Vec<SlotRuns>, String> {
    let mut found = Vec::new();
    for m in mine {
        let (start, end) = (m.slot.start, m.slot.start + m.len);
        let runs = replicad_procfs::private_runs(pagemap, start, end)
            .map_err(|e| format!("PAGEMAP_SCAN of {start:#x}-{end:#x}: {e}"))?;
        if !runs.is_empty() {
            found.push((*m, runs));
        }
    }
    Ok(found)
}

/// One process: find its ranges on `on` that hold private pages, copy
/// each run to the same offsets of the range's spare. The common case
/// (nothing written privately) asks pagemap about the ranges the process
/// told us of, one ioctl each, and reads none of its memory.
fn carry_one(
    proc: &ProcReader,
    told: &Told<'_>,
    on: &[Truncating],
    stop: &AtomicBool,
    buf: &mut [u8],
) -> Result<u64, String> {
    let Told {
        a,
        table: (table, uid),
        ranges,
        ..
    } = *told;
    let gone = || "the process is gone".to_string();
    let opened;
    let pagemap = match told.pagemap {
        Some(Cached(f)) => f,
        None => {
            opened = proc
                .pagemap(a.pid)
                .map_err(|e| e.to_string())?
                .ok_or_else(gone)?;
            &opened
        }
    };
    let mut any = false;
    for &(start, end) in ranges {
        if stop.load(Ordering::Acquire) {
            return Ok(0);
        }
        if replicad_procfs::has_private(pagemap, start, end)
            .map_err(|e| format!("PAGEMAP_SCAN of {start:#x}-{end:#x}: {e}"))?
        {
            any = true;
            break;
        }
    }
    if !any {
        return Ok(0);
    }
    // Something to carry (rare): from here on, everything goes through
    // fds opened on the process the pid names now, checked to be the one
    // that told us and still its uid's (no set-user-ID exec since); the
    // table and the scan are read again through them.
    let mem = proc
        .mem(a.pid)
        .map_err(|e| e.to_string())?
        .ok_or_else(gone)?;
    let pagemap = proc
        .pagemap(a.pid)
        .map_err(|e| e.to_string())?
        .ok_or_else(gone)?;
    if proc.start_time(a.pid).ok().flatten() != Some(a.start_time) {
        return Err(gone());
    }
    if uid != 0 && proc.proc_owner_uid(a.pid).ok().flatten() != Some(uid) {
        return Err(format!("it is no longer uid {uid}'s to inspect"));
    }
    let page = replicad_procfs::page_size() as u64;
    // Through `mem`, only its pages in memory: the rest of the table was never written
    // (all slots free), and reading it would fault each page in.
    let size = buf.len() as u64;
    buf.fill(0);
    let present = replicad_procfs::present_runs(&pagemap, table & !(page - 1), table + size)
        .map_err(|e| format!("PAGEMAP_SCAN: {e}"))?;
    for (from, to) in present {
        let (from, to) = (from.max(table), to.min(table + size));
        let Some(part) = buf.get_mut((from - table) as usize..(to - table) as usize) else {
            continue;
        };
        mem.read_at(part, from)
            .map_err(|e| format!("reading its fallback table at {from:#x}: {e}"))?;
    }
    let got = buf.len();
    let page = replicad_procfs::page_size() as u64;
    let mut carried = 0u64;
    let mut budget = MAX_BYTES;
    let mut chunk = vec![0u8; CHUNK];
    let mine = matching(buf.get(..got).unwrap_or(&[]), on);
    let found = private_slots(&mine, &pagemap)?;
    // While its `carrying` word is set the process moves and unmaps no
    // spare (it waits; each of our writes checks the slot's word first).
    let _carrying = Carrying::flag(&mem, table);
    for (m, runs) in found {
        let s = m.slot;
        for (from, to) in runs {
            let mut at = from;
            while at < to && budget > 0 {
                if stop.load(Ordering::Acquire) {
                    return Ok(carried);
                }
                let n = (to - at).min(CHUNK as u64).min(budget) as usize;
                let Some(part) = chunk.get_mut(..n) else {
                    break;
                };
                let dst = s.spare + (at - s.start);
                let read = mem
                    .read_at(part, at)
                    .map_err(|e| format!("reading {at:#x}: {e}"))?;
                // The shim marks a slot before it moves or unmaps its
                // spare (and then waits for the revoke): write only while
                // the slot still says what it said.
                if read == 0 || stop.load(Ordering::Acquire) || !unchanged(&mem, &m, table) {
                    break;
                }
                let wrote = mem
                    .write_at(part.get(..read).unwrap_or(&[]), dst)
                    .map_err(|e| format!("writing {at:#x} to its way back at {dst:#x}: {e}"))?;
                if wrote == 0 {
                    break;
                }
                at += wrote as u64;
                budget -= wrote as u64;
                carried += (wrote as u64).div_ceil(page);
            }
        }
    }
    if budget == 0 {
        crate::warn_limited!(
            "pid {}: more than {} MiB written privately in replica-backed ranges; the rest is \
             lost at this revoke",
            a.pid,
            MAX_BYTES >> 20
        );
    }
    if carried > 0 {
        tracing::info!(
            pid = a.pid,
            pages = carried,
            "private pages carried to the original mapping before a revoke"
        );
    }
    Ok(carried)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    const PAGE: u64 = 4096;

    fn map(f: &std::fs::File, len: usize) -> u64 {
        // SAFETY: a private read-only mapping of our own temp file.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        for off in (0..len as u64).step_by(PAGE as usize) {
            // SAFETY: inside the mapping.
            unsafe { std::ptr::read_volatile((p as u64 + off) as *const u8) };
        }
        p as u64
    }

    #[test]
    fn a_private_page_goes_to_the_same_offset_of_the_spare_and_nothing_else() {
        let len = 4 * PAGE as usize;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; len]).unwrap();
        let md = f.metadata().unwrap();
        let (range, spare, other) = (map(&f, len), map(&f, len), map(&f, len));
        let proc = ProcReader::default();
        let mem = proc.mem(std::process::id()).unwrap().unwrap();
        mem.write_at(&[0xcc], range + 2 * PAGE + 9).unwrap();
        mem.write_at(&[0xdd], other + PAGE).unwrap();
        // A table in our memory: slot 3 is the range (a replica whose
        // device and inode are the temp file's), slot 5 another one that
        // maps `other` on an inode no revoke concerns.
        // The slots, then the `carrying` word.
        let mut table = vec![0u64; slots::SLOTS * slots::SLOT_WORDS + 1];
        let dev = slots::dev_word(md.dev());
        let slot = |t: &mut Vec<u64>, i: usize, start: u64, sp: u64, ino: u64| {
            let w = &mut t[i * slots::SLOT_WORDS..(i + 1) * slots::SLOT_WORDS];
            w.copy_from_slice(&[9 << 8 | slots::ACTIVE, start, len as u64, sp, dev, ino, 0]);
        };
        slot(&mut table, 3, range, spare, md.ino());
        slot(&mut table, 5, other, spare, md.ino() + 1);
        let pid = std::process::id();
        let a = Attachment {
            pid,
            start_time: proc.start_time(pid).unwrap().unwrap(),
        };
        let on = [Truncating {
            dev,
            ino: md.ino(),
            size: len as u64,
            attached: vec![a],
        }];
        // SAFETY: geteuid cannot fail.
        let uid = unsafe { libc::geteuid() };
        let ranges = [(range, range + len as u64), (other, other + len as u64)];
        let told = Told {
            a,
            table: (table.as_ptr() as u64, uid),
            pagemap: None,
            ranges: &ranges,
        };
        let mut buf = vec![0u8; slots::TABLE_BYTES];
        let stop = AtomicBool::new(false);
        assert_eq!(carry_one(&proc, &told, &on, &stop, &mut buf), Ok(1));
        // SAFETY: reading our own vector's last word, which the copy set
        // and cleared through our mem.
        let carrying = unsafe { std::ptr::read_volatile(table.as_ptr().add(table.len() - 1)) };
        assert_eq!(carrying, 0, "the carrying word was left set");
        // SAFETY: reads inside our mappings.
        let at = |p: u64| unsafe { std::ptr::read_volatile(p as *const u8) };
        assert_eq!(at(spare + 2 * PAGE + 9), 0xcc);
        assert_eq!(at(spare + 2 * PAGE), 7);
        assert_eq!(at(spare + PAGE), 7, "the other slot's page came along");
        let pagemap = proc.pagemap(pid).unwrap().unwrap();
        assert_eq!(
            replicad_procfs::private_runs(&pagemap, spare, spare + len as u64).unwrap(),
            vec![(spare + 2 * PAGE, spare + 3 * PAGE)]
        );
        // A process that is not the one that told us (its start time
        // differs) gets nothing written.
        let stranger = Told {
            a: Attachment {
                pid,
                start_time: a.start_time + 1,
            },
            ..told
        };
        assert!(carry_one(&proc, &stranger, &on, &stop, &mut buf).is_err());
        // Nor does one whose revoke gave up on it.
        stop.store(true, Ordering::Release);
        assert_eq!(carry_one(&proc, &told, &on, &stop, &mut buf), Ok(0));
        for p in [range, spare, other] {
            // SAFETY: our own mappings.
            unsafe { libc::munmap(p as *mut libc::c_void, len) };
        }
    }
}
