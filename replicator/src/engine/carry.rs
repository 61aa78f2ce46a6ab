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
//! hostile program mapped where it said its table is): the copies run on
//! a thread of their own, and the revoke waits for them at most
//! [`DEADLINE`], then truncates anyway (the thread, told to stop, writes
//! nothing more once it wakes); while [`MAX_STUCK`] such threads are
//! still waiting, nothing is carried. A program writing
//! privately while its replica is being revoked may lose that one write
//! (between the copy and the truncate); one whose daemon died (the keeper
//! fences alone) keeps nothing.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use replicad_procfs::{slots, ProcReader};

use super::Inner;
use crate::model::Attachment;

/// Slots of one process looked at per revoke.
const MAX_SLOTS: usize = 64;
/// Bytes carried for one process per revoke.
const MAX_BYTES: u64 = 16 << 20;
/// One copy's buffer.
const CHUNK: usize = 64 << 10;
/// Longest a revoke waits for the copies.
pub(super) const DEADLINE: Duration = Duration::from_millis(5);
/// Copy threads past their deadline and still running, at most.
const MAX_STUCK: usize = 4;
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

/// One process's share: where its table is, the uid it connected as, and
/// its replicas.
type Work = Vec<(Attachment, (u64, u32), Vec<Truncating>)>;

impl Inner {
    /// Remember where `pid` (which connected as `uid`) keeps its fallback
    /// table (0: it has none).
    pub(super) fn note_table(&self, pid: u32, uid: u32, table: u64) {
        if table == 0 {
            return;
        }
        let a = self.attachment(pid);
        if a.start_time != 0 {
            super::relock(&self.tables).insert(a, (table, uid));
        }
    }

    /// Carry the private pages of every process attached to `replicas` to
    /// its spares, waiting at most [`DEADLINE`]. Returns the pages
    /// carried.
    pub(super) fn carry_private(&self, replicas: &[Truncating]) -> u64 {
        let mut per_process: BTreeMap<Attachment, ((u64, u32), Vec<Truncating>)> = BTreeMap::new();
        {
            let tables = super::relock(&self.tables);
            for r in replicas {
                for a in &r.attached {
                    if let Some(&table) = tables.get(a) {
                        per_process
                            .entry(*a)
                            .or_insert((table, Vec::new()))
                            .1
                            .push(r.clone());
                    }
                }
            }
        }
        if per_process.is_empty() {
            return 0;
        }
        let work: Work = per_process
            .into_iter()
            .map(|(a, (table, on))| (a, table, on))
            .collect();
        if RUNNING.load(Ordering::Acquire) >= MAX_STUCK {
            crate::warn_limited!(
                "{MAX_STUCK} copies of private pages are still waiting on process memory: \
                 this revoke carries none (pids {})",
                pids(&work)
            );
            return 0;
        }
        let proc = self.proc.clone();
        let counter = self.metrics.carried_pages.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::sync_channel(1);
        let stopped = stop.clone();
        let pids = pids(&work);
        RUNNING.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new()
            .name("carry".into())
            .spawn(move || {
                let mut pages = 0;
                for (a, table, on) in &work {
                    match carry_one(&proc, *a, *table, on, &stopped) {
                        Ok(n) => pages += n,
                        Err(why) => crate::debug_limited!(
                            "pid {}: private pages not carried before the revoke: {why}",
                            a.pid
                        ),
                    }
                }
                counter.inc_by(pages);
                RUNNING.fetch_sub(1, Ordering::AcqRel);
                let _ = tx.send(pages);
            });
        if let Err(e) = spawned {
            RUNNING.fetch_sub(1, Ordering::AcqRel);
            crate::warn_limited!("cannot start a thread to carry private pages: {e}");
            return 0;
        }
        match rx.recv_timeout(DEADLINE) {
            Ok(pages) => pages,
            Err(_) => {
                stop.store(true, Ordering::Release);
                crate::warn_limited!(
                    "carrying private pages of pids {pids} took over {DEADLINE:?} (their memory \
                     waits on something): revoking without the rest"
                );
                0
            }
        }
    }
}

fn pids(work: &Work) -> String {
    let v: Vec<String> = work.iter().map(|(a, _, _)| a.pid.to_string()).collect();
    v.join(", ")
}

/// One process: read its table, find its ranges on `on`, copy each run
/// of private pages to the same offsets of the range's spare.
fn carry_one(
    proc: &ProcReader,
    a: Attachment,
    (table, uid): (u64, u32),
    on: &[Truncating],
    stop: &AtomicBool,
) -> Result<u64, String> {
    let gone = || "the process is gone".to_string();
    let mem = proc
        .mem(a.pid)
        .map_err(|e| e.to_string())?
        .ok_or_else(gone)?;
    let pagemap = proc
        .pagemap(a.pid)
        .map_err(|e| e.to_string())?
        .ok_or_else(gone)?;
    // Both were opened on the process the pid names now: is it the one
    // that told us, and still its uid's (no set-user-ID exec since)?
    if proc.start_time(a.pid).ok().flatten() != Some(a.start_time) {
        return Err(gone());
    }
    if uid != 0 && proc.proc_owner_uid(a.pid).ok().flatten() != Some(uid) {
        return Err(format!("it is no longer uid {uid}'s to inspect"));
    }
    let mut buf = vec![0u8; slots::TABLE_BYTES];
    let got = mem
        .read_at(&mut buf, table)
        .map_err(|e| format!("reading its fallback table at {table:#x}: {e}"))?;
    let page = replicad_procfs::page_size() as u64;
    let mut carried = 0u64;
    let mut budget = MAX_BYTES;
    let mut chunk = vec![0u8; CHUNK];
    let mut looked = 0;
    for s in slots::decode(buf.get(..got).unwrap_or(&[])) {
        let Some(r) = on.iter().find(|r| s.active_on(r.dev, r.ino)) else {
            continue;
        };
        looked += 1;
        if looked > MAX_SLOTS {
            break;
        }
        let len = s.len.min(r.size.div_ceil(page) * page);
        let runs = replicad_procfs::private_runs(&pagemap, s.start, s.start + len)
            .map_err(|e| format!("PAGEMAP_SCAN: {e}"))?;
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
                if read == 0 || stop.load(Ordering::Acquire) {
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
