//! Prometheus metrics of the engine. Labels stay bounded: target (`node0`,
//! ...), reason, result. Per-file detail goes to the status report.
//!
//! Every family has HELP text, and counters of a known label set exist at
//! zero from the start (alerts can be written before the first event).
//! `tests/metrics.rs` runs a daemon through a scenario and fails on any
//! family in [`Metrics::families`] that no event moved.

use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// `replicad_invalidations_total` reasons.
/// (`copy_failed`: a failed copy dropped a source it left without replicas,
/// so its fence; the count is of replicas, so it stays 0.)
/// (`modified`: the source changed without a lease break, such as an
/// `open(O_RDONLY|O_TRUNC)`, and the modify watch saw it.)
/// (`keeper_lost`: the fence keeper died or was stopped, and may have
/// revoked and released what it held.)
pub const INVALIDATION_REASONS: [&str; 7] = [
    "write",
    "evict",
    "shutdown",
    "unlinked",
    "modified",
    "keeper_lost",
    "copy_failed",
];
/// `replicad_fence_failures_total` reasons: one per [`FenceFailure`] kind.
///
/// [`FenceFailure`]: crate::fence::FenceFailure
pub const FENCE_FAILURE_REASONS: [&str; 4] = crate::fence::FenceFailure::LABELS;
/// `replicad_attach_total` results.
pub const ATTACH_RESULTS: [&str; 3] = ["replica", "original", "refused"];
/// `replicad_replication_failures_total` reasons.
pub const REPLICATION_FAILURE_REASONS: [&str; 4] =
    ["no_space", "source_changed", "misplaced", "io"];

/// `replicad_planner_actions_total` actions.
pub const PLANNER_ACTIONS: [&str; 3] = ["replicate", "migrate", "evict"];

/// One registered metric family: its name and HELP text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub name: String,
    pub help: String,
}

/// Every metric the engine updates.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Valid replicas per target.
    pub replicas: IntGaugeVec,
    /// Bytes in valid replicas per target.
    pub replica_bytes: IntGaugeVec,
    /// Bytes copied into replicas.
    pub copied_bytes: IntCounterVec,
    /// Seconds each replica copy took (for throughput).
    pub copy_seconds: HistogramVec,
    /// Invalidated replicas by reason (`write`, `evict`, `shutdown`,
    /// `unlinked`).
    pub invalidations: IntCounterVec,
    /// Seconds from a lease-break signal to the lease's release.
    pub invalidation_seconds: Histogram,
    /// A writer's whole wait (signal to release; lease-break-time when
    /// the kernel broke the lease by force).
    pub writer_wait_seconds: Histogram,
    /// Files that could not be fenced, by reason.
    pub fence_failures: IntCounterVec,
    /// Map requests by result (`replica`, `original`, `refused`).
    pub attaches: IntCounterVec,
    /// Pages found off their target node after populating.
    pub misplaced_pages: IntCounter,
    /// Replica copies that failed, by reason.
    pub replication_failures: IntCounterVec,
    /// Leftover replicas of an earlier run removed at start.
    pub leftovers_removed: IntCounter,
    /// Replicas a restarted daemon took over from the fence keeper.
    pub adopted_replicas: IntCounter,
    /// Leases the kernel broke by force (`lease-break-time` passed first).
    pub forced_breaks: IntCounter,
    /// Private pages of attached processes carried to their way back
    /// before a revoke truncated the replica under them.
    pub carried_pages: IntCounter,
    /// Page-cache pages `migrate` moved to the node asked for.
    pub migrated_pages: IntCounter,
    pub follower_nudges: IntCounter,
    /// Always 1; the `version` label carries the version.
    pub build_info: IntGaugeVec,
    /// Bytes processes on a node map from other nodes' memory now
    /// (`state="now"`), and what it would be without replicad's copies
    /// (`state="without_replicas"`: now plus what the copies turned local).
    pub remote_mapped_bytes: IntGaugeVec,
    /// Full scanner passes, their CPU time and wall time.
    pub scan_passes: IntCounter,
    pub scan_cpu_seconds: prometheus::Counter,
    pub scan_seconds: Histogram,
    /// Processes the last pass read.
    pub scan_processes: prometheus::IntGauge,
    /// Planner decisions carried out (`replicate`, `migrate`, `evict`), by kind.
    pub planner_actions: IntCounterVec,
    /// Bytes of the planner's copies per node, and their budget.
    pub planner_budget_used: IntGaugeVec,
    pub planner_budget: IntGaugeVec,
    families: Arc<[Family]>,
}

