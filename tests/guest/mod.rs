//! A throw-away multi-NUMA Linux guest for the tests: QEMU software
//! emulation (TCG) with 2 or 4 NUMA nodes, booting Debian's cloud kernel
//! with an initramfs that holds busybox, the freshly built replicad,
//! replicactl, the preload shim, the test programs and every shared library
//! they need. The guest runs `replicad-guest` (tests/programs/guest.rs),
//! which prints one `SCENARIO <name> PASS|FAIL <detail>` line per scenario,
//! then powers off.
//!
//! ```text
//!  cache (target/guest-cache, or $REPLICAD_GUEST_CACHE)
//!    kernel/vmlinuz, kernel/loop.ko   <- apt-get download linux-image-cloud-amd64
//!                                        + dpkg -x (no install), once
//!  initramfs (uncompressed newc cpio, written per run)
//!    /init (busybox sh) -> mounts, insmod loop, replicad-guest, poweroff
//!  qemu-system-x86_64 -accel tcg -M q35 -smp 4 -m 2048M
//!    -object memory-backend-ram,id=mN  -numa node,nodeid=N,cpus=..,memdev=mN
//!    serial console -> our stdout pipe -> GuestRun
//! ```
//!
//! Everything the guest needs is installed by `scripts/setup.sh`
//! (qemu-system-x86, busybox-static); the kernel comes from the Debian
//! archive on first use. A guest that cannot boot fails the test with the
//! reason: CI machines boot it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one guest may run before it is killed.
const GUEST_LIMIT: Duration = Duration::from_secs(240);

/// What one boot printed and how it ended.
#[derive(Debug)]
pub struct GuestRun {
    pub nodes: u32,
    /// The serial console, `\r` removed.
    pub output: String,
    /// `GUEST-EXIT <n>` from /init; `None` if the guest never got there.
    pub exit: Option<i32>,
    /// Seconds from QEMU's start to the guest's first line of /init.
    pub boot_secs: Option<f64>,
    /// The guest kernel's uptime at that line.
    pub guest_uptime: Option<f64>,
    /// The node count the guest program saw (`GUEST nodes <n>`).
    pub reported_nodes: Option<u32>,
    pub wall: Duration,
}

impl GuestRun {
    /// The scenario's line: `(passed, detail)`.
    pub fn scenario(&self, name: &str) -> Option<(bool, String)> {
        let prefix = format!("SCENARIO {name} ");
        self.output.lines().find_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (verdict, detail) = rest.split_once(' ').unwrap_or((rest, ""));
            Some((verdict == "PASS", detail.to_string()))
        })
    }

    /// The last `n` lines of the console, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.output.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// `target/` of this build (the test binary is `target/<profile>/deps/x`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `target/<profile>/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

pub fn cache_dir() -> PathBuf {
    std::env::var_os("REPLICAD_GUEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("guest-cache"))
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tool the guest needs, or a panic saying how to get it.
fn tool(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} is missing: the multi-NUMA guest tests need it. Install it with \
         `apt-get install {package}` (scripts/setup.sh does)"
    );
}

/// The guest kernel and the loop module, fetched into the cache once.
pub fn kernel() -> (PathBuf, PathBuf) {
    let dir = cache_dir().join("kernel");
    let vmlinuz = dir.join("vmlinuz");
    let loop_ko = dir.join("loop.ko");
    if vmlinuz.exists() && loop_ko.exists() {
        return (vmlinuz, loop_ko);
    }
    std::fs::create_dir_all(&dir).unwrap();
    let work = tempfile::tempdir_in(&dir).unwrap();
    let apt = tool("apt-get", "apt");
    // The meta package names the real one in its Depends. A machine whose
    // package lists are empty (fresh containers) gets them first.
    let fetch = |pkg: &str| {
        Command::new(&apt)
            .args(["download", "-q", pkg])
            .current_dir(work.path())
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !fetch("linux-image-cloud-amd64") {
        run(
            Command::new(&apt).args(["update", "-qq"]),
            "updating the package lists to fetch the guest kernel",
        );
    }
    run(
        Command::new(&apt)
            .args(["download", "-q", "linux-image-cloud-amd64"])
            .current_dir(work.path()),
        "fetching the guest kernel (linux-image-cloud-amd64) from the Debian archive",
    );
    let meta = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("linux-image-cloud-amd64_"))
        .expect("apt-get download wrote no linux-image-cloud-amd64 package");
    let depends = run(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&meta)
            .arg("Depends"),
        "reading the kernel meta package",
    );
    let image = depends
        .split(',')
        .map(|d| d.trim().split(' ').next().unwrap_or(""))
        .find(|d| d.starts_with("linux-image-") && d.ends_with("-cloud-amd64"))
        .unwrap_or_else(|| panic!("no kernel package in Depends: {depends}"))
        .to_string();
    run(
        Command::new(&apt)
            .args(["download", "-q", &image])
            .current_dir(work.path()),
        "fetching the guest kernel package",
    );
    let deb = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains(&format!("{image}_")))
        .unwrap_or_else(|| panic!("apt-get download wrote no {image} package"));
    let x = work.path().join("x");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x),
        "unpacking the kernel package",
    );
    let boot = std::fs::read_dir(x.join("boot"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .expect("no vmlinuz in the kernel package");
    let modules = std::fs::read_dir(x.join("lib/modules"))
        .unwrap()
        .next()
        .expect("no modules in the kernel package")
        .unwrap()
        .path();
    // Copied beside, then renamed (vmlinuz last, as the check above reads
    // them): the other guest, booting at once, sees both whole or neither.
    std::fs::copy(
        modules.join("kernel/drivers/block/loop.ko"),
        work.path().join("loop.ko"),
    )
    .unwrap();
    std::fs::copy(boot, work.path().join("vmlinuz")).unwrap();
    std::fs::rename(work.path().join("loop.ko"), &loop_ko).unwrap();
    std::fs::rename(work.path().join("vmlinuz"), &vmlinuz).unwrap();
    std::fs::write(dir.join("package"), format!("{image}\n")).unwrap();
    (vmlinuz, loop_ko)
}

/// An uncompressed `newc` cpio archive, built in memory.
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn new() -> Cpio {
        Cpio {
            out: Vec::new(),
            ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let name = name.trim_start_matches('/');
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, path: &str) {
        let path = path.trim_end_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_string());
        self.entry(path, 0o040755, &[]);
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o100000 | mode, data);
    }

    fn symlink(&mut self, path: &str, target: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(path, 0o120777, target.as_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }
}

