//! The layout keeps its promises: the engine depends on neither the client
//! API nor the shim (nor the wire format: the daemon translates), and
//! `/proc` is read through the procfs crate alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn the_engine_depends_on_neither_the_client_nor_the_shim() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "replicad-replicator",
            "--prefix",
            "none",
            "-e",
            "normal,build",
        ])
        .current_dir(ROOT)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("replicad-procfs"), "{tree}");
    for crate_ in ["replicad-client", "replicad-preload", "replicad-wire"] {
        assert!(
            !tree.lines().any(|l| l.starts_with(&format!("{crate_} "))),
            "the engine depends on {crate_}:\n{tree}"
        );
    }
}

/// Rust files under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The lines of `text` that are code, not a comment and not in the unit
/// tests that close a file (`#[cfg(test)]` at the top level).
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .take_while(|(_, l)| *l != "#[cfg(test)]")
        .filter(|(_, l)| {
            let t = l.trim_start();
            !(t.starts_with("//") || t.starts_with("#!["))
        })
        .map(|(i, l)| (i + 1, l))
}

#[test]
fn no_proc_path_outside_the_procfs_crate() {
    let mut files = Vec::new();
    for dir in [
        "src",
        "replicator/src",
        "client/src",
        "client/preload/src",
        "wire/src",
        "benches",
    ] {
        rust_files(&Path::new(ROOT).join(dir), &mut files);
    }
    assert!(files.len() > 30, "found only {} files", files.len());
    let mut found = Vec::new();
    for f in &files {
        // Unit-test files of their own.
        if f.file_name()
            .is_some_and(|n| n == "tests.rs" || n == "test.rs")
        {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in code_lines(&text) {
            if line.contains("\"/proc/") || line.contains("b\"/proc") || line.contains("\"/proc\"")
            {
                found.push(format!("{}:{n}: {}", f.display(), line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "read /proc through replicad-procfs (ProcReader), not by path:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_sees_a_proc_path() {
    let text = "fn f() {\n    let _ = std::fs::read(\"/proc/self/maps\");\n}\n// \"/proc/x\"\n";
    let hits: Vec<usize> = code_lines(text)
        .filter(|(_, l)| l.contains("\"/proc/"))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(hits, [2]);
    let with_tests = "fn f() {}\n#[cfg(test)]\nmod tests { const P: &str = \"/proc/1\"; }\n";
    assert_eq!(
        code_lines(with_tests)
            .filter(|(_, l)| l.contains("/proc/"))
            .count(),
        0
    );
}