impl Metrics {
    /// Create the metrics in a fresh registry.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let replicas = IntGaugeVec::new(
            Opts::new("replicad_replicas", "Valid replicas per target"),
            &["target"],
        )?;
        let replica_bytes = IntGaugeVec::new(
            Opts::new(
                "replicad_replica_bytes",
                "Bytes held in valid replicas per target",
            ),
            &["target"],
        )?;
        let copied_bytes = IntCounterVec::new(
            Opts::new("replicad_copied_bytes_total", "Bytes copied into replicas"),
            &["target"],
        )?;
        let copy_seconds = HistogramVec::new(
            HistogramOpts::new("replicad_copy_seconds", "Time to copy one replica")
                .buckets(prometheus::exponential_buckets(0.0001, 4.0, 10)?),
            &["target"],
        )?;
        let invalidations = IntCounterVec::new(
            Opts::new(
                "replicad_invalidations_total",
                "Replicas invalidated, by reason",
            ),
            &["reason"],
        )?;
        let invalidation_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "replicad_invalidation_seconds",
                "Time from a lease-break signal (or a change seen without one) to the \
                 replicas' revoke and the lease's release by replicad",
            )
            .buckets(prometheus::exponential_buckets(0.00001, 2.5, 14)?),
        )?;
        let writer_wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "replicad_writer_wait_seconds",
                "A writer's wait on a replicated file: from its break signal to the lease's \
                 release; for a break the kernel forced, lease-break-time (the kernel's own wait)",
            )
            .buckets(prometheus::exponential_buckets(0.00001, 2.5, 18)?),
        )?;
        let fence_failures = IntCounterVec::new(
            Opts::new(
                "replicad_fence_failures_total",
                "Files that could not be write-fenced, by reason",
            ),
            &["reason"],
        )?;
        let attaches = IntCounterVec::new(
            Opts::new("replicad_attach_total", "Map and hello requests by result"),
            &["result"],
        )?;
        let misplaced_pages = IntCounter::new(
            "replicad_misplaced_pages_total",
            "Replica pages found off their target node after populating",
        )?;
        let replication_failures = IntCounterVec::new(
            Opts::new(
                "replicad_replication_failures_total",
                "Replica copies that failed, by reason",
            ),
            &["reason"],
        )?;
        let leftovers_removed = IntCounter::new(
            "replicad_leftovers_removed_total",
            "Replicas of an earlier run removed at start (their fence was not held)",
        )?;
        let forced_breaks = IntCounter::new(
            "replicad_forced_breaks_total",
            "Leases the kernel broke by force because lease-break-time passed before \
             replicad released them: the writer got in while replicas were still mapped",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "replicad_build_info",
                "Always 1; the version label is replicad's version",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for r in INVALIDATION_REASONS {
            invalidations.with_label_values(&[r]);
        }
        for r in FENCE_FAILURE_REASONS {
            fence_failures.with_label_values(&[r]);
        }
        for r in ATTACH_RESULTS {
            attaches.with_label_values(&[r]);
        }
        for r in REPLICATION_FAILURE_REASONS {
            replication_failures.with_label_values(&[r]);
        }
        let mut families = Vec::new();
        let mut register = |c: Box<dyn Collector>| -> prometheus::Result<()> {
            families.extend(c.desc().iter().map(|d| Family {
                name: d.fq_name.clone(),
                help: d.help.clone(),
            }));
            registry.register(c)
        };
        register(Box::new(replicas.clone()))?;
        register(Box::new(replica_bytes.clone()))?;
        register(Box::new(copied_bytes.clone()))?;
        register(Box::new(copy_seconds.clone()))?;
        register(Box::new(invalidations.clone()))?;
        register(Box::new(invalidation_seconds.clone()))?;
        register(Box::new(writer_wait_seconds.clone()))?;
        register(Box::new(fence_failures.clone()))?;
        register(Box::new(attaches.clone()))?;
        register(Box::new(misplaced_pages.clone()))?;
        register(Box::new(replication_failures.clone()))?;
        register(Box::new(leftovers_removed.clone()))?;
        let adopted_replicas = IntCounter::new(
            "replicad_adopted_replicas_total",
            "Replicas taken over from the fence keeper of a daemon that died (served again, not copied)",
        )?;
        register(Box::new(adopted_replicas.clone()))?;
        register(Box::new(forced_breaks.clone()))?;
        let carried_pages = IntCounter::new(
            "replicad_private_pages_carried_total",
            "Pages a program wrote privately in a replica-backed range (a debugger's breakpoint), copied to its way back before a revoke",
        )?;
        register(Box::new(carried_pages.clone()))?;
        let migrated_pages = IntCounter::new(
            "replicad_pages_migrated_total",
            "Page-cache pages of files moved to the NUMA node a migrate asked for (pages already there not counted)",
        )?;
        register(Box::new(migrated_pages.clone()))?;
        let follower_nudges = IntCounter::new(
            "replicad_follower_nudges_total",
            "Times programs following the published set were asked to look at their maps again with the set unchanged (a process changed node, a home node changed)",
        )?;
        register(Box::new(follower_nudges.clone()))?;
        register(Box::new(build_info.clone()))?;
        let remote_mapped_bytes = IntGaugeVec::new(
            Opts::new(
                "replicad_remote_mapped_bytes",
                "Bytes that processes on a node map from other nodes' memory: now, and without replicad's copies",
            ),
            &["node", "state"],
        )?;
        register(Box::new(remote_mapped_bytes.clone()))?;
        let scan_passes = IntCounter::new(
            "replicad_scan_passes_total",
            "Full passes of the heat scanner over the processes policies cover",
        )?;
        register(Box::new(scan_passes.clone()))?;
        let scan_cpu_seconds = prometheus::Counter::new(
            "replicad_scan_cpu_seconds_total",
            "CPU time the heat scanner spent reading maps and numa_maps",
        )?;
        register(Box::new(scan_cpu_seconds.clone()))?;
        let scan_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "replicad_scan_seconds",
                "Wall time of one full scanner pass (spread over intervals by the CPU budget)",
            )
            .buckets(prometheus::exponential_buckets(0.001, 4.0, 10)?),
        )?;
        register(Box::new(scan_seconds.clone()))?;
        let scan_processes = prometheus::IntGauge::new(
            "replicad_scan_processes",
            "Processes the last full scanner pass read",
        )?;
        register(Box::new(scan_processes.clone()))?;
        let planner_actions = IntCounterVec::new(
            Opts::new(
                "replicad_planner_actions_total",
                "Planner decisions carried out, by action (replicate, migrate, evict)",
            ),
            &["action"],
        )?;
        for a in PLANNER_ACTIONS {
            planner_actions.with_label_values(&[a]);
        }
        register(Box::new(planner_actions.clone()))?;
        let planner_budget_used = IntGaugeVec::new(
            Opts::new(
                "replicad_planner_budget_used_bytes",
                "Bytes of the planner's copies on each node",
            ),
            &["node"],
        )?;
        register(Box::new(planner_budget_used.clone()))?;
        let planner_budget = IntGaugeVec::new(
            Opts::new(
                "replicad_planner_budget_bytes",
                "Bytes the policies let the planner place on each node",
            ),
            &["node"],
        )?;
        register(Box::new(planner_budget.clone()))?;
        Ok(Metrics {
            remote_mapped_bytes,
            scan_passes,
            scan_cpu_seconds,
            scan_seconds,
            scan_processes,
            planner_actions,
            planner_budget_used,
            planner_budget,
            build_info,
            families: families.into(),
            registry,
            replicas,
            replica_bytes,
            copied_bytes,
            copy_seconds,
            invalidations,
            invalidation_seconds,
            writer_wait_seconds,
            fence_failures,
            attaches,
            misplaced_pages,
            replication_failures,
            leftovers_removed,
            adopted_replicas,
            forced_breaks,
            carried_pages,
            migrated_pages,
            follower_nudges,
        })
    }

    /// Every registered family, in registration order.
    pub fn families(&self) -> &[Family] {
        &self.families
    }

    /// Create the per-target series at zero, so that a target's copy
    /// metrics exist before its first copy.
    pub fn add_target(&self, target: &str) {
        if let Some(n) = target.strip_prefix("node") {
            for state in ["now", "without_replicas"] {
                self.remote_mapped_bytes.with_label_values(&[n, state]);
            }
            self.planner_budget_used.with_label_values(&[n]);
            self.planner_budget.with_label_values(&[n]);
        }
        self.replicas.with_label_values(&[target]);
        self.replica_bytes.with_label_values(&[target]);
        self.copied_bytes.with_label_values(&[target]);
        self.copy_seconds.with_label_values(&[target]);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        if encoder
            .encode_utf8(&self.registry.gather(), &mut out)
            .is_err()
        {
            out.clear();
        }
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Every family has HELP text, and every family is in the exposition
    /// from the start (with a target added: the engine adds one per node).
    #[test]
    fn every_family_has_help_and_exists_from_the_start() {
        let m = Metrics::new().unwrap();
        m.add_target("node0");
        let text = m.render();
        assert!(!m.families().is_empty());
        for f in m.families() {
            assert!(f.name.starts_with("replicad_"), "{f:?}");
            assert!(f.help.trim().len() > 10, "{} has no real HELP text", f.name);
            assert!(
                text.contains(&format!("# HELP {} {}", f.name, f.help)),
                "{} missing from:\n{text}",
                f.name
            );
        }
        assert!(text.contains(&format!(
            "replicad_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("replicad_fence_failures_total{reason=\"lease_refused\"} 0"));
    }
}
