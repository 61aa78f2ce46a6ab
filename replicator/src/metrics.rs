//! Prometheus metrics of the engine. Labels stay bounded: target (`node0`,
//! ...), reason, result. Per-file detail goes to the status report.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

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
                "Time from a lease-break signal to the lease's release (the writer's wait)",
            )
            .buckets(prometheus::exponential_buckets(0.00001, 2.5, 14)?),
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
        registry.register(Box::new(replicas.clone()))?;
        registry.register(Box::new(replica_bytes.clone()))?;
        registry.register(Box::new(copied_bytes.clone()))?;
        registry.register(Box::new(copy_seconds.clone()))?;
        registry.register(Box::new(invalidations.clone()))?;
        registry.register(Box::new(invalidation_seconds.clone()))?;
        registry.register(Box::new(fence_failures.clone()))?;
        registry.register(Box::new(attaches.clone()))?;
        registry.register(Box::new(misplaced_pages.clone()))?;
        registry.register(Box::new(replication_failures.clone()))?;
        registry.register(Box::new(leftovers_removed.clone()))?;
        Ok(Metrics {
            registry,
            replicas,
            replica_bytes,
            copied_bytes,
            copy_seconds,
            invalidations,
            invalidation_seconds,
            fence_failures,
            attaches,
            misplaced_pages,
            replication_failures,
            leftovers_removed,
        })
    }

    /// Make the labelled series exist at zero before the first event, so
    /// alerts can be written against them: one per target, per
    /// invalidation reason and per fence-failure reason.
    pub fn start_at_zero<'a>(
        &self,
        targets: impl Iterator<Item = String>,
        invalidation_reasons: impl Iterator<Item = &'a str>,
        fence_failure_reasons: impl Iterator<Item = &'a str>,
    ) {
        for t in targets {
            self.replicas.with_label_values(&[t.as_str()]).set(0);
            self.replica_bytes.with_label_values(&[t.as_str()]).set(0);
            self.copied_bytes.with_label_values(&[t.as_str()]);
        }
        for r in invalidation_reasons {
            self.invalidations.with_label_values(&[r]);
        }
        for r in fence_failure_reasons {
            self.fence_failures.with_label_values(&[r]);
        }
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
