//! The shim and the client API believe only the real daemon: real processes,
//! the real kernel, and a fake replicad that nobody runs
//! (tests/programs/fake_daemon.rs: a forged published set listing the file,
//! and for every `Map` a memfd of `FORGED!!` handed read-only, as a real
//! replica is, so that only its owner gives it away).
//!
//! * A set-user-ID root program linked with the shim
//!   (tests/programs/secure_reader.c), run by nobody with `REPLICAD_SOCKET`
//!   naming the fake, `REPLICAD_DAEMON_UID` naming nobody and
//!   `REPLICAD_NODE`, `REPLICAD_DEBUG` set: the kernel marks it `AT_SECURE`,
//!   the shim reads none of them, the fake hears nothing, and the program
//!   prints the real bytes of a file only root may read.
//! * The same program run by root, not set-user-ID, with `REPLICAD_SOCKET`
//!   naming the fake: the published set is not read (nobody owns it), the
//!   daemon is refused for its uid before anything is sent, and the debug
//!   lines say so; only `REPLICAD_DAEMON_UID=65534` makes the program
//!   believe it.
//! * The client API against the fake: `map` maps the file itself, with a
//!   reason naming the fake's uid, and the fake never gets the file's fd.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const NOBODY: u32 = 65534;

/// What the real file holds; the fake hands `FORGED!!` instead.
const REAL: &[u8] = b"the real bytes of a file that only root may read\n";

fn as_nobody() -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    c
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// What `test` needs (root, setpriv, cc); `false` after a skip.
fn can_run(test: &str, cc: bool) -> bool {
    if !root_or_skip(test) {
        return false;
    }
    for tool in ["setpriv"].iter().chain(cc.then_some(&"cc")) {
        if Command::new(tool).arg("--version").output().is_err() {
            skip(test, &format!("no `{tool}` on PATH"));
            return false;
        }
    }
    true
}

/// A scratch directory everyone may enter, holding [`REAL`] as `secret`,
/// mode 0600, root's.
fn secret_dir(tag: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = scratch(tag);
    chmod(dir.path(), 0o755);
    let secret = dir.path().join("secret");
    std::fs::write(&secret, REAL).unwrap();
    chmod(&secret, 0o600);
    (dir, secret)
}

