//! The planner loop: step the scanner under its CPU budget, plan, and
//! carry out what a `replicate` policy allows. The daemon calls
//! [`Planner::tick`] once per scan interval from its own thread;
//! `replicactl heat` and `plan` read what the last tick handed over.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use replicad_procfs::ProcReader;

use super::plan::{plan, Action, Existing, Machine, Plan};
use super::policy::{Budget, Mode, Policies, ScanConfig};
use super::scan::{Scanner, SourceHeat};
use crate::model::{NodeSelection, SourceKey, Target};
use crate::Replicator;

/// Memory pressure thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pressure {
    /// PSI `memory` `some avg10` above this percentage.
    pub psi_some_avg10: f64,
    /// A node with less free memory than this.
    pub min_free: Option<Budget>,
}

/// A copy the planner made.
#[derive(Debug, Clone)]
struct Made {
    benefit: u64,
    unattached_since: Option<Instant>,
}

/// What the last tick did.
#[derive(Debug, Clone, Default)]
pub struct TickReport {
    pub pass_ended: bool,
    pub planned: bool,
    pub carried_out: Vec<String>,
    pub failed: Vec<String>,
    pub pressure: Option<String>,
    /// What the tick saw and planned (empty until the first full pass).
    pub heat: Vec<SourceHeat>,
    pub plan: Plan,
}

/// The scanner and the planner's memory of its own copies; each tick
/// hands what it saw and planned to its caller ([`TickReport`]).
#[derive(Debug)]
pub struct Planner {
    scanner: Scanner,
    proc: ProcReader,
    made: HashMap<(SourceKey, u32), Made>,
    /// Where `made` is kept across restarts ([`OWNED_FILE`] in the run
    /// directory): replicas a daemon killed with `-9` left to the fence
    /// keeper are adopted by the next one, and stay the planner's to drop.
    owned_file: PathBuf,
    /// `made`'s keys as last written there.
    owned_written: BTreeSet<(SourceKey, u32)>,
    last_cpu: Duration,
    /// Files whose page cache was moved, where and when: not moved again
    /// for [`MIGRATE_AGAIN_AFTER`] (pages that would not move stay put).
    migrated: HashMap<SourceKey, (u32, Instant)>,
}

/// The planner's copies, one `dev ino node benefit` line each, in the run
/// directory.
pub const OWNED_FILE: &str = "planner.owned";

/// The copies listed in `path` ([`OWNED_FILE`]): a missing file is none, a
/// line that does not parse is skipped (the file is the daemon's own, in
/// its private run directory; a torn or old one loses only ownership).
pub fn load_owned(path: &Path) -> BTreeMap<(SourceKey, u32), u64> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return BTreeMap::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_ascii_whitespace();
            let dev = w.next()?.parse().ok()?;
            let ino = w.next()?.parse().ok()?;
            let node = w.next()?.parse().ok()?;
            let benefit = w.next()?.parse().ok()?;
            w.next()
                .is_none()
                .then_some(((SourceKey { dev, ino }, node), benefit))
        })
        .collect()
}

/// Write `owned` to `path` whole: a new file renamed over the old one.
pub fn save_owned(path: &Path, owned: &BTreeMap<(SourceKey, u32), u64>) -> std::io::Result<()> {
    let mut text = String::new();
    for ((k, node), benefit) in owned {
        text.push_str(&format!("{} {} {node} {benefit}\n", k.dev, k.ino));
    }
    let tmp = path.with_extension("owned.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// How long a migrated file is left alone before it is tried again.
const MIGRATE_AGAIN_AFTER: Duration = Duration::from_secs(300);

/// PSI `some avg10` of `<proc>/pressure/memory`, if the kernel has PSI.
pub fn psi_memory_some(proc: &ProcReader) -> Option<f64> {
    let text = std::fs::read_to_string(proc.root().join("pressure/memory")).ok()?;
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("avg10="))
        .and_then(|v| v.parse().ok())
}

/// Free bytes of each node, from sysfs `meminfo` (`Node N MemFree: X kB`).
pub fn node_free_bytes(sys_node_dir: &Path, nodes: &[u32]) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for &n in nodes {
        let Ok(text) = std::fs::read_to_string(sys_node_dir.join(format!("node{n}/meminfo")))
        else {
            continue;
        };
        let free = text.lines().find_map(|l| {
            let rest = l.split_once("MemFree:")?.1;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        });
        if let Some(kb) = free {
            out.insert(n, kb * 1024);
        }
    }
    out
}

