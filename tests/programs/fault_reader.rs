//! Test program: the coherence checker of the fault tests (tests/faults.rs).
//!
//! `replicad-fault-reader api|shared|private SECONDS FILE CONTROL [FILE CONTROL ...] [--rounds N]`
//!
//! Maps each FILE once at start and holds that mapping for its whole life
//! (*held*: what a reader that sat on a replica when a process was killed
//! goes on reading), and each round maps each FILE again (*fresh*: what a
//! reader that maps now gets). Every 8-byte word of both is checked (see
//! pattern.rs) against the file's CONTROL: right page and word, version
//! at least the completed version read before the pass and at most the
//! started version read after it. `api` maps through
//! `replicad_client::map_with` (node 0, the socket in `$REPLICAD_SOCKET`);
//! `shared` and `private` through plain `mmap(2)` (`MAP_SHARED`,
//! `MAP_PRIVATE`), which the preload shim moves onto replicas when it is
//! loaded.
//!
//! No writer in these tests shrinks a file: a SIGBUS that reaches this
//! program is a revoke the client or the shim did not turn into a
//! fallback. It is counted as a fault (and the page reads zeros from then
//! on, so its words count as bad too).
//!
//! `replicad-fault-reader literal`: wait for a byte on stdin, then
//! `write(2)` a string literal (in this program's rodata) to stdout and
//! exit 0, or exit 1 naming the error. Run from a replicated copy under the
//! shim, the rodata is on the replica: once that is revoked, the kernel
//! reads the literal from the revoked range.
//!
//! Prints JSON lines: `{"ready":true,...}` once every held mapping is made
//! and checked, with each one's address (a test reads `/proc/<pid>/maps`
//! itself); `{"progress":true,...}` about every 100 ms; `{"final":true,...}`
//! at the end. Stops at the deadline, after `--rounds` rounds, or once word
//! 2 of the first CONTROL is non-zero. Exits 1 if any word was wrong or any
//! fault reached it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

include!("pattern.rs");

include!("torn.rs");

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Api,
    Mmap(libc::c_int),
}

/// One read-only mapping of a whole file, by the client API or plain mmap.
enum Map {
    Api(replicad_client::Mapping),
    Raw { ptr: *mut libc::c_void, len: usize },
}

impl Map {
    fn new(kind: Kind, file: &str) -> Result<Map, String> {
        match kind {
            Kind::Api => {
                let opts = replicad_client::MapOptions {
                    node: Some(0),
                    timeout: Duration::from_secs(1),
                    ..Default::default()
                };
                replicad_client::map_with(file, &opts)
                    .map(Map::Api)
                    .map_err(|e| e.to_string())
            }
            Kind::Mmap(flags) => {
                let f = std::fs::File::open(file).map_err(|e| format!("open: {e}"))?;
                let len = f.metadata().map_err(|e| format!("fstat: {e}"))?.len() as usize;
                if len < PAGE {
                    return Err(format!("{len} bytes long"));
                }
                // SAFETY: a fresh read-only mapping of a file we hold open;
                // the shim may move it onto a replica (same bytes, same
                // protection).
                let ptr = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ,
                        flags,
                        f.as_raw_fd(),
                        0,
                    )
                };
                if ptr == libc::MAP_FAILED {
                    return Err(format!("mmap: {}", std::io::Error::last_os_error()));
                }
                Ok(Map::Raw { ptr, len })
            }
        }
    }

    fn base(&self) -> *const u64 {
        match self {
            Map::Api(m) => m.as_ptr().cast(),
            Map::Raw { ptr, .. } => ptr.cast_const().cast(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Map::Api(m) => m.len(),
            Map::Raw { len, .. } => *len,
        }
    }

    /// Whether a replica backs it now: the client's word, or for a plain
    /// mapping our `/proc/self/maps` (another inode than the file's).
    fn on_replica(&self, file_ino: u64) -> bool {
        match self {
            Map::Api(m) => m.on_replica(),
            Map::Raw { ptr, .. } => maps_ino(*ptr as usize).is_some_and(|i| i != file_ino),
        }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        if let Map::Raw { ptr, len } = self {
            // SAFETY: the mapping this value made; nothing borrows it now.
            unsafe { libc::munmap(*ptr, *len) };
        }
    }
}

