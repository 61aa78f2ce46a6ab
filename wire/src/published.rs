//! The published replica set: a shared-memory table the daemon writes and
//! the preload shim reads, so that a program's `mmap()` of a file that has
//! no replica costs no round trip to the daemon.
//!
//! ```text
//!  <run_dir>/replicas.set (regular file, 0644, written only by replicad)
//!
//!  0      8        16     24         32     40     48         64
//!  ┌──────┬────────┬──────┬──────────┬──────┬──────┬─────────┬────────┐
//!  │magic │version │ seq  │ capacity │count │flags │revoking │reserved│  header
//!  └──────┴────────┴──────┴──────────┴──────┴──────┴─────────┴────────┘
//!  64 + 32*i
//!  ┌──────┬──────┬───────┬────────────┐
//!  │ dev  │ ino  │ nodes │ generation │  entry i, i < capacity
//!  └──────┴──────┴───────┴────────────┘
//!
//!  slot(dev, ino) = fmix64(ino ^ fmix64(dev ^ 0x9e3779b97f4a7c15)) & (capacity - 1)
//!  (fmix64: MurmurHash3's 64-bit finaliser), then linear probing;
//!  ino == 0 marks an empty slot.
//! ```
//!
//! Every field is a little-endian `u64`, read and written only through
//! `AtomicU64` views of the mapping. `magic` is `b"RPLDSET1"`, `version` 1,
//! `capacity` a power of two and the file exactly `64 + 32 * capacity`
//! bytes. `nodes` has bit `n` set when a valid replica exists on node `n`
//! (`n < 63`); bit 63 ([`NODES_OTHER`]) says a node the mask cannot name may
//! hold one: ask the daemon. `flags` bit 0 ([`FLAG_OVERFLOW`]) says the
//! daemon had more sources than fit: a key not in the table is then
//! [`Lookup::Unknown`], not [`Lookup::Absent`]. Bit 1 ([`FLAG_RETIRED`]) says
//! the daemon no longer maintains this file (it stopped, or a new file was
//! renamed over it): every answer is `Unknown` and the reader should reopen.
//!
//! `revoking` counts the revokes that are truncating replicas right now
//! (outside the seqlock: the [`Writer`] raises it before the first
//! truncate of a revoke and lowers it once the writer was let go, then
//! wakes every futex waiter on its low 32 bits). A program's SIGBUS
//! fallback that finds it non-zero sleeps on it (`FUTEX_WAIT`, bounded)
//! before it moves the original over the range: that move takes the
//! replica's `i_mmap_rwsem` for writing, and dozens of them queued against
//! the truncate's unmap are what the waiting writer paid for. Only timing
//! rests on it: a fallback that does not wait is as correct.
//!
//! `seq` is a seqlock. The [`Writer`] makes it odd, rewrites only the slots
//! that changed, `count` and `flags`, then makes it even again (release). A
//! [`Reader`] reads `seq`, probes, reads `seq` again and retries a few times
//! when the two differ or are odd; after that it answers `Unknown`, and the
//! shim asks the daemon as it would without this table.
//!
//! `seq` is also what a running program waits on to follow the set:
//!
//! ```text
//!  shim's watcher                          Writer
//!  s = seq; check our maps against the set
//!  FUTEX_WAIT(low half of seq, s) ──┐      publish() that changed a slot,
//!        (asleep, no CPU)           │<──── count or flags; nudge(); remove();
//!  seq != s: check again            │      or a new file's retire() of this one
//!                                   └───── FUTEX_WAKE(low half of seq, all)
//! ```
//!
//! The wake is a shared futex (no `FUTEX_PRIVATE_FLAG`): the waiters map the
//! file in other processes. A retire (a bigger table renamed over this one,
//! or a new daemon) moves `seq` on by two and wakes, so a waiter that read
//! `seq` before the flag went up never sleeps through it. A waiter sleeps
//! only while the low half still holds what it read, so a wake between its
//! read and its wait is not lost.
//!
//! Nothing in the file is trusted by the reader beyond what `open` checked:
//! the capacity is the one the file's size matched at open, a probe stops
//! after `capacity` slots, and any content (even garbage) yields an answer,
//! never a panic or an endless loop. What the reader cannot survive is the
//! file shrinking under its mapping (SIGBUS, as for any shared file mapping):
//! only the daemon (root) writes it, in its own run directory, and it never
//! shrinks a file it published; a new file replaces the old one by rename.
//! Whom to believe is the caller's to decide: the client API and the preload
//! shim read only a set that the daemon's uid owns and no one else may
//! write (`replicad_client::trust`), checked on the open file
//! ([`Reader::open_file`], then [`Reader::from_file`]).

use std::fs::{File, OpenOptions, Permissions};
use std::hint::spin_loop;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU64, Ordering};

/// `b"RPLDSET1"` read as a little-endian `u64`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"RPLDSET1");
/// The format this module reads and writes.
pub const VERSION: u64 = 1;
/// The file name the daemon publishes under, in its run directory.
pub const FILE_NAME: &str = "replicas.set";
/// Bytes before the first entry.
pub const HEADER_LEN: usize = 64;
/// Bytes per entry.
pub const ENTRY_LEN: usize = 32;
/// `flags`: more sources than fit; absent keys are unknown.
pub const FLAG_OVERFLOW: u64 = 1 << 0;
/// `flags`: the daemon no longer maintains this file.
pub const FLAG_RETIRED: u64 = 1 << 1;
/// `nodes`: a node the mask cannot name (63 or above) may hold a replica.
pub const NODES_OTHER: u64 = 1 << 63;
/// Smallest table [`Writer::create`] makes.
pub const MIN_CAPACITY: usize = 8;
/// Largest table [`Writer::create`] makes (an 8 GiB file).
pub const MAX_CAPACITY: usize = 1 << 28;

