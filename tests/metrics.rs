//! Every metric is moved by something a test does (as firecracker's
//! `test_unused_metrics`): a real daemon runs through a scenario that
//! exercises every family it exports, and the test fails on any family that
//! stayed at its initial value throughout.
//!
//! Adding a metric? This test fails until the scenario below moves it (or,
//! if nothing outside the daemon can, until it is in [`CANNOT_MOVE`] with
//! the reason and an engine unit test covers it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};

use common::*;

/// Families this scenario cannot move, each with the reason. Each must be
/// covered by an engine unit test or the outside test it names instead.
const CANNOT_MOVE: &[(&str, &str)] = &[
    (
        "replicad_planner_actions_total",
        "the planner copies or migrates only pages read from another node, and \
     nothing is remote on a one-node machine; moved by the policy scenarios of \
     tests/guest_numa.rs (2 and 4 nodes); the decisions themselves by replicator \
     heat::plan::tests",
    ),
    (
        "replicad_planner_budget_used_bytes",
        "counts the planner's own copies, which need remote pages (see \
     replicad_planner_actions_total); moved in tests/guest_numa.rs",
    ),
    (
        "replicad_remote_mapped_bytes",
        "remote-mapped bytes need a second node; moved in tests/guest_numa.rs; \
     the counting by replicator heat::tests::heat_folds_processes_into_files_as_numa_maps_says",
    ),
    (
        "replicad_misplaced_pages_total",
        "pages land off their node only when the kernel ignores the store's \
     mpol=bind/mbind (memory pressure on the node); a test cannot provoke \
     that from outside, least of all on a one-node machine; moved by \
     replicator engine::tests::a_failed_copy_leaves_no_lease_held",
    ),
    (
        "replicad_forced_breaks_total",
        "the kernel breaks a lease by force only after lease-break-time (45 s by \
     default, a global setting); moved by replicator \
     engine::tests::a_lease_the_kernel_broke_by_force_is_counted and, with the \
     setting lowered, by tests/forced_break.rs",
    ),
    (
        "replicad_pages_migrated_total",
        "on a one-node machine every page is on node 0 already (counted as \
     already, not migrated: tests/heat.rs runs replicactl migrate to node 0); \
     moved only where pages leave another node, in the migrate scenario of \
     tests/guest_numa.rs; the engine call is covered by replicator \
     engine::tests::migrate_to_node0_leaves_every_resident_page_on_node0",
    ),
    (
        "replicad_private_pages_carried_total",
        "moves only when a program under the shim wrote privately (a debugger's \
     breakpoint) in a replica-backed range before a revoke; moved by \
     tests/private_pages.rs, which runs such a program",
    ),
];

/// What one scrape says: family -> (type, whether any sample left its
/// initial value: counter > 0, gauge != 0, histogram count > 0).
#[derive(Debug, Default)]
struct Scrape {
    types: BTreeMap<String, String>,
    help: BTreeSet<String>,
    moved: BTreeSet<String>,
}

fn parse(text: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap();
            s.types.insert(name.to_string(), ty.to_string());
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, help)) = rest.split_once(' ') {
                if !help.trim().is_empty() {
                    s.help.insert(name.to_string());
                }
            }
        }
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad sample {line:?}"));
        let name = series.split('{').next().unwrap();
        let (family, moved) = match name.strip_suffix("_count") {
            Some(f) if s.types.get(f).is_some_and(|t| t == "histogram") => (f, value > 0.0),
            _ => match s.types.get(name).map(String::as_str) {
                Some("counter") => (name, value > 0.0),
                Some("gauge") => (name, value != 0.0),
                // Histogram buckets and sums; untyped samples.
                _ => continue,
            },
        };
        if moved {
            s.moved.insert(family.to_string());
        }
    }
    s
}

/// Scrapes during a scenario; a family counts as moved if any scrape saw
/// it moved (gauges go back to zero).
struct Watch<'a> {
    d: &'a Daemon,
    seen: BTreeMap<String, String>,
    help: BTreeSet<String>,
    moved: BTreeSet<String>,
    scrapes: usize,
}

impl Watch<'_> {
    fn scrape(&mut self) {
        let s = parse(&self.d.http_get("/metrics"));
        self.seen.extend(s.types);
        self.help.extend(s.help);
        self.moved.extend(s.moved);
        self.scrapes += 1;
    }
}

