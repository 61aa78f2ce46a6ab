//! The SIGBUS fallback: when replicad revokes a replica (it truncates the
//! replica file to 0 before a writer may touch the source), the next touch of
//! the replica range raises SIGBUS. The handler here moves the spare mapping
//! of the original file over the range with one `mremap(MREMAP_FIXED)` and
//! returns; the faulting instruction then reads the file's current bytes.
//!
//! ```text
//!  slot (fixed static table, atomics only)
//!  ┌──────────────────────────────────────────┐
//!  │ word = seq << 8 | state                  │  FREE ─claim─> CLAIMED ─> ACTIVE
//!  │ start, len   (the range the caller reads)│  ACTIVE ─fault─> REMAPPING ─> FALLEN
//!  │ spare        (the original file, mapped) │  (mremap failed:     ─> BROKEN)
//!  └──────────────────────────────────────────┘  ACTIVE|FALLEN|BROKEN ─drop─> RELEASING ─> FREE
//! ```
//!
//! The handler is async-signal-safe: it reads and CASes atomics, makes its
//! syscalls with inline assembly (x86_64, aarch64; `libc::syscall` on other
//! architectures), and calls nothing outside this crate except the previous
//! handler it chains to, because the range being revoked could one day hold
//! libc's own text. It never allocates, never panics (no indexing, only
//! wrapping arithmetic) and never loops on a fault it cannot fix:
//!
//! * a fault in an `ACTIVE` range: exactly one thread wins the CAS to
//!   `REMAPPING` and remaps; the others wait until it is done and return;
//! * a fault in a `FALLEN` range is retried once per thread and address (the
//!   thread may have faulted on the replica just before another thread's
//!   remap completed); faulting again at the same address means the original
//!   itself faults (e.g. the source shrank), and the fault goes where it would
//!   have gone without replicad;
//! * any other SIGBUS goes to the previous action: its handler is called with
//!   its mask and flags honoured, or, for `SIG_DFL`/`SIG_IGN`, the default
//!   action is restored and the fault re-raises.
//!
//! Flags: `SA_SIGINFO` (we need `si_addr`), `SA_ONSTACK` (run on the
//! program's alternate stack if the thread has one, as the program's own
//! handler would), `SA_RESTART`, and `SA_NODEFER`: SIGBUS stays unblocked
//! inside the handler so that a chained program handler that itself touches
//! another revoked replica gets that fault fixed too, instead of the kernel
//! killing the process for a fault on a blocked signal. Before chaining, the
//! handler blocks what the previous action asked for (its `sa_mask`, and
//! SIGBUS unless it had `SA_NODEFER`); the kernel restores the thread's mask
//! from the signal frame on return.

use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use replicad_procfs::slots;

/// Number of replica ranges one process can hold at once.
pub(crate) const SLOTS: usize = slots::SLOTS;

const FREE: u64 = 0;
const CLAIMED: u64 = 1;
const ACTIVE: u64 = 2;
const REMAPPING: u64 = 3;
const FALLEN: u64 = 4;
const BROKEN: u64 = 5;
const RELEASING: u64 = 6;
/// A shim range the program unmapped or replaced behind our back (found
/// when a fault's range no longer maps the replica): never remapped again.
const STALE: u64 = 7;

const STATE_MASK: u64 = 0xff;

/// Laid out as [`replicad_procfs::slots`] says: the daemon reads the table
/// (through `/proc/<pid>/mem`) during a revoke.
#[repr(C)]
struct Slot {
    /// `seq << 8 | state`. `seq` grows on every claim, so a handler that read
    /// `start`/`len` can tell whether they still belong to the same range.
    word: AtomicU64,
    start: AtomicUsize,
    len: AtomicUsize,
    spare: AtomicUsize,
    /// For ranges the preload shim swapped in (the program owns the range
    /// and may unmap it without telling us): the replica's device
    /// (`major << 32 | minor`) and inode. Before remapping, the handler
    /// checks in `/proc/self/maps` that the faulting range still maps that
    /// file. 0: not checked (a [`Replica`] owns its range).
    dev: AtomicU64,
    ino: AtomicU64,
    /// For shim ranges: the file offset the range maps, checked with the
    /// rest (a range the program mapped again at the same address may map
    /// the same replica at another offset); [`OFFSET_UNCHECKED`]: not
    /// checked.
    offset: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Slot>() == slots::SLOT_WORDS * 8);
const _: () = assert!(ACTIVE == slots::ACTIVE && STATE_MASK == slots::STATE_MASK);

/// A shim slot's offset when its registrar did not give one.
const OFFSET_UNCHECKED: u64 = u64::MAX;

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: Slot = Slot {
    word: AtomicU64::new(0),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    spare: AtomicUsize::new(0),
    dev: AtomicU64::new(0),
    ino: AtomicU64::new(0),
    offset: AtomicU64::new(0),
};

/// The table and, right after it, the word the daemon sets while it
/// writes private pages into this process's spares during a revoke
/// ([`replicad_procfs::slots::CARRYING_OFFSET`]).
#[repr(C)]
struct Shared {
    slots: [Slot; SLOTS],
    carrying: AtomicU64,
}

static SHARED: Shared = Shared {
    slots: [EMPTY_SLOT; SLOTS],
    carrying: AtomicU64::new(0),
};
static TABLE: &[Slot; SLOTS] = &SHARED.slots;

const _: () = assert!(std::mem::offset_of!(Shared, carrying) as u64 == slots::CARRYING_OFFSET);

/// Where this process keeps its table, for the daemon (see
/// [`replicad_procfs::slots`]).
pub(crate) fn table_address() -> u64 {
    &SHARED as *const Shared as u64
}

/// Longest a spare's move or unmap waits for the daemon to finish writing
/// into spares (longer than the daemon's own deadline for it).
const CARRY_WAIT_NS: u64 = 25_000_000;
/// One nap while it waits.
const CARRY_NAP_NS: u64 = 100_000;

/// Wait while the daemon writes private pages into this process's spares
/// (it checks each slot's word before each write, and the caller has just
/// changed it: once the word is clear, no write of the daemon's is left
/// to land on a spare about to move). At most [`CARRY_WAIT_NS`].
/// Async-signal-safe: loads and nanosleep.
fn wait_carry() {
    fence(Ordering::SeqCst);
    let mut slept = 0;
    while SHARED.carrying.load(Ordering::SeqCst) != 0 && slept < CARRY_WAIT_NS {
        sys::nap(CARRY_NAP_NS);
        slept += CARRY_NAP_NS;
    }
}
/// The page size, read once when the handler is installed.
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// One past the highest slot ever claimed: the handler scans only this far.
static HIGH_WATER: AtomicUsize = AtomicUsize::new(0);

/// Per-thread "last fault I returned on", direct-mapped by tid. A collision
/// only costs the other thread one more retry; it never makes a fault look
/// like a repeat that was not one (see `repeat_fault`).
const THREAD_SLOTS: usize = 256;