// Word indices of the header fields.
const MAGIC_WORD: usize = 0;
const VERSION_WORD: usize = 1;
const SEQ_WORD: usize = 2;
const CAPACITY_WORD: usize = 3;
const COUNT_WORD: usize = 4;
const FLAGS_WORD: usize = 5;
const REVOKING_WORD: usize = 6;
const HEADER_WORDS: usize = HEADER_LEN / 8;
const ENTRY_WORDS: usize = ENTRY_LEN / 8;

/// Seqlock reads before a lookup gives up and answers `Unknown`.
const READ_TRIES: usize = 8;
/// `spin_loop` hints between two reads that found the writer mid-update.
const ODD_SPINS: usize = 64;

/// One source as the daemon publishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishedEntry {
    /// The source's device, as `st_dev` encodes it.
    pub dev: u64,
    /// The source's inode; 0 cannot be published.
    pub ino: u64,
    /// Bit `n`: a valid replica on node `n`; see [`nodes_mask`].
    pub nodes: u64,
    /// The source's replica generation.
    pub generation: u64,
}

/// The `nodes` word for replicas on these nodes: bit `n` for `n < 63`,
/// [`NODES_OTHER`] for any node above.
pub fn nodes_mask<I: IntoIterator<Item = u32>>(nodes: I) -> u64 {
    nodes.into_iter().fold(0, |mask, n| {
        mask | if n < 63 { 1u64 << n } else { NODES_OTHER }
    })
}

/// What the table says about one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// No replica of it on any node.
    Absent,
    /// Listed, with its replica nodes (maybe none) and generation.
    Present { nodes: u64, generation: u64 },
    /// The table cannot tell: ask the daemon.
    Unknown,
}

/// What one [`Writer::publish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Sources the table now holds.
    pub sources: usize,
    /// Some sources did not fit (the table says so to readers).
    pub overflow: bool,
    /// Slots rewritten because they differ from the previous table.
    pub slots_written: usize,
}

/// The daemon's side: owns the file and rewrites it in place.
#[derive(Debug)]
pub struct Writer {
    path: PathBuf,
    shm: Shm,
    capacity: usize,
    seq: u64,
    /// What the mapping's entry area holds, slot by slot.
    current: Vec<[u64; 4]>,
    /// The table being built by `publish`.
    next: Vec<[u64; 4]>,
    /// The file this writer made, so `remove` unlinks only that one.
    dev: u64,
    ino: u64,
}

impl Writer {
    /// Create the file at `path` with room for `capacity` slots (rounded up
    /// to a power of two, at least [`MIN_CAPACITY`]) and an empty table.
    ///
    /// The file is built beside `path` and renamed over it, so a process
    /// that still maps an older file never sees it shrink; that older file
    /// is marked [`FLAG_RETIRED`] first.
    pub fn create(path: &Path, capacity: usize) -> io::Result<Writer> {
        let capacity = capacity
            .max(MIN_CAPACITY)
            .checked_next_power_of_two()
            .filter(|&c| c <= MAX_CAPACITY)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{}: capacity {capacity} is above the limit of {MAX_CAPACITY}",
                        path.display()
                    ),
                )
            })?;
        let len = HEADER_LEN + capacity * ENTRY_LEN;
        let Some(name) = path.file_name() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} names no file", path.display()),
            ));
        };
        let mut tmp_name = name.to_os_string();
        tmp_name.push(format!(".tmp.{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);

        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(context(&tmp, "cannot remove a stale temporary file", e))
            }
            _ => {}
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| context(&tmp, "cannot create", e))?;
        let built = build(&tmp, &file, len, capacity).and_then(|shm| {
            let meta = file
                .metadata()
                .map_err(|e| context(&tmp, "cannot stat", e))?;
            Ok((shm, meta))
        });
        drop(file);
        let (shm, meta) = match built {
            Ok(built) => built,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };

        retire(path);
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(context(
                path,
                &format!("cannot rename {} over it", tmp.display()),
                e,
            ));
        }
        Ok(Writer {
            path: path.to_path_buf(),
            shm,
            capacity,
            seq: 0,
            current: vec![[0; 4]; capacity],
            next: vec![[0; 4]; capacity],
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Slots in the table; at most three quarters of them are used.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Replace the table with `entries`. A source listed twice keeps its
    /// last entry; an entry with inode 0 is left out (readers answer
    /// `Unknown` for inode 0). Sources beyond three quarters of the capacity
    /// are left out and the table says so ([`FLAG_OVERFLOW`]).
    pub fn publish(&mut self, entries: &[PublishedEntry]) -> Published {
        let mask = self.capacity - 1;
        let limit = self.capacity / 4 * 3;
        self.next.fill([0; 4]);
        let mut sources = 0;
        let mut overflow = false;
        for e in entries.iter().filter(|e| e.ino != 0) {
            let mut slot = slot_of(e.dev, e.ino, mask);
            // Ends: at most `limit` < capacity slots are taken.
            loop {
                let s = &mut self.next[slot];
                if s[1] == 0 {
                    if sources < limit {
                        *s = [e.dev, e.ino, e.nodes, e.generation];
                        sources += 1;
                    } else {
                        overflow = true;
                    }
                    break;
                }
                if s[0] == e.dev && s[1] == e.ino {
                    *s = [e.dev, e.ino, e.nodes, e.generation];
                    break;
                }
                slot = (slot + 1) & mask;
            }
        }

        let flags = if overflow { FLAG_OVERFLOW } else { 0 };
        let changed_header =
            self.shm.load(COUNT_WORD) != sources as u64 || self.shm.load(FLAGS_WORD) != flags;
        let slots_written = self.write_locked(|w| {
            let mut written = 0;
            for slot in 0..w.capacity {
                let (new, old) = (w.next[slot], w.current[slot]);
                if new != old {
                    for (k, v) in new.into_iter().enumerate() {
                        w.shm.store(HEADER_WORDS + slot * ENTRY_WORDS + k, v);
                    }
                    written += 1;
                }
            }
            w.shm.store(COUNT_WORD, sources as u64);
            w.shm.store(FLAGS_WORD, flags);
            written
        });
        std::mem::swap(&mut self.current, &mut self.next);
        if slots_written > 0 || changed_header {
            // Programs that follow the set (see the module doc) look again.
            self.shm.wake_all(SEQ_WORD);
        }
        Published {
            sources,
            overflow,
            slots_written,
        }
    }

    /// Wake every program that follows the set, with the table unchanged:
    /// each looks at its maps again. For what the table does not show but
    /// a program's answer depends on: its CPUs moved to another node, or
    /// the home node of its cgroup changed. Moves `seq` on by two.
    pub fn nudge(&mut self) {
        self.write_locked(|_| ());
        self.shm.wake_all(SEQ_WORD);
    }

    /// A revoke starts truncating replicas: fallbacks wait for it (see the
    /// module doc). Every call is followed by one [`Writer::revoke_ended`].
    pub fn revoke_began(&mut self) {
        let n = self.shm.load(REVOKING_WORD);
        self.shm.store_release(REVOKING_WORD, n.wrapping_add(1));
    }

    /// A revoke is done (its replicas truncated, its writer let go): when
    /// none is left, wake the fallbacks waiting for it.
    pub fn revoke_ended(&mut self) {
        let n = self.shm.load(REVOKING_WORD).saturating_sub(1);
        self.shm.store_release(REVOKING_WORD, n);
        if n == 0 {
            self.shm.wake_all(REVOKING_WORD);
        }
    }

    /// Mark the file retired and unlink it, if `path` still names the file
    /// this writer made (the daemon calls this on shutdown).
    pub fn remove(mut self) -> io::Result<()> {
        self.write_locked(|w| w.shm.store(FLAGS_WORD, FLAG_RETIRED));
        self.shm.store_release(REVOKING_WORD, 0);
        self.shm.wake_all(REVOKING_WORD);
        self.shm.wake_all(SEQ_WORD);
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {}
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(context(&self.path, "cannot stat", e)),
        }
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(context(&self.path, "cannot remove", e))
            }
            _ => Ok(()),
        }
    }

    /// Run `update` with `seq` odd, then make it even (release).
    fn write_locked<T>(&mut self, update: impl FnOnce(&mut Self) -> T) -> T {
        self.seq = self.seq.wrapping_add(1) | 1;
        self.shm.store(SEQ_WORD, self.seq);
        // Orders the odd seq before every store of `update`: a reader that
        // sees one of them sees seq changed when it reads seq again.
        fence(Ordering::Release);
        let out = update(self);
        self.seq = self.seq.wrapping_add(1);
        self.shm.store_release(SEQ_WORD, self.seq);
        out
    }
}

