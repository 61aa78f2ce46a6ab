//! The planner's thread and what the control socket reads of it: one
//! [`Planner`], owned by its thread and stepped once per scan interval,
//! its policies swapped on SIGHUP. After each tick the thread publishes
//! what it saw ([`Seen`]); `heat`, `plan` and `top` read that, and never
//! wait for a tick that is copying a large file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use replicad_procfs::ProcReader;
use replicad_replicator::heat::{
    Action, PassStats, Plan, Planner, Policies, Policy, Pressure, Scanner, SourceHeat, TickReport,
};
use replicad_replicator::model::Target;
use replicad_replicator::Replicator;
use replicad_wire::proto::{HeatReport, HeatRow, PlanReport, PlanRow};

use crate::config::Heat;

/// The planner's config and what it last saw, shared by its thread and
/// the server.
pub struct HeatState {
    seen: Mutex<Arc<Seen>>,
    config: Mutex<Heat>,
    /// Signalled with `config` changed: the thread's wait for the next
    /// tick ends early, so a shorter interval applies at once.
    reloaded: Condvar,
}

static STATE: OnceLock<Arc<HeatState>> = OnceLock::new();

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Start the planner thread (once per daemon).
/// The planner's last tick, as the handlers read it.
#[derive(Debug, Default)]
struct Seen {
    /// A full pass has finished since the daemon started.
    complete: bool,
    passes: u64,
    last_pass: PassStats,
    heat: Vec<SourceHeat>,
    plan: Plan,
}

impl Seen {
    /// The scanner's counts, and the heat and plan the tick hands over.
    fn of(planner: &Planner, report: &mut TickReport) -> Seen {
        let scanner = planner.scanner();
        Seen {
            complete: scanner.complete(),
            passes: scanner.passes(),
            last_pass: scanner.last_pass().unwrap_or_default(),
            heat: std::mem::take(&mut report.heat),
            plan: std::mem::take(&mut report.plan),
        }
    }
}

pub fn start(engine: &Replicator, heat: Heat) -> anyhow::Result<()> {
    let mut planner = Planner::new(engine, ProcReader::default());
    let state = Arc::new(HeatState {
        seen: Mutex::new(Arc::new(Seen::default())),
        config: Mutex::new(heat),
        reloaded: Condvar::new(),
    });
    let _ = STATE.set(state.clone());
    let engine = engine.clone();
    std::thread::Builder::new()
        .name("replicad-plan".into())
        .spawn(move || loop {
            let cfg = lock(&state.config).clone();
            let t0 = Instant::now();
            let pressure = Pressure {
                psi_some_avg10: cfg.psi_some_avg10,
                min_free: cfg.min_free,
            };
            let mut report = planner.tick(&engine, &cfg.policies, &cfg.scan, &pressure);
            *lock(&state.seen) = Arc::new(Seen::of(&planner, &mut report));
            for c in &report.carried_out {
                tracing::info!("planner: {c}");
            }
            for f in &report.failed {
                tracing::warn!("planner: {f}");
            }
            if let Some(p) = &report.pressure {
                tracing::debug!("planner: memory pressure: {p}");
            }
            if engine.is_stopped() {
                return;
            }
            state.wait_for_next_tick(t0);
        })?;
    Ok(())
}

/// New policies and pacing (a reload).
pub fn reload(heat: Heat) {
    if let Some(s) = STATE.get() {
        *lock(&s.config) = heat;
        s.reloaded.notify_all();
    }
}

