// Shared by the reader and writer test programs (included with `include!`).
//
// Data file format: every 8-byte word of page `p`, word `w` of version `v`
// is `v << 32 | p << 9 | w` (4096-byte pages, 512 words). Every word checks
// itself: a zero word, a word of the wrong page, or a word older than the
// newest completed version is caught, and aligned 8-byte loads never tear.
//
// Control file (24 bytes, shared): word 0 = last version whose write is
// complete, word 1 = last version whose write has started, word 2 = stop
// (readers end their loop when it is non-zero).

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;

#[allow(dead_code)]
fn word(version: u64, page: u64, w: u64) -> u64 {
    (version << 32) | (page << 9) | w
}

#[allow(dead_code)]
fn page_bytes(version: u64, page: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(PAGE);
    for w in 0..WORDS as u64 {
        out.extend_from_slice(&word(version, page, w).to_le_bytes());
    }
    out
}

/// The shared control words, mapped from a small file.
#[allow(dead_code)]
struct Control {
    ptr: *mut u64,
}

#[allow(dead_code)]
impl Control {
    fn open(path: &std::path::Path) -> Control {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .expect("control file");
        if f.metadata().expect("control file").len() < 24 {
            f.set_len(24).expect("control file size");
        }
        // SAFETY: mapping 24 bytes of a file we just sized; shared so every
        // process sees the same words.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                24,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap control file");
        Control { ptr: ptr.cast() }
    }

    fn atomic(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        // SAFETY: the mapping holds three aligned u64 words for the life of
        // the process; AtomicU64 has the layout of u64.
        unsafe { &*(self.ptr.add(i) as *const std::sync::atomic::AtomicU64) }
    }

    fn completed(&self) -> u64 {
        self.atomic(0).load(std::sync::atomic::Ordering::SeqCst)
    }

    fn started(&self) -> u64 {
        self.atomic(1).load(std::sync::atomic::Ordering::SeqCst)
    }

    fn stopped(&self) -> bool {
        self.atomic(2).load(std::sync::atomic::Ordering::SeqCst) != 0
    }

    fn set_completed(&self, v: u64) {
        self.atomic(0).store(v, std::sync::atomic::Ordering::SeqCst)
    }

    fn set_started(&self, v: u64) {
        self.atomic(1).store(v, std::sync::atomic::Ordering::SeqCst)
    }
}