struct LastFault {
    tid: AtomicUsize,
    addr: AtomicUsize,
    key: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_FAULT: LastFault = LastFault {
    tid: AtomicUsize::new(0),
    addr: AtomicUsize::new(0),
    key: AtomicU64::new(0),
};

static LAST_FAULT: [LastFault; THREAD_SLOTS] = [EMPTY_FAULT; THREAD_SLOTS];

/// The published set's `revoking` word (see `replicad_wire::published`),
/// or 0: a fault that must fall back first waits while it is non-zero, so
/// that its remap does not queue against the daemon's truncate (which the
/// writer waits for). Set only to words of mappings never unmapped.
static REVOKING: AtomicUsize = AtomicUsize::new(0);

/// Longest one fallback waits for a revoke to end: the daemon's truncate
/// and release take well under this; a daemon that died mid-revoke (its
/// count never lowered) costs each fallback this much once.
const REVOKE_WAIT_NS: u64 = 4_000_000;
/// One sleep on the word, at most.
const REVOKE_NAP_NS: u64 = 1_000_000;

/// Wait before remapping while the daemon's published set shows a revoke
/// truncating replicas, from now on. `word` must stay mapped for the
/// process's life (the handler may load it at any moment).
pub(crate) fn watch_revokes(word: &'static AtomicU64) {
    REVOKING.store(word as *const AtomicU64 as usize, Ordering::Release);
}

/// Sleep while a revoke is in progress, at most [`REVOKE_WAIT_NS`] in all.
/// Async-signal-safe: loads and futex waits.
fn wait_revokes() {
    let mut slept = 0;
    while slept < REVOKE_WAIT_NS && revoke_nap(REVOKE_NAP_NS) {
        slept += REVOKE_NAP_NS;
    }
}

/// If a revoke is in progress, sleep until it ends or `ns` passed and say
/// true; else false at once.
fn revoke_nap(ns: u64) -> bool {
    let addr = REVOKING.load(Ordering::Acquire);
    if addr == 0 {
        return false;
    }
    // SAFETY: `watch_revokes` takes only words that stay mapped for the
    // process's life; a read-only mapping allows relaxed loads.
    let word = unsafe { &*(addr as *const AtomicU64) };
    if word.load(Ordering::Relaxed) == 0 {
        return false;
    }
    // The futex is the word's low half (its first four bytes: the file is
    // little-endian); the kernel sleeps only if that half still holds what
    // we read, so a wake between the load and the wait is not lost.
    // SAFETY: as above, the low half lies in the same live mapping.
    let seen = unsafe { &*(addr as *const AtomicU32) }.load(Ordering::Relaxed);
    sys::futex_wait(addr, seen, ns);
    true
}

/// The action that was installed for SIGBUS before ours.
static PREV_READY: AtomicBool = AtomicBool::new(false);
static PREV_HANDLER: AtomicUsize = AtomicUsize::new(0);
static PREV_FLAGS: AtomicU64 = AtomicU64::new(0);
/// The previous `sa_mask` as the kernel's 64-bit signal set.
static PREV_MASK: AtomicU64 = AtomicU64::new(0);

/// How often ranges fell back, and how many faults went on to the previous
/// action (for tests and debugging).
static FALLBACKS: AtomicU64 = AtomicU64::new(0);
static CHAINED: AtomicU64 = AtomicU64::new(0);
/// Faults that found another thread's remap in flight or done (waited or
/// retried once).
static RACED: AtomicU64 = AtomicU64::new(0);

/// Installation result, once: `Ok` or the errno of `sigaction`.
static INSTALL: Mutex<Option<Result<(), i32>>> = Mutex::new(None);

fn state(word: u64) -> u64 {
    word & STATE_MASK
}

fn seq(word: u64) -> u64 {
    word >> 8
}

fn with_state(word: u64, st: u64) -> u64 {
    (word & !STATE_MASK) | st
}

/// Why a range could not be registered.
#[derive(Debug)]
pub(crate) enum AttachError {
    /// All [`SLOTS`] slots hold ranges.
    Full,
    /// The SIGBUS handler could not be installed.
    Install(io::Error),
}

impl std::fmt::Display for AttachError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttachError::Full => write!(
                f,
                "the SIGBUS fallback table is full ({SLOTS} replica mappings)"
            ),
            AttachError::Install(e) => write!(f, "cannot install the SIGBUS handler: {e}"),
        }
    }
}

/// A replica mapped at `start` with the original file mapped at a spare
/// address, registered for the fallback. Dropping it unmaps both (or the one
/// range left after a fallback) and frees the slot.
#[derive(Debug)]
pub(crate) struct Replica {
    slot: usize,
    seq: u64,
    start: usize,
    len: usize,
}

/// Register `len` bytes (a multiple of the page size) at `start` (the
/// replica) with the original file mapped at `spare`. On success the
/// returned value owns both mappings; on error the caller still owns them.
pub(crate) fn attach(start: usize, len: usize, spare: usize) -> Result<Replica, AttachError> {
    claim(start, len, spare, 0, 0, 0)
}

fn claim(
    start: usize,
    len: usize,
    spare: usize,
    offset: u64,
    dev: u64,
    ino: u64,
) -> Result<Replica, AttachError> {
    install().map_err(AttachError::Install)?;
    let (slot, seq) = claim_slot(start, len, spare, offset, dev, ino).ok_or(AttachError::Full)?;
    Ok(Replica {
        slot,
        seq,
        start,
        len,
    })
}