impl HeatState {
    /// Until one interval has passed since the tick that began at `t0`,
    /// by the interval in force: one a reload shortened ends the wait then.
    fn wait_for_next_tick(&self, t0: Instant) {
        let mut cfg = lock(&self.config);
        loop {
            let left = cfg.scan.interval.saturating_sub(t0.elapsed());
            if left.is_zero() {
                return;
            }
            cfg = self
                .reloaded
                .wait_timeout(cfg, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

use crate::wire::by_node;

/// Wire rows of `heat`, with each file's replica pages.
fn rows(
    engine: &Replicator,
    heat: &[SourceHeat],
    policies: &Policies,
    paths: &[PathBuf],
) -> Vec<HeatRow> {
    let status = engine.status();
    let page = replicad_procfs::page_size() as u64;
    let keys: Vec<(u64, u64)> = paths
        .iter()
        .filter_map(|p| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
        })
        .collect();
    let mut out: Vec<HeatRow> = heat
        .iter()
        .filter(|h| paths.is_empty() || keys.contains(&(h.key.dev, h.key.ino)))
        .map(|h| {
            let mut replica_pages = BTreeMap::new();
            if let Some(s) = status.sources.iter().find(|s| s.key == h.key) {
                for r in &s.replicas {
                    if let Target::Node(n) = r.target {
                        replica_pages.insert(n.to_string(), r.pages);
                    }
                }
            }
            HeatRow {
                path: PathBuf::from(&h.path),
                dev: h.key.dev,
                ino: h.key.ino,
                kinds: h.kinds.iter().map(|k| k.name().to_string()).collect(),
                mapped_bytes: h.mapped_bytes,
                sharers: by_node(&h.sharers),
                sharers_spanning: h.sharers_spanning,
                mapped_pages: by_node(&h.resident),
                remote_bytes: h
                    .remote
                    .iter()
                    .map(|(n, p)| (n.to_string(), p * page))
                    .collect(),
                replica_pages,
                cached_pages: BTreeMap::new(),
                writes_per_hour: h.writes_per_hour.round() as u64,
                policy: policies
                    .list
                    .get(h.policy)
                    .map(|p| p.name.clone())
                    .unwrap_or_default(),
            }
        })
        .collect();
    // Named files: their whole page cache, and a row even if no process
    // maps them.
    for p in paths {
        let Ok(f) = std::fs::File::open(p) else {
            continue;
        };
        let Ok(md) = f.metadata() else {
            continue;
        };
        use std::os::unix::fs::MetadataExt;
        let (dev, ino) = (md.dev(), md.ino());
        let cached = replicad_replicator::residency::resident_pages(&f)
            .map(|r| by_node(&r.per_node))
            .unwrap_or_default();
        match out.iter_mut().find(|r| r.dev == dev && r.ino == ino) {
            Some(r) => r.cached_pages = cached,
            None => {
                let mut replica_pages = BTreeMap::new();
                if let Some(s) = status
                    .sources
                    .iter()
                    .find(|s| s.key.dev == dev && s.key.ino == ino)
                {
                    for r in &s.replicas {
                        if let Target::Node(n) = r.target {
                            replica_pages.insert(n.to_string(), r.pages);
                        }
                    }
                }
                out.push(HeatRow {
                    path: p.clone(),
                    dev,
                    ino,
                    kinds: Vec::new(),
                    mapped_bytes: 0,
                    sharers: BTreeMap::new(),
                    sharers_spanning: 0,
                    mapped_pages: BTreeMap::new(),
                    remote_bytes: BTreeMap::new(),
                    replica_pages,
                    cached_pages: cached,
                    writes_per_hour: 0,
                    policy: String::new(),
                })
            }
        }
    }
    out
}

/// `replicactl heat`: the planner's last pass, or (no planner, no policy
/// covering anything, or named files) a pass made now over every process.
pub fn heat(engine: &Replicator, paths: &[PathBuf]) -> HeatReport {
    if let Some(s) = STATE.get() {
        let seen = lock(&s.seen).clone();
        if seen.complete && paths.is_empty() && !seen.heat.is_empty() {
            let policies = lock(&s.config).policies.clone();
            let last = seen.last_pass;
            return HeatReport {
                rows: rows(engine, &seen.heat, &policies, paths),
                passes: seen.passes,
                processes: last.processes,
                pass_cpu_us: u64::try_from(last.cpu.as_micros()).unwrap_or(u64::MAX),
            };
        }
    }
    let everything = Policies {
        list: vec![Policy::observe_everything("(heat)")],
    };
    let mut scanner = Scanner::new(
        ProcReader::default(),
        engine.topology().clone(),
        engine.run_dir().to_path_buf(),
    );
    let pass = scanner.full_pass(&everything);
    HeatReport {
        rows: rows(engine, &scanner.heat(), &everything, paths),
        passes: 0,
        processes: pass.processes,
        pass_cpu_us: u64::try_from(pass.cpu.as_micros()).unwrap_or(u64::MAX),
    }
}

/// `replicactl plan`: the planner's last plan.
pub fn plan() -> PlanReport {
    let Some(s) = STATE.get() else {
        return PlanReport {
            note: "the planner is not running".into(),
            ..PlanReport::default()
        };
    };
    let seen = lock(&s.seen).clone();
    if !seen.complete {
        return PlanReport {
            note: "the scanner has not finished its first pass yet: ask again in a few intervals"
                .into(),
            ..PlanReport::default()
        };
    }
    let plan = &seen.plan;
    let page = replicad_procfs::page_size() as u64;
    PlanReport {
        actions: plan
            .actions
            .iter()
            .map(|p| {
                let (node, bytes, remote, reason) = match &p.action {
                    Action::Replicate {
                        node,
                        bytes,
                        remote,
                        ..
                    } => (Some(*node), *bytes, *remote, String::new()),
                    Action::Migrate { node, pages, .. } => {
                        (Some(*node), pages * page, pages * page, String::new())
                    }
                    Action::Evict {
                        node,
                        bytes,
                        reason,
                        ..
                    } => (Some(*node), *bytes, 0, reason.clone()),
                    Action::Skip { node, reason, .. } => (*node, 0, 0, reason.clone()),
                };
                PlanRow {
                    action: p.action.kind().into(),
                    path: PathBuf::from(p.action.path()),
                    node,
                    bytes,
                    remote_bytes: remote,
                    reason,
                    policy: p.policy.clone(),
                    mode: p.mode.name().into(),
                }
            })
            .collect(),
        budget: by_node(&plan.budget),
        used: by_node(&plan.used),
        note: String::new(),
    }
}
