//! The planner: from the heat map, the policies and what is replicated
//! now, what to copy where, what to migrate, and what to drop.
//!
//! ```text
//!  per file (its policy not off):
//!    written more than max_writes_per_hour ── skip (evict a copy once it
//!                                             is over twice that: hysteresis)
//!    every sharer on node X, its pages elsewhere ── migrate the page cache to X
//!    per node X with >= min_sharers and >= min_remote remote bytes ── candidate
//!  candidates by remote bytes, most first, into each node's budget;
//!  the rest: over budget
//!  copies the planner made: unattached for evict_after ── evict
//!  memory pressure: no new copies; evict the least benefit first
//! ```
//!
//! Pure: no I/O, so every decision is a unit test.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::policy::{Kind, Mode, Policies, ScanConfig};
use super::scan::SourceHeat;
use crate::model::SourceKey;

/// One decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Copy the file to `node`: `remote` bytes there would turn local.
    Replicate {
        key: SourceKey,
        path: String,
        node: u32,
        bytes: u64,
        remote: u64,
    },
    /// Move the file's page cache to `node`, where all its users run.
    Migrate {
        key: SourceKey,
        path: String,
        node: u32,
        pages: u64,
    },
    /// Drop the planner's copy of the file on `node`.
    Evict {
        key: SourceKey,
        path: String,
        node: u32,
        bytes: u64,
        reason: String,
    },
    /// Left as it is, and why.
    Skip {
        key: SourceKey,
        path: String,
        node: Option<u32>,
        reason: String,
    },
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Replicate { .. } => "replicate",
            Action::Migrate { .. } => "migrate",
            Action::Evict { .. } => "evict",
            Action::Skip { .. } => "skip",
        }
    }

    pub fn path(&self) -> &str {
        match self {
            Action::Replicate { path, .. }
            | Action::Migrate { path, .. }
            | Action::Evict { path, .. }
            | Action::Skip { path, .. } => path,
        }
    }
}

/// One decision with the policy that made it.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub action: Action,
    pub policy: String,
    pub mode: Mode,
}

/// A copy that exists now.
#[derive(Debug, Clone, PartialEq)]
pub struct Existing {
    pub key: SourceKey,
    pub path: String,
    pub node: u32,
    pub bytes: u64,
    /// The planner made it (it may evict it); `replicactl replicate` and
    /// `[[replicate]]` copies are the operator's.
    pub planned: bool,
    /// Remote bytes it turned local when it was planned.
    pub benefit: u64,
    /// How long no process has mapped it (zero: mapped now).
    pub unattached_for: Duration,
}

/// What the planner needs to know about the machine now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Machine {
    /// Memory of each node, bytes.
    pub node_bytes: BTreeMap<u32, u64>,
    /// Memory is short (PSI, or a node's free memory under the watermark):
    /// make no copy, drop the least useful.
    pub pressure: bool,
    pub page_size: u64,
}

/// What the planner would do now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Planned>,
    /// Budget of the planner's copies per node (of the policy that used the
    /// most), and bytes it uses (existing planned copies plus new ones).
    pub budget: BTreeMap<u32, u64>,
    pub used: BTreeMap<u32, u64>,
}

impl Plan {
    /// Actions of one kind.
    pub fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Planned> {
        self.actions.iter().filter(move |a| a.action.kind() == kind)
    }
}

/// Why a file written `h.writes_per_hour` times an hour is left alone.
fn not_read_mostly(h: &SourceHeat, scan: &ScanConfig) -> String {
    format!(
        "written {:.0} times an hour (more than {:.0}): not read-mostly",
        h.writes_per_hour, scan.max_writes_per_hour
    )
}

