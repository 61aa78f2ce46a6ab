//! The daemon's life: load config, start the engine (which clears leftovers
//! of an earlier run before anything else), serve the control socket and
//! HTTP, reload on SIGHUP, and on SIGTERM invalidate every replica before
//! exit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use replicad_procfs::ProcReader;
use replicad_replicator::engine::SourceLimit;
use replicad_replicator::store::StoreKind;
use replicad_replicator::{fence, info_limited, warn_limited, Metrics, Replicator, Topology};

use crate::config::Config;
use crate::{http, server};

/// Command-line overrides of the config.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub run_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub metrics_listen: Option<String>,
}

fn load(file: Option<&Path>, over: &Overrides) -> anyhow::Result<Config> {
    let mut cfg = match file {
        Some(f) => Config::load(f)?,
        None => Config::embedded()?,
    };
    if let Some(d) = &over.run_dir {
        cfg.daemon.run_dir = d.clone();
    }
    if let Some(s) = &over.socket {
        cfg.daemon.socket = Some(s.clone());
    }
    if let Some(m) = &over.metrics_listen {
        cfg.daemon.metrics_listen = m.clone();
    }
    Ok(cfg)
}

/// Run the daemon until SIGTERM or SIGINT. `fence::prepare()` must have run
/// at the very start of `main`.
pub fn run(file: Option<PathBuf>, over: Overrides) -> anyhow::Result<()> {
    let cfg = load(file.as_deref(), &over)?;
    // Bind first: a live daemon on this socket must stop us before the
    // store is touched (opening it removes every replica found there).
    let listener = server::bind(&cfg.socket())?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        // Clients check the uid the socket was listened on (SO_PEERCRED).
        tracing::warn!(
            "replicad runs as uid {uid}: clients use its replicas only with {}={uid} set, \
             and set-user-ID programs never",
            replicad_wire::proto::DAEMON_UID_ENV
        );
    }
    let topology = Topology::detect().context("detecting the NUMA topology")?;
    tracing::info!(
        "topology ({}): {} node(s): {}",
        topology.source,
        topology.nodes.len(),
        topology.node_list()
    );
    let metrics = Metrics::new().context("creating metrics")?;
    std::fs::create_dir_all(&cfg.daemon.run_dir)
        .with_context(|| format!("creating run directory {}", cfg.daemon.run_dir.display()))?;
    let publisher = crate::wire::publisher(&cfg.daemon.run_dir);
    let mut engine_cfg = cfg.engine();
    let nodes = topology.nodes.len();
    let limit = raise_open_files();
    // Counted again by the engine for the store it opens (a tmpfs
    // replica holds no fd; a memfd one does).
    engine_cfg.max_sources = Some(SourceLimit::new(limit.soft, &vec![StoreKind::Memfd; nodes]));
    let engine = Replicator::start(engine_cfg, topology, metrics, publisher)
        .context("starting the replica engine")?;
    if let Some(room) = engine.source_limit() {
        tracing::info!(
            "open-file limit {} (was {}, hard {}): room for {} replicated files on {nodes} node(s)",
            limit.soft,
            limit.was,
            limit.hard,
            room.sources
        );
    }
    crate::planner::start(&engine, cfg.heat.clone()).context("starting the planner thread")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .thread_name("replicad-io")
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(serve(cfg, listener, file, over, engine.clone()));
    engine.shutdown();
    runtime.shutdown_background();
    result
}

/// Raise the open-file limit as far as it goes (as root up to
/// `fs.nr_open`), before the engine and its fence keeper start (the keeper
/// inherits it); the daemon logs the room it leaves once the engine counted
/// it for its store.
fn raise_open_files() -> replicad_replicator::sys::NofileLimit {
    let nr_open = std::fs::read_to_string(ProcReader::default().root().join("sys/fs/nr_open"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let limit = match replicad_replicator::sys::raise_nofile(nr_open) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("cannot read the open-file limit: {e}; assuming 1024");
            replicad_replicator::sys::NofileLimit {
                soft: 1024,
                hard: 1024,
                was: 1024,
            }
        }
    };
    limit
}