/// Take a free slot for a range, ACTIVE at once: `(index, seq)`. Atomics
/// only (no lock, no allocation): the shim's `munmap` wrapper splits
/// ranges with it, and programs call `munmap` from signal handlers.
fn claim_slot(
    start: usize,
    len: usize,
    spare: usize,
    offset: u64,
    dev: u64,
    ino: u64,
) -> Option<(usize, u64)> {
    let mut i = 0;
    while i < SLOTS {
        let slot = TABLE.get(i)?;
        i += 1;
        let w = slot.word.load(Ordering::Relaxed);
        if state(w) != FREE {
            continue;
        }
        let claimed = ((seq(w).wrapping_add(1)) << 8) | CLAIMED;
        if slot
            .word
            .compare_exchange(w, claimed, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        slot.start.store(start, Ordering::Relaxed);
        slot.len.store(len, Ordering::Relaxed);
        slot.spare.store(spare, Ordering::Relaxed);
        slot.dev.store(dev, Ordering::Relaxed);
        slot.ino.store(ino, Ordering::Relaxed);
        slot.offset.store(offset, Ordering::Relaxed);
        HIGH_WATER.fetch_max(i, Ordering::AcqRel);
        slot.word
            .store(with_state(claimed, ACTIVE), Ordering::Release);
        return Some((i - 1, seq(claimed)));
    }
    None
}

impl Replica {
    /// Whether the replica is still mapped (no fallback has begun).
    pub(crate) fn on_replica(&self) -> bool {
        let Some(slot) = TABLE.get(self.slot) else {
            return false;
        };
        let w = slot.word.load(Ordering::Acquire);
        seq(w) == self.seq && state(w) == ACTIVE
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let Some(slot) = TABLE.get(self.slot) else {
            return;
        };
        // Take the slot away from the handler first; a remap in flight is
        // waited for, so the spare is never unmapped under it.
        let spare_separate = loop {
            let w = slot.word.load(Ordering::Acquire);
            if seq(w) != self.seq {
                // Not ours any more: cannot happen, but never free another
                // range's slot.
                return;
            }
            match state(w) {
                REMAPPING => {
                    sys::sched_yield();
                    continue;
                }
                ACTIVE | FALLEN | BROKEN => {
                    if slot
                        .word
                        .compare_exchange(
                            w,
                            with_state(w, RELEASING),
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        )
                        .is_ok()
                    {
                        break state(w) != FALLEN;
                    }
                }
                _ => return,
            }
        };
        let spare = slot.spare.load(Ordering::Relaxed);
        // SAFETY: start/len is the range this value owns; nothing borrows it
        // any more (the Mapping that held us is being dropped).
        unsafe { libc::munmap(self.start as *mut libc::c_void, self.len) };
        if spare_separate {
            // SAFETY: the spare mapping was never moved (the state was not
            // FALLEN, and the handler can no longer move it: RELEASING), so
            // it is still ours at `spare`.
            unsafe { libc::munmap(spare as *mut libc::c_void, self.len) };
        }
        let w = slot.word.load(Ordering::Acquire);
        slot.word.store(with_state(w, FREE), Ordering::Release);
    }
}

/// The preload shim's side of the table: ranges the program mapped (its
/// libraries, its files) that the shim moved onto replicas. Unlike a
/// `Replica`, nobody owns them: they live until the program unmaps them,
/// which the handler notices (see `Slot::dev`).
pub mod shim {
    use super::*;

    /// From now on a fault that falls back waits while `word` (a published
    /// set's revoke count, which must stay mapped for the process's life)
    /// shows a revoke in progress.
    pub fn watch_revokes(word: &'static AtomicU64) {
        super::watch_revokes(word);
    }

    /// Register the replica now mapped at `start` (or about to be), with
    /// the original mapped at `spare`, and the replica file's device
    /// (`major`, `minor`) and inode. Returns the slot. The range's file
    /// offset is not checked on a fault; [`register_mapping`] checks it.
    pub fn register(
        start: usize,
        len: usize,
        spare: usize,
        major: u32,
        minor: u32,
        ino: u64,
    ) -> Result<usize, String> {
        register_mapping(start, len, spare, OFFSET_UNCHECKED, major, minor, ino)
    }

    /// [`register`], with the file `offset` the range maps: on a fault,
    /// the range is taken for this entry's only if it still maps exactly
    /// `start..start+len` of the replica file at `offset`.
    pub fn register_mapping(
        start: usize,
        len: usize,
        spare: usize,
        offset: u64,
        major: u32,
        minor: u32,
        ino: u64,
    ) -> Result<usize, String> {
        let dev = (u64::from(major) << 32) | u64::from(minor);
        let r = claim(start, len, spare, offset, dev, ino.max(1)).map_err(|e| e.to_string())?;
        let slot = r.slot;
        // Nobody owns the range: never unmap it on drop.
        std::mem::forget(r);
        Ok(slot)
    }

    /// Where this process's fallback table lies, for the daemon's hello
    /// and map requests (it carries private pages to the spares during a
    /// revoke; see [`replicad_procfs::slots`]).
    pub fn table_address() -> u64 {
        super::table_address()
    }

    /// Undo [`register`] after the swap failed: the range is still the
    /// program's original; the spare is unmapped.
    pub fn unregister(slot: usize) {
        release(slot, true);
    }

    /// The program unmapped `addr..addr+len`, or the kernel just mapped
    /// something new there: every shim range overlapping it is gone, so
    /// its entry is freed and its spare unmapped (unless the spare is what
    /// the range became after a fallback). Without this, each range a
    /// program unmaps keeps a slot and a spare mapping for good, and an
    /// entry left at an address the kernel hands out again would be taken
    /// for the new mapping's. Only atomics and `munmap`: safe in a signal
    /// handler (programs call `mmap` and `munmap` from theirs).
    ///
    /// A range the program unmaps only part of keeps its fallback for the
    /// rest: the parts before and after the hole get entries of their own
    /// (with the matching parts of the spare), and only the spare's part
    /// under the hole is unmapped.
    pub fn forget(addr: usize, len: usize) {
        let page = PAGE.load(Ordering::Relaxed).max(1);
        // The kernel unmaps whole pages.
        let end = addr.saturating_add(len).saturating_add(page - 1) & !(page - 1);
        let high = HIGH_WATER.load(Ordering::Acquire);
        let mut i = 0;
        while i < high {
            let Some(slot) = TABLE.get(i) else {
                return;
            };
            i += 1;
            let w = slot.word.load(Ordering::Acquire);
            let start = slot.start.load(Ordering::Relaxed);
            let slot_end = start.saturating_add(slot.len.load(Ordering::Relaxed));
            if slot.ino.load(Ordering::Relaxed) == 0
                || !matches!(state(w), ACTIVE | FALLEN | BROKEN | STALE)
                || start >= end
                || addr >= slot_end
            {
                continue;
            }
            if state(w) != ACTIVE || (addr <= start && slot_end <= end) {
                release(i - 1, state(w) != FALLEN);
                continue;
            }
            split(i - 1, w, addr.max(start), end.min(slot_end));
        }
    }

    /// Put the original file back over every shim range overlapping
    /// `addr..addr+len` now, as a revoke would (one `mremap` of the spare
    /// each): for a program about to change such a range itself (make it
    /// writable, move or resize it), whose result must then live on the
    /// file, never on a replica a revoke could take away. Atomics and raw
    /// syscalls only.
    pub fn fall_back(addr: usize, len: usize) {
        let end = addr.saturating_add(len);
        let high = HIGH_WATER.load(Ordering::Acquire);
        let mut i = 0;
        while i < high {
            let Some(slot) = TABLE.get(i) else {
                return;
            };
            i += 1;
            let w = slot.word.load(Ordering::Acquire);
            let start = slot.start.load(Ordering::Relaxed);
            let slot_len = slot.len.load(Ordering::Relaxed);
            if slot.ino.load(Ordering::Relaxed) == 0
                || start >= end
                || addr >= start.saturating_add(slot_len)
            {
                continue;
            }
            match state(w) {
                ACTIVE => {
                    if slot
                        .word
                        .compare_exchange(
                            w,
                            with_state(w, REMAPPING),
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_err()
                    {
                        // A fault's remap got there first: wait for it.
                        wait_remap(slot, seq(w));
                        continue;
                    }
                    let spare = slot.spare.load(Ordering::Relaxed);
                    // The program's private pages in the range (what a
                    // debugger or a `/proc/self/mem` write left there) go
                    // with it, as they would stay without replicad.
                    carry_own(start, slot_len, spare);
                    wait_carry();
                    let ok = sys::mremap_fixed(spare, slot_len, start);
                    if ok {
                        FALLBACKS.fetch_add(1, Ordering::Relaxed);
                    }
                    slot.word.store(
                        with_state(w, if ok { FALLEN } else { BROKEN }),
                        Ordering::Release,
                    );
                }
                REMAPPING => wait_remap(slot, seq(w)),
                _ => {}
            }
        }
    }

    /// Keep the parts of slot `i` (word `w`, ACTIVE) outside `hole`..`hole_end`
    /// (which the program unmapped) as entries of their own, then free `i`
    /// and unmap the spare's part under the hole.
    fn split(i: usize, w: u64, hole: usize, hole_end: usize) {
        let Some(slot) = TABLE.get(i) else {
            return;
        };
        let start = slot.start.load(Ordering::Relaxed);
        let slot_end = start.saturating_add(slot.len.load(Ordering::Relaxed));
        let spare = slot.spare.load(Ordering::Relaxed);
        let offset = slot.offset.load(Ordering::Relaxed);
        let dev = slot.dev.load(Ordering::Relaxed);
        let ino = slot.ino.load(Ordering::Relaxed);
        let part = |from: usize, to: usize| {
            if to > from {
                let skip = from - start;
                let off = if offset == OFFSET_UNCHECKED {
                    OFFSET_UNCHECKED
                } else {
                    offset.wrapping_add(skip as u64)
                };
                // Full table: that part loses its way back, as before.
                let _ = claim_slot(from, to - from, spare + skip, off, dev, ino);
            }
        };
        part(start, hole);
        part(hole_end, slot_end);
        // Take the old entry away (the new ones already cover the rest).
        if slot
            .word
            .compare_exchange(
                w,
                with_state(w, RELEASING),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return;
        }
        // As in `release`: not while the daemon may write to the spare.
        wait_carry();
        // SAFETY: the spare is the shim's own mapping and was never moved
        // (the slot was ACTIVE); only its part under the hole goes.
        unsafe {
            libc::munmap(
                (spare + (hole - start)) as *mut libc::c_void,
                hole_end - hole,
            )
        };
        slot.word.store(with_state(w, FREE), Ordering::Release);
    }

    /// Whether `start` holds a range the shim moved onto a replica that is
    /// still in use (not fallen back, not stale). Slots at `start` that are
    /// done (fallen back, broken or stale) are freed, so that the range can
    /// be attached again.
    pub fn live_at(start: usize) -> bool {
        let high = HIGH_WATER.load(Ordering::Acquire);
        let mut live = false;
        for (i, slot) in TABLE.iter().enumerate().take(high) {
            let w = slot.word.load(Ordering::Acquire);
            if slot.ino.load(Ordering::Relaxed) == 0 || slot.start.load(Ordering::Relaxed) != start
            {
                continue;
            }
            match state(w) {
                ACTIVE | REMAPPING => live = true,
                FALLEN | BROKEN | STALE => release(i, state(w) != FALLEN),
                _ => {}
            }
        }
        live
    }

    /// The ranges on a replica now (not fallen back): `(start, len,
    /// replica st_dev as makedev, replica inode)` each, for a caller that
    /// checks them against its maps after something other than the
    /// program's own wrapped calls unmapped memory (the dynamic loader's
    /// `dlclose`), then [`forget`]s those that are gone.
    pub fn active_ranges() -> Vec<(usize, usize, u64, u64)> {
        let high = HIGH_WATER.load(Ordering::Acquire);
        TABLE
            .iter()
            .take(high)
            .filter(|slot| {
                slot.ino.load(Ordering::Relaxed) != 0
                    && state(slot.word.load(Ordering::Acquire)) == ACTIVE
            })
            .map(|slot| {
                let dev = slot.dev.load(Ordering::Relaxed);
                (
                    slot.start.load(Ordering::Relaxed),
                    slot.len.load(Ordering::Relaxed),
                    libc::makedev((dev >> 32) as u32, dev as u32),
                    slot.ino.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Whether `start` is the spare (the way back) of a shim range: a
    /// mapping of the source the shim made itself, never to be attached.
    pub fn is_spare(start: usize) -> bool {
        let high = HIGH_WATER.load(Ordering::Acquire);
        TABLE.iter().take(high).any(|slot| {
            slot.ino.load(Ordering::Relaxed) != 0
                && slot.spare.load(Ordering::Relaxed) == start
                && matches!(
                    state(slot.word.load(Ordering::Acquire)),
                    ACTIVE | REMAPPING | BROKEN | STALE
                )
        })
    }

    fn release(i: usize, unmap_spare: bool) {
        let Some(slot) = TABLE.get(i) else {
            return;
        };
        let w = slot.word.load(Ordering::Acquire);
        if !matches!(state(w), ACTIVE | FALLEN | BROKEN | STALE)
            || slot
                .word
                .compare_exchange(
                    w,
                    with_state(w, RELEASING),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        if unmap_spare {
            // The daemon may be copying private pages into the spare: the
            // address must not be handed out again meanwhile.
            wait_carry();
            let spare = slot.spare.load(Ordering::Relaxed);
            let len = slot.len.load(Ordering::Relaxed);
            // SAFETY: the spare is the shim's own mapping and was never moved
            // (the slot was not FALLEN); the handler can no longer move it.
            unsafe { libc::munmap(spare as *mut libc::c_void, len) };
        }
        slot.word.store(with_state(w, FREE), Ordering::Release);
    }

    /// Ranges on replicas now, and fallbacks so far.
    pub fn counts() -> (usize, u64) {
        let high = HIGH_WATER.load(Ordering::Acquire);
        let live = TABLE
            .iter()
            .take(high)
            .filter(|s| {
                s.ino.load(Ordering::Relaxed) != 0
                    && state(s.word.load(Ordering::Acquire)) == ACTIVE
            })
            .count();
        (live, FALLBACKS.load(Ordering::Relaxed))
    }

    /// Whether the SIGBUS handler is installed.
    pub fn handler_installed() -> bool {
        PREV_READY.load(Ordering::Acquire)
    }

    /// `sigaction(SIGBUS, act, old)` as the program sees it once the handler
    /// is installed: the program's action becomes the one faults that are
    /// not ours are chained to, and `old` gets the program's previous one.
    /// Returns false (and does nothing) if the handler is not installed:
    /// the caller then makes the real call.
    ///
    /// # Safety
    /// `act` and `old` are null or valid `sigaction` pointers.
    pub unsafe fn program_sigaction(
        act: *const libc::sigaction,
        old: *mut libc::sigaction,
    ) -> bool {
        if !handler_installed() {
            return false;
        }
        if !old.is_null() {
            // SAFETY: the caller passes a valid pointer; zeroed is valid.
            unsafe {
                std::ptr::write_bytes(old, 0, 1);
                (*old).sa_sigaction = PREV_HANDLER.load(Ordering::Relaxed);
                (*old).sa_flags = PREV_FLAGS.load(Ordering::Relaxed) as u32 as libc::c_int;
                libc::sigemptyset(&mut (*old).sa_mask);
            }
            let mask = PREV_MASK.load(Ordering::Relaxed);
            for sig in 1..=64 {
                if mask & (1u64 << (sig - 1)) != 0 {
                    // SAFETY: old is valid; sig is in range.
                    unsafe { libc::sigaddset(&mut (*old).sa_mask, sig) };
                }
            }
        }
        if !act.is_null() {
            let mut mask = 0u64;
            for sig in 1..=64 {
                // SAFETY: the caller passes a valid sigaction; sig in range.
                if unsafe { libc::sigismember(&(*act).sa_mask, sig) } == 1 {
                    mask |= 1u64 << (sig - 1);
                }
            }
            // SAFETY: as above.
            let (handler, flags) = unsafe { ((*act).sa_sigaction, (*act).sa_flags) };
            PREV_MASK.store(mask, Ordering::Relaxed);
            PREV_FLAGS.store(flags as u32 as u64, Ordering::Relaxed);
            PREV_HANDLER.store(handler, Ordering::Release);
        }
        true
    }
}

/// Copy this process's private (anonymous) pages in `start..start+len`
/// to the same offsets of `spare` (a `MAP_PRIVATE` mapping of the file),
/// so that moving the spare over the range keeps them. Found with
/// `PAGEMAP_SCAN` on our own pagemap, written through our own
/// `/proc/self/mem` (which, as for a debugger, may write a read-only
/// private mapping): raw syscalls only, nothing allocated. Best effort: a
/// kernel without `PAGEMAP_SCAN` (before 6.7) carries nothing.
fn carry_own(start: usize, len: usize, spare: usize) {
    let pagemap = sys::open_raw(replicad_procfs::SELF_PAGEMAP_C, libc::O_RDONLY);
    if pagemap < 0 {
        return;
    }
    let mem = sys::open_raw(replicad_procfs::SELF_MEM_C, libc::O_RDWR);
    if mem < 0 {
        sys::close(pagemap);
        return;
    }
    const BATCH: usize = 16;
    let end = start.wrapping_add(len);
    let mut from = start;
    while from < end {
        let mut vec = std::mem::MaybeUninit::<[replicad_procfs::PageRegion; BATCH]>::uninit();
        let mut arg = replicad_procfs::PmScanArg::private_pages(
            from as u64,
            end as u64,
            vec.as_mut_ptr() as u64,
            BATCH as u64,
        );
        let n = sys::ioctl_raw(
            pagemap,
            replicad_procfs::PAGEMAP_SCAN,
            &mut arg as *mut replicad_procfs::PmScanArg as usize,
        );
        if n <= 0 {
            break;
        }
        let base = vec.as_ptr().cast::<replicad_procfs::PageRegion>();
        let mut i = 0;
        while i < n as usize && i < BATCH {
            // SAFETY: the kernel filled the first n (<= BATCH) regions.
            let (rs, re) = unsafe { ((*base.add(i)).start, (*base.add(i)).end) };
            let (rs, re) = (rs as usize, re as usize);
            if start <= rs && rs < re && re <= end {
                let to = spare.wrapping_add(rs - start);
                sys::pwrite_raw(mem, rs, re - rs, to);
            }
            i += 1;
        }
        if (n as usize) < BATCH || arg.walk_end as usize <= from {
            break;
        }
        from = arg.walk_end as usize;
    }
    sys::close(mem);
    sys::close(pagemap);
}

/// Whether `start..start+len` still maps the file `dev`
/// (`major << 32 | minor`), `ino` from `offset` (any offset for
/// [`OFFSET_UNCHECKED`]), within one maps line: read `/proc/self/maps` with
/// raw syscalls into a small stack buffer (the handler may run on a small
/// alternate stack), a byte at a time through [`MapsScan`]. If the file
/// cannot be read, say yes: the check guards against a program's own
/// unmapping, and failing to read maps must not turn every revoke into a
/// crash.
fn still_mapped(start: usize, len: usize, offset: u64, dev: u64, ino: u64) -> bool {
    let fd = sys::open_maps();
    if fd < 0 {
        return true;
    }
    let mut scan = MapsScan::new(start as u64);
    // Left uninitialised: zeroing it is a call to libc's memset, whose
    // text may be the very range being revoked (a fault in here would find
    // the slot REMAPPING and wait for itself forever). Only the bytes
    // read() filled are looked at.
    let mut buf = std::mem::MaybeUninit::<[u8; 512]>::uninit();
    let base = buf.as_mut_ptr().cast::<u8>();
    let found = 'read: loop {
        let n = sys::read_raw(fd, base, 512);
        if n <= 0 {
            break 'read false;
        }
        let mut i = 0;
        while i < n as usize && i < 512 {
            // SAFETY: read() filled the first n (<= 512) bytes.
            let b = unsafe { base.add(i).read() };
            if scan.feed(b) {
                break 'read true;
            }
            i += 1;
        }
    };
    sys::close(fd);
    // The kernel may have merged the range with a neighbour mapping the
    // same file at the adjacent offsets: one maps line may hold it, as
    // long as the file offset at `start` is the range's own.
    let (start, end) = (start as u64, (start as u64).wrapping_add(len as u64));
    found
        && scan.found_start <= start
        && end <= scan.found_end
        && (offset == OFFSET_UNCHECKED
            || scan.found_offset.wrapping_add(start - scan.found_start) == offset)
        && scan.found_dev == dev
        && scan.found_ino == ino
}

/// A byte-at-a-time reader of maps lines that finds the line whose range
/// holds `addr` and keeps its range, offset, device and inode. No
/// allocation, no panics, and no call into libc: fields are set one by
/// one (a whole-struct copy compiles to libc's memcpy in unoptimised
/// builds, and libc's text may be the range being revoked; see
/// `still_mapped`).
struct MapsScan {
    addr: u64,
    field: u8,
    start: u64,
    end: u64,
    offset: u64,
    major: u64,
    minor: u64,
    ino: u64,
    /// Inside the path field: skip to the end of the line.
    skipping: bool,
    bad: bool,
    /// The line holding `addr`, once [`MapsScan::feed`] said so.
    found_start: u64,
    found_end: u64,
    found_offset: u64,
    /// `major << 32 | minor`.
    found_dev: u64,
    found_ino: u64,
}

impl MapsScan {
    fn new(addr: u64) -> MapsScan {
        MapsScan {
            addr,
            field: 0,
            start: 0,
            end: 0,
            offset: 0,
            major: 0,
            minor: 0,
            ino: 0,
            skipping: false,
            bad: false,
            found_start: 0,
            found_end: 0,
            found_offset: 0,
            found_dev: 0,
            found_ino: 0,
        }
    }

    fn reset(&mut self) {
        self.field = 0;
        self.start = 0;
        self.end = 0;
        self.offset = 0;
        self.major = 0;
        self.minor = 0;
        self.ino = 0;
        self.skipping = false;
        self.bad = false;
    }

    /// Feed one byte; true at the end of the line holding `addr` (its
    /// fields are then in `found_*`).
    fn feed(&mut self, b: u8) -> bool {
        if b == b'\n' {
            let hit =
                !self.bad && self.field >= 5 && self.start <= self.addr && self.addr < self.end;
            if hit {
                self.found_start = self.start;
                self.found_end = self.end;
                self.found_offset = self.offset;
                self.found_dev = (self.major << 32) | self.minor;
                self.found_ino = self.ino;
            }
            self.reset();
            return hit;
        }
        if self.skipping || self.bad {
            return false;
        }
        let hexval = |b: u8| (b as char).to_digit(16).map(u64::from);
        match (self.field, b) {
            (0, b'-') => self.field = 1,
            (0, _) => match hexval(b) {
                Some(v) => self.start = self.start.wrapping_mul(16).wrapping_add(v),
                None => self.bad = true,
            },
            (1, b' ') => self.field = 2,
            (1, _) => match hexval(b) {
                Some(v) => self.end = self.end.wrapping_mul(16).wrapping_add(v),
                None => self.bad = true,
            },
            // perms: skipped.
            (2, b' ') => self.field = 3,
            (2, _) => {}
            (3, b' ') => self.field = 4,
            (3, _) => match hexval(b) {
                Some(v) => self.offset = self.offset.wrapping_mul(16).wrapping_add(v),
                None => self.bad = true,
            },
            (4, b':') => self.field = 5,
            (4, _) => match hexval(b) {
                Some(v) => self.major = self.major.wrapping_mul(16).wrapping_add(v),
                None => self.bad = true,
            },
            (5, b' ') => self.field = 6,
            (5, _) => match hexval(b) {
                Some(v) => self.minor = self.minor.wrapping_mul(16).wrapping_add(v),
                None => self.bad = true,
            },
            (6, b' ') => {
                self.field = 7;
                self.skipping = true;
            }
            (6, b'0'..=b'9') => {
                self.ino = self.ino.wrapping_mul(10).wrapping_add(u64::from(b - b'0'))
            }
            (6, _) => self.bad = true,
            _ => self.skipping = true,
        }
        false
    }
}

/// Fallbacks done, faults that raced a remap, and faults chained so far.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn counters() -> (u64, u64, u64) {
    (
        FALLBACKS.load(Ordering::Relaxed),
        RACED.load(Ordering::Relaxed),
        CHAINED.load(Ordering::Relaxed),
    )
}

/// Install the handler once per process, saving the previous action.
fn install() -> io::Result<()> {
    let mut done = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = *done {
        return r.map_err(io::Error::from_raw_os_error);
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        PAGE.store(page as usize, Ordering::Relaxed);
    }
    // SAFETY: sigaction is plain old data; all-zero is a valid value.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigbus as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER | libc::SA_RESTART;
    // SAFETY: act.sa_mask is a valid sigset_t to initialise.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: act and old are valid sigaction structs; SIGBUS is a valid
    // signal. One call swaps the action, so no other installer slips in.
    let rc = unsafe { libc::sigaction(libc::SIGBUS, &act, &mut old) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        *done = Some(Err(err.raw_os_error().unwrap_or(libc::EINVAL)));
        return Err(err);
    }
    let mut mask = 0u64;
    for sig in 1..=64 {
        // SAFETY: old.sa_mask was filled by sigaction; sig is in range.
        if unsafe { libc::sigismember(&old.sa_mask, sig) } == 1 {
            mask |= 1u64 << (sig - 1);
        }
    }
    PREV_HANDLER.store(old.sa_sigaction, Ordering::Relaxed);
    PREV_FLAGS.store(old.sa_flags as u32 as u64, Ordering::Relaxed);
    PREV_MASK.store(mask, Ordering::Relaxed);
    PREV_READY.store(true, Ordering::Release);
    *done = Some(Ok(()));
    Ok(())
}

/// Find the live range holding `addr`: `(slot index, word seen)`.
#[cfg(test)]
fn lookup(addr: usize) -> Option<(usize, u64)> {
    lookup_from(addr, 0)
}

/// [`lookup`] among slots `from` and above. An index loop: iterator
/// adaptors copy themselves with libc's memcpy in unoptimised builds (see
/// `still_mapped`).
fn lookup_from(addr: usize, from: usize) -> Option<(usize, u64)> {
    let high = HIGH_WATER.load(Ordering::Acquire);
    let mut i = from;
    while i < high {
        let slot = TABLE.get(i)?;
        // A few tries per slot: a slot whose seq changed under us is read
        // again; after that it is skipped (it was being reused, so the fault
        // cannot be in its old range any more).
        for _ in 0..4 {
            let w = slot.word.load(Ordering::Acquire);
            match state(w) {
                ACTIVE | REMAPPING | FALLEN | BROKEN => {}
                _ => break,
            }
            let start = slot.start.load(Ordering::Relaxed);
            let len = slot.len.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            let again = slot.word.load(Ordering::Relaxed);
            if seq(again) != seq(w) {
                continue;
            }
            if addr >= start && addr.wrapping_sub(start) < len {
                return Some((i, again));
            }
            break;
        }
        i += 1;
    }
    None
}

/// Wait until no remap is in flight on `slot` (same `seq`).
fn wait_remap(slot: &Slot, seq_seen: u64) {
    loop {
        let w = slot.word.load(Ordering::Acquire);
        if seq(w) != seq_seen || state(w) != REMAPPING {
            return;
        }
        // The remapping thread may be waiting for a revoke to end: sleep
        // with it rather than spin.
        if !revoke_nap(REVOKE_NAP_NS / 10) {
            sys::sched_yield();
        }
    }
}

/// Whether this thread already returned once on this very fault (same
/// address, same range incarnation). If not, remember it and say no.
fn repeat_fault(addr: usize, key: u64) -> bool {
    let tid = sys::gettid();
    let Some(entry) = LAST_FAULT.get(tid % THREAD_SLOTS) else {
        return true;
    };
    if entry.tid.load(Ordering::Relaxed) == tid
        && entry.addr.load(Ordering::Relaxed) == addr
        && entry.key.load(Ordering::Relaxed) == key
    {
        return true;
    }
    entry.tid.store(tid, Ordering::Relaxed);
    entry.addr.store(addr, Ordering::Relaxed);
    entry.key.store(key, Ordering::Relaxed);
    false
}

/// The SIGBUS handler.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if info.is_null() {
        chain(sig, info, ctx, false);
        return;
    }
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let code = unsafe { (*info).si_code };
    // Only faults (kernel-generated, si_code > 0) carry a meaningful address.
    if code <= 0 {
        chain(sig, info, ctx, false);
        return;
    }
    // SAFETY: as above; si_addr is the faulting address for SIGBUS faults.
    let addr = unsafe { (*info).si_addr() } as usize;
    // Entries are tried in table order; one that turns out not to describe
    // the mapping at `addr` any more (the program unmapped the range and
    // the kernel put a new mapping there, perhaps one the shim attached
    // again) passes the fault on to the next one that holds `addr`.
    let mut from = 0;
    loop {
        let Some((i, w)) = lookup_from(addr, from) else {
            chain(sig, info, ctx, true);
            return;
        };
        let Some(slot) = TABLE.get(i) else {
            chain(sig, info, ctx, true);
            return;
        };
        from = i.wrapping_add(1);
        match state(w) {
            ACTIVE => {
                let won = slot
                    .word
                    .compare_exchange(
                        w,
                        with_state(w, REMAPPING),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok();
                if won {
                    let start = slot.start.load(Ordering::Relaxed);
                    let len = slot.len.load(Ordering::Relaxed);
                    let spare = slot.spare.load(Ordering::Relaxed);
                    let dev = slot.dev.load(Ordering::Relaxed);
                    let ino = slot.ino.load(Ordering::Relaxed);
                    let offset = slot.offset.load(Ordering::Relaxed);
                    if ino != 0 && !still_mapped(start, len, offset, dev, ino) {
                        // The program unmapped or replaced the range: this
                        // entry is stale, and its spare must never land
                        // there. Another entry may hold the new mapping.
                        slot.word.store(with_state(w, STALE), Ordering::Release);
                        continue;
                    }
                    wait_revokes();
                    wait_carry();
                    let ok = sys::mremap_fixed(spare, len, start);
                    let st = if ok { FALLEN } else { BROKEN };
                    if ok {
                        FALLBACKS.fetch_add(1, Ordering::Relaxed);
                    }
                    slot.word.store(with_state(w, st), Ordering::Release);
                } else {
                    RACED.fetch_add(1, Ordering::Relaxed);
                    wait_remap(slot, seq(w));
                }
                // Retry the faulting instruction: it now reads the original
                // (or, if the remap failed, faults again and is chained as
                // BROKEN).
                return;
            }
            REMAPPING => {
                RACED.fetch_add(1, Ordering::Relaxed);
                wait_remap(slot, seq(w));
                return;
            }
            FALLEN => {
                let key = (seq(w) << 16) | (i as u64 & 0xffff);
                if !repeat_fault(addr, key) {
                    // First fault of this thread here since the fallback;
                    // it may have hit the replica just before the remap.
                    // Retry once.
                    RACED.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // Faulting again: the original itself faults here, unless
                // a later entry holds a new mapping of the range.
            }
            // BROKEN: the remap failed; the fault is not ours to fix.
            _ => {}
        }
    }
}

/// Hand the signal to the action that was installed before ours, as the
/// kernel would have delivered it.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void, fault: bool) {
    CHAINED.fetch_add(1, Ordering::Relaxed);
    while !PREV_READY.load(Ordering::Acquire) {
        // Our handler is installed but `install` has not saved the old
        // action yet: a few instructions away on another thread.
        sys::sched_yield();
    }
    let handler = PREV_HANDLER.load(Ordering::Relaxed);
    let flags = PREV_FLAGS.load(Ordering::Relaxed);
    if handler == libc::SIG_IGN && !fault {
        // A sent SIGBUS that the program ignored: ignore it.
        return;
    }
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // Restore the default action. A fault re-raises when the
        // instruction retries (an ignored fault is fatal anyway, as the
        // kernel forces the default for it); a sent signal is sent again.
        sys::set_default(sig);
        if !fault {
            sys::raise(sig);
        }
        return;
    }
    let mut mask = PREV_MASK.load(Ordering::Relaxed);
    if flags & libc::SA_NODEFER as u32 as u64 == 0 && sig > 0 && sig <= 64 {
        mask |= 1u64 << (sig - 1);
    }
    sys::block(mask);
    if flags & libc::SA_RESETHAND as u32 as u64 != 0 {
        sys::set_default(sig);
    }
    if flags & libc::SA_SIGINFO as u32 as u64 != 0 {
        // SAFETY: the program installed this value as an SA_SIGINFO handler.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = unsafe {
            std::mem::transmute::<
                usize,
                extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void),
            >(handler)
        };
        f(sig, info, ctx);
    } else {
        // SAFETY: the program installed this value as a plain handler.
        let f = unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int)>(handler) };
        f(sig);
    }
}