/// Decide. `heat` from the scanner, `existing` every copy there is now.
pub fn plan(
    heat: &[SourceHeat],
    policies: &Policies,
    scan: &ScanConfig,
    existing: &[Existing],
    machine: &Machine,
) -> Plan {
    let page = machine.page_size.max(1);
    let mut out = Plan::default();
    let have: BTreeSet<(SourceKey, u32)> = existing.iter().map(|e| (e.key, e.node)).collect();
    let mut used: BTreeMap<u32, u64> = BTreeMap::new();
    for e in existing.iter().filter(|e| e.planned) {
        *used.entry(e.node).or_default() += e.bytes;
    }
    let by_key: BTreeMap<SourceKey, &SourceHeat> = heat.iter().map(|h| (h.key, h)).collect();
    // Each node's budget: the largest any policy that may copy gives it.
    for (&node, &bytes) in &machine.node_bytes {
        let b = policies
            .list
            .iter()
            .filter(|p| p.mode != Mode::Off)
            .map(|p| p.node_budget.bytes(bytes))
            .max()
            .unwrap_or(0);
        out.budget.insert(node, b);
        used.entry(node).or_default();
    }
    let push = |out: &mut Plan, policy: usize, action: Action| {
        let (name, mode) = policies
            .list
            .get(policy)
            .map(|p| (p.name.clone(), p.mode))
            .unwrap_or_else(|| ("-".into(), Mode::Observe));
        out.actions.push(Planned {
            action,
            policy: name,
            mode,
        });
    };
    // Drop `e`, and give its bytes back to its node's budget.
    let evict = |out: &mut Plan,
                 used: &mut BTreeMap<u32, u64>,
                 policy: usize,
                 e: &Existing,
                 reason: String| {
        if let Some(u) = used.get_mut(&e.node) {
            *u = u.saturating_sub(e.bytes);
        }
        push(
            out,
            policy,
            Action::Evict {
                key: e.key,
                path: e.path.clone(),
                node: e.node,
                bytes: e.bytes,
                reason,
            },
        );
    };
    // Evictions first: they free budget for the copies below.
    let mut evicted: BTreeSet<(SourceKey, u32)> = BTreeSet::new();
    for e in existing.iter().filter(|e| e.planned) {
        let h = by_key.get(&e.key);
        // A copy no process maps has no heat row: the first replicate
        // policy that wants its path decides (its evict_after, not 10 min).
        let policy = h.map(|h| h.policy).unwrap_or_else(|| {
            policies
                .list
                .iter()
                .position(|p| {
                    p.mode == Mode::Replicate
                        && [Kind::Text, Kind::Data]
                            .iter()
                            .any(|k| p.wants(&e.path, *k))
                })
                .unwrap_or(usize::MAX)
        });
        let p = policies.list.get(policy);
        let reason =
            if let Some(h) = h.filter(|h| h.writes_per_hour > 2.0 * scan.max_writes_per_hour) {
                Some(not_read_mostly(h, scan))
            } else {
                let after = p.map(|p| p.evict_after).unwrap_or(Duration::from_secs(600));
                (e.unattached_for >= after)
                    .then(|| format!("no process mapped it for {} s", e.unattached_for.as_secs()))
            };
        if let Some(reason) = reason {
            evicted.insert((e.key, e.node));
            evict(&mut out, &mut used, policy, e, reason);
        }
    }
    if machine.pressure {
        // The least useful planned copy goes; one per run, until the
        // pressure is gone.
        if let Some(e) = existing
            .iter()
            .filter(|e| e.planned && !evicted.contains(&(e.key, e.node)))
            .min_by_key(|e| (e.benefit, std::cmp::Reverse(e.bytes)))
        {
            let policy = by_key.get(&e.key).map(|h| h.policy).unwrap_or(usize::MAX);
            let reason = format!(
                "memory pressure: least benefit ({} remote bytes)",
                e.benefit
            );
            evict(&mut out, &mut used, policy, e, reason);
        }
    }
    // Candidates.
    let mut candidates: Vec<(u64, &SourceHeat, u32)> = Vec::new();
    for h in heat {
        let Some(p) = policies.list.get(h.policy) else {
            continue;
        };
        if p.mode == Mode::Off {
            continue;
        }
        let skip = |out: &mut Plan, node: Option<u32>, reason: String| {
            push(
                out,
                h.policy,
                Action::Skip {
                    key: h.key,
                    path: h.path.clone(),
                    node,
                    reason,
                },
            )
        };
        if h.remote_pages() == 0 {
            continue;
        }
        if h.writes_per_hour > scan.max_writes_per_hour {
            skip(&mut out, None, not_read_mostly(h, scan));
            continue;
        }
        // Every user on one node, the pages elsewhere: move them there.
        let users: Vec<u32> = h.sharers.keys().copied().collect();
        let replicated = existing.iter().any(|e| e.key == h.key);
        if users.len() == 1 && h.sharers_spanning == 0 && !replicated {
            let node = users[0];
            let local = h.resident.get(&node).copied().unwrap_or(0);
            let elsewhere: u64 = h
                .resident
                .iter()
                .filter(|(n, _)| **n != node)
                .map(|(_, c)| c)
                .sum();
            if local == 0 && elsewhere > 0 && elsewhere * page >= p.min_remote {
                // A migration costs no memory: pressure does not stop it.
                push(
                    &mut out,
                    h.policy,
                    Action::Migrate {
                        key: h.key,
                        path: h.path.clone(),
                        node,
                        pages: elsewhere,
                    },
                );
                continue;
            }
        }
        for (&node, &remote) in &h.remote {
            if remote == 0 || have.contains(&(h.key, node)) && !evicted.contains(&(h.key, node)) {
                continue;
            }
            let sharers = h.sharers.get(&node).copied().unwrap_or(0);
            if sharers < p.min_sharers {
                skip(
                    &mut out,
                    Some(node),
                    format!(
                        "{sharers} process(es) on node {node}, fewer than min_sharers {}",
                        p.min_sharers
                    ),
                );
                continue;
            }
            if remote * page < p.min_remote {
                skip(
                    &mut out,
                    Some(node),
                    format!(
                        "{} remote bytes on node {node}, under min_remote {}",
                        remote * page,
                        p.min_remote
                    ),
                );
                continue;
            }
            candidates.push((remote * page, h, node));
        }
    }
    candidates.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then(a.1.path.cmp(&b.1.path))
            .then(a.2.cmp(&b.2))
    });
    for (remote, h, node) in candidates {
        let p = &policies.list[h.policy];
        let budget = p
            .node_budget
            .bytes(machine.node_bytes.get(&node).copied().unwrap_or(0));
        let b = out.budget.entry(node).or_default();
        *b = (*b).max(budget);
        let bytes = h.mapped_bytes.div_ceil(page) * page;
        let u = used.entry(node).or_default();
        let skip = if machine.pressure {
            Some("memory pressure: no new copies".to_string())
        } else if *u + bytes > budget {
            Some(format!(
                "over budget on node {node}: needs {bytes} bytes, {} of {budget} left",
                budget.saturating_sub(*u)
            ))
        } else {
            None
        };
        if let Some(reason) = skip {
            push(
                &mut out,
                h.policy,
                Action::Skip {
                    key: h.key,
                    path: h.path.clone(),
                    node: Some(node),
                    reason,
                },
            );
            continue;
        }
        *u += bytes;
        push(
            &mut out,
            h.policy,
            Action::Replicate {
                key: h.key,
                path: h.path.clone(),
                node,
                bytes,
                remote,
            },
        );
    }
    out.used = used;
    out
}