async fn serve(
    mut cfg: Config,
    listener: std::os::fd::OwnedFd,
    file: Option<PathBuf>,
    over: Overrides,
    engine: Replicator,
) -> anyhow::Result<()> {
    // Signals first: a SIGHUP that arrived before this would end the
    // process (its default action).
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let socket = cfg.socket();
    // HTTP is bound before the control socket answers: whoever sees the
    // daemon answer (a test, `replicactl status`, systemd's readiness) can
    // scrape it too (a test once found the port still closed).
    let web = if cfg.daemon.metrics_listen.is_empty() {
        None
    } else {
        let addr = cfg.daemon.metrics_listen.clone();
        let l = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening for HTTP on {addr} (daemon.metrics_listen)"))?;
        tracing::info!("metrics at http://{addr}/metrics, status at http://{addr}/status");
        Some(tokio::spawn(http::serve(l, engine.clone())))
    };
    let control = tokio::spawn(server::serve(listener, engine.clone(), socket.clone()));
    apply_replicate_list(&engine, &cfg, &BTreeSet::new()).await;
    notify_systemd("READY=1");
    tracing::info!("replicad ready");
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match load(file.as_deref(), &over) {
                    Ok(new) => {
                        warn_restart_only(&cfg, &new);
                        let old: BTreeSet<PathBuf> =
                            cfg.replicate.iter().map(|r| r.path.clone()).collect();
                        engine.set_home_nodes(new.engine().home_nodes);
                        crate::planner::reload(new.heat.clone());
                        apply_replicate_list(&engine, &new, &old).await;
                        cfg = new;
                        tracing::info!("configuration reloaded");
                    }
                    Err(e) => tracing::error!("reload refused, the running configuration stays: {e:#}"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("shutting down: invalidating every replica");
    notify_systemd("STOPPING=1");
    control.abort();
    if let Some(w) = web {
        w.abort();
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Replicate every listed file; evict files that were listed before and
/// are not any more.
async fn apply_replicate_list(engine: &Replicator, cfg: &Config, before: &BTreeSet<PathBuf>) {
    let now: BTreeSet<PathBuf> = cfg.replicate.iter().map(|r| r.path.clone()).collect();
    let engine = engine.clone();
    let entries = cfg.replicate.clone();
    let gone: Vec<PathBuf> = before.difference(&now).cloned().collect();
    let _ = tokio::task::spawn_blocking(move || {
        // One line per file, limited; then one summary that is not, so a
        // long list that fails still says how much did.
        let (mut evicted, mut evict_failed) = (0usize, 0usize);
        for path in gone {
            match engine.evict(&path) {
                Ok(n) => {
                    evicted += 1;
                    info_limited!(
                        "{}: no longer configured, {n} replicas evicted",
                        path.display()
                    )
                }
                Err(e) => {
                    evict_failed += 1;
                    warn_limited!("{e}")
                }
            }
        }
        let (total, mut failed) = (entries.len(), 0usize);
        for r in entries {
            let Some(nodes) = r.nodes.selection() else {
                continue;
            };
            if let Err(e) = engine.replicate(&r.path, &nodes) {
                failed += 1;
                warn_limited!("configured replica: {e}");
            }
        }
        if evicted + evict_failed > 0 {
            tracing::info!(
                "{evicted} files no longer configured were evicted, {evict_failed} could not be"
            );
        }
        if failed > 0 {
            tracing::warn!("{failed} of {total} configured files were not replicated");
        }
    })
    .await;
}

fn warn_restart_only(old: &Config, new: &Config) {
    if old.daemon != new.daemon || old.store != new.store || old.fence != new.fence {
        tracing::warn!(
            "[daemon], [store] and [fence] changes take effect at the next restart; \
             [[replicate]] and [[home_node]] changes apply now"
        );
    }
}

/// Tell systemd (Type=notify) about our state, if it is listening.
fn notify_systemd(state: &str) {
    if let Some(store) = replicad_replicator::fence::fdstore::FdStore::from_env() {
        let _ = store.notify(state, &[]);
    }
}

/// Block the fence signals; must be the first thing `main` does.
pub fn prepare() -> anyhow::Result<()> {
    fence::prepare().context("blocking the fence signals")
}