/// The shared libraries `elf` loads (and the loader), by `ldd`.
fn libraries(elf: &Path) -> Vec<PathBuf> {
    let out = run(Command::new("ldd").arg(elf), "listing shared libraries");
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.trim().split(' ').next()?,
                None => l.split(' ').next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// A copy of `src` without debug info, cached by mtime.
fn stripped(src: &Path) -> PathBuf {
    let dir = cache_dir().join("stripped");
    std::fs::create_dir_all(&dir).unwrap();
    let dst = dir.join(src.file_name().unwrap());
    let fresh = match (dst.metadata(), src.metadata()) {
        (Ok(d), Ok(s)) => d.modified().unwrap() >= s.modified().unwrap(),
        _ => false,
    };
    if !fresh {
        // To a name of our own, then renamed: the 2- and 4-node guests boot
        // at once, and one must never read the other's half-written copy
        // (a run once booted a guest whose program printed nothing).
        let tmp = tempfile::Builder::new()
            .prefix(".strip-")
            .tempfile_in(&dir)
            .unwrap()
            .into_temp_path();
        run(
            Command::new(tool("strip", "binutils"))
                .arg("--strip-debug")
                .arg("-o")
                .arg(&tmp)
                .arg(src),
            "stripping a binary for the guest",
        );
        tmp.persist(&dst).unwrap();
    }
    dst
}

/// The preload shim of this build: `cargo test` builds it as a dependency
/// of the tests, into `deps/` (and beside the binaries after a `cargo
/// build`); the newer one counts.
fn shim(bins: &Path) -> PathBuf {
    [
        bins.join("libreplicad_preload.so"),
        bins.join("deps/libreplicad_preload.so"),
    ]
    .into_iter()
    .filter(|p| p.exists())
    .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
    .unwrap_or_else(|| bins.join("deps/libreplicad_preload.so"))
}

/// Build the initramfs: busybox, our binaries and their libraries, the
/// guest's /init running `replicad-guest ARGS`.
fn initramfs(loop_ko: &Path, nodes: u32, args: &str) -> Vec<u8> {
    let busybox = tool("busybox", "busybox-static");
    let ldd = Command::new("ldd").arg(&busybox).output().unwrap();
    assert!(
        !ldd.status.success() || String::from_utf8_lossy(&ldd.stdout).contains("not a dynamic"),
        "{} is not static: install busybox-static",
        busybox.display()
    );
    let bins = profile_dir();
    let ours: Vec<(PathBuf, &str)> = vec![
        (bins.join("replicad"), "/bin/replicad"),
        (bins.join("replicactl"), "/bin/replicactl"),
        (shim(&bins), "/bin/libreplicad_preload.so"),
        (bins.join("examples/replicad-guest"), "/bin/replicad-guest"),
        (
            bins.join("examples/replicad-reader"),
            "/bin/replicad-reader",
        ),
        (
            bins.join("examples/replicad-writer"),
            "/bin/replicad-writer",
        ),
    ];
    let mut cpio = Cpio::new();
    for d in [
        "/proc", "/sys", "/dev", "/run", "/tmp", "/data", "/etc", "/var/tmp",
    ] {
        cpio.dir(d);
    }
    cpio.file("/bin/busybox", 0o755, &std::fs::read(&busybox).unwrap());
    cpio.file(
        "/lib/modules/loop.ko",
        0o644,
        &std::fs::read(loop_ko).unwrap(),
    );
    let mut libs: BTreeSet<PathBuf> = BTreeSet::new();
    for (src, dst) in &ours {
        assert!(
            src.exists(),
            "{} is not built: `cargo test` builds it (the guest tests run the fresh build)",
            src.display()
        );
        let built = src.metadata().unwrap().modified().unwrap();
        let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs/guest.rs");
        assert!(
            !dst.ends_with("replicad-guest")
                || driver.metadata().unwrap().modified().unwrap() <= built,
            "{} is older than {}: build the examples first (`cargo test` does; \
             `cargo test --test guest_numa` alone does not: run `cargo build --examples`)",
            src.display(),
            driver.display()
        );
        libs.extend(libraries(src));
        cpio.file(dst, 0o755, &std::fs::read(stripped(src)).unwrap());
    }
    // A real program for the text scenario.
    let sleep = Path::new("/usr/bin/sleep");
    libs.extend(libraries(sleep));
    cpio.file("/usr/bin/sleep", 0o755, &std::fs::read(sleep).unwrap());
    for lib in &libs {
        let real = std::fs::canonicalize(lib).unwrap();
        cpio.file(
            &lib.to_string_lossy(),
            0o755,
            &std::fs::read(&real).unwrap(),
        );
    }
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin:/usr/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\n\
         mount -t tmpfs run /run\n\
         echo \"GUEST-READY $(cut -d' ' -f1 /proc/uptime)\"\n\
         insmod /lib/modules/loop.ko\n\
         /bin/replicad-guest --nodes {nodes} {args}\n\
         echo \"GUEST-EXIT $?\"\n\
         poweroff -f\n"
    );
    cpio.file("/init", 0o755, init.as_bytes());
    cpio.finish()
}