#[test]
fn every_metric_is_moved_by_a_test() {
    if !root_or_skip("every_metric_is_moved_by_a_test") {
        return;
    }
    // Room for the small files, not for the big one (replication fails
    // for want of space).
    let mut d = Daemon::start("[store]\nsize = \"4m\"\n");
    let dir = scratch("metrics-all");
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let big = dir.path().join("big");
    make_file(&a, 1 << 20, 1);
    make_file(&b, 512 << 10, 2);
    make_file(&big, 8 << 20, 3);
    let (a_s, b_s, big_s) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        big.to_str().unwrap(),
    );

    // A crash of the daemon alone: its fence keeper fences on. A writer
    // comes meanwhile: the keeper revokes that replica (it stays in the
    // store, cut to nothing). The restarted daemon takes the other over
    // and removes the revoked one as a leftover.
    d.ctl_ok(&["replicate", "--nodes", "0", a_s, b_s]);
    d.crash();
    std::fs::OpenOptions::new().write(true).open(&b).unwrap();
    d.restart();
    assert_eq!(d.status().sources.len(), 1, "{}", d.log());
    assert_eq!(d.metric("replicad_adopted_replicas_total"), 1.0);
    assert_eq!(d.metric("replicad_leftovers_removed_total"), 1.0);

    let registered: BTreeSet<String> = replicad_replicator::Metrics::new()
        .unwrap()
        .families()
        .iter()
        .map(|f| f.name.clone())
        .collect();
    let mut w = Watch {
        d: &d,
        seen: BTreeMap::new(),
        help: BTreeSet::new(),
        moved: BTreeSet::new(),
        scrapes: 0,
    };
    w.scrape();

    // Replicate, and read it as a client.
    d.ctl_ok(&["replicate", "--nodes", "0", a_s]);
    w.scrape();
    let out = d.ctl_ok(&["map", a_s]);
    assert!(out.contains("replica on node0"), "{out}");
    w.scrape();

    // A writer breaks the fence: revoke, the writer's wait measured.
    std::fs::OpenOptions::new().write(true).open(&a).unwrap();
    w.scrape();

    // Evict.
    d.ctl_ok(&["replicate", "--nodes", "0", b_s]);
    d.ctl_ok(&["evict", b_s]);
    w.scrape();

    // Fence failure: the file is open for writing by another process.
    let mut holder = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 3>>'{}'; echo ready; read _", b.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    let e = d.ctl_err(&["replicate", b_s]);
    assert!(e.contains("open for writing"), "{e}");
    drop(holder.stdin.take());
    holder.wait().unwrap();
    w.scrape();

    // Replication failure: the store is full.
    let e = d.ctl_err(&["replicate", "--nodes", "0", big_s]);
    assert!(e.contains("is full"), "{e}");
    w.scrape();

    // A reload that names a home node: programs following the set are
    // nudged to look again.
    let config = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        format!("{config}\n[[home_node]]\ncgroup = \"/\"\nnode = 0\n"),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    let t0 = std::time::Instant::now();
    while !d.log().contains("configuration reloaded") {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    w.scrape();

    let (seen, help, moved, scrapes) = (w.seen, w.help, w.moved, w.scrapes);
    let exempt: BTreeSet<String> = CANNOT_MOVE.iter().map(|(n, _)| n.to_string()).collect();
    for name in &exempt {
        assert!(
            registered.contains(name),
            "{name} is in CANNOT_MOVE but no longer registered: drop it from the list"
        );
    }
    let mut problems = Vec::new();
    for name in &registered {
        if !seen.contains_key(name) {
            problems.push(format!(
                "{name}: registered but never in /metrics (a labelled family with no series: \
                 create its series at zero in Metrics::new or Metrics::add_target)"
            ));
        }
    }
    for name in seen.keys() {
        if !help.contains(name) {
            problems.push(format!("{name}: no HELP text"));
        }
        if !moved.contains(name) && !exempt.contains(name) {
            problems.push(format!(
                "{name}: never left its initial value in {scrapes} scrapes: make this \
                 scenario move it, or list it in CANNOT_MOVE with the reason"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n\nlast scrape:\n{}",
        problems.join("\n"),
        d.http_get("/metrics")
    );
    // Restart's leftover is counted by the restarted process.
    assert_eq!(d.metric("replicad_leftovers_removed_total"), 1.0);
}

/// The parser of this test sees what it must: a histogram moves by its
/// count, a gauge by any nonzero value, a counter by a positive one.
#[test]
fn scrape_parser() {
    let text =
        "# HELP a_total A.\n# TYPE a_total counter\na_total{r=\"x\"} 0\na_total{r=\"y\"} 2\n\
                # HELP g G.\n# TYPE g gauge\ng{t=\"node0\"} 0\n\
                # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 0\nh_sum 0\nh_count 0\n\
                # HELP k K.\n# TYPE k gauge\nk -1\n";
    let s = parse(text);
    assert_eq!(s.types.len(), 4);
    assert_eq!(s.help.len(), 4);
    assert_eq!(
        s.moved,
        ["a_total", "k"].iter().map(|x| x.to_string()).collect()
    );
}