impl Planner {
    /// A planner that takes back the copies its predecessor on the same run
    /// directory listed as its own (those no longer there are forgotten at
    /// the first plan).
    pub fn new(replicator: &Replicator, proc: ProcReader) -> Planner {
        let owned_file = replicator.run_dir().join(OWNED_FILE);
        let owned = load_owned(&owned_file);
        let made = owned
            .iter()
            .map(|(k, benefit)| {
                let m = Made {
                    benefit: *benefit,
                    unattached_since: None,
                };
                (*k, m)
            })
            .collect();
        Planner {
            scanner: Scanner::new(
                proc.clone(),
                replicator.topology().clone(),
                replicator.run_dir().to_path_buf(),
            ),
            proc,
            made,
            owned_file,
            owned_written: owned.into_keys().collect(),
            last_cpu: Duration::ZERO,
            migrated: HashMap::new(),
        }
    }

    pub fn scanner(&self) -> &Scanner {
        &self.scanner
    }

    /// Whether memory is short now, and why.
    fn pressure(&self, replicator: &Replicator, p: &Pressure) -> Option<String> {
        if let Some(avg) = psi_memory_some(&self.proc) {
            if avg > p.psi_some_avg10 {
                return Some(format!(
                    "PSI memory some avg10 {avg:.1}% > {:.1}%",
                    p.psi_some_avg10
                ));
            }
        }
        let min = p.min_free?;
        let topo = replicator.topology();
        let ids: Vec<u32> = topo.nodes.iter().map(|n| n.id).collect();
        let free = node_free_bytes(Path::new("/sys/devices/system/node"), &ids);
        for n in &topo.nodes {
            let want = min.bytes(n.memory_bytes);
            if let Some(f) = free.get(&n.id) {
                if *f < want {
                    return Some(format!(
                        "node {} has {f} bytes free, under min_free {want}",
                        n.id
                    ));
                }
            }
        }
        None
    }

