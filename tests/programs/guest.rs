//! Test program, run inside the multi-NUMA test guest (tests/guest/mod.rs)
//! by its /init: starts replicad and runs the placement scenarios with real
//! processes bound to nodes through `replicactl run`, printing one line per
//! scenario:
//!
//! ```text
//! SCENARIO <name> PASS|FAIL <detail>
//! ```
//!
//! `replicad-guest --nodes N [SCENARIO...]` checks that the kernel sees
//! exactly N NUMA nodes (/sys/devices/system/node/online and the node
//! directories; every scenario FAILs otherwise, and so does a run without
//! `--nodes`), then runs the named scenarios (all by default: baseline
//! replicated coherence text spanning), in that order.
//! The policy scenarios (policy observe migrate budget pressure) restart the
//! daemon with a `[[policy]]` and no `replicactl replicate`: processes that
//! started before it must end up on their node's pages by the planner alone.
//! `replicad-guest hold FILE` maps FILE, prints its address, and keeps
//! touching every page (a reader that never restarts).
//! `replicad-guest probe FILE` (run under the shim by the scenarios) maps
//! FILE with plain `mmap`, touches every page and prints its numa_maps and
//! maps lines as JSON.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PAGE: usize = 4096;

const RUN_DIR: &str = "/run/replicad";
const SOCKET: &str = "/run/replicad/replicad.sock";
const DATA: &str = "/data";
const MODEL: &str = "/data/model.bin";
const MODEL_MB: usize = 8;
const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
/// The coherence writer's paths, in order (the readers are told them too).
const WRITER_PATHS: &str = "wronly,trunc,truncate,mmap";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("probe") {
        probe(&args[2]);
        return;
    }
    if args.get(1).map(String::as_str) == Some("hold") {
        hold(&args[2]);
        return;
    }
    let (expected, rest) = match args.get(1).map(String::as_str) {
        Some("--nodes") => (
            args.get(2).and_then(|n| n.parse::<usize>().ok()),
            &args[3.min(args.len())..],
        ),
        _ => (None, &args[1..]),
    };
    let nodes = nodes();
    let online = std::fs::read_to_string("/sys/devices/system/node/online").unwrap_or_default();
    let online_count = count_list(online.trim());
    println!(
        "GUEST nodes {} ({}; online {:?})",
        nodes.len(),
        nodes
            .iter()
            .map(|(n, cpus)| format!("node{n}: cpus {cpus}"))
            .collect::<Vec<_>>()
            .join(", "),
        online.trim()
    );
    let wanted: Vec<&str> = if !rest.is_empty() {
        rest.iter().map(String::as_str).collect()
    } else {
        vec![
            "baseline",
            "replicated",
            "coherence",
            "text",
            "spanning",
            "policy",
            "restart",
            "observe",
            "migrate",
            "budget",
            "written",
            "pressure",
        ]
    };
    // A guest with the wrong node count proves nothing about placement:
    // a 1-node guest would pass every scenario.
    let wrong = match expected {
        None => Some("no --nodes N given: the node count cannot be checked".to_string()),
        Some(n) if online_count != Some(n) || nodes.len() != n => Some(format!(
            "the kernel sees {} node(s) (online {:?}, {} node directories), expected {n}",
            online_count.map_or("?".into(), |c| c.to_string()),
            online.trim(),
            nodes.len()
        )),
        Some(_) => None,
    };
    if let Some(why) = wrong {
        println!("GUEST WRONG NODE COUNT: {why}");
        for s in &wanted {
            println!("SCENARIO {s} FAIL {why}");
        }
        std::process::exit(1);
    }
    if let Err(e) = setup() {
        for s in &wanted {
            println!("SCENARIO {s} FAIL setup: {e}");
        }
        std::process::exit(1);
    }
    let mut daemon = start_daemon();
    let ids: Vec<u32> = nodes.keys().copied().collect();
    let mut failed = 0;
    for s in wanted {
        let t0 = Instant::now();
        let result = match s {
            "baseline" => baseline(&ids),
            "replicated" => replicated(&ids),
            "coherence" => coherence(&ids),
            "text" => text(&ids),
            "spanning" => spanning(&nodes, &mut daemon),
            "policy" => policy(&ids, &mut daemon, "replicate"),
            "restart" => restart(&ids, &mut daemon),
            "observe" => policy(&ids, &mut daemon, "observe"),
            "migrate" => migrate(&ids, &mut daemon),
            "budget" => budget(&ids, &mut daemon),
            "written" => written(&ids, &mut daemon),
            "pressure" => pressure(&ids, &mut daemon),
            other => Err(format!("no scenario {other}")),
        };
        let secs = t0.elapsed().as_secs_f64();
        match result {
            Ok(detail) => println!("SCENARIO {s} PASS {detail} ({secs:.1} s)"),
            Err(detail) => {
                failed += 1;
                println!("SCENARIO {s} FAIL {detail} ({secs:.1} s)");
                println!("--- replicad log ---\n{}", daemon_log());
            }
        }
        std::io::stdout().flush().unwrap();
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

/// How many ids a sysfs list (`0-3,5`) names; `None` if it does not parse.
fn count_list(list: &str) -> Option<usize> {
    if list.is_empty() {
        return Some(0);
    }
    let mut n = 0;
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                n += b.checked_sub(a)? + 1;
            }
            None => {
                part.parse::<usize>().ok()?;
                n += 1;
            }
        }
    }
    Some(n)
}