/// Boot a guest with `nodes` NUMA nodes (2 or 4) running `replicad-guest
/// ARGS`, and collect what it printed.
pub fn boot(nodes: u32, args: &str) -> GuestRun {
    assert!(nodes == 2 || nodes == 4, "2 or 4 nodes");
    let qemu = tool("qemu-system-x86_64", "qemu-system-x86");
    let (vmlinuz, loop_ko) = kernel();
    let image = initramfs(&loop_ko, nodes, args);
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, &image).unwrap();
    std::fs::set_permissions(&initrd, std::fs::Permissions::from_mode(0o644)).unwrap();

    let cpus = 4u32;
    let per_node_mb = 2048 / nodes;
    let per_node_cpus = cpus / nodes;
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-M",
        "q35",
        "-smp",
        &cpus.to_string(),
        "-m",
        "2048M",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
    ])
    .arg(&vmlinuz)
    .arg("-initrd")
    .arg(&initrd)
    .args([
        "-append",
        "console=ttyS0 quiet panic=-1 rdinit=/init transparent_hugepage=madvise",
    ]);
    for n in 0..nodes {
        let first = n * per_node_cpus;
        let last = first + per_node_cpus - 1;
        cmd.args([
            "-object",
            &format!("memory-backend-ram,size={per_node_mb}M,id=m{n}"),
            "-numa",
            &format!("node,nodeid={n},cpus={first}-{last},memdev=m{n}"),
        ]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut output = Vec::new();
    let mut ready_at = None;
    let deadline = started + GUEST_LIMIT;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((at, bytes)) => {
                output.extend_from_slice(&bytes);
                if ready_at.is_none() && contains(&output, b"GUEST-READY") {
                    ready_at = Some(at);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            output.extend_from_slice(
                format!(
                    "\n[harness] guest killed after {} s\n",
                    GUEST_LIMIT.as_secs()
                )
                .as_bytes(),
            );
            break;
        }
    }
    let status = child.wait().unwrap();
    let _ = reader.join();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let wall = started.elapsed();
    let mut text = String::from_utf8_lossy(&output).replace('\r', "");
    if !err.trim().is_empty() {
        text.push_str(&format!("\n[qemu stderr] {err}"));
    }
    if !status.success() {
        text.push_str(&format!("\n[harness] qemu exited with {status}"));
    }
    let exit = text
        .lines()
        .find_map(|l| l.strip_prefix("GUEST-EXIT "))
        .and_then(|v| v.trim().parse().ok());
    // The firmware's escape codes may precede the line.
    let guest_uptime = text
        .lines()
        .find_map(|l| l.split_once("GUEST-READY ").map(|(_, v)| v))
        .and_then(|v| v.trim().parse().ok());
    let reported_nodes = text
        .lines()
        .find_map(|l| l.split_once("GUEST nodes ").map(|(_, v)| v))
        .and_then(|v| v.split_whitespace().next()?.parse().ok());
    let run = GuestRun {
        nodes,
        reported_nodes,
        output: text,
        exit,
        boot_secs: ready_at.map(|t| t.duration_since(started).as_secs_f64()),
        guest_uptime,
        wall,
    };
    let _ = std::io::stderr().write_all(
        format!(
            "guest with {nodes} nodes: booted in {} (guest uptime {} s), whole run {:.1} s\n",
            run.boot_secs
                .map_or("never".to_string(), |b| format!("{b:.1} s")),
            run.guest_uptime
                .map_or("?".to_string(), |u| format!("{u:.2}")),
            wall.as_secs_f64()
        )
        .as_bytes(),
    );
    run
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
