//! Heat, plan, top and migrate against a real daemon and real processes
//! on this machine (one NUMA node: nothing is remote here, so what is
//! checked is that `heat` counts exactly what the processes' own
//! numa_maps show and the page cache holds; placement across nodes is in
//! tests/guest_numa.rs, the planner's decisions in the engine's unit tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const FAST_SCAN_INTERVAL: &str = "interval = \"200ms\"";
const FAST_SCAN: &str = "[scan]\ninterval = \"200ms\"\ncpu_budget = \"50%\"\n";

/// python3 mapping `file` private and read-only, every page touched; it
/// runs until killed.
fn mapper(file: &Path) -> Child {
    let mut c = Command::new("python3")
        .args([
            "-c",
            "import mmap,sys\nf=open(sys.argv[1],'rb')\n\
             m=mmap.mmap(f.fileno(),0,flags=mmap.MAP_PRIVATE,prot=mmap.PROT_READ)\n\
             s=sum(m[i] for i in range(0,len(m),4096))\nprint('ready',flush=True)\nsys.stdin.read()",
            file.to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    c
}

/// Pages per node of `file` in `pid`'s numa_maps, summed over its ranges.
fn numa_pages(pid: u32, file: &Path) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/numa_maps")).unwrap();
    text.lines()
        .filter(|l| l.contains(&format!("file={}", file.display())))
        .flat_map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.strip_prefix('N')?.split_once('=')?.1.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

fn sum(v: &serde_json::Value) -> u64 {
    v.as_object()
        .map(|m| m.values().filter_map(|x| x.as_u64()).sum())
        .unwrap_or(0)
}

#[test]
fn heat_counts_what_numa_maps_and_the_page_cache_show() {
    if !root_or_skip("heat_counts_what_numa_maps_and_the_page_cache_show") {
        return;
    }
    let d = Daemon::start(FAST_SCAN);
    let dir = scratch("heat");
    let file = dir.path().join("weights.bin");
    make_file(&file, 48 * 4096, 3);
    let mut m1 = mapper(&file);
    let mut m2 = mapper(&file);
    let want = numa_pages(m1.id(), &file);
    assert_eq!(want, 48, "the mapper touched every page");
    let out = d.ctl_ok(&["heat", "--json", file.to_str().unwrap()]);
    let v = json(&out);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{v}");
    let r = &rows[0];
    assert_eq!(sum(&r["mapped_pages"]), want, "{r}");
    assert_eq!(r["mapped_pages"]["0"], want, "{r}");
    assert_eq!(r["sharers"]["0"], 2, "{r}");
    assert_eq!(sum(&r["remote_bytes"]), 0, "one node: nothing remote: {r}");
    assert_eq!(r["cached_pages"]["0"], 48, "{r}");
    assert_eq!(r["kinds"][0], "data");
    // The table says the same.
    let table = d.ctl_ok(&["heat", file.to_str().unwrap()]);
    assert!(
        table.contains("N0=48") && table.contains("weights.bin"),
        "{table}"
    );
    // A file nobody maps, named: a row with its page cache only.
    let idle = dir.path().join("idle.bin");
    make_file(&idle, 5 * 4096, 1);
    let v = json(&d.ctl_ok(&["heat", "--json", idle.to_str().unwrap()]));
    assert_eq!(v["rows"][0]["cached_pages"]["0"], 5, "{v}");
    assert_eq!(sum(&v["rows"][0]["sharers"]), 0, "{v}");
    // The planner's own passes (default policies cover every cgroup) see
    // the mappers too, and count themselves in the metrics.
    let t0 = Instant::now();
    let found = loop {
        let v = json(&d.ctl_ok(&["heat", "--json"]));
        let hit = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["path"] == file.to_str().unwrap())
            .cloned();
        // A pass that began before the second mapper mapped counts one.
        if let (Some(r), true) = (hit, v["passes"].as_u64().unwrap_or(0) > 0) {
            if r["sharers"]["0"] == 2 || t0.elapsed() > Duration::from_secs(20) {
                break Some(r);
            }
        }
        if t0.elapsed() > Duration::from_secs(20) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let r = found.expect("the planner's pass never saw the mapped file");
    assert_eq!(r["sharers"]["0"], 2, "{r}");
    assert_eq!(
        r["policy"], "data",
        "the default data policy covers it: {r}"
    );
    assert!(d.metric("replicad_scan_passes_total") >= 1.0);
    assert!(d.metric("replicad_scan_processes") >= 2.0);
    for c in [&mut m1, &mut m2] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn plan_and_top_report_without_changing_anything() {
    if !root_or_skip("plan_and_top_report_without_changing_anything") {
        return;
    }
    let d = Daemon::start(FAST_SCAN);
    let t0 = Instant::now();
    let plan = loop {
        let v = json(&d.ctl_ok(&["plan", "--json"]));
        if v["note"] == "" || t0.elapsed() > Duration::from_secs(20) {
            break v;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(plan["note"], "", "no plan after 20 s: {plan}");
    // One node: no file is remote, so no copy is planned, and the budget
    // of the default policies is shown.
    assert!(
        plan["actions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["action"] != "replicate"),
        "{plan}"
    );
    assert!(plan["budget"]["0"].as_u64().unwrap() >= 256 << 20, "{plan}");
    let table = d.ctl_ok(&["plan"]);
    assert!(
        table.contains("node 0:") && table.contains("budget used"),
        "{table}"
    );
    let top = d.ctl_ok(&["top", "--once", "--rows", "3"]);
    assert!(
        top.contains("replicad top") && top.contains("REMOTE"),
        "{top}"
    );
    assert!(top.lines().count() <= 3 + 3, "{top}");
    assert!(
        d.status().sources.is_empty(),
        "plan and top changed nothing"
    );
}

#[test]
fn migrate_moves_the_page_cache_and_names_a_missing_node() {
    if !root_or_skip("migrate_moves_the_page_cache_and_names_a_missing_node") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("migrate");
    let file = dir.path().join("index.bin");
    make_file(&file, 20 * 4096, 9);
    let out = d.ctl_ok(&["migrate", "--node", "0", file.to_str().unwrap()]);
    assert!(
        out.contains("pages moved to node 0") && out.contains("after N0=20"),
        "{out}"
    );
    let e = d.ctl_err(&["migrate", "--node", "7", file.to_str().unwrap()]);
    assert!(e.contains('7'), "{e}");
    let e = d.ctl_err(&["migrate", "--node", "0", "/nonexistent/x"]);
    assert!(e.contains("/nonexistent/x"), "{e}");
    assert!(
        d.status().sources.is_empty(),
        "a migration makes no replica"
    );
}

#[test]
fn check_config_refuses_a_bad_policy_with_file_line_and_reason() {
    let dir = scratch("policy-config");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[[policy]]\nname = \"llama\"\ncgroups = [\"/system.slice/llama-*.service\"]\n\
         mode = \"replicate\"\nnode_budget = \"150%\"\n",
    )
    .unwrap();
    let out = Command::new(REPLICAD)
        .arg("--check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains(&format!(
            "{}:5: policy[0] (llama).node_budget",
            cfg.display()
        )),
        "{e}"
    );
    std::fs::write(
        &cfg,
        "[scan]\ninterval = \"5s\"\n[[policy]]\nname = \"llama\"\n\
         cgroups = [\"/system.slice/llama-*.service\"]\nmode = \"observe\"\nkinds = [\"data\"]\n\
         include = [\"/srv/models/**\"]\nmin_remote = \"4m\"\nnode_budget = \"25%\"\nevict_after = \"10m\"\n",
    )
    .unwrap();
    let out = Command::new(REPLICAD)
        .arg("--check-config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A reload that shortens the scan interval applies at once: the planner
/// does not sleep out the interval it was started with (an hour here).
#[test]
fn a_reload_to_a_shorter_interval_applies_without_waiting_out_the_old_one() {
    if !root_or_skip("a_reload_to_a_shorter_interval_applies_without_waiting_out_the_old_one") {
        return;
    }
    let d = Daemon::start("[scan]\ninterval = \"1h\"\n");
    let passes = || d.metric("replicad_scan_passes_total");
    let t0 = Instant::now();
    while passes() < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(20), "no first pass");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(passes(), 1.0, "one pass an hour");
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        text.replace("interval = \"1h\"", FAST_SCAN_INTERVAL),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    let t0 = Instant::now();
    while passes() < 3.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{} passes 10 s after the reload to 200 ms:\n{}",
            passes(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