/// Size the new file, map it and write the header of an empty table.
fn build(path: &Path, file: &File, len: usize, capacity: usize) -> io::Result<Shm> {
    // fchmod: the mode must not depend on the daemon's umask.
    file.set_permissions(Permissions::from_mode(0o644))
        .map_err(|e| context(path, "cannot chmod", e))?;
    file.set_len(len as u64)
        .map_err(|e| context(path, &format!("cannot size to {len} bytes"), e))?;
    let shm = Shm::map(file, len, libc::PROT_READ | libc::PROT_WRITE)
        .map_err(|e| context(path, "cannot map", e))?;
    shm.store(MAGIC_WORD, MAGIC);
    shm.store(VERSION_WORD, VERSION);
    shm.store(SEQ_WORD, 0);
    shm.store(CAPACITY_WORD, capacity as u64);
    shm.store(COUNT_WORD, 0);
    shm.store_release(FLAGS_WORD, 0);
    Ok(shm)
}

/// Mark a published file already at `path` retired, so processes that map
/// it stop trusting it once it is replaced. Best effort: anything that is
/// not a valid published set is left alone.
fn retire(path: &Path) {
    let Ok(file) = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    else {
        return;
    };
    let Ok(shm) = Shm::map(&file, HEADER_LEN, libc::PROT_READ | libc::PROT_WRITE) else {
        return;
    };
    if check(&file, &shm).is_ok() {
        shm.fetch_or(FLAGS_WORD, FLAG_RETIRED);
        // Even to even (or odd to odd, under a writer still at work): seq
        // moves, so a follower that read it before the flag went up does
        // not sleep through the wake below.
        shm.fetch_add(SEQ_WORD, 2);
        shm.wake_all(SEQ_WORD);
        // A daemon that died mid-revoke left its count up: nobody lowers it
        // now, and fallbacks would wait it out.
        shm.store_release(REVOKING_WORD, 0);
        shm.wake_all(REVOKING_WORD);
    }
}

/// Check that `file`, whose first bytes `shm` maps, is a published set;
/// return its capacity or what is wrong.
fn check(file: &File, shm: &Shm) -> Result<usize, String> {
    let meta = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let size = meta.len();
    if size < HEADER_LEN as u64 {
        return Err(format!(
            "is {size} bytes, shorter than the {HEADER_LEN}-byte header"
        ));
    }
    let magic = shm.load(MAGIC_WORD);
    if magic != MAGIC {
        return Err(format!(
            "bad magic {:?}, expected {:?}",
            magic.to_le_bytes().escape_ascii().to_string(),
            MAGIC.to_le_bytes().escape_ascii().to_string()
        ));
    }
    let version = shm.load(VERSION_WORD);
    if version != VERSION {
        return Err(format!("version {version}, this reader knows {VERSION}"));
    }
    let capacity = shm.load(CAPACITY_WORD);
    if !capacity.is_power_of_two() {
        return Err(format!("capacity {capacity} is not a power of two"));
    }
    let expected = capacity
        .checked_mul(ENTRY_LEN as u64)
        .and_then(|n| n.checked_add(HEADER_LEN as u64));
    if expected != Some(size) {
        return Err(format!(
            "is {size} bytes, but a capacity of {capacity} needs {HEADER_LEN} + {capacity} * {ENTRY_LEN}"
        ));
    }
    usize::try_from(capacity).map_err(|_| format!("capacity {capacity} does not fit in memory"))
}