/// Node id -> cpulist, from sysfs.
fn nodes() -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir("/sys/devices/system/node").unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("node").and_then(|n| n.parse().ok()) {
            let cpus = std::fs::read_to_string(format!("/sys/devices/system/node/{name}/cpulist"))
                .unwrap()
                .trim()
                .to_string();
            out.insert(n, cpus);
        }
    }
    out
}

fn sh(cmd: &str) -> Result<String, String> {
    let out = Command::new("/bin/sh")
        .args(["-c", cmd])
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{cmd}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An ext2 filesystem on a loop device at /data: a real page cache, whose
/// pages land on the node of the task that reads them first.
fn setup() -> Result<(), String> {
    sh("dd if=/dev/zero of=/var/tmp/data.img bs=1M count=64 2>/dev/null")?;
    let dev = sh("losetup -f")?;
    let dev = dev.trim();
    sh(&format!("losetup {dev} /var/tmp/data.img"))?;
    sh(&format!("mke2fs -q {dev}"))?;
    sh(&format!("mount -t ext2 {dev} {DATA}"))?;
    write_config("")
}

fn write_config(extra: &str) -> Result<(), String> {
    std::fs::write(
        "/etc/replicad.toml",
        format!(
            "[daemon]\nrun_dir = \"{RUN_DIR}\"\nmetrics_listen = \"\"\n[fence]\nsettle_ms = 20\n{extra}"
        ),
    )
    .map_err(|e| e.to_string())
}

fn start_daemon() -> Child {
    let log = std::fs::File::create("/tmp/replicad.log").unwrap();
    let child = Command::new("/bin/replicad")
        .args(["--config", "/etc/replicad.toml"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !Path::new(SOCKET).exists() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn daemon_log() -> String {
    std::fs::read_to_string("/tmp/replicad.log").unwrap_or_default()
}

fn ctl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("/bin/replicactl")
        .args(["--socket", SOCKET])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "replicactl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `replicactl run --node N -- CMD`, with the daemon's socket.
fn on_node(node: u32, cmd: &[&str]) -> Command {
    let mut c = Command::new("/bin/replicactl");
    c.args(["--socket", SOCKET, "run", "--node", &node.to_string(), "--"])
        .args(cmd)
        .env("REPLICAD_SOCKET", SOCKET);
    c
}

fn output(mut c: Command) -> Result<String, String> {
    let out = c.output().map_err(|e| format!("{c:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{c:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Pages per node from a numa_maps line (`N0=12 N1=3`).
fn pages_per_node(numa_maps: &str) -> BTreeMap<u32, u64> {
    numa_maps
        .split_whitespace()
        .filter_map(|f| {
            let (k, v) = f.strip_prefix('N')?.split_once('=')?;
            Some((k.parse().ok()?, v.parse().ok()?))
        })
        .collect()
}

fn histogram(h: &BTreeMap<u32, u64>) -> String {
    if h.is_empty() {
        return "no pages".into();
    }
    h.iter()
        .map(|(n, p)| format!("N{n}={p}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// All `pages` on `node` and nowhere else.
fn all_on(h: &BTreeMap<u32, u64>, node: u32, pages: u64) -> bool {
    h.get(&node) == Some(&pages) && h.iter().all(|(n, p)| *n == node || *p == 0)
}

fn json(line: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(line.trim()).map_err(|e| format!("{e}: {line:?}"))
}

/// A file cached by a process on node 0 and read by a process bound to
/// the last node: its pages stay on node 0 (the problem replicad solves).
fn baseline(ids: &[u32]) -> Result<String, String> {
    let last = *ids.last().unwrap();
    cached_on_node0(MODEL, MODEL_MB)?;
    let probe = json(&output(on_node(
        last,
        &["/bin/replicad-guest", "probe", MODEL],
    ))?)?;
    let numa = probe["numa_maps"].as_str().unwrap_or("");
    let h = pages_per_node(numa);
    let pages = (MODEL_MB * 256) as u64;
    if !all_on(&h, 0, pages) {
        return Err(format!(
            "expected all {pages} pages on node 0 (cached there), read from node {last}: {} \
             [{numa}]",
            histogram(&h)
        ));
    }
    Ok(format!(
        "node-{last} process reads {pages} pages, all remote on node 0: {}",
        histogram(&h)
    ))
}

/// The daemon replicates the file to every node; a process on each node
/// maps only its node's pages, through the client API and through the
/// shim; the daemon's placement check agrees with numa_maps.
fn replicated(ids: &[u32]) -> Result<String, String> {
    ctl(&["replicate", MODEL])?;
    let status = json(&ctl(&["status", "--json"])?)?;
    let pages = (MODEL_MB * 256) as u64;
    let mut seen = Vec::new();
    for &n in ids {
        // replicad's own check, done with move_pages after the copy.
        let source = status["sources"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["path"] == MODEL))
            .ok_or_else(|| format!("{MODEL} not in the status: {status}"))?;
        let replica = source["replicas"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["target"] == format!("node{n}")))
            .ok_or_else(|| format!("no replica on node{n}: {source}"))?;
        if replica["state"] != "valid"
            || replica["pages_on_node"].as_u64() != Some(pages)
            || replica["pages"].as_u64() != Some(pages)
        {
            return Err(format!(
                "replicad's placement check for node{n}: {replica} (want {pages} pages, all on \
                 the node)"
            ));
        }
        // Client API.
        let api = json(
            output(on_node(n, &["/bin/replicad-reader", "once", MODEL]))?
                .lines()
                .next()
                .unwrap_or(""),
        )?;
        let h = pages_per_node(api["numa_maps"].as_str().unwrap_or(""));
        if !api["backing"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("replica node{n}"))
            || !all_on(&h, n, pages)
        {
            return Err(format!(
                "client API on node {n}: {} backing {} [{}]",
                histogram(&h),
                api["backing"],
                api["numa_maps"]
            ));
        }
        // Plain mmap under the shim.
        let shim = json(&output(on_node(
            n,
            &["/bin/replicad-guest", "probe", MODEL],
        ))?)?;
        let hs = pages_per_node(shim["numa_maps"].as_str().unwrap_or(""));
        let backed = shim["maps"].as_str().unwrap_or("");
        if !backed.contains(&format!("{RUN_DIR}/node{n}/")) || !all_on(&hs, n, pages) {
            return Err(format!(
                "shim on node {n}: {} maps [{backed}] numa_maps [{}]",
                histogram(&hs),
                shim["numa_maps"]
            ));
        }
        seen.push(format!(
            "node{n}: api {} shim {}",
            histogram(&h),
            histogram(&hs)
        ));
    }
    Ok(seen.join("; "))
}

/// The reader/writer coherence test across nodes: a verifying reader on
/// every node while a writer on node 0 rewrites the file through every
/// writer path.
fn coherence(ids: &[u32]) -> Result<String, String> {
    const PAGES: u64 = 64;
    const ROUNDS: u64 = 8;
    let file = "/data/coherence.bin";
    let control = "/data/coherence.ctl";
    let mut data = Vec::with_capacity((PAGES * 4096) as usize);
    for p in 0..PAGES {
        for w in 0..512u64 {
            data.extend_from_slice(&((1u64 << 32) | (p << 9) | w).to_le_bytes());
        }
    }
    std::fs::write(file, data).map_err(|e| e.to_string())?;
    let mut c = vec![0u8; 24];
    c[0] = 1;
    c[8] = 1;
    std::fs::write(control, c).map_err(|e| e.to_string())?;
    ctl(&["replicate", file])?;
    let readers: Vec<(u32, Child)> = ids
        .iter()
        .map(|&n| {
            let mut c = on_node(
                n,
                &[
                    "/bin/replicad-reader",
                    "verify",
                    file,
                    control,
                    "600",
                    "--paths",
                    WRITER_PATHS,
                ],
            );
            c.stdout(Stdio::piped());
            (n, c.spawn().unwrap())
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let w = output({
        let mut c = on_node(
            0,
            &[
                "/bin/replicad-writer",
                file,
                control,
                &ROUNDS.to_string(),
                "--paths",
                WRITER_PATHS,
                "--socket",
                SOCKET,
                "--wait-replica",
            ],
        );
        c.stderr(Stdio::inherit());
        c
    });
    std::thread::sleep(Duration::from_millis(300));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(control)
            .map_err(|e| e.to_string())?;
        f.write_all_at(&1u64.to_le_bytes(), 16)
            .map_err(|e| e.to_string())?;
    }
    let mut words = 0;
    let mut problems = Vec::new();
    for (n, r) in readers {
        let out = r.wait_with_output().map_err(|e| e.to_string())?;
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let v = json(line.lines().last().unwrap_or(""))?;
        if v["bad_words"] != 0 || v["torn_unexplained"] != 0 || !out.status.success() {
            problems.push(format!("reader on node {n}: {v}"));
        }
        if v["replica_rounds_new"].as_u64().unwrap_or(0) == 0 {
            problems.push(format!("reader on node {n} never back on a replica: {v}"));
        }
        words += v["words"].as_u64().unwrap_or(0);
    }
    let w = json(w?.lines().last().unwrap_or(""))?;
    if w["violations"].as_array().is_none_or(|v| !v.is_empty()) || w["regen_n"] != ROUNDS {
        problems.push(format!("writer: {w}"));
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(format!(
        "{} readers (one per node), {ROUNDS} rewrites from node 0, {words} words checked, 0 bad",
        ids.len()
    ))
}

/// A real program (coreutils `sleep`) bound to the last node under the
/// shim runs its libc text from the last node's replica.
fn text(ids: &[u32]) -> Result<String, String> {
    let last = *ids.last().unwrap();
    ctl(&["replicate", LIBC])?;
    let mut sleeper = on_node(last, &["/usr/bin/sleep", "30"])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let pid = sleeper.id();
    // `run` execs: the pid is sleep's once the shim attached.
    let t0 = Instant::now();
    let replica_dir = format!("{RUN_DIR}/node{last}/");
    let mut found = None;
    while t0.elapsed() < Duration::from_secs(20) {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        let text_line = maps
            .lines()
            .find(|l| l.contains(&replica_dir) && l.split_whitespace().nth(1) == Some("r-xp"));
        if let Some(l) = text_line {
            found = Some(l.to_string());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let result = match found {
        None => Err(format!(
            "sleep (pid {pid}) on node {last} never mapped libc text from {replica_dir}: {}",
            std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
        )),
        Some(line) => {
            let start = line.split('-').next().unwrap_or("").to_string();
            let numa = std::fs::read_to_string(format!("/proc/{pid}/numa_maps"))
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with(&format!("{start} ")))
                .unwrap_or("")
                .to_string();
            let h = pages_per_node(&numa);
            let on: u64 = h.get(&last).copied().unwrap_or(0);
            let elsewhere: u64 = h.iter().filter(|(n, _)| **n != last).map(|(_, p)| p).sum();
            if on == 0 || elsewhere != 0 {
                Err(format!(
                    "libc text of sleep on node {last}: {} [{numa}]",
                    histogram(&h)
                ))
            } else {
                Ok(format!(
                    "sleep bound to node {last}: libc text from the replica, {}",
                    histogram(&h)
                ))
            }
        }
    };
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    result
}

/// A process whose CPUs span two nodes is left alone (the status says
/// why); once the policy names a home node for its cgroup (a reload), the
/// same kind of process attaches to that node's replicas.
fn spanning(nodes: &BTreeMap<u32, String>, daemon: &mut Child) -> Result<String, String> {
    let last = *nodes.keys().last().unwrap();
    let first_cpu = |n: u32| -> String {
        nodes[&n]
            .split([',', '-'])
            .next()
            .unwrap_or("0")
            .to_string()
    };
    let cpus = format!("{},{}", first_cpu(0), first_cpu(last));
    let hup = |daemon: &Child| {
        // SAFETY: kill with SIGHUP on our own child.
        unsafe { libc::kill(daemon.id() as libc::pid_t, libc::SIGHUP) };
        std::thread::sleep(Duration::from_millis(500));
    };
    // A scanner that passes every 2 s notices CPUs that move.
    let scan = format!("[scan]\ninterval = \"{POLICY_INTERVAL_S}s\"\ncpu_budget = \"50%\"\n");
    write_config(&scan)?;
    hup(daemon);
    ctl(&["replicate", LIBC])?;
    // `run` without --node keeps the CPUs it was given: both nodes.
    let spawn = || -> Result<Child, String> {
        Command::new("/bin/taskset")
            .args([
                "-c",
                &cpus,
                "/bin/replicactl",
                "--socket",
                SOCKET,
                "run",
                "--",
                "/usr/bin/sleep",
                "60",
            ])
            .env("REPLICAD_SOCKET", SOCKET)
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())
    };
    let left_alone = |pid: u32| -> Result<String, String> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(200));
            let st = json(&ctl(&["status", "--json"])?)?;
            let why = st["left_alone"]
                .as_array()
                .and_then(|l| l.iter().find(|e| e["pid"] == pid))
                .map(|e| e["reason"].as_str().unwrap_or("").to_string());
            if let Some(why) = why {
                return if why.contains("span several nodes") {
                    Ok(why)
                } else {
                    Err(format!("pid {pid} left alone for another reason: {why}"))
                };
            }
        }
        Err(format!(
            "sleep (pid {pid}) on cpus {cpus} is not listed as left alone"
        ))
    };
    let replica_dir = format!("{RUN_DIR}/node{last}/");
    let text_on_replica = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(&replica_dir) && l.split_whitespace().nth(1) == Some("r-xp"))
    };
    // Running, left alone, then both within 2 scan intervals: one whose
    // CPUs move onto the last node, one whose cgroup gets a home node.
    let deadline = Duration::from_secs(2 * POLICY_INTERVAL_S);
    let follows = |pid: u32| -> Option<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < deadline {
            if text_on_replica(pid) {
                return Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    };
    let mut moved = spawn()?;
    let mut homed = spawn()?;
    let result = (|| {
        let why = left_alone(moved.id())?;
        left_alone(homed.id())?;
        let one_cpu = first_cpu(last);
        sh(&format!(
            "taskset -a -p -c {one_cpu} {} >/dev/null",
            moved.id()
        ))?;
        let after_taskset =
            follows(moved.id()).ok_or_else(|| {
                format!(
                "sleep (pid {}) bound to cpu {one_cpu} (node {last}) while running did not map \
                 libc text from {replica_dir} within {deadline:?}; left alone: {}",
                moved.id(),
                ctl(&["status", "--json"])
                    .map(|s| json(&s).map(|j| j["left_alone"].clone()).unwrap_or_default())
                    .unwrap_or_default()
            )
            })?;
        if text_on_replica(homed.id()) {
            return Err(format!(
                "pid {} attached before its home node was named",
                homed.id()
            ));
        }
        // Name a home node for every cgroup and reload.
        write_config(&format!(
            "{scan}[[home_node]]\ncgroup = \"/\"\nnode = {last}\n"
        ))?;
        // SAFETY: as in hup.
        unsafe { libc::kill(daemon.id() as libc::pid_t, libc::SIGHUP) };
        let after_reload = follows(homed.id()).ok_or_else(|| {
            format!(
                "with home_node = {last}, the running sleep (pid {}) on cpus {cpus} did not map \
                 libc text from {replica_dir} within {deadline:?}; cgroup: {:?}",
                homed.id(),
                std::fs::read_to_string(format!("/proc/{}/cgroup", homed.id())).unwrap_or_default()
            )
        })?;
        Ok(format!(
            "cpus {cpus}: left alone ({why}); running, bound by taskset to node {last}: libc text \
             from its replica after {:.1} s; running, its cgroup given home node {last}: after \
             {:.1} s (limit {deadline:?})",
            after_taskset.as_secs_f64(),
            after_reload.as_secs_f64()
        ))
    })();
    for c in [&mut moved, &mut homed] {
        let _ = c.kill();
        let _ = c.wait();
    }
    write_config("")?;
    hup(daemon);
    result
}

/// `file` mapped whole, private and read-only, with plain mmap (the shim,
/// if preloaded, may swap it onto the node's replica); never unmapped.
fn map_private(file: &str) -> (*mut libc::c_void, usize) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(file).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a read-only private mapping of a file we opened.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    (p, len)
}

/// Map `file` with plain mmap (the shim, if preloaded, swaps it onto the
/// node's replica), touch every page, print the mapping's lines.
fn probe(file: &str) {
    let (p, len) = map_private(file);
    let mut sum = 0u64;
    for off in (0..len).step_by(PAGE) {
        // SAFETY: inside the mapping.
        sum = sum.wrapping_add(u64::from(unsafe {
            std::ptr::read_volatile((p as *const u8).add(off))
        }));
    }
    let addr = p as usize;
    let line = |file: &str| {
        let text = std::fs::read_to_string(file).unwrap();
        let key = format!("{addr:x}");
        BufReader::new(text.as_bytes())
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with(&key))
            .unwrap_or_default()
    };
    println!(
        "{}",
        serde_json::json!({
            "sum": sum,
            "maps": line("/proc/self/maps"),
            "numa_maps": line("/proc/self/numa_maps"),
        })
    );
}

/// Map `file` private read-only, print its address, then touch every page
/// every 100 ms for two minutes.
fn hold(file: &str) {
    let (p, len) = map_private(file);
    // Where our libc text is (the shim may move a replica over it later).
    let libc_at = std::fs::read_to_string("/proc/self/maps")
        .unwrap_or_default()
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("r-xp") && l.ends_with("libc.so.6"))
        .and_then(|l| l.split('-').next().map(str::to_string))
        .unwrap_or_default();
    println!(
        "{}",
        serde_json::json!({ "addr": format!("{:x}", p as usize), "libc": libc_at })
    );
    std::io::stdout().flush().unwrap();
    let t0 = Instant::now();
    let mut sum = 0u64;
    while t0.elapsed() < Duration::from_secs(120) {
        for off in (0..len).step_by(PAGE) {
            // SAFETY: inside the mapping (the shim falls back on SIGBUS).
            sum = sum.wrapping_add(u64::from(unsafe {
                std::ptr::read_volatile((p as *const u8).add(off))
            }));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::hint::black_box(sum);
}

/// Scan pacing of the policy scenarios.
const POLICY_INTERVAL_S: u64 = 2;

/// Restart the daemon on `config` (appended to the base config).
fn restart_daemon(daemon: &mut Child, config: &str) -> Result<(), String> {
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = std::fs::remove_file(SOCKET);
    write_config(config)?;
    *daemon = start_daemon();
    if !Path::new(SOCKET).exists() {
        return Err(format!("the daemon did not start: {}", daemon_log()));
    }
    Ok(())
}

fn policy_config(mode: &str, include: &str, budget: &str, extra: &str) -> String {
    format!(
        "[scan]\ninterval = \"{POLICY_INTERVAL_S}s\"\ncpu_budget = \"50%\"\n{extra}\n\
         [[policy]]\nname = \"guest\"\ncgroups = [\"/**\"]\nmode = \"{mode}\"\n\
         kinds = [\"text\", \"data\"]\ninclude = [{include}]\nmin_remote = \"4k\"\n\
         node_budget = \"{budget}\"\n"
    )
}

/// A fresh file of `mb` MiB cached on node 0: written from node 0, pushed
/// out of the page cache, then read back from node 0. drop_caches leaves a
/// page it cannot drop (one still in a CPU's LRU batch) where the writer
/// put it, so the writer runs on node 0 too: a CI run once found one page
/// of 2048 on node 1 when `dd` ran unbound.
fn cached_on_node0(path: &str, mb: usize) -> Result<(), String> {
    let write = format!(
        "dd if=/dev/urandom of={path} bs=1M count={mb} 2>/dev/null && sync && \
         echo 3 > /proc/sys/vm/drop_caches"
    );
    output(on_node(0, &["/bin/sh", "-c", &write]))?;
    output(on_node(0, &["/bin/cat", path])).map(|_| ())
}

/// A holder of `file` on `node` under the shim, and the address it mapped.
fn holder(node: u32, file: &str) -> Result<(Child, String), String> {
    holder_with_libc(node, file).map(|(c, a, _)| (c, a))
}

/// [`holder`], and the address of its libc text.
fn holder_with_libc(node: u32, file: &str) -> Result<(Child, String, String), String> {
    let mut c = on_node(node, &["/bin/replicad-guest", "hold", file]);
    c.stdout(Stdio::piped());
    let mut child = c.spawn().map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let v = json(&line)?;
    let addr = v["addr"].as_str().unwrap_or("").to_string();
    let libc_at = v["libc"].as_str().unwrap_or("").to_string();
    Ok((child, addr, libc_at))
}

/// The numa_maps line of `pid`'s mapping at `addr` (hex), and its maps path.
fn mapping_at(pid: u32, addr: &str) -> (String, String) {
    let numa = std::fs::read_to_string(format!("/proc/{pid}/numa_maps"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(&format!("{addr} ")))
        .unwrap_or("")
        .to_string();
    let path = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(&format!("{addr}-")))
        .map(|l| l.split_whitespace().nth(5).unwrap_or("").to_string())
        .unwrap_or_default();
    (numa, path)
}

/// The libc text mapping of `pid` at `at` (hex): its maps path and
/// numa_maps line.
fn libc_text(pid: u32, at: &str) -> (String, String) {
    let (numa, path) = mapping_at(pid, at);
    (path, numa)
}

/// The address holder `pid` (one of `children`: node 0's first) mapped.
fn holder_addr(children: &[Child], pid: u32, last: &str, first: &str) -> String {
    if children.first().map(Child::id) == Some(pid) {
        first.to_string()
    } else {
        last.to_string()
    }
}

fn kill_all(children: &mut [Child]) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn status_paths() -> Result<Vec<(String, Vec<String>)>, String> {
    let st = json(&ctl(&["status", "--json"])?)?;
    Ok(st["sources"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["path"].as_str().unwrap_or("").to_string(),
                        s["replicas"]
                            .as_array()
                            .map(|r| {
                                r.iter()
                                    .map(|r| r["target"].as_str().unwrap_or("").to_string())
                                    .collect()
                            })
                            .unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// After `policy`: the daemon is killed (`-9`) while the planner's copy of
/// the policy file sits on the last node, and the next daemon adopts it
/// from the fence keeper. It is still the planner's: with nobody mapping it,
/// it is dropped after `evict_after`; the operator's copies stay.
fn restart(ids: &[u32], daemon: &mut Child) -> Result<String, String> {
    let last = *ids.last().unwrap();
    let file = format!("{DATA}/policy-replicate.bin");
    let target = format!("node{last}");
    let has = |paths: &[(String, Vec<String>)], p: &str| {
        paths.iter().any(|(q, t)| q == p && t.contains(&target))
    };
    if !has(&status_paths()?, &file) {
        return Err(format!(
            "the policy scenario's copy of {file} on {target} is not there"
        ));
    }
    let include = format!("\"{DATA}/**\"");
    let config = policy_config("replicate", &include, "64m", "") + "evict_after = \"2s\"\n";
    restart_daemon(daemon, &config)?;
    let adopted = status_paths()?;
    if !has(&adopted, &file) || !has(&adopted, MODEL) {
        return Err(format!(
            "the restarted daemon did not take over {file} and {MODEL} on {target}: {adopted:?}"
        ));
    }
    let t0 = Instant::now();
    let deadline = Duration::from_secs(2 + 4 * POLICY_INTERVAL_S);
    loop {
        let now = status_paths()?;
        if !has(&now, &file) {
            if !has(&now, MODEL) {
                return Err(format!("the operator's copy of {MODEL} went too: {now:?}"));
            }
            return Ok(format!(
                "killed with -9, its successor adopted the planner's copy of {file} and dropped \
                 it {:.1} s later (evict_after 2 s, nobody maps it); the operator's {MODEL} stays",
                t0.elapsed().as_secs_f64()
            ));
        }
        if t0.elapsed() > deadline {
            return Err(format!(
                "the adopted copy of {file} is still there after {deadline:?} (evict_after 2 s): \
                 the new daemon takes it for the operator's; plan: {}",
                ctl(&["plan"]).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Processes on node 0 and on the last node, started before the daemon,
/// map a data file cached on node 0 and run libc text from node 0; a
/// `[[policy]]` in `mode` covers them. replicate: within 3 scan intervals
/// the last node's process maps only last-node pages of both, with no
/// `replicactl replicate`. observe: nothing changes, and `plan` shows the
/// copies it would make.
fn policy(ids: &[u32], daemon: &mut Child, mode: &str) -> Result<String, String> {
    let last = *ids.last().unwrap();
    let file = format!("{DATA}/policy-{mode}.bin");
    let _ = daemon.kill();
    let _ = daemon.wait();
    cached_on_node0(&file, 4)?;
    let pages = 4 * 256u64;
    let (h0, addr0) = holder(0, &file)?;
    let (hl, addr, libc_at) = holder_with_libc(last, &file)?;
    let mut children = vec![h0, hl];
    let pid = children[1].id();
    let include = format!("\"{DATA}/**\", \"{LIBC}\"");
    let started = Instant::now();
    let r = (|| -> Result<String, String> {
        restart_daemon(daemon, &policy_config(mode, &include, "64m", ""))?;
        let ready = started.elapsed();
        let deadline = Duration::from_secs(3 * POLICY_INTERVAL_S);
        let replica_dir = format!("{RUN_DIR}/node{last}/");
        let t0 = Instant::now();
        let (mut data_ok, mut text_ok) = (false, false);
        let (mut numa, mut path, mut text) =
            (String::new(), String::new(), (String::new(), String::new()));
        while t0.elapsed() < deadline + Duration::from_secs(2) {
            (numa, path) = mapping_at(pid, &addr);
            text = libc_text(pid, &libc_at);
            let h = pages_per_node(&numa);
            data_ok = path.starts_with(&replica_dir) && all_on(&h, last, pages);
            let th = pages_per_node(&text.1);
            text_ok = text.0.starts_with(&replica_dir)
                && th.get(&last).copied().unwrap_or(0) > 0
                && th.iter().all(|(n, p)| *n == last || *p == 0);
            if mode == "replicate" && data_ok && text_ok {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let took = t0.elapsed();
        if mode == "replicate" {
            if !(data_ok && text_ok) || took > deadline {
                return Err(format!(
                    "after {:.1} s (deadline {} s = 3 intervals): data {path} [{numa}]; libc text {} [{}]; plan: {}",
                    took.as_secs_f64(),
                    deadline.as_secs(),
                    text.0,
                    text.1,
                    ctl(&["plan"]).unwrap_or_default()
                ));
            }
            return Ok(format!(
                "daemon up {:.1} s after the holders; within {:.1} s (3 intervals = {} s) the node-{last} \
                 holder maps {} and libc text {} from its node: {} / {}",
                ready.as_secs_f64(),
                took.as_secs_f64(),
                deadline.as_secs(),
                path,
                text.0,
                histogram(&pages_per_node(&numa)),
                histogram(&pages_per_node(&text.1))
            ));
        }
        // observe: still the file's own pages on node 0, no replica, and a
        // plan that names the copies.
        let h = pages_per_node(&numa);
        let plan = json(&ctl(&["plan", "--json"])?)?;
        let wants = plan["actions"].as_array().is_some_and(|a| {
            a.iter().any(|x| {
                x["action"] == "replicate"
                    && x["path"] == file.as_str()
                    && x["node"] == last
                    && x["mode"] == "observe"
            })
        });
        // (Replicas of earlier scenarios were adopted from the fence
        // keeper by the restarted daemon: only this file must have none.)
        let copied = status_paths()?.iter().any(|(p, _)| p == &file);
        if path != file || !all_on(&h, 0, pages) || copied || !wants {
            return Err(format!(
                "observe changed something or planned nothing: {path} [{numa}]; replica made: {copied}; status {:?}; plan {plan}",
                status_paths()?
            ));
        }
        // heat agrees with both holders' own numa_maps, page for page.
        let heat = json(&ctl(&["heat", "--json", &file])?)?;
        let row = &heat["rows"][0];
        let mut mapped: BTreeMap<u32, u64> = BTreeMap::new();
        for c in &children {
            let (n, _) = mapping_at(c.id(), &holder_addr(&children, c.id(), &addr, &addr0));
            for (node, p) in pages_per_node(&n) {
                let e = mapped.entry(node).or_default();
                *e = (*e).max(p);
            }
        }
        let heat_mapped: BTreeMap<u32, u64> = row["mapped_pages"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default();
        let remote_last = row["remote_bytes"][last.to_string()].as_u64().unwrap_or(0);
        if heat_mapped != mapped
            || remote_last != pages * PAGE as u64
            || row["sharers"]["0"] != 1
            || row["sharers"][last.to_string()] != 1
        {
            return Err(format!(
                "heat disagrees with the holders' numa_maps ({}): {row}",
                histogram(&mapped)
            ));
        }
        Ok(format!(
            "observe: the node-{last} holder still maps {file} on node 0 ({}), no replica; heat \
             agrees with numa_maps ({}, {remote_last} bytes remote on node {last}); plan: {}",
            histogram(&h),
            histogram(&mapped),
            ctl(&["plan"])?
                .lines()
                .filter(|l| l.contains("replicate"))
                .collect::<Vec<_>>()
                .join("; ")
        ))
    })();
    kill_all(&mut children);
    r
}

/// A file used only by a last-node process, its page cache on node 0: the
/// planner migrates the pages (numa_maps of the process shows them on its
/// node, mapped from the file itself) and makes no replica.
fn migrate(ids: &[u32], daemon: &mut Child) -> Result<String, String> {
    let last = *ids.last().unwrap();
    let file = format!("{DATA}/migrate.bin");
    let _ = daemon.kill();
    let _ = daemon.wait();
    cached_on_node0(&file, 2)?;
    let pages = 2 * 256u64;
    let (hl, addr) = holder(last, &file)?;
    let mut children = vec![hl];
    let pid = children[0].id();
    let r = (|| -> Result<String, String> {
        let include = format!("\"{DATA}/migrate.bin\"");
        restart_daemon(daemon, &policy_config("replicate", &include, "64m", ""))?;
        let deadline = Duration::from_secs(3 * POLICY_INTERVAL_S);
        let t0 = Instant::now();
        let (mut numa, mut path) = (String::new(), String::new());
        while t0.elapsed() < deadline + Duration::from_secs(2) {
            (numa, path) = mapping_at(pid, &addr);
            if path == file && all_on(&pages_per_node(&numa), last, pages) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let took = t0.elapsed();
        let h = pages_per_node(&numa);
        let replicated = status_paths()?.iter().any(|(p, _)| p == &file);
        if path != file || !all_on(&h, last, pages) || replicated || took > deadline {
            return Err(format!(
                "after {:.1} s: {path} [{numa}]; in status: {replicated}; log: {}",
                took.as_secs_f64(),
                daemon_log()
            ));
        }
        Ok(format!(
            "migrated in {:.1} s: the node-{last} holder maps {file} itself, {}, no replica",
            took.as_secs_f64(),
            histogram(&h)
        ))
    })();
    kill_all(&mut children);
    r
}

/// Three candidate files, a budget that fits two: the two with the most
/// remote bytes are copied, the third is reported over budget.
fn budget(ids: &[u32], daemon: &mut Child) -> Result<String, String> {
    let last = *ids.last().unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let files: Vec<(String, usize)> = [(2usize, "small"), (6, "large"), (4, "middle")]
        .iter()
        .map(|(mb, n)| (format!("{DATA}/budget-{n}.bin"), *mb))
        .collect();
    let mut children = Vec::new();
    for (f, mb) in &files {
        cached_on_node0(f, *mb)?;
    }
    for (f, _) in &files {
        // A sharer on each node: copies, not migrations.
        children.push(holder(0, f)?.0);
        children.push(holder(last, f)?.0);
    }
    let r = (|| -> Result<String, String> {
        let include = format!("\"{DATA}/budget-*\"");
        // 6 + 4 MiB fit in 11 MiB; 2 more do not.
        restart_daemon(daemon, &policy_config("replicate", &include, "11m", ""))?;
        let t0 = Instant::now();
        let want = |st: &[(String, Vec<String>)], n: &str| {
            st.iter().any(|(p, t)| {
                p.ends_with(&format!("budget-{n}.bin")) && t.contains(&format!("node{last}"))
            })
        };
        while t0.elapsed() < Duration::from_secs(4 * POLICY_INTERVAL_S) {
            let st = status_paths()?;
            if want(&st, "large") && want(&st, "middle") {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        std::thread::sleep(Duration::from_secs(POLICY_INTERVAL_S));
        let st = status_paths()?;
        let plan = json(&ctl(&["plan", "--json"])?)?;
        let over = plan["actions"].as_array().is_some_and(|a| {
            a.iter().any(|x| {
                x["action"] == "skip"
                    && x["path"]
                        .as_str()
                        .is_some_and(|p| p.ends_with("budget-small.bin"))
                    && x["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("over budget"))
            })
        });
        if !want(&st, "large") || !want(&st, "middle") || want(&st, "small") || !over {
            return Err(format!("status {st:?}; plan {plan}"));
        }
        Ok(format!(
            "budget 11 MiB on node {last}: large (6 MiB) and middle (4 MiB) copied, small reported over budget"
        ))
    })();
    kill_all(&mut children);
    r
}

/// Two planner copies, then a free-memory watermark no node meets (a
/// reload): the copy with the least benefit goes first, then the other.
fn pressure(ids: &[u32], daemon: &mut Child) -> Result<String, String> {
    let last = *ids.last().unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let files = [
        (format!("{DATA}/pressure-a.bin"), 1usize),
        (format!("{DATA}/pressure-b.bin"), 3),
    ];
    let mut children = Vec::new();
    for (f, mb) in &files {
        cached_on_node0(f, *mb)?;
    }
    for (f, _) in &files {
        children.push(holder(0, f)?.0);
        children.push(holder(last, f)?.0);
    }
    let r = (|| -> Result<String, String> {
        let include = format!("\"{DATA}/pressure-*\"");
        restart_daemon(daemon, &policy_config("replicate", &include, "64m", ""))?;
        let has = |st: &[(String, Vec<String>)], f: &str| st.iter().any(|(p, _)| p == f);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(4 * POLICY_INTERVAL_S) {
            let st = status_paths()?;
            if has(&st, &files[0].0) && has(&st, &files[1].0) {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let st = status_paths()?;
        if !(has(&st, &files[0].0) && has(&st, &files[1].0)) {
            return Err(format!("the planner did not copy both files: {st:?}"));
        }
        // Memory is short from now on: every node under 100% free.
        write_config(&policy_config(
            "replicate",
            &include,
            "64m",
            "min_free = \"100%\"",
        ))?;
        // SAFETY: kill with SIGHUP on our own child.
        unsafe { libc::kill(daemon.id() as libc::pid_t, libc::SIGHUP) };
        let mut order = Vec::new();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(6 * POLICY_INTERVAL_S) && order.len() < 2 {
            let st = status_paths()?;
            for (f, _) in &files {
                if !has(&st, f) && !order.contains(f) {
                    order.push(f.clone());
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if order.first() != Some(&files[0].0) || order.len() != 2 {
            return Err(format!(
                "evicted in order {order:?} (want a, the smaller benefit, first, then b); log: {}",
                daemon_log()
            ));
        }
        Ok(format!(
            "under pressure: {} (1 MiB remote) went first, then {}",
            order[0], order[1]
        ))
    })();
    kill_all(&mut children);
    let _ = write_config("");
    r
}

/// A file rewritten every second, read from both nodes: not replicated, or
/// evicted once its writes are seen, and `plan` says why.
fn written(ids: &[u32], daemon: &mut Child) -> Result<String, String> {
    let last = *ids.last().unwrap();
    let file = format!("{DATA}/written.bin");
    let _ = daemon.kill();
    let _ = daemon.wait();
    cached_on_node0(&file, 1)?;
    let mut children = vec![holder(0, &file)?.0, holder(last, &file)?.0];
    // Rewrites the first page in place every second.
    children.push(
        Command::new("/bin/sh")
            .args([
                "-c",
                &format!(
                    "while true; do dd if=/dev/urandom of={file} bs=4096 count=1 conv=notrunc 2>/dev/null; sleep 1; done"
                ),
            ])
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    let r = (|| -> Result<String, String> {
        let include = format!("\"{file}\"");
        restart_daemon(daemon, &policy_config("replicate", &include, "64m", ""))?;
        std::thread::sleep(Duration::from_secs(5 * POLICY_INTERVAL_S));
        let copied = status_paths()?.iter().any(|(p, _)| p == &file);
        let plan = json(&ctl(&["plan", "--json"])?)?;
        let why = plan["actions"].as_array().and_then(|a| {
            a.iter()
                .find(|x| x["path"] == file.as_str() && x["action"] == "skip")
                .map(|x| x["reason"].as_str().unwrap_or("").to_string())
        });
        match (copied, why) {
            (false, Some(w)) if w.contains("not read-mostly") => Ok(format!(
                "rewritten every second: no copy after {} s; plan: {w}",
                5 * POLICY_INTERVAL_S
            )),
            (c, w) => Err(format!(
                "copied: {c}; skip reason: {w:?}; plan {plan}; log: {}",
                daemon_log()
            )),
        }
    })();
    kill_all(&mut children);
    r
}