    /// One interval's work: a scanner step; once a full pass has been
    /// seen, a plan; in `replicate` mode, the plan carried out.
    pub fn tick(
        &mut self,
        replicator: &Replicator,
        policies: &Policies,
        scan: &ScanConfig,
        pressure: &Pressure,
    ) -> TickReport {
        let mut report = TickReport {
            pass_ended: self.scanner.step(policies, scan.step_budget()),
            ..TickReport::default()
        };
        replicator.recheck_left_alone();
        for key in replicator.take_write_breaks() {
            self.scanner.note_write(key);
        }
        let metrics = replicator.metrics();
        if report.pass_ended {
            if let Some(s) = self.scanner.last_pass() {
                metrics.scan_passes.inc();
                metrics.scan_cpu_seconds.inc_by(s.cpu.as_secs_f64());
                metrics.scan_seconds.observe(s.wall.as_secs_f64());
                metrics
                    .scan_processes
                    .set(i64::try_from(s.processes).unwrap_or(i64::MAX));
                self.last_cpu = s.cpu;
            }
        }
        if !self.scanner.complete() {
            return report;
        }
        let heat = self.scanner.heat();
        let status = replicator.status();
        let now = Instant::now();
        let mut existing = Vec::new();
        let mut live: BTreeSet<(SourceKey, u32)> = BTreeSet::new();
        for s in &status.sources {
            for r in &s.replicas {
                let Target::Node(node) = r.target else {
                    continue;
                };
                live.insert((s.key, node));
                let made = self.made.get_mut(&(s.key, node));
                let planned = made.is_some();
                let (benefit, unattached_for) = match made {
                    Some(m) => {
                        if r.attachments.is_empty() {
                            let since = *m.unattached_since.get_or_insert(now);
                            (m.benefit, now.duration_since(since))
                        } else {
                            m.unattached_since = None;
                            (m.benefit, Duration::ZERO)
                        }
                    }
                    None => (0, Duration::ZERO),
                };
                existing.push(Existing {
                    key: s.key,
                    path: s.path.to_string_lossy().into_owned(),
                    node,
                    bytes: r.bytes,
                    planned,
                    benefit,
                    unattached_for,
                });
            }
        }
        // Copies that went (a write, an operator's evict) are no longer ours.
        self.made.retain(|k, _| live.contains(k));
        let topo = replicator.topology();
        report.pressure = self.pressure(replicator, pressure);
        let machine = Machine {
            node_bytes: topo.nodes.iter().map(|n| (n.id, n.memory_bytes)).collect(),
            pressure: report.pressure.is_some(),
            page_size: replicad_procfs::page_size() as u64,
        };
        let plan = plan(&heat, policies, scan, &existing, &machine);
        report.planned = true;
        // Remote bytes now and without the copies.
        let page = machine.page_size;
        for n in &topo.nodes {
            let now_remote: u64 =
                heat.iter().filter_map(|h| h.remote.get(&n.id)).sum::<u64>() * page;
            let turned: u64 = existing
                .iter()
                .filter(|e| e.node == n.id)
                .map(|e| e.benefit)
                .sum();
            let label = n.id.to_string();
            metrics
                .remote_mapped_bytes
                .with_label_values(&[&label, "now"])
                .set(i64::try_from(now_remote).unwrap_or(i64::MAX));
            metrics
                .remote_mapped_bytes
                .with_label_values(&[&label, "without_replicas"])
                .set(i64::try_from(now_remote + turned).unwrap_or(i64::MAX));
            metrics.planner_budget.with_label_values(&[&label]).set(
                i64::try_from(plan.budget.get(&n.id).copied().unwrap_or(0)).unwrap_or(i64::MAX),
            );
        }
        let mut gone: BTreeSet<SourceKey> = BTreeSet::new();
        for p in &plan.actions {
            if p.mode != Mode::Replicate {
                continue;
            }
            match &p.action {
                Action::Replicate {
                    key,
                    path,
                    node,
                    remote,
                    ..
                } => {
                    let mut nodes: BTreeSet<u32> = existing
                        .iter()
                        .filter(|e| e.key == *key)
                        .map(|e| e.node)
                        .collect();
                    nodes.insert(*node);
                    match replicator.replicate_expected(
                        Path::new(path),
                        *key,
                        &NodeSelection::List(nodes.into_iter().collect()),
                    ) {
                        Ok(_) => {
                            self.made.insert(
                                (*key, *node),
                                Made {
                                    benefit: *remote,
                                    unattached_since: None,
                                },
                            );
                            metrics
                                .planner_actions
                                .with_label_values(&["replicate"])
                                .inc();
                            report
                                .carried_out
                                .push(format!("replicate {path} on node {node}"));
                        }
                        Err(e) => report
                            .failed
                            .push(format!("replicate {path} on node {node}: {e}")),
                    }
                }
                Action::Evict {
                    key, path, node, ..
                } => {
                    // Only a source whose every copy is the planner's goes
                    // whole; the operator's copies stay.
                    let all_ours = existing.iter().filter(|e| e.key == *key).all(|e| e.planned);
                    // One evict drops the whole source: a second action for
                    // another of its nodes has nothing left to do.
                    if !all_ours || !gone.insert(*key) {
                        continue;
                    }
                    match replicator.evict(Path::new(path)) {
                        Ok(_) => {
                            self.made.retain(|k, _| k.0 != *key);
                            metrics.planner_actions.with_label_values(&["evict"]).inc();
                            report
                                .carried_out
                                .push(format!("evict {path} (node {node})"));
                        }
                        Err(e) => report.failed.push(format!("evict {path}: {e}")),
                    }
                }
                Action::Migrate {
                    key, path, node, ..
                } => {
                    if self
                        .migrated
                        .get(key)
                        .is_some_and(|(n, at)| n == node && at.elapsed() < MIGRATE_AGAIN_AFTER)
                    {
                        continue;
                    }
                    self.migrated.insert(*key, (*node, Instant::now()));
                    match replicator.migrate_expected(Path::new(path), *key, *node) {
                        Ok(m) => {
                            metrics
                                .planner_actions
                                .with_label_values(&["migrate"])
                                .inc();
                            report.carried_out.push(format!(
                                "migrate {path} to node {node}: {} pages moved, {} could not move",
                                m.moved, m.failed
                            ));
                        }
                        Err(e) => report
                            .failed
                            .push(format!("migrate {path} to node {node}: {e}")),
                    }
                }
                Action::Skip { .. } => {}
            }
        }
        let mut used: BTreeMap<u32, u64> = BTreeMap::new();
        for ((_, node), _) in self.made.iter() {
            let bytes: u64 = status
                .sources
                .iter()
                .flat_map(|s| s.replicas.iter().map(move |r| (s.key, r)))
                .filter(|(k, r)| {
                    r.target == Target::Node(*node) && self.made.contains_key(&(*k, *node))
                })
                .map(|(_, r)| r.bytes)
                .sum();
            used.insert(*node, bytes);
        }
        for n in &topo.nodes {
            metrics
                .planner_budget_used
                .with_label_values(&[&n.id.to_string()])
                .set(i64::try_from(used.get(&n.id).copied().unwrap_or(0)).unwrap_or(i64::MAX));
        }
        report.plan = plan;
        report.heat = heat;
        self.save_owned();
        report
    }

    /// Write [`OWNED_FILE`] when the planner's copies changed.
    fn save_owned(&mut self) {
        let keys: BTreeSet<(SourceKey, u32)> = self.made.keys().copied().collect();
        if keys == self.owned_written {
            return;
        }
        let owned: BTreeMap<(SourceKey, u32), u64> =
            self.made.iter().map(|(k, m)| (*k, m.benefit)).collect();
        match save_owned(&self.owned_file, &owned) {
            Ok(()) => self.owned_written = keys,
            Err(e) => crate::warn_limited!(
                "cannot write {} (the planner's copies, for the next daemon): {e}",
                self.owned_file.display()
            ),
        }
    }
}
