//! Test program: reads a file through `replicad_client::map` the way a real
//! program would.
//!
//! `replicad-reader once FILE [--hold]`: map once, print one JSON line with
//! what backs the mapping, its `/proc/self/maps` and `numa_maps` lines and
//! an FNV-1a checksum; with `--hold`, keep the mapping until stdin closes.
//!
//! `replicad-reader verify FILE CONTROL SECONDS [--paths P,...]`: the
//! coherence reader. In a loop: read the completed version `c`, map FILE,
//! check every 8-byte word of every page (see pattern.rs): right page and
//! word, version between `c` and the started version read afterwards.
//! Prints one JSON line of counts; exits 1 if any word was wrong (stale,
//! zero, or foreign) or any SIGBUS reached our own handler that the client
//! fallback should have handled (`torn_unexplained`).
//!
//! A SIGBUS reaching our handler is legitimate only when the file itself
//! was cut short under a mapping of the file: the client fallback had
//! already moved the range off the replica (`on_replica()` is false after
//! the round) and a write that truncates (`trunc`, `truncate`) was under
//! way during the round. `--paths` is the writer's path list: version `v`
//! is written through `paths[(v - 2) % len]` (the control file starts at
//! version 1, as the coherence test writes it); without it any write under
//! way counts. Every other fault on the mapping is the fallback failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};

include!("pattern.rs");

include!("torn.rs");

fn line_for(file: &str, addr: usize) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .find(|l| {
            let range = l.split_whitespace().next().unwrap_or("");
            let start = range.split('-').next().unwrap_or("");
            usize::from_str_radix(start, 16).ok() == Some(addr)
        })
        .unwrap_or("")
        .to_string()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn once(file: &str, hold: bool) {
    let m = replicad_client::map(file).expect("map");
    let backing = match m.backing() {
        replicad_client::Backing::Replica { node, generation } => {
            format!("replica node{node} generation {generation}")
        }
        replicad_client::Backing::File { reason } => format!("file: {reason}"),
    };
    let sum = fnv1a(m.as_slice());
    let addr = m.as_slice().as_ptr() as usize;
    println!(
        "{{\"pid\":{},\"backing\":{},\"checksum\":\"{:016x}\",\"maps\":{},\"numa_maps\":{}}}",
        std::process::id(),
        json_str(&backing),
        sum,
        json_str(&line_for("/proc/self/maps", addr)),
        json_str(&line_for("/proc/self/numa_maps", addr)),
    );
    if hold {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        // Read again after the hold: still the right bytes, whatever
        // happened to the replica meanwhile.
        println!(
            "{{\"after_hold_checksum\":\"{:016x}\",\"on_replica\":{}}}",
            fnv1a(m.as_slice()),
            m.on_replica()
        );
    }
}

#[derive(Default)]
struct Counts {
    rounds: u64,
    replica_rounds: u64,
    replica_rounds_new: u64,
    file_rounds: u64,
    torn_rounds: u64,
    torn_unexplained: u64,
    words: u64,
    bad_words: u64,
    first_bad: String,
}

/// Whether a write that can shrink the file was under way at some point
/// while versions `low` (completed) to `high` (started) were current.
fn truncating_write_between(low: u64, high: u64, paths: Option<&[String]>) -> bool {
    if high <= low {
        return false;
    }
    let Some(paths) = paths.filter(|p| !p.is_empty()) else {
        return true;
    };
    ((low + 1)..=high).any(|v| {
        let how = &paths[(v.saturating_sub(2) as usize) % paths.len()];
        how == "trunc" || how == "truncate"
    })
}