/// The shim's side: a read-only view of the daemon's table.
#[derive(Debug)]
pub struct Reader {
    shm: Shm,
    /// Checked against the file's size at open; never re-read.
    capacity: usize,
}

impl Reader {
    /// Map the published set at `path`. A file that is not one (wrong size,
    /// magic, version, capacity) is an `InvalidData` error naming the path
    /// and what is wrong. The fd is closed before this returns.
    pub fn open(path: &Path) -> io::Result<Reader> {
        let file = Reader::open_file(path)?;
        Reader::from_file(&file, path)
    }

    /// Open `path` as [`Reader::open`] does, without mapping it: for a
    /// caller that checks the open file (its owner, its mode) before
    /// [`Reader::from_file`] maps it.
    pub fn open_file(path: &Path) -> io::Result<File> {
        // O_NONBLOCK: a FIFO put there must not hang the caller in open().
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| context(path, "cannot open", e))
    }

    /// Map the published set open at `file` (named `path` in errors), as
    /// [`Reader::open`] does. The caller may close `file` afterwards.
    pub fn from_file(file: &File, path: &Path) -> io::Result<Reader> {
        let meta = file
            .metadata()
            .map_err(|e| context(path, "cannot stat", e))?;
        let invalid = |what: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a published replica set: {what}", path.display()),
            )
        };
        if !meta.is_file() {
            return Err(invalid("not a regular file".into()));
        }
        if meta.len() < HEADER_LEN as u64 {
            return Err(invalid(format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                meta.len()
            )));
        }
        let len = usize::try_from(meta.len())
            .map_err(|_| invalid(format!("{} bytes do not fit in memory", meta.len())))?;
        let shm =
            Shm::map(file, len, libc::PROT_READ).map_err(|e| context(path, "cannot map", e))?;
        let capacity = check(file, &shm).map_err(invalid)?;
        Ok(Reader { shm, capacity })
    }

    /// What the table says about the source `(dev, ino)`. Allocates nothing,
    /// takes no lock and returns after a bounded number of steps.
    pub fn lookup(&self, dev: u64, ino: u64) -> Lookup {
        if ino == 0 {
            return Lookup::Unknown;
        }
        for _ in 0..READ_TRIES {
            let before = self.shm.load(SEQ_WORD);
            if before & 1 != 0 {
                for _ in 0..ODD_SPINS {
                    spin_loop();
                }
                continue;
            }
            // Relaxed loads plus fences: the mapping is read-only, where only
            // relaxed atomic loads are sound.
            fence(Ordering::Acquire);
            let magic = self.shm.load(MAGIC_WORD);
            let flags = self.shm.load(FLAGS_WORD);
            let probe = self.probe(dev, ino);
            fence(Ordering::Acquire);
            if self.shm.load(SEQ_WORD) != before {
                continue;
            }
            if magic != MAGIC || flags & FLAG_RETIRED != 0 {
                return Lookup::Unknown;
            }
            return match probe {
                Probe::Hit { nodes, generation } => Lookup::Present { nodes, generation },
                Probe::Empty if flags & FLAG_OVERFLOW == 0 => Lookup::Absent,
                Probe::Empty | Probe::Full => Lookup::Unknown,
            };
        }
        Lookup::Unknown
    }

    /// Whether `(dev, ino)` has a valid replica on `node`; `None` when the
    /// table cannot tell.
    pub fn has_replica_on(&self, dev: u64, ino: u64, node: u32) -> Option<bool> {
        match self.lookup(dev, ino) {
            Lookup::Absent => Some(false),
            Lookup::Unknown => None,
            Lookup::Present { nodes, .. } if node < 63 => Some(nodes & (1 << node) != 0),
            Lookup::Present { nodes, .. } if nodes & NODES_OTHER != 0 => None,
            Lookup::Present { .. } => Some(false),
        }
    }

    /// Address of the `revoking` word (see the module doc), for a SIGBUS
    /// handler to load and `FUTEX_WAIT` on while this reader lives. Only
    /// relaxed loads: the mapping is read-only.
    pub fn revoking_word(&self) -> Option<&AtomicU64> {
        self.shm.word(REVOKING_WORD)
    }

    /// Address of the `seq` word (see the module doc), for a follower to
    /// load and `FUTEX_WAIT` on (shared) while this reader lives: the
    /// writer wakes it after every change. Only relaxed loads: the mapping
    /// is read-only.
    pub fn seq_word(&self) -> Option<&AtomicU64> {
        self.shm.word(SEQ_WORD)
    }

    /// Revokes in progress, as the daemon counts them.
    pub fn revoking(&self) -> u64 {
        self.shm.load(REVOKING_WORD)
    }

    /// The daemon no longer maintains this file: reopen the path.
    pub fn is_retired(&self) -> bool {
        self.shm.load(FLAGS_WORD) & FLAG_RETIRED != 0
    }

    /// One probe, at most `capacity` slots. Values may be torn; the caller
    /// discards them unless seq did not move.
    fn probe(&self, dev: u64, ino: u64) -> Probe {
        let mask = self.capacity - 1;
        let mut slot = slot_of(dev, ino, mask);
        for _ in 0..self.capacity {
            let base = HEADER_WORDS + slot * ENTRY_WORDS;
            let slot_ino = self.shm.load(base + 1);
            if slot_ino == 0 {
                return Probe::Empty;
            }
            if slot_ino == ino && self.shm.load(base) == dev {
                return Probe::Hit {
                    nodes: self.shm.load(base + 2),
                    generation: self.shm.load(base + 3),
                };
            }
            slot = (slot + 1) & mask;
        }
        Probe::Full
    }
}

