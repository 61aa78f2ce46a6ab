//! Coherence under writes (invariants 1-3): 8 reader processes check every
//! 8-byte word of every page they read through `map()`, in a loop, while a
//! writer rewrites the file through each path a writer can take
//! (`open(O_WRONLY)`, `O_TRUNC`, `truncate(2)`, a writable shared mmap).
//! Each writer's open must find every replica already revoked; no reader
//! may ever see a stale, zero or foreign word; after each write a new
//! generation is replicated and readers are back on a replica.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};

use common::*;

const PAGES: u64 = 256; // 1 MiB
const READERS: usize = 8;
const ROUNDS: u64 = 40; // 10 through each path
/// The writer's paths, in order; the readers are told them too, to know
/// which rounds may legitimately cut the file short under them.
const PATHS: &str = "wronly,trunc,truncate,mmap";
/// Rounds that shrink the file (trunc, truncate).
const TRUNCATING_ROUNDS: u64 = ROUNDS / 2;

fn write_version_1(file: &std::path::Path) {
    let mut data = Vec::with_capacity((PAGES * 4096) as usize);
    for p in 0..PAGES {
        for w in 0..512u64 {
            data.extend_from_slice(&((1u64 << 32) | (p << 9) | w).to_le_bytes());
        }
    }
    std::fs::write(file, data).unwrap();
}

#[test]
fn readers_never_see_stale_or_zero_bytes() {
    if !root_or_skip("readers_never_see_stale_or_zero_bytes") {
        return;
    }
    coherence(false);
}

/// The same readers with the preload shim loaded as well (as `replicactl
/// run` starts them): the shim interposes `mmap`, and must leave the client
/// library's own mappings (its replica and the spare of the file that is
/// its way back) alone, or a revoke swaps a revoked replica back in.
#[test]
fn readers_under_the_shim_never_see_stale_or_zero_bytes() {
    if !root_or_skip("readers_under_the_shim_never_see_stale_or_zero_bytes") {
        return;
    }
    coherence(true);
}

fn coherence(under_shim: bool) {
    let d = Daemon::start("");
    let dir = scratch("coherence");
    let file = dir.path().join("data");
    let control = dir.path().join("control");
    write_version_1(&file);
    {
        let mut c = vec![0u8; 16];
        c.resize(24, 0);
        c[0] = 1; // completed = 1
        c[8] = 1; // started = 1
        std::fs::write(&control, c).unwrap();
    }
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);

    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let mut reader = Command::new(program("replicad-reader"));
            if under_shim {
                reader.env("LD_PRELOAD", shim_path());
            }
            reader
                .args([
                    "verify",
                    file.to_str().unwrap(),
                    control.to_str().unwrap(),
                    "3600",
                    "--paths",
                    PATHS,
                ])
                .env("REPLICAD_SOCKET", &d.socket)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Readers up and attached before the first write.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let writer = Command::new(program("replicad-writer"))
        .args([
            file.to_str().unwrap(),
            control.to_str().unwrap(),
            &ROUNDS.to_string(),
            "--paths",
            PATHS,
            "--socket",
            d.socket.to_str().unwrap(),
            "--wait-replica",
        ])
        .output()
        .unwrap();
    let wout = String::from_utf8_lossy(&writer.stdout).to_string();
    eprintln!("writer: {wout}");
    // Let readers run on the last generation's replica for a moment.
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Stop the readers (control word 2) and collect their counts.
    {
        use std::os::unix::fs::FileExt;
        let c = std::fs::OpenOptions::new()
            .write(true)
            .open(&control)
            .unwrap();
        c.write_all_at(&1u64.to_le_bytes(), 16).unwrap();
    }
    let mut results = Vec::new();
    for r in readers {
        let out = r.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        eprintln!("reader: {}", text.trim());
        results.push((out.status, json(&text)));
    }
    assert!(
        writer.status.success(),
        "writer failed: {wout}\n{}",
        String::from_utf8_lossy(&writer.stderr)
    );
    let w = json(&wout);
    assert_eq!(w["violations"].as_array().unwrap().len(), 0, "{w}");
    assert_eq!(w["regen_timeouts"], 0, "{w}");
    assert_eq!(w["regen_n"], ROUNDS, "{w}");
    for how in ["wronly", "trunc", "truncate", "mmap"] {
        assert_eq!(w[how]["n"], ROUNDS / 4, "{how}: {w}");
    }
    let st = d.status();
    assert_eq!(st.sources[0].generation, ROUNDS + 1, "{st:?}");
    for (status, r) in &results {
        assert_eq!(
            r["bad_words"], 0,
            "a reader saw a stale, zero or foreign word: {r}"
        );
        // A SIGBUS that reached the reader's own handler is the client
        // fallback failing, unless the writer cut the file itself short
        // under a mapping the fallback had already moved onto the file
        // (reader.rs classifies each torn round).
        assert_eq!(
            r["torn_unexplained"], 0,
            "a SIGBUS the client fallback should have handled reached the program: {r}"
        );
        // Each truncating write can tear at most one round of a reader.
        assert!(
            r["torn_rounds"].as_u64().unwrap() <= TRUNCATING_ROUNDS,
            "more torn rounds than truncating writes: {r}"
        );
        assert!(status.success(), "{r}");
        assert!(r["words"].as_u64().unwrap() > 0, "{r}");
        // Readers went back onto replicas of the new generations.
        assert!(
            r["replica_rounds_new"].as_u64().unwrap() > 0,
            "never back on a replica: {r}"
        );
    }
    let fell_back: u64 = results
        .iter()
        .map(|(_, r)| r["file_rounds"].as_u64().unwrap())
        .sum();
    let torn: u64 = results
        .iter()
        .map(|(_, r)| r["torn_rounds"].as_u64().unwrap())
        .sum();
    eprintln!(
        "readers: {fell_back} rounds on the file itself during revokes, {torn} torn by a truncating write"
    );
}