/// The inode of our mapping that starts at `addr`, from /proc/self/maps.
fn maps_ino(addr: usize) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/maps").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let start = f.first()?.split('-').next()?;
        (usize::from_str_radix(start, 16).ok()? == addr)
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

#[derive(Default, Clone)]
struct Tally {
    words: u64,
    bad: u64,
}

/// What one file's checks found.
#[derive(Default)]
struct PerFile {
    held: Tally,
    fresh: Tally,
    fresh_replica_rounds: u64,
    fresh_file_rounds: u64,
    fresh_unmapped_rounds: u64,
}

struct Reader {
    kind: Kind,
    files: Vec<(String, Control, u64)>,
    held: Vec<Map>,
    per_file: Vec<PerFile>,
    faults: u64,
    first_bad: String,
}

impl Reader {
    /// Check every word of the held mapping of file `i` (`fresh`: of
    /// `fresh` instead); returns the tally.
    fn check(&mut self, i: usize, fresh: Option<&Map>, what: &str) -> Tally {
        let m = fresh.unwrap_or(&self.held[i]);
        let (base, pages) = (m.base(), m.len() / PAGE);
        let ctl = &self.files[i].1;
        let low = ctl.completed();
        TORN.store(false, Ordering::SeqCst);
        let mut t = Tally::default();
        let mut max_version = 0;
        let mut first = String::new();
        for p in 0..pages {
            for w in 0..WORDS {
                // SAFETY: inside the mapping (whole pages of the file,
                // which no writer shrinks); a volatile load so that memory
                // is read every time.
                let v = unsafe { std::ptr::read_volatile(base.add(p * WORDS + w)) };
                t.words += 1;
                let version = v >> 32;
                max_version = max_version.max(version);
                if (v & 0xffff_ffff) != ((p as u64) << 9 | w as u64) || version < low {
                    t.bad += 1;
                    if first.is_empty() {
                        first = format!(
                            "{what} mapping of {}: page {p} word {w}: {v:#018x} (version {version}, completed {low})",
                            self.files[i].0
                        );
                    }
                }
            }
        }
        let high = ctl.started();
        if max_version > high {
            t.bad += 1;
            if first.is_empty() {
                first = format!(
                    "{what} mapping of {}: version {max_version} read but only {high} was started",
                    self.files[i].0
                );
            }
        }
        if TORN.swap(false, Ordering::SeqCst) {
            self.faults += 1;
            if first.is_empty() {
                first = format!(
                    "{what} mapping of {}: a SIGBUS reached the program (completed {low}, started {high})",
                    self.files[i].0
                );
            }
        }
        if self.first_bad.is_empty() {
            self.first_bad = first;
        }
        t
    }

    fn round(&mut self) {
        for i in 0..self.files.len() {
            let t = self.check(i, None, "held");
            add(&mut self.per_file[i].held, &t);

            let Ok(fresh) = Map::new(self.kind, &self.files[i].0) else {
                self.per_file[i].fresh_unmapped_rounds += 1;
                continue;
            };
            let ino = self.files[i].2;
            let at_start = fresh.on_replica(ino);
            let t = self.check(i, Some(&fresh), "fresh");
            let at_end = fresh.on_replica(ino);
            add(&mut self.per_file[i].fresh, &t);
            if at_start && at_end {
                self.per_file[i].fresh_replica_rounds += 1;
            } else {
                self.per_file[i].fresh_file_rounds += 1;
            }
        }
    }

    fn bad(&self) -> u64 {
        self.per_file.iter().map(|f| f.held.bad + f.fresh.bad).sum()
    }

    fn words(&self) -> u64 {
        self.per_file
            .iter()
            .map(|f| f.held.words + f.fresh.words)
            .sum()
    }

