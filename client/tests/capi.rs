//! The C ABI: a C program compiled against `client/include/replicad.h` and
//! linked with the built `libreplicad_client.so`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The newest `libreplicad_client.so` beside the test binary
/// (`target/<profile>/deps/` or `target/<profile>/`).
fn find_cdylib() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    [deps.to_path_buf(), deps.parent()?.to_path_buf()]
        .iter()
        .map(|d| d.join("libreplicad_client.so"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
}

/// Build the C program; `Err` says why the test must skip.
fn build_c_program(out_dir: &Path) -> Result<PathBuf, String> {
    if Command::new("cc").arg("--version").output().is_err() {
        return Err("no C compiler `cc` on PATH".into());
    }
    let lib = find_cdylib().ok_or("libreplicad_client.so not found beside the test binary")?;
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = out_dir.join("checksum");
    let lib_dir = lib.parent().unwrap();
    let out = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&exe)
        .arg(manifest.join("tests/c/checksum.c"))
        .arg("-I")
        .arg(manifest.join("include"))
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(exe)
}

#[test]
fn c_program_without_daemon_gets_the_files_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let exe = match build_c_program(dir.path()) {
        Ok(e) => e,
        Err(why) => {
            common::skip("c_program_without_daemon_gets_the_files_checksum", &why);
            return;
        }
    };
    let data = pattern(70_001, 11);
    let p = write_file(dir.path(), "data", &data);
    let missing = dir.path().join("missing");
    let out = Command::new(&exe)
        .arg(&p)
        .arg(&missing)
        .arg(dir.path())
        .env("REPLICAD_SOCKET", dir.path().join("replicad.sock"))
        .env("REPLICAD_DEBUG", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "{} len={} on_replica=0 node=0 generation=0 checksum={:016x}",
        p.display(),
        data.len(),
        fnv1a(&data)
    );
    assert!(
        stdout.contains(&want),
        "want {want}\ngot:\n{stdout}{stderr}"
    );
    assert!(
        stdout.contains(&format!("{} error={} ", missing.display(), libc::ENOENT)),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{} error={} ", dir.path().display(), libc::ENODEV)),
        "{stdout}"
    );
    // REPLICAD_DEBUG=1 says why the file itself was mapped.
    assert!(stderr.contains("replicad not reachable at"), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "one file failed on purpose");
}

#[test]
fn c_program_on_a_replica_falls_back_after_revoke() {
    let daemon = FakeDaemon::with_replicas();
    let exe = match build_c_program(daemon.dir()) {
        Ok(e) => e,
        Err(why) => {
            common::skip("c_program_on_a_replica_falls_back_after_revoke", &why);
            return;
        }
    };
    let old = pattern(3 * 4096 + 1, 12);
    let new = pattern(old.len(), 13);
    let p = write_file(daemon.dir(), "data", &old);
    let mut child = Command::new(&exe)
        .arg("--wait")
        .arg(&p)
        .env("REPLICAD_SOCKET", &daemon.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(
        first,
        format!(
            "{} len={} on_replica=1 node=0 generation=1 checksum={:016x}",
            p.display(),
            old.len(),
            fnv1a(&old)
        )
    );
    // A writer changes the file, then the daemon revokes the replica (a C
    // program has SIG_DFL for SIGBUS: nothing to chain to).
    std::fs::write(&p, &new).unwrap();
    daemon.revoke_all();
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let second = lines.next().unwrap().unwrap();
    assert_eq!(
        second,
        format!(
            "{} again before=1 after=0 checksum={:016x}",
            p.display(),
            fnv1a(&new)
        ),
        "the checksum must be the file's new bytes"
    );
    assert!(child.wait().unwrap().success());
}