/// The handler's syscalls, made without libc.
mod sys {
    /// The kernel's `struct sigaction` for `rt_sigaction` (x86_64, aarch64
    /// and the generic layout with `SA_RESTORER`).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn syscall6(
        nr: libc::c_long,
        a0: usize,
        a1: usize,
        a2: usize,
        a3: usize,
        a4: usize,
        a5: usize,
    ) -> isize {
        let ret: isize;
        // SAFETY: the x86_64 Linux syscall convention: number in rax, args
        // in rdi, rsi, rdx, r10, r8, r9; the kernel clobbers rcx and r11.
        // Callers pass arguments valid for the syscall they name.
        unsafe {
            core::arch::asm!(
                "syscall",
                inlateout("rax") nr as isize => ret,
                in("rdi") a0,
                in("rsi") a1,
                in("rdx") a2,
                in("r10") a3,
                in("r8") a4,
                in("r9") a5,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    fn syscall6(
        nr: libc::c_long,
        a0: usize,
        a1: usize,
        a2: usize,
        a3: usize,
        a4: usize,
        a5: usize,
    ) -> isize {
        let ret: isize;
        // SAFETY: the aarch64 Linux syscall convention: number in x8, args
        // in x0..x5, result in x0. Callers pass arguments valid for the
        // syscall they name.
        unsafe {
            core::arch::asm!(
                "svc 0",
                in("x8") nr,
                inlateout("x0") a0 as isize => ret,
                in("x1") a1,
                in("x2") a2,
                in("x3") a3,
                in("x4") a4,
                in("x5") a5,
                options(nostack),
            );
        }
        ret
    }

    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    #[inline(always)]
    fn syscall6(
        nr: libc::c_long,
        a0: usize,
        a1: usize,
        a2: usize,
        a3: usize,
        a4: usize,
        a5: usize,
    ) -> isize {
        // SAFETY: callers pass arguments valid for the syscall they name.
        // On these architectures we go through libc's syscall(), which only
        // sets errno on failure.
        unsafe { libc::syscall(nr, a0, a1, a2, a3, a4, a5) as isize }
    }

    pub(super) fn sched_yield() {
        syscall6(libc::SYS_sched_yield, 0, 0, 0, 0, 0, 0);
    }

    /// `FUTEX_WAIT` (shared) on the u32 at `addr` while it holds `val`,
    /// for at most `ns`; any outcome (woken, timed out, value changed,
    /// interrupted) just returns.
    pub(super) fn futex_wait(addr: usize, val: u32, ns: u64) {
        let ts = libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        };
        syscall6(
            libc::SYS_futex,
            addr,
            libc::FUTEX_WAIT as usize,
            val as usize,
            &ts as *const libc::timespec as usize,
            0,
            0,
        );
    }

    /// Sleep `ns` (any interruption just returns).
    pub(super) fn nap(ns: u64) {
        let ts = libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        };
        syscall6(
            libc::SYS_nanosleep,
            &ts as *const libc::timespec as usize,
            0,
            0,
            0,
            0,
            0,
        );
    }

    pub(super) fn gettid() -> usize {
        syscall6(libc::SYS_gettid, 0, 0, 0, 0, 0, 0) as usize
    }

    /// Move the mapping at `from` over `to` in one step.
    pub(super) fn mremap_fixed(from: usize, len: usize, to: usize) -> bool {
        let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as usize;
        let r = syscall6(libc::SYS_mremap, from, len, len, flags, to, 0);
        r as usize == to
    }

    /// Restore the default action of `sig`.
    pub(super) fn set_default(sig: libc::c_int) {
        let act = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        syscall6(
            libc::SYS_rt_sigaction,
            sig as usize,
            &act as *const KernelSigaction as usize,
            0,
            8,
            0,
            0,
        );
    }

    /// Block `mask` (a 64-bit kernel signal set) in this thread.
    pub(super) fn block(mask: u64) {
        syscall6(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK as usize,
            &mask as *const u64 as usize,
            0,
            8,
            0,
            0,
        );
    }

    /// `open("/proc/self/maps", O_RDONLY | O_CLOEXEC)`: an fd or < 0.
    pub(super) fn open_maps() -> isize {
        open_raw(replicad_procfs::SELF_MAPS_C, libc::O_RDONLY)
    }

    /// `open(path, flags | O_CLOEXEC)` of a NUL-terminated path: an fd or
    /// < 0.
    pub(super) fn open_raw(path: &[u8], flags: libc::c_int) -> isize {
        syscall6(
            libc::SYS_openat,
            libc::AT_FDCWD as isize as usize,
            path.as_ptr() as usize,
            (flags | libc::O_CLOEXEC) as usize,
            0,
            0,
            0,
        )
    }

    /// `ioctl(fd, req, arg)`: its result, < 0 on error.
    pub(super) fn ioctl_raw(fd: isize, req: u64, arg: usize) -> isize {
        syscall6(libc::SYS_ioctl, fd as usize, req as usize, arg, 0, 0, 0)
    }

    /// `pwrite(fd, buf, len, offset)` with an address as the offset (for
    /// `/proc/self/mem`), retried on EINTR.
    pub(super) fn pwrite_raw(fd: isize, buf: usize, len: usize, offset: usize) -> isize {
        loop {
            let n = syscall6(libc::SYS_pwrite64, fd as usize, buf, len, offset, 0, 0);
            if n != -(libc::EINTR as isize) {
                return n;
            }
        }
    }

    /// `read(fd, buf, len)`, retried on EINTR, into memory that may be
    /// uninitialised; the caller passes `len` writable bytes at `buf`.
    /// Bytes read, 0 at the end, < 0 on error.
    pub(super) fn read_raw(fd: isize, buf: *mut u8, len: usize) -> isize {
        loop {
            let n = syscall6(libc::SYS_read, fd as usize, buf as usize, len, 0, 0, 0);
            if n != -(libc::EINTR as isize) {
                return n;
            }
        }
    }

    pub(super) fn close(fd: isize) {
        syscall6(libc::SYS_close, fd as usize, 0, 0, 0, 0, 0);
    }

    /// Send `sig` to this thread.
    pub(super) fn raise(sig: libc::c_int) {
        let pid = syscall6(libc::SYS_getpid, 0, 0, 0, 0, 0, 0) as usize;
        let tid = gettid();
        syscall6(libc::SYS_tgkill, pid, tid, sig as usize, 0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_scan_finds_the_line_holding_an_address() {
        let text = "1000-2000 r-xp 00000000 08:01 12 /lib/a.so\n\
                    2000-3000 r--p 00001000 fd:1a 99 /tmp/x y (deleted)\n\
                    7ffd0000-7ffd1000 rw-p 00000000 00:00 0 [stack]\n";
        let find = |addr: u64| {
            let mut s = MapsScan::new(addr);
            text.bytes().any(|b| s.feed(b)).then_some((
                s.found_start,
                s.found_end,
                s.found_offset,
                s.found_dev,
                s.found_ino,
            ))
        };
        assert_eq!(find(0x1000), Some((0x1000, 0x2000, 0, (8 << 32) | 1, 12)));
        assert_eq!(
            find(0x2fff),
            Some((0x2000, 0x3000, 0x1000, (0xfd << 32) | 0x1a, 99))
        );
        assert_eq!(find(0x7ffd0010), Some((0x7ffd0000, 0x7ffd1000, 0, 0, 0)));
        assert_eq!(find(0x3000), None);
        // Garbage lines never match and never panic.
        let mut s = MapsScan::new(0x1000);
        for b in b"zz-\xff 1 2 3:4:5 6\n\n\n1000-ffffffffffffffffffffffff r 0 1:1 1 x\n" {
            let _ = s.feed(*b);
        }
        // Our own maps, through the raw syscalls: the text mapping holding
        // this function, exactly, and nothing that differs in any field.
        let addr = maps_scan_finds_the_line_holding_an_address as *const () as u64;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let l = maps
            .lines()
            .filter_map(replicad_procfs::MapsLine::parse)
            .find(|l| l.start <= addr && addr < l.end)
            .unwrap();
        let dev = (u64::from(libc::major(l.dev)) << 32) | u64::from(libc::minor(l.dev));
        let (start, len) = (l.start as usize, l.len() as usize);
        assert!(still_mapped(start, len, l.offset, dev, l.ino));
        assert!(still_mapped(start, len, OFFSET_UNCHECKED, dev, l.ino));
        assert!(!still_mapped(start, len, l.offset, dev, l.ino + 1));
        assert!(!still_mapped(start, len, l.offset, dev + 1, l.ino));
        assert!(!still_mapped(start, len, l.offset + 4096, dev, l.ino));
        // Not all of the range is that line any more.
        assert!(!still_mapped(start, len + 4096, l.offset, dev, l.ino));
        if len > 4096 {
            // Part of one line (a neighbour merged in): the offset at the
            // start must follow.
            let (s2, n2) = (start + 4096, len - 4096);
            assert!(still_mapped(s2, n2, l.offset + 4096, dev, l.ino));
            assert!(!still_mapped(s2, n2, l.offset, dev, l.ino));
        }
    }

    #[test]
    fn seq_and_state_pack() {
        let w = (7u64 << 8) | ACTIVE;
        assert_eq!(state(w), ACTIVE);
        assert_eq!(seq(w), 7);
        assert_eq!(with_state(w, FALLEN), (7u64 << 8) | FALLEN);
    }

    #[test]
    fn raw_syscalls_answer() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as usize;
        assert_eq!(sys::gettid(), tid);
        sys::sched_yield();
        // A failed mremap reports failure (unaligned source address).
        assert!(!sys::mremap_fixed(1, 4096, 0x10000));
    }

    #[test]
    fn repeat_fault_is_per_address_and_key() {
        assert!(!repeat_fault(0x1000, 1));
        assert!(repeat_fault(0x1000, 1));
        assert!(!repeat_fault(0x2000, 1));
        assert!(!repeat_fault(0x2000, 2));
        assert!(repeat_fault(0x2000, 2));
    }

    fn anon(len: usize) -> usize {
        // SAFETY: a fresh anonymous mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as usize
    }

    #[test]
    fn attach_lookup_and_release() {
        let (a, b) = (anon(4096), anon(4096));
        let r = attach(a, 4096, b).unwrap();
        assert!(r.on_replica());
        let (i, w) = lookup(a + 100).unwrap();
        assert_eq!(i, r.slot);
        assert_eq!(state(w), ACTIVE);
        assert_ne!(lookup(a + 4096).map(|(i, _)| i), Some(r.slot));
        drop(r);
        assert!(lookup(a + 100).is_none());
    }

    /// A fault as the kernel would describe it, for calling the handler
    /// directly (never on a path that chains: in a test binary the previous
    /// action is std's stack-overflow handler, which resets SIGBUS).
    fn fault_info(addr: usize) -> libc::siginfo_t {
        // SAFETY: siginfo_t is plain old data; all-zero is valid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        info.si_signo = libc::SIGBUS;
        info.si_code = 2; // BUS_ADRERR
                          // SAFETY: on 64-bit Linux si_addr sits 16 bytes into siginfo_t,
                          // which is 128 bytes long.
        unsafe {
            (&mut info as *mut libc::siginfo_t)
                .cast::<u8>()
                .add(16)
                .cast::<usize>()
                .write_unaligned(addr)
        };
        // SAFETY: reading back what was just written.
        assert_eq!(unsafe { info.si_addr() } as usize, addr);
        info
    }

    #[test]
    fn a_fault_during_a_remap_waits_for_it() {
        let (a, b) = (anon(4096), anon(4096));
        let r = attach(a, 4096, b).unwrap();
        let slot = &TABLE[r.slot];
        let w = slot.word.load(Ordering::Acquire);
        // Pretend another thread won the remap and is inside mremap.
        slot.word.store(with_state(w, REMAPPING), Ordering::Release);
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let d2 = done.clone();
        let t = std::thread::spawn(move || {
            let mut info = fault_info(a + 8);
            on_sigbus(libc::SIGBUS, &mut info, std::ptr::null_mut());
            d2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst), "returned during the remap");
        slot.word.store(with_state(w, FALLEN), Ordering::Release);
        t.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        // The "remap" never happened: the spare is still separate.
        slot.word.store(with_state(w, ACTIVE), Ordering::Release);
        drop(r);
    }

    #[test]
    fn a_late_fault_after_the_remap_is_retried_once() {
        let (a, b) = (anon(4096), anon(4096));
        let r = attach(a, 4096, b).unwrap();
        let slot = &TABLE[r.slot];
        let w = slot.word.load(Ordering::Acquire);
        slot.word.store(with_state(w, FALLEN), Ordering::Release);
        let (_, raced_before, _) = counters();
        // This thread faulted on the replica just before another thread's
        // remap: the first fault here returns to retry...
        let mut info = fault_info(a + 16);
        on_sigbus(libc::SIGBUS, &mut info, std::ptr::null_mut());
        assert!(counters().1 > raced_before);
        // ...and the same fault again would be the original's own, chained.
        let key = (seq(w) << 16) | r.slot as u64;
        assert!(repeat_fault(a + 16, key));
        slot.word.store(with_state(w, ACTIVE), Ordering::Release);
        drop(r);
    }

    #[test]
    fn concurrent_faults_remap_once_and_read_the_original() {
        use std::io::Write;
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        const LEN: usize = 8 * 4096;
        let data: Vec<u8> = (0..LEN).map(|i| (i % 253) as u8 + 1).collect();
        let mut orig = tempfile::tempfile().unwrap();
        orig.write_all(&data).unwrap();
        let map = |fd: i32| {
            // SAFETY: a new shared read-only mapping of a live fd.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    LEN,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            p as usize
        };
        for round in 0..10 {
            // SAFETY: a valid name; the result is checked.
            let fd = unsafe { libc::memfd_create(c"fallback-unit".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: fd was just created and is ours.
            let replica = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            (&replica).write_all(&data).unwrap();
            let spare = map(orig.as_raw_fd());
            let start = map(replica.as_raw_fd());
            let (falls_before, _, _) = counters();
            let r = attach(start, LEN, spare).unwrap();
            let stop = std::sync::Arc::new(AtomicBool::new(false));
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(9));
            let readers: Vec<_> = (0..8)
                .map(|_| {
                    let (stop, barrier, data) = (stop.clone(), barrier.clone(), data.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let mut passes = 0;
                        while !stop.load(Ordering::Relaxed) || passes < 2 {
                            for (i, want) in data.iter().enumerate() {
                                // SAFETY: start..start+LEN stays mapped
                                // (replica or original) until r is dropped.
                                let b =
                                    unsafe { std::ptr::read_volatile((start + i) as *const u8) };
                                assert_eq!(b, *want, "byte {i}");
                            }
                            passes += 1;
                        }
                    })
                })
                .collect();
            barrier.wait();
            std::thread::sleep(std::time::Duration::from_micros(100 * round));
            replica.set_len(0).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
            stop.store(true, Ordering::Relaxed);
            for t in readers {
                t.join().unwrap();
            }
            assert!(!r.on_replica());
            assert!(counters().0 > falls_before);
            drop(r);
        }
        let (falls, raced, chained) = counters();
        eprintln!("fallbacks {falls}, faults that raced a remap {raced}, chained {chained}");
    }
}