enum Probe {
    Hit {
        nodes: u64,
        generation: u64,
    },
    /// Reached an empty slot: not in the table.
    Empty,
    /// Every slot taken and none matched: the writer never leaves a table
    /// so, so the content is not to be trusted.
    Full,
}

/// MurmurHash3's 64-bit finaliser.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// First slot probed for `(dev, ino)`; part of the file format.
fn slot_of(dev: u64, ino: u64, mask: usize) -> usize {
    (fmix64(ino ^ fmix64(dev ^ 0x9e37_79b9_7f4a_7c15)) as usize) & mask
}

/// A `MAP_SHARED` mapping of a file, seen as little-endian `u64` words
/// accessed only atomically.
#[derive(Debug)]
struct Shm {
    base: NonNull<u64>,
    /// Bytes mapped.
    len: usize,
}

// SAFETY: the mapping is owned by this value and only ever accessed through
// atomics, so it may move to and be shared between threads.
unsafe impl Send for Shm {}
// SAFETY: as above: every access is an atomic load or store.
unsafe impl Sync for Shm {}

impl Shm {
    /// Map the first `len` bytes of `file` (`len` > 0).
    fn map(file: &File, len: usize, prot: libc::c_int) -> io::Result<Shm> {
        // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED), so no
        // existing memory is affected; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u64>())
            .ok_or_else(|| io::Error::other("mmap returned address 0"))?;
        Ok(Shm { base, len })
    }

    /// Word `i`, or `None` past the mapping.
    fn word(&self, i: usize) -> Option<&AtomicU64> {
        if i >= self.len / 8 {
            return None;
        }
        // SAFETY: word i lies inside the mapping, which lives as long as
        // `self`; mmap returns page-aligned memory, so it is 8-byte aligned;
        // every process touches the file only through 8-byte atomics. Only
        // relaxed loads are made on read-only mappings (`load`), which Rust
        // allows for atomics no wider than a pointer. A file shrunk by
        // someone else would fault (SIGBUS) rather than read out of bounds.
        Some(unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(i)) })
    }

    fn load(&self, i: usize) -> u64 {
        self.word(i)
            .map_or(0, |w| u64::from_le(w.load(Ordering::Relaxed)))
    }

    /// Only on writable mappings.
    fn store(&self, i: usize, v: u64) {
        if let Some(w) = self.word(i) {
            w.store(v.to_le(), Ordering::Relaxed);
        }
    }

    /// Only on writable mappings.
    fn store_release(&self, i: usize, v: u64) {
        if let Some(w) = self.word(i) {
            w.store(v.to_le(), Ordering::Release);
        }
    }

    /// Only on writable mappings.
    fn fetch_or(&self, i: usize, bits: u64) {
        if let Some(w) = self.word(i) {
            w.fetch_or(bits.to_le(), Ordering::Release);
        }
    }

    /// Only on writable mappings (little-endian hosts: the file's order).
    fn fetch_add(&self, i: usize, n: u64) {
        if let Some(w) = self.word(i) {
            w.fetch_add(n.to_le(), Ordering::Release);
        }
    }
}

impl Shm {
    /// `FUTEX_WAKE` every waiter on word `i` (shared: waiters map the file
    /// in other processes). Only on writable mappings.
    fn wake_all(&self, i: usize) {
        let Some(w) = self.word(i) else {
            return;
        };
        // The futex is the word's first four bytes: its low half, the file
        // being little-endian.
        let addr = w as *const AtomicU64 as *const u32;
        // SAFETY: FUTEX_WAKE only reads the address, which lies in our live
        // mapping; no timeout or second address is passed.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                addr,
                libc::FUTEX_WAKE,
                i32::MAX,
                0usize,
                0usize,
                0u32,
            );
        }
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly what mmap returned; no reference to
        // the words outlives `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