#[cfg(test)]
mod tests {
    use super::super::policy::{Budget, Kind, Policy};
    use super::*;

    fn policy(mode: Mode, budget: u64) -> Policies {
        Policies {
            list: vec![Policy {
                name: "p".into(),
                cgroups: vec!["/**".into()],
                mode,
                include: vec![],
                exclude: vec![],
                kinds: vec![Kind::Text, Kind::Data],
                min_sharers: 1,
                min_remote: 4096,
                node_budget: Budget::Bytes(budget),
                huge_pages: false,
                evict_after: Duration::from_secs(60),
            }],
        }
    }

    /// `pages` of a file on node 0, mapped by a process on node 1.
    fn remote_file(ino: u64, pages: u64) -> SourceHeat {
        SourceHeat {
            key: SourceKey { dev: 1, ino },
            path: format!("/f{ino}"),
            kinds: vec![Kind::Data],
            mapped_bytes: pages * 4096,
            sharers: [(1, 1)].into(),
            sharers_spanning: 0,
            resident: [(0, pages)].into(),
            remote: [(1, pages)].into(),
            writes_per_hour: 0.0,
            policy: 0,
        }
    }

    fn shared(mut h: SourceHeat) -> SourceHeat {
        // A node-0 user too: copying, not migrating.
        h.sharers.insert(0, 1);
        h.remote.insert(0, 0);
        h
    }

    fn machine() -> Machine {
        Machine {
            node_bytes: [(0, 1 << 30), (1, 1 << 30)].into(),
            pressure: false,
            page_size: 4096,
        }
    }