fn verify(file: &str, control: &str, seconds: f64, paths: Option<&[String]>) -> Counts {
    let ctl = Control::open(std::path::Path::new(control));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(seconds);
    let mut c = Counts::default();
    while std::time::Instant::now() < deadline && !ctl.stopped() {
        let low = ctl.completed();
        let m = match replicad_client::map(file) {
            Ok(m) => m,
            Err(_) => continue, // file momentarily empty (O_TRUNC): nothing to read
        };
        let on_replica_at_start = matches!(m.backing(), replicad_client::Backing::Replica { .. });
        TORN.store(false, Ordering::SeqCst);
        let base = m.as_slice().as_ptr() as *const u64;
        let pages = m.as_slice().len() / PAGE;
        let mut max_version = 0;
        let mut bad = 0;
        let mut first_bad = String::new();
        let mut words = 0;
        'pages: for p in 0..pages {
            for w in 0..WORDS {
                // SAFETY: inside the mapping; a volatile load so the
                // compiler reads memory every time.
                let v = unsafe { std::ptr::read_volatile(base.add(p * WORDS + w)) };
                if TORN.load(Ordering::SeqCst) {
                    break 'pages;
                }
                words += 1;
                let version = v >> 32;
                max_version = max_version.max(version);
                if (v & 0xffff_ffff) != ((p as u64) << 9 | w as u64) || version < low {
                    bad += 1;
                    if first_bad.is_empty() {
                        first_bad = format!(
                            "page {p} word {w}: {v:#018x} (version {version}, completed {low}, on_replica {on_replica_at_start})"
                        );
                    }
                }
            }
        }
        let high = ctl.started();
        c.rounds += 1;
        // Every word read counts, torn round or not: the load that faulted
        // is never checked (TORN is tested right after it).
        if max_version > high {
            bad += 1;
            first_bad = format!("version {max_version} read but only {high} was started");
        }
        c.words += words;
        c.bad_words += bad;
        if c.first_bad.is_empty() {
            c.first_bad = first_bad;
        }
        if TORN.load(Ordering::SeqCst) {
            c.torn_rounds += 1;
            // Our handler got a fault: legitimate only on the file itself
            // (the fallback already left the replica) cut short by a writer.
            if m.on_replica() || !truncating_write_between(low, high, paths) {
                c.torn_unexplained += 1;
                if c.first_bad.is_empty() {
                    c.first_bad = format!(
                        "SIGBUS reached the program's handler (on_replica {}, completed {low}, started {high}): the client fallback did not handle it",
                        m.on_replica()
                    );
                }
            }
            continue;
        }
        if on_replica_at_start && m.on_replica() {
            c.replica_rounds += 1;
            if low >= 2 {
                c.replica_rounds_new += 1;
            }
        } else {
            c.file_rounds += 1;
        }
    }
    c
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("once") => once(&args[2], args.iter().any(|a| a == "--hold")),
        Some("verify") => {
            install_sigbus();
            let paths: Option<Vec<String>> = args
                .iter()
                .position(|a| a == "--paths")
                .and_then(|i| args.get(i + 1))
                .map(|p| p.split(',').map(String::from).collect());
            let c = verify(
                &args[2],
                &args[3],
                args[4].parse().expect("seconds"),
                paths.as_deref(),
            );
            println!(
                "{{\"pid\":{},\"rounds\":{},\"replica_rounds\":{},\"replica_rounds_new\":{},\"file_rounds\":{},\"torn_rounds\":{},\"torn_unexplained\":{},\"words\":{},\"bad_words\":{},\"first_bad\":{}}}",
                std::process::id(),
                c.rounds,
                c.replica_rounds,
                c.replica_rounds_new,
                c.file_rounds,
                c.torn_rounds,
                c.torn_unexplained,
                c.words,
                c.bad_words,
                json_str(&c.first_bad)
            );
            std::process::exit(if c.bad_words == 0 && c.torn_unexplained == 0 {
                0
            } else {
                1
            });
        }
        _ => {
            eprintln!("usage: replicad-reader once FILE [--hold] | verify FILE CONTROL SECONDS [--paths P,...]");
            std::process::exit(2);
        }
    }
}
