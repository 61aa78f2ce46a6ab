//! Placement on machines with 2 and 4 NUMA nodes, proven in a QEMU guest
//! (this machine has one node): see tests/guest/mod.rs for the guest and
//! tests/programs/guest.rs for what runs inside it.
//!
//! One guest boots per node count, the first time one of its scenarios is
//! checked, and runs every scenario; each test then checks its own
//! scenario's line:
//! - `baseline`: a file cached by a process on node 0 and read by a process
//!   bound to the last node shows its pages on node 0 (remote), so the
//!   replicated check below could fail;
//! - `replicated`: after replication, a process on each node maps only its
//!   node's pages, through the client API and through the shim, and
//!   replicad's own placement check (`move_pages`) agrees;
//! - `coherence`: a verifying reader on every node, a writer on node 0
//!   rewriting through every writer path: 0 bad words;
//! - `text`: coreutils `sleep` bound to the last node under the shim runs
//!   libc text whose pages are on the last node;
//! - `spanning`: a process whose CPUs span two nodes is left alone (and
//!   `status` says why); while it runs, `taskset` onto the last node or a
//!   `[[home_node]]` for its cgroup puts it on that node's replicas within
//!   2 scan intervals (it is re-examined, no restart);
//! - `policy`: with no `replicactl replicate`, processes started before the
//!   daemon (a data file cached on node 0, libc text) end up on their
//!   node's pages within 3 scan intervals, by a `mode = "replicate"`
//!   policy; `observe`: the same under `mode = "observe"` changes nothing
//!   and `plan` shows the copy, and `heat` agrees with both processes'
//!   numa_maps page for page;
//! - `restart`: after `policy`, a daemon killed with `-9` and its successor:
//!   the adopted copy is still the planner's (dropped after `evict_after`
//!   once nobody maps it), the operator's copies stay;
//! - `migrate`: a file used only on the last node is migrated, not copied;
//! - `budget`: a budget that fits two of three files copies the two with
//!   the most remote bytes and reports the third over budget;
//! - `written`: a file rewritten every second is not copied (or dropped);
//! - `pressure`: memory pressure (a free-memory watermark no node meets)
//!   drops the planner's copies, least benefit first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod guest;

use std::sync::OnceLock;

use guest::GuestRun;

static TWO: OnceLock<GuestRun> = OnceLock::new();
static FOUR: OnceLock<GuestRun> = OnceLock::new();

fn run(nodes: u32) -> &'static GuestRun {
    let cell = if nodes == 2 { &TWO } else { &FOUR };
    cell.get_or_init(|| guest::boot(nodes, ""))
}

fn check(nodes: u32, scenario: &str) {
    let run = run(nodes);
    eprintln!(
        "{nodes}-node guest: boot {} s, guest uptime at /init {} s, run {:.1} s",
        run.boot_secs.map_or("?".into(), |b| format!("{b:.1}")),
        run.guest_uptime.map_or("?".into(), |u| format!("{u:.2}")),
        run.wall.as_secs_f64()
    );
    assert_eq!(
        run.reported_nodes,
        Some(nodes),
        "the {nodes}-node guest's kernel does not see {nodes} nodes; console tail:\n{}",
        run.tail(60)
    );
    let Some((passed, detail)) = run.scenario(scenario) else {
        panic!(
            "the {nodes}-node guest printed no result for {scenario} (exit {:?}); console \
             tail:\n{}",
            run.exit,
            run.tail(60)
        );
    };
    eprintln!("{nodes} nodes, {scenario}: {detail}");
    assert!(
        passed,
        "{nodes} nodes, {scenario}: {detail}\nconsole tail:\n{}",
        run.tail(80)
    );
}

#[test]
fn two_nodes_baseline_reads_remote_pages() {
    check(2, "baseline");
}

#[test]
fn two_nodes_replicas_are_node_local() {
    check(2, "replicated");
}

#[test]
fn two_nodes_coherence_across_nodes() {
    check(2, "coherence");
}

#[test]
fn two_nodes_libc_text_on_the_last_node() {
    check(2, "text");
}

#[test]
fn four_nodes_baseline_reads_remote_pages() {
    check(4, "baseline");
}

#[test]
fn four_nodes_replicas_are_node_local() {
    check(4, "replicated");
}

#[test]
fn four_nodes_coherence_across_nodes() {
    check(4, "coherence");
}

#[test]
fn four_nodes_libc_text_on_the_last_node() {
    check(4, "text");
}

#[test]
fn two_nodes_spanning_process_left_alone_unless_policy_names_a_home() {
    check(2, "spanning");
}

#[test]
fn four_nodes_spanning_process_left_alone_unless_policy_names_a_home() {
    check(4, "spanning");
}

#[test]
fn two_nodes_policy_replicates_for_running_processes() {
    check(2, "policy");
}

#[test]
fn four_nodes_policy_replicates_for_running_processes() {
    check(4, "policy");
}

#[test]
fn two_nodes_the_planner_keeps_its_copies_across_a_kill_9() {
    check(2, "restart");
}

#[test]
fn four_nodes_the_planner_keeps_its_copies_across_a_kill_9() {
    check(4, "restart");
}

#[test]
fn two_nodes_observe_changes_nothing_and_plans() {
    check(2, "observe");
}

#[test]
fn four_nodes_observe_changes_nothing_and_plans() {
    check(4, "observe");
}

#[test]
fn two_nodes_single_node_users_get_a_migration() {
    check(2, "migrate");
}

#[test]
fn four_nodes_single_node_users_get_a_migration() {
    check(4, "migrate");
}

#[test]
fn two_nodes_budget_takes_the_most_remote_bytes() {
    check(2, "budget");
}

#[test]
fn two_nodes_a_file_rewritten_every_second_is_not_copied() {
    check(2, "written");
}

#[test]
fn two_nodes_pressure_drops_the_least_benefit_first() {
    check(2, "pressure");
}

#[test]
fn guest_exits_cleanly_on_both_node_counts() {
    for n in [2, 4] {
        let run = run(n);
        assert_eq!(
            run.exit,
            Some(0),
            "{n}-node guest did not finish cleanly; console tail:\n{}",
            run.tail(60)
        );
    }
}