    fn report(&self, tag: &str, rounds: u64) -> String {
        let list = |f: &dyn Fn(&PerFile) -> String| {
            self.per_file.iter().map(f).collect::<Vec<_>>().join(",")
        };
        let ino = |i: usize| self.files[i].2;
        format!(
            "{{\"{tag}\":true,\"pid\":{},\"rounds\":{rounds},\"words\":{},\"bad_words\":{},\"faults\":{},\
             \"held_words\":[{}],\"held_bad\":[{}],\"fresh_words\":[{}],\"fresh_bad\":[{}],\
             \"fresh_replica_rounds\":[{}],\"fresh_file_rounds\":[{}],\"fresh_unmapped_rounds\":[{}],\
             \"held_on_replica\":[{}],\"first_bad\":{}}}",
            std::process::id(),
            self.words(),
            self.bad(),
            self.faults,
            list(&|f| f.held.words.to_string()),
            list(&|f| f.held.bad.to_string()),
            list(&|f| f.fresh.words.to_string()),
            list(&|f| f.fresh.bad.to_string()),
            list(&|f| f.fresh_replica_rounds.to_string()),
            list(&|f| f.fresh_file_rounds.to_string()),
            list(&|f| f.fresh_unmapped_rounds.to_string()),
            self.held
                .iter()
                .enumerate()
                .map(|(i, m)| m.on_replica(ino(i)).to_string())
                .collect::<Vec<_>>()
                .join(","),
            serde_json::to_string(&self.first_bad).unwrap()
        )
    }
}

fn add(to: &mut Tally, t: &Tally) {
    to.words += t.words;
    to.bad += t.bad;
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn usage() -> ! {
    eprintln!(
        "usage: replicad-fault-reader api|shared|private SECONDS FILE CONTROL [FILE CONTROL ...] [--rounds N]"
    );
    std::process::exit(2);
}

/// A literal in rodata, for `literal`.
static LITERAL: &[u8] = b"a string literal from rodata\n";

fn literal() -> ! {
    let mut b = [0u8; 1];
    // SAFETY: a one-byte read into our stack buffer.
    unsafe { libc::read(0, b.as_mut_ptr().cast(), 1) };
    // SAFETY: write(2) of a static byte string.
    let n = unsafe { libc::write(1, LITERAL.as_ptr().cast(), LITERAL.len()) };
    if n == LITERAL.len() as isize {
        std::process::exit(0);
    }
    let e = std::io::Error::last_os_error();
    eprintln!("write(2) of a literal: {n} ({e})");
    std::process::exit(1);
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("literal") {
        literal();
    }
    let mut max_rounds = u64::MAX;
    if let Some(i) = args.iter().position(|a| a == "--rounds") {
        max_rounds = args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| usage());
        args.drain(i..i + 2);
    }
    if args.len() < 4 || !args.len().is_multiple_of(2) {
        usage();
    }
    let kind = match args[0].as_str() {
        "api" => Kind::Api,
        "shared" => Kind::Mmap(libc::MAP_SHARED),
        "private" => Kind::Mmap(libc::MAP_PRIVATE),
        _ => usage(),
    };
    let seconds: f64 = args[1].parse().unwrap_or_else(|_| usage());
    install_sigbus();
    let files: Vec<(String, Control, u64)> = args[2..]
        .chunks(2)
        .map(|c| {
            let ino = std::fs::metadata(&c[0]).expect("stat FILE").ino();
            (
                c[0].clone(),
                Control::open(std::path::Path::new(&c[1])),
                ino,
            )
        })
        .collect();
    let held: Vec<Map> = files
        .iter()
        .map(|(f, _, _)| Map::new(kind, f).unwrap_or_else(|e| panic!("map {f}: {e}")))
        .collect();
    let n = files.len();
    let mut r = Reader {
        kind,
        files,
        held,
        per_file: (0..n).map(|_| PerFile::default()).collect(),
        faults: 0,
        first_bad: String::new(),
    };
    // Every held mapping checked once (and so touched) before we say so.
    for i in 0..n {
        let t = r.check(i, None, "held");
        add(&mut r.per_file[i].held, &t);
    }
    let held: Vec<String> = r
        .held
        .iter()
        .zip(&r.files)
        .map(|(m, (f, _, _))| {
            format!(
                "{{\"file\":{},\"addr\":{},\"len\":{}}}",
                serde_json::to_string(f).unwrap(),
                m.base() as usize,
                m.len()
            )
        })
        .collect();
    say(&format!(
        "{{\"ready\":true,\"pid\":{},\"held\":[{}]}}",
        std::process::id(),
        held.join(",")
    ));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut rounds = 0;
    let mut last = Instant::now();
    while rounds < max_rounds && Instant::now() < deadline && !r.files[0].1.stopped() {
        r.round();
        rounds += 1;
        if last.elapsed() >= Duration::from_millis(100) {
            last = Instant::now();
            say(&r.report("progress", rounds));
        }
    }
    say(&r.report("final", rounds));
    std::process::exit(if r.bad() == 0 && r.faults == 0 { 0 } else { 1 });
}