fn context(path: &Path, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn entry(dev: u64, ino: u64, nodes: u64, generation: u64) -> PublishedEntry {
        PublishedEntry {
            dev,
            ino,
            nodes,
            generation,
        }
    }

    /// splitmix64: deterministic noise for the hostile-content tests.
    struct Noise(u64);
    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            fmix64(self.0)
        }
    }

    fn set_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join(FILE_NAME)
    }

    fn poke(path: &Path, offset: u64, bytes: &[u8]) {
        let mut f = OpenOptions::new().write(true).open(path).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(bytes).unwrap();
    }

    /// `FUTEX_WAIT` on the low half of `word` while it holds what it holds
    /// now, for at most `secs`.
    fn futex_wait(word: &AtomicU64, secs: i64) {
        let addr = word as *const AtomicU64 as *const u32;
        // SAFETY: the low half of a live mapped word; the timeout is valid.
        let seen =
            unsafe { (*(addr as *const std::sync::atomic::AtomicU32)).load(Ordering::Relaxed) };
        let ts = libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        };
        // SAFETY: FUTEX_WAIT on a mapped address with a valid timespec.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                addr,
                libc::FUTEX_WAIT,
                seen,
                &ts,
                0usize,
                0u32,
            )
        };
    }

    #[test]
    fn revokes_are_counted_and_their_end_wakes_waiters_in_other_mappings() {
        let dir = tempfile::tempdir().unwrap();
        let path = set_path(&dir);
        let mut w = Writer::create(&path, 8).unwrap();
        let r = Reader::open(&path).unwrap();
        assert_eq!(r.revoking(), 0);
        w.revoke_began();
        w.revoke_began();
        assert_eq!(r.revoking(), 2);
        // Not part of the seqlocked table: lookups still answer.
        assert_eq!(r.lookup(1, 2), Lookup::Absent);
        let r = Arc::new(r);
        let r2 = r.clone();
        let waiter = std::thread::spawn(move || {
            let t = std::time::Instant::now();
            while r2.revoking() != 0 {
                futex_wait(r2.revoking_word().unwrap(), 30);
            }
            t.elapsed()
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        w.revoke_ended();
        assert_eq!(r.revoking(), 1);
        w.revoke_ended();
        assert_eq!(r.revoking(), 0);
        // Woken by the last end, not by its 30 s timeout.
        let waited = waiter.join().unwrap();
        assert!(waited < std::time::Duration::from_secs(20), "{waited:?}");
        // More ends than begins never wrap.
        w.revoke_ended();
        assert_eq!(r.revoking(), 0);
    }

    /// Wait (up to `secs`) on `r`'s seq word in another thread while
    /// `act` runs; how long the waiter slept.
    fn seq_wait_during(r: &Arc<Reader>, secs: i64, act: impl FnOnce()) -> std::time::Duration {
        let r2 = r.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let word = r2.seq_word().unwrap();
            let before = word.load(Ordering::Relaxed);
            tx.send(()).unwrap();
            let t = std::time::Instant::now();
            while word.load(Ordering::Relaxed) == before && t.elapsed().as_secs() < secs as u64 {
                futex_wait(word, secs);
            }
            t.elapsed()
        });
        rx.recv().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        act();
        waiter.join().unwrap()
    }

    #[test]
    fn followers_on_seq_are_woken_by_changes_retires_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let path = set_path(&dir);
        let mut w = Writer::create(&path, 8).unwrap();
        let r = Arc::new(Reader::open(&path).unwrap());
        let long = std::time::Duration::from_secs(20);
        // A publish that changes a slot wakes at once.
        let woke = seq_wait_during(&r, 30, || {
            w.publish(&[entry(1, 2, 1, 1)]);
        });
        assert!(woke < long, "{woke:?}");
        // A bigger file renamed over this one retires it: seq moves, wakes.
        let woke = seq_wait_during(&r, 30, || {
            let _bigger = Writer::create(&path, 64).unwrap();
        });
        assert!(woke < long, "{woke:?}");
        assert!(r.is_retired());
        // remove() wakes too.
        let w = Writer::create(&path, 8).unwrap();
        let r = Arc::new(Reader::open(&path).unwrap());
        let woke = seq_wait_during(&r, 30, || w.remove().unwrap());
        assert!(woke < long, "{woke:?}");
        assert!(r.is_retired());
    }

    #[test]
    fn a_publish_that_changes_nothing_wakes_no_follower() {
        let dir = tempfile::tempdir().unwrap();
        let path = set_path(&dir);
        let mut w = Writer::create(&path, 8).unwrap();
        let r = Arc::new(Reader::open(&path).unwrap());
        w.publish(&[entry(1, 2, 1, 1)]);
        let waiter = follower(r.clone());
        std::thread::sleep(std::time::Duration::from_millis(50));
        // Hold seq at what the waiter saw: the same table, published again,
        // moves seq (a reader mid-probe retries) but must not wake; the
        // waiter is already asleep on the old value.
        w.publish(&[entry(1, 2, 1, 1)]);
        let (rc, e, slept) = waiter.join().unwrap();
        assert!(
            rc == -1 && e == Some(libc::ETIMEDOUT),
            "woken ({rc}, {e:?}) after {slept:?}"
        );
    }

    #[test]
    fn a_nudge_wakes_every_follower_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = set_path(&dir);
        let mut w = Writer::create(&path, 8).unwrap();
        let r = Arc::new(Reader::open(&path).unwrap());
        w.publish(&[entry(1, 2, 1, 1)]);
        let before = r.seq_word().unwrap().load(Ordering::Relaxed);
        let waiters = [follower(r.clone()), follower(r.clone())];
        std::thread::sleep(std::time::Duration::from_millis(50));
        w.nudge();
        for waiter in waiters {
            let (rc, e, slept) = waiter.join().unwrap();
            assert!(rc == 0, "not woken ({rc}, {e:?}) after {slept:?}");
            assert!(slept < std::time::Duration::from_millis(900), "{slept:?}");
        }
        assert_eq!(r.seq_word().unwrap().load(Ordering::Relaxed), before + 2);
        assert_eq!(r.has_replica_on(1, 2, 0), Some(true));
        assert_eq!(r.lookup(1, 3), Lookup::Absent);
    }

    /// A program's watcher: FUTEX_WAIT (up to 1 s) on the seq it reads now;
    /// joins with the return value, errno and time asleep.
    fn follower(
        r: Arc<Reader>,
    ) -> std::thread::JoinHandle<(libc::c_long, Option<i32>, std::time::Duration)> {
        let seen = r.seq_word().unwrap().load(Ordering::Relaxed);
        std::thread::spawn(move || {
            let word = r.seq_word().unwrap();
            let addr = word as *const AtomicU64 as *const u32;
            let ts = libc::timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            let t = std::time::Instant::now();
            // SAFETY: FUTEX_WAIT on the low half of a live mapped word,
            // with the value read before any change and a valid timespec.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    addr,
                    libc::FUTEX_WAIT,
                    seen as u32,
                    &ts,
                    0usize,
                    0u32,
                )
            };
            let e = std::io::Error::last_os_error().raw_os_error();
            (rc, e, t.elapsed())
        })
    }

    #[test]
    fn a_count_left_up_is_cleared_when_the_set_is_retired_or_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = set_path(&dir);
        let mut w = Writer::create(&path, 8).unwrap();
        let r = Reader::open(&path).unwrap();
        w.revoke_began();
        // A daemon that died mid-revoke: the next one replaces the file.
        std::mem::forget(w);
        let w2 = Writer::create(&path, 8).unwrap();
        assert!(r.is_retired());
        assert_eq!(r.revoking(), 0);
        let mut w2 = w2;
        let r2 = Reader::open(&path).unwrap();
        w2.revoke_began();
        w2.remove().unwrap();
        assert_eq!(r2.revoking(), 0);
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = set_path(&dir);
        let mut w = Writer::create(&path, 100).unwrap();
        assert_eq!(w.capacity(), 128);
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            (HEADER_LEN + 128 * ENTRY_LEN) as u64
        );
        let entries: Vec<_> = (1..=40)
            .map(|i| entry(0x801, i * 7919, nodes_mask([(i % 4) as u32]), i))
            .collect();
        let out = w.publish(&entries);
        assert_eq!(out.sources, 40);
        assert!(!out.overflow);
        assert_eq!(out.slots_written, 40);

        let r = Reader::open(&path).unwrap();
        for e in &entries {
            assert_eq!(
                r.lookup(e.dev, e.ino),
                Lookup::Present {
                    nodes: e.nodes,
                    generation: e.generation
                }
            );
            let node = (e.generation % 4) as u32;
            assert_eq!(r.has_replica_on(e.dev, e.ino, node), Some(true));
            assert_eq!(r.has_replica_on(e.dev, e.ino, (node + 1) % 4), Some(false));
        }
        assert_eq!(r.lookup(0x801, 5), Lookup::Absent);
        assert_eq!(r.lookup(0x802, 7919), Lookup::Absent);
        assert_eq!(r.has_replica_on(0x801, 5, 0), Some(false));
        assert_eq!(r.lookup(0x801, 0), Lookup::Unknown);
        assert!(!r.is_retired());

        // The same table again rewrites nothing.
        assert_eq!(w.publish(&entries).slots_written, 0);
    }

    #[test]
    fn nodes_beyond_the_mask_are_asked_for() {
        assert_eq!(nodes_mask([0, 2, 70]), 0b101 | NODES_OTHER);
        let dir = tempfile::tempdir().unwrap();
        let path = set_path(&dir);
        let mut w = Writer::create(&path, 8).unwrap();
        w.publish(&[entry(1, 10, nodes_mask([1, 64]), 3), entry(1, 11, 1, 3)]);
        let r = Reader::open(&path).unwrap();
        assert_eq!(r.has_replica_on(1, 10, 1), Some(true));
        assert_eq!(r.has_replica_on(1, 10, 0), Some(false));
        assert_eq!(r.has_replica_on(1, 10, 64), None);
        assert_eq!(r.has_replica_on(1, 10, 99), None);
        assert_eq!(r.has_replica_on(1, 11, 99), Some(false));
    }

    #[test]
    fn update_replaces_the_table_under_an_open_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = set_path(&dir);
        let mut w = Writer::create(&path, 64).unwrap();
        let old: Vec<_> = (1..=20).map(|i| entry(7, i, 1, 1)).collect();
        w.publish(&old);
        let r = Reader::open(&path).unwrap();
        assert_eq!(
            r.lookup(7, 1),
            Lookup::Present {
                nodes: 1,
                generation: 1
            }
        );

        let new: Vec<_> = (11..=30).map(|i| entry(7, i, 2, 2)).collect();
        let out = w.publish(&new);
        assert_eq!(out.sources, 20);
        for i in 1..=10 {
            assert_eq!(r.lookup(7, i), Lookup::Absent, "ino {i}");
        }
        for i in 11..=30 {
            assert_eq!(
                r.lookup(7, i),
                Lookup::Present {
                    nodes: 2,
                    generation: 2
                }
            );
        }
        // Duplicates: the last entry wins.
        w.publish(&[entry(7, 5, 1, 1), entry(7, 5, 4, 9)]);
        assert_eq!(
            r.lookup(7, 5),
            Lookup::Present {
                nodes: 4,
                generation: 9
            }
        );
        assert_eq!(r.lookup(7, 11), Lookup::Absent);
        w.publish(&[]);
        assert_eq!(r.lookup(7, 5), Lookup::Absent);
    }

    #[test]
    fn overflow_makes_absent_keys_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = set_path(&dir);
        let mut w = Writer::create(&path, 16).unwrap();
        let entries: Vec<_> = (1..=20).map(|i| entry(3, i, 1, i)).collect();
        let out = w.publish(&entries);
        assert!(out.overflow);
        assert_eq!(out.sources, 12);
        let r = Reader::open(&path).unwrap();
        let mut present = 0;
        for e in &entries {
            match r.lookup(e.dev, e.ino) {
                Lookup::Present { nodes, generation } => {
                    assert_eq!((nodes, generation), (1, e.ino));
                    present += 1;
                }
                Lookup::Unknown => {}
                Lookup::Absent => panic!("ino {} absent from an overflowing table", e.ino),
            }
        }
        assert_eq!(present, 12);
        assert_eq!(r.lookup(3, 1000), Lookup::Unknown);
        assert_eq!(r.has_replica_on(3, 1000, 0), None);

        // Back under the limit: absent is absent again.
        let out = w.publish(&entries[..5]);
        assert!(!out.overflow);
        assert_eq!(r.lookup(3, 1000), Lookup::Absent);
    }

    #[test]
    fn recreate_retires_the_old_file_and_remove_unlinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = set_path(&dir);
        let mut w1 = Writer::create(&path, 8).unwrap();
        w1.publish(&[entry(1, 1, 1, 1)]);
        let r1 = Reader::open(&path).unwrap();
        let mut w2 = Writer::create(&path, 32).unwrap();
        w2.publish(&[entry(1, 2, 1, 1)]);
        assert!(r1.is_retired());
        assert_eq!(r1.lookup(1, 1), Lookup::Unknown);
        // w1 no longer owns the path: removing it leaves w2's file.
        w1.remove().unwrap();
        let r2 = Reader::open(&path).unwrap();
        assert_eq!(
            r2.lookup(1, 2),
            Lookup::Present {
                nodes: 1,
                generation: 1
            }
        );
        w2.remove().unwrap();
        assert!(!path.exists());
        assert!(r2.is_retired());
        assert_eq!(r2.lookup(1, 2), Lookup::Unknown);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    fn invalid(path: &Path, what: &str) {
        let err = Reader::open(path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(what), "{msg}");
    }

    #[test]
    fn bad_files_are_invalid_data_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = set_path(&dir);
        drop(Writer::create(&path, 8).unwrap());
        Reader::open(&path).unwrap();

        poke(&path, 0, b"RPLDSETX");
        invalid(&path, "bad magic");
        poke(&path, 0, b"RPLDSET1");

        poke(&path, 8, &2u64.to_le_bytes());
        invalid(&path, "version 2");
        poke(&path, 8, &1u64.to_le_bytes());

        poke(&path, 24, &12u64.to_le_bytes());
        invalid(&path, "not a power of two");
        poke(&path, 24, &0u64.to_le_bytes());
        invalid(&path, "not a power of two");
        poke(&path, 24, &u64::MAX.to_le_bytes());
        invalid(&path, "not a power of two");
        poke(&path, 24, &(1u64 << 63).to_le_bytes());
        invalid(&path, "needs");
        poke(&path, 24, &16u64.to_le_bytes());
        invalid(&path, "needs");
        poke(&path, 24, &8u64.to_le_bytes());
        Reader::open(&path).unwrap();

        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len((HEADER_LEN + 8 * ENTRY_LEN + 8) as u64).unwrap();
        invalid(&path, "needs");
        f.set_len(40).unwrap();
        invalid(&path, "shorter than");
        f.set_len(0).unwrap();
        invalid(&path, "shorter than");

        invalid(dir.path(), "not a regular file");
        let err = Reader::open(&dir.path().join("missing")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("missing"));
    }

    #[test]
    fn concurrent_reader_never_sees_a_torn_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = set_path(&dir);
        let mut w = Writer::create(&path, 256).unwrap();
        let r = Reader::open(&path).unwrap();
        let round = |n: u64| -> Vec<PublishedEntry> {
            let (lo, hi) = if n.is_multiple_of(2) {
                (1, 64)
            } else {
                (33, 96)
            };
            (lo..=hi).map(|i| entry(9, i, n & 0xff, n)).collect()
        };
        w.publish(&round(0));
        let stop = Arc::new(AtomicBool::new(false));
        // Round n publishes inodes 1..=64 (n even) or 33..=96 (n odd), all
        // with generation n and nodes n & 0xff.
        let writer = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut n = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    w.publish(&round(n));
                    n += 1;
                }
                n
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
        let (mut known, mut unknown) = (0u64, 0u64);
        while std::time::Instant::now() < deadline {
            for ino in 1..=100 {
                match r.lookup(9, ino) {
                    Lookup::Present { nodes, generation } => {
                        assert_eq!(nodes, generation & 0xff, "torn entry for ino {ino}");
                        assert!(ino <= 96, "ino {ino} was never published");
                        if ino <= 32 {
                            assert_eq!(generation % 2, 0, "ino {ino} from an odd table");
                        }
                        if ino > 64 {
                            assert_eq!(generation % 2, 1, "ino {ino} from an even table");
                        }
                        known += 1;
                    }
                    Lookup::Absent => {
                        assert!(!(33..=64).contains(&ino), "ino {ino} is in every table");
                        known += 1;
                    }
                    Lookup::Unknown => unknown += 1,
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let rounds = writer.join().unwrap();
        assert!(rounds > 10, "writer made only {rounds} rounds");
        assert!(known > 0, "reader never got an answer ({unknown} unknown)");
    }

    #[test]
    fn hostile_content_terminates_without_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = set_path(&dir);
        let capacity = 64;
        drop(Writer::create(&path, capacity).unwrap());
        let r = Reader::open(&path).unwrap();
        let mut noise = Noise(42);

        // Every slot taken by garbage: probes run out of slots.
        let junk: Vec<u8> = (0..capacity * ENTRY_WORDS)
            .flat_map(|_| noise.next().to_le_bytes())
            .collect();
        poke(&path, HEADER_LEN as u64, &junk);
        for _ in 0..2000 {
            let _ = r.lookup(noise.next(), noise.next());
            let _ = r.has_replica_on(noise.next(), noise.next(), noise.next() as u32);
        }
        // Garbage keys that are in the table are found (it is what it says).
        let dev = u64::from_le_bytes(junk[..8].try_into().unwrap());
        let ino = u64::from_le_bytes(junk[8..16].try_into().unwrap());
        let _ = r.lookup(dev, ino);

        // A header rewritten after open: capacity is not re-read, flags and
        // seq may be anything.
        for _ in 0..200 {
            let header: Vec<u8> = (0..HEADER_WORDS)
                .flat_map(|_| noise.next().to_le_bytes())
                .collect();
            poke(&path, 0, &header);
            for _ in 0..20 {
                let _ = r.lookup(noise.next(), noise.next() | 1);
            }
            let _ = r.is_retired();
        }

        // A writer stuck mid-update (seq odd forever): Unknown, not a hang.
        poke(&path, 0, &MAGIC.to_le_bytes());
        poke(&path, (FLAGS_WORD * 8) as u64, &0u64.to_le_bytes());
        poke(&path, (SEQ_WORD * 8) as u64, &7u64.to_le_bytes());
        assert_eq!(r.lookup(1, 1), Lookup::Unknown);
    }
}