/// The fake daemon, run by nobody, serving a published set that lists
/// `files`.
struct Fake {
    child: Child,
    _dir: tempfile::TempDir,
    socket: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Fake {
    fn start(files: &[&Path]) -> Fake {
        let dir = scratch("trust-fake");
        std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
        chmod(dir.path(), 0o755);
        let socket = dir.path().join("replicad.sock");
        let mut child = as_nobody()
            .arg(program("replicad-fake-daemon"))
            .arg(&socket)
            .args(files)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                l2.lock().unwrap().push(line);
            }
        });
        let fake = Fake {
            child,
            _dir: dir,
            socket,
            lines,
        };
        fake.wait_for("ready");
        fake
    }

    fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Wait (5 s at most) until the fake has said `line`.
    fn wait_for(&self, line: &str) {
        let t0 = Instant::now();
        while !self.log().iter().any(|l| l == line) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the fake daemon never said {line:?}: {:?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn set(&self) -> PathBuf {
        self.socket.with_file_name("replicas.set")
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// secure_reader.c linked with a copy of the shim, both in `dir`.
fn build_reader(dir: &Path) -> PathBuf {
    let shim = dir.join("libreplicad_preload.so");
    std::fs::copy(shim_path(), &shim).unwrap();
    let exe = dir.join("replicad-secure-reader");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/secure_reader.c");
    let out = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        // Before libc: the shim's mmap is the one the program's calls find.
        .arg(&shim)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// What secure_reader printed.
struct Read {
    ids: String,
    fnv: String,
    head: String,
    map: String,
}

fn parse(out: &Output) -> Read {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stdout}{stderr}", out.status);
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {stdout}{stderr}"))
            .to_string()
    };
    Read {
        ids: stdout.lines().next().unwrap_or_default().to_string(),
        fnv: field("fnv="),
        head: field("head="),
        map: field("map="),
    }
}

fn real_head() -> String {
    String::from_utf8_lossy(&REAL[..32]).into_owned()
}

/// Assert that the program read [`REAL`] from `secret` itself.
fn assert_real(r: &Read, secret: &Path, ctx: &str) {
    assert_eq!(r.head, real_head(), "{ctx}: {}", r.map);
    assert_eq!(r.fnv, format!("{:016x}", fnv1a(REAL)), "{ctx}: {}", r.map);
    assert!(
        r.map.ends_with(&secret.display().to_string()),
        "{ctx}: the mapping is not the file's: {}",
        r.map
    );
}

#[test]
fn a_set_user_id_program_ignores_replicad_variables_and_reads_the_real_file() {
    let test = "a_set_user_id_program_ignores_replicad_variables_and_reads_the_real_file";
    if !can_run(test, true) {
        return;
    }
    let (dir, secret) = secret_dir("trust-suid");
    let fake = Fake::start(&[&secret]);
    let reader = build_reader(dir.path());
    chmod(&reader, 0o4755);

    let out = as_nobody()
        .arg(&reader)
        .arg(&secret)
        .env("REPLICAD_SOCKET", &fake.socket)
        .env("REPLICAD_DAEMON_UID", NOBODY.to_string())
        .env("REPLICAD_NODE", "0")
        .env("REPLICAD_DEBUG", "1")
        .env_remove("REPLICAD_DISABLE")
        .env_remove("LD_PRELOAD")
        .output()
        .unwrap();
    let r = parse(&out);
    assert_eq!(r.ids, "uid=65534 euid=0 secure=1", "not a set-user-ID run");
    assert_real(&r, &secret, "set-user-ID root, run by nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("replicad-preload["),
        "REPLICAD_DEBUG was followed:\n{stderr}"
    );
    // Nothing ever reached the fake: REPLICAD_SOCKET was not followed.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fake.log(), ["ready"], "the fake heard from the program");
}

#[test]
fn a_fake_daemon_is_refused_by_the_shim_unless_its_uid_is_named() {
    let test = "a_fake_daemon_is_refused_by_the_shim_unless_its_uid_is_named";
    if !can_run(test, true) {
        return;
    }
    let (dir, secret) = secret_dir("trust-shim");
    let fake = Fake::start(&[&secret]);
    let reader = build_reader(dir.path());
    let run = |trusted: Option<u32>| {
        let mut c = Command::new(&reader);
        c.arg(&secret)
            .env("REPLICAD_SOCKET", &fake.socket)
            .env("REPLICAD_DEBUG", "1")
            .env_remove("REPLICAD_DAEMON_UID")
            .env_remove("REPLICAD_DISABLE")
            .env_remove("LD_PRELOAD");
        if let Some(uid) = trusted {
            c.env("REPLICAD_DAEMON_UID", uid.to_string());
        }
        c.output().unwrap()
    };

    let out = run(None);
    let r = parse(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(r.ids, "uid=0 euid=0 secure=0");
    assert_real(&r, &secret, &stderr);
    let set = fake.set();
    for says in [
        format!(
            "the published set {}, owned by uid 65534, is not used: that uid is not trusted \
             (trusted: root (uid 0) only",
            set.display()
        ),
        format!(
            "replicad at {} runs as uid 65534, which is not trusted (trusted: root (uid 0) only",
            fake.socket.display()
        ),
    ] {
        assert!(stderr.contains(&says), "no {says:?} in:\n{stderr}");
    }
    // The shim hung up before sending anything.
    fake.wait_for("closed without a request");
    assert_eq!(
        fake.log(),
        ["ready", "connection", "closed without a request"],
        "{stderr}"
    );

    // Told that nobody runs the daemon, the program believes it: its
    // published set, and its replica (read-only, on tmpfs, nobody's).
    let out = run(Some(NOBODY));
    let r = parse(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(r.head, "FORGED!!".repeat(4), "{stderr}");
    assert!(r.map.contains("/memfd:replicad:forged"), "{}", r.map);
    assert!(
        !stderr.contains("not trusted") && !stderr.contains("not used"),
        "{stderr}"
    );
    fake.wait_for("request map");
}

#[test]
fn a_fake_daemon_gets_nothing_from_the_client_api() {
    let test = "a_fake_daemon_gets_nothing_from_the_client_api";
    if !can_run(test, false) {
        return;
    }
    let (_dir, secret) = secret_dir("trust-api");
    let fake = Fake::start(&[&secret]);
    let opts = replicad_client::MapOptions {
        socket: fake.socket.clone(),
        node: None,
        timeout: Duration::from_secs(2),
    };
    let m = replicad_client::map_with(&secret, &opts).unwrap();
    assert_eq!(m.as_slice(), REAL);
    assert!(!m.on_replica());
    let replicad_client::Backing::File { reason } = m.backing() else {
        panic!("the fake's replica backs the mapping: {:?}", m.backing());
    };
    assert!(
        reason.contains(&format!(
            "replicad at {} runs as uid 65534, which is not trusted",
            fake.socket.display()
        )),
        "{reason}"
    );
    // The fd of the file never left this process.
    fake.wait_for("closed without a request");
    assert_eq!(
        fake.log(),
        ["ready", "connection", "closed without a request"],
        "{reason}"
    );
}
