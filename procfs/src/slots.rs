//! The client's fallback table as `<pid>/mem` shows it: a contract between
//! the client library (which keeps the table in its own memory) and the
//! daemon (which reads it through `<pid>/mem`, only during a revoke).
//!
//! ```text
//!  table = [Slot; SLOTS], each SLOT_WORDS native-endian u64s:
//!   0 word    seq << 8 | state     (ACTIVE: the range still maps the replica)
//!   1 start   the range the program reads (the replica, while ACTIVE)
//!   2 len
//!   3 spare   the original file mapped a second time: the way back
//!   4 dev     the replica file's major << 32 | minor (0: a client-API range)
//!   5 ino     the replica file's inode
//!   6 offset  the file offset the range maps
//!  then one u64, `carrying`: non-zero while the daemon writes into spares
//! ```
//!
//! A revoke truncates the replica, and the kernel drops with it every
//! private page a program made in the range (a debugger's breakpoint, a
//! `/proc/self/mem` write). Before that, the daemon copies those pages
//! into the same offsets of the spare, so that the fallback, which moves
//! the spare over the range, carries them. The table is the program's own
//! memory: the daemon believes nothing in it beyond the program's own
//! address space (it copies the program's bytes to the program's address),
//! and bounds what it reads.

/// Slots in one table.
pub const SLOTS: usize = 1024;
/// u64 words per slot.
pub const SLOT_WORDS: usize = 7;
/// Bytes of one whole table.
pub const TABLE_BYTES: usize = SLOTS * SLOT_WORDS * 8;
/// Offset from the table's start of the word the daemon sets (1) while it
/// writes into the process's spares, and clears (0) after: the client
/// waits for it before it moves or unmaps a spare.
pub const CARRYING_OFFSET: u64 = TABLE_BYTES as u64;

/// Word index of `seq << 8 | state`.
pub const WORD: usize = 0;
/// Word index of the range's start.
pub const START: usize = 1;
/// Word index of its length.
pub const LEN: usize = 2;
/// Word index of the spare's address.
pub const SPARE: usize = 3;
/// Word index of the replica's device.
pub const DEV: usize = 4;
/// Word index of the replica's inode.
pub const INO: usize = 5;
/// Word index of the file offset.
pub const OFFSET: usize = 6;

/// `word & STATE_MASK`: the slot's state.
pub const STATE_MASK: u64 = 0xff;
/// The state of a range that still maps its replica (its spare is apart).
pub const ACTIVE: u64 = 2;

/// One slot as the daemon reads it.
/// One slot as the daemon reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    /// `seq << 8 | state`.
    pub word: u64,
    /// The range the program reads.
    pub start: u64,
    /// Its length in bytes.
    pub len: u64,
    /// The spare's address.
    pub spare: u64,
    /// The replica's `major << 32 | minor`.
    pub dev: u64,
    /// The replica's inode.
    pub ino: u64,
    /// The file offset the range maps.
    pub offset: u64,
}

impl SlotView {
    /// Whether the range still maps the replica with this `dev`
    /// (`major << 32 | minor`) and `ino`, and its spare lies apart.
    pub fn active_on(&self, dev: u64, ino: u64) -> bool {
        self.word & STATE_MASK == ACTIVE
            && self.dev == dev
            && self.ino == ino
            && self.len > 0
            && self.start.checked_add(self.len).is_some()
            && self.spare.checked_add(self.len).is_some()
    }
}

/// The slots of a table read from a process (`bytes` may be short: the
/// slots it holds whole) that still map the replica `dev`, `ino`
/// ([`SlotView::active_on`]), with their index. Reads one word of every
/// other slot: most are free.
pub fn active_on(bytes: &[u8], dev: u64, ino: u64) -> impl Iterator<Item = (usize, SlotView)> + '_ {
    bytes
        .chunks_exact(SLOT_WORDS * 8)
        .enumerate()
        .filter(|(_, s)| word(s, WORD) & STATE_MASK == ACTIVE)
        .map(|(i, s)| (i, view(s)))
        .filter(move |(_, v)| v.active_on(dev, ino))
}

/// Byte offset of slot `index`'s first word ([`WORD`]) in the table.
pub fn word_offset(index: usize) -> u64 {
    (index * SLOT_WORDS * 8) as u64
}

fn word(slot: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(src) = slot.get(i * 8..i * 8 + 8) {
        b.copy_from_slice(src);
    }
    u64::from_ne_bytes(b)
}

fn view(s: &[u8]) -> SlotView {
    SlotView {
        word: word(s, WORD),
        start: word(s, START),
        len: word(s, LEN),
        spare: word(s, SPARE),
        dev: word(s, DEV),
        ino: word(s, INO),
        offset: word(s, OFFSET),
    }
}

/// `st_dev` as the table stores it.
pub fn dev_word(st_dev: u64) -> u64 {
    (u64::from(libc::major(st_dev)) << 32) | u64::from(libc::minor(st_dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every whole slot of a table read from a process.
    fn decode(bytes: &[u8]) -> Vec<SlotView> {
        bytes.chunks_exact(SLOT_WORDS * 8).map(view).collect()
    }

    #[test]
    fn slots_decode_and_match() {
        let mut bytes = vec![0u8; 2 * SLOT_WORDS * 8 + 5];
        let words = [
            ACTIVE | 7 << 8,
            0x1000,
            0x2000,
            0x9000,
            dev_word(0x803),
            42,
            0,
        ];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
        }
        let slots = decode(&bytes);
        assert_eq!(slots.len(), 2);
        assert!(slots[0].active_on(8 << 32 | 3, 42));
        assert!(!slots[0].active_on(8 << 32 | 3, 43));
        assert!(!slots[1].active_on(0, 0));
        assert_eq!(
            active_on(&bytes, 8 << 32 | 3, 42)
                .map(|(i, _)| i)
                .collect::<Vec<_>>(),
            vec![0]
        );
        assert_eq!(word_offset(2), 2 * 56);
        assert_eq!(active_on(&bytes, 8 << 32 | 3, 41).count(), 0);
        let mut wrapped = slots[0];
        wrapped.start = u64::MAX;
        assert!(!wrapped.active_on(8 << 32 | 3, 42));
    }
}