    #[test]
    fn budget_takes_the_most_remote_bytes_first() {
        let heat = vec![
            shared(remote_file(1, 100)),
            shared(remote_file(2, 300)),
            shared(remote_file(3, 200)),
        ];
        let p = plan(
            &heat,
            &policy(Mode::Replicate, 500 * 4096),
            &ScanConfig::default(),
            &[],
            &machine(),
        );
        let copied: Vec<&str> = p.of_kind("replicate").map(|a| a.action.path()).collect();
        assert_eq!(copied, ["/f2", "/f3"]);
        let skipped: Vec<&Planned> = p.of_kind("skip").collect();
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].action.path(), "/f1");
        assert!(format!("{:?}", skipped[0].action).contains("over budget"));
        assert_eq!(p.used[&1], 500 * 4096);
    }

    #[test]
    fn one_node_of_users_migrates_instead_of_copying() {
        let heat = vec![remote_file(1, 10)];
        let p = plan(
            &heat,
            &policy(Mode::Replicate, 1 << 30),
            &ScanConfig::default(),
            &[],
            &machine(),
        );
        assert_eq!(p.actions.len(), 1, "{p:?}");
        assert!(matches!(
            p.actions[0].action,
            Action::Migrate {
                node: 1,
                pages: 10,
                ..
            }
        ));
    }

    #[test]
    fn written_files_are_skipped_and_evicted_with_hysteresis() {
        let mut h = shared(remote_file(1, 10));
        h.writes_per_hour = 10.0;
        let scan = ScanConfig::default();
        let p = plan(
            &[h.clone()],
            &policy(Mode::Replicate, 1 << 30),
            &scan,
            &[],
            &machine(),
        );
        assert_eq!(p.of_kind("replicate").count(), 0);
        assert!(format!("{p:?}").contains("not read-mostly"));
        let e = Existing {
            key: h.key,
            path: h.path.clone(),
            node: 1,
            bytes: 40960,
            planned: true,
            benefit: 40960,
            unattached_for: Duration::ZERO,
        };
        // 10/h: not copied again, but the copy stays (under twice the limit).
        let p = plan(
            &[h.clone()],
            &policy(Mode::Replicate, 1 << 30),
            &scan,
            std::slice::from_ref(&e),
            &machine(),
        );
        assert_eq!(p.of_kind("evict").count(), 0, "{p:?}");
        h.writes_per_hour = 3600.0;
        let p = plan(
            &[h],
            &policy(Mode::Replicate, 1 << 30),
            &scan,
            &[e],
            &machine(),
        );
        assert_eq!(p.of_kind("evict").count(), 1, "{p:?}");
    }

    #[test]
    fn unattached_copies_go_after_evict_after_and_operator_copies_stay() {
        let h = shared(remote_file(1, 10));
        let mut e = Existing {
            key: h.key,
            path: h.path.clone(),
            node: 1,
            bytes: 40960,
            planned: true,
            benefit: 1,
            unattached_for: Duration::from_secs(61),
        };
        let pol = policy(Mode::Replicate, 1 << 30);
        let p = plan(
            std::slice::from_ref(&h),
            &pol,
            &ScanConfig::default(),
            &[e.clone()],
            &machine(),
        );
        assert_eq!(p.of_kind("evict").count(), 1);
        // No process maps it at all (no heat row): the policy that wants
        // its path still decides, after its evict_after (60 s), not 10 min.
        let p = plan(&[], &pol, &ScanConfig::default(), &[e.clone()], &machine());
        assert_eq!(p.of_kind("evict").count(), 1, "{p:?}");
        e.unattached_for = Duration::from_secs(59);
        let p = plan(&[], &pol, &ScanConfig::default(), &[e.clone()], &machine());
        assert_eq!(p.of_kind("evict").count(), 0, "{p:?}");
        e.unattached_for = Duration::from_secs(61);
        e.planned = false;
        let p = plan(&[h], &pol, &ScanConfig::default(), &[e], &machine());
        assert_eq!(p.of_kind("evict").count(), 0);
    }

    #[test]
    fn pressure_evicts_least_benefit_first_and_copies_nothing() {
        let heat = vec![shared(remote_file(9, 10))];
        let mk = |ino, benefit| Existing {
            key: SourceKey { dev: 1, ino },
            path: format!("/e{ino}"),
            node: 1,
            bytes: 4096,
            planned: true,
            benefit,
            unattached_for: Duration::ZERO,
        };
        let existing = vec![mk(1, 500), mk(2, 100), mk(3, 900)];
        let mut m = machine();
        m.pressure = true;
        let p = plan(
            &heat,
            &policy(Mode::Replicate, 1 << 30),
            &ScanConfig::default(),
            &existing,
            &m,
        );
        let ev: Vec<&str> = p.of_kind("evict").map(|a| a.action.path()).collect();
        assert_eq!(ev, ["/e2"]);
        assert_eq!(p.of_kind("replicate").count(), 0);
    }

    #[test]
    fn thresholds_are_reported() {
        let mut pol = policy(Mode::Observe, 1 << 30);
        pol.list[0].min_sharers = 2;
        let p = plan(
            &[shared(remote_file(1, 10))],
            &pol,
            &ScanConfig::default(),
            &[],
            &machine(),
        );
        assert!(format!("{p:?}").contains("min_sharers"), "{p:?}");
        assert_eq!(p.actions[0].mode, Mode::Observe);
    }
}
