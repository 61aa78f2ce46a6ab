//! `replicactl`: ask the daemon to replicate or evict files (or the text
//! of a running process), show the replica list and the machine's
//! topology, read a file through the client API the way a program would,
//! and start a command on a node with the preload shim.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use replicad_replicator::Topology;
use std::os::fd::AsFd;

use replicad_wire::proto::{
    HeatReport, LeftAlone, NodeSelection, PlanReport, Request, Response, Skipped, SourceStatus,
    StatusReport,
};

/// Exit code when the daemon cannot be reached.
pub const EXIT_UNREACHABLE: i32 = 3;
/// Exit code of `replicactl run` when it fails before starting the command
/// (as `env`, `nice` and `timeout` do).
pub const EXIT_RUN_FAILED: u8 = 125;
/// Exit code of `replicactl run` when the command cannot be executed.
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Exit code of `replicactl run` when the command is not found.
pub const EXIT_NOT_FOUND: u8 = 127;

/// File name of the preload shim.
pub const SHIM_NAME: &str = "libreplicad_preload.so";
/// Environment variable naming the shim for `replicactl run`.
pub const SHIM_ENV: &str = "REPLICAD_PRELOAD";
/// Where an installed shim lives, after the places relative to replicactl.
pub const SYSTEM_SHIM_DIRS: [&str; 2] = ["/usr/local/lib/replicad", "/usr/lib/replicad"];
/// How to build the shim, for the error that cannot find it.
const SHIM_BUILD: &str = "cargo build --release -p replicad-preload";

#[derive(Debug, Parser)]
#[command(
    name = "replicactl",
    version,
    about = "Control replicad: node-local replicas of hot read-mostly files",
    long_about = "Control replicad, which keeps a read-only copy of hot files (shared \
                  libraries, model weights, index files) in each NUMA node's local memory \
                  and invalidates every copy before any write reaches the file.\n\n\
                  Examples:\n  \
                  replicactl replicate /srv/model.bin            # every node\n  \
                  replicactl replicate --nodes 0,1 /srv/index.db\n  \
                  replicactl replicate --pid 4242                # a process's program and libraries\n  \
                  replicactl run --node 1 -- ./server --port 80  # on node 1, on its replicas\n  \
                  replicactl status                              # the replica list\n  \
                  replicactl map /srv/model.bin                  # read it as a client would\n  \
                  replicactl evict /srv/model.bin\n  \
                  replicactl topology"
)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "REPLICAD_SOCKET", default_value = replicad_wire::proto::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Seconds to wait for the daemon (copying a large file takes a while).
    #[arg(long, global = true, default_value_t = 600)]
    pub timeout: u64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy files into node-local memory and fence them against writes.
    ///
    /// Returns once every copy is valid: its bytes equal the file's and
    /// every page sits on its node. Needs root. Every PATH is tried; each
    /// failure is named (a file beyond the room the daemon's open-file
    /// limit leaves says so, with the fix), and the exit status is 1 when
    /// any file was not replicated.
    ///
    /// With --pid, replicates the text of a running process instead: its
    /// program and libraries (the files it maps private and executable).
    /// Files that cannot be replicated (open for writing, on a network or
    /// FUSE filesystem, the preload shim, replicas themselves) are listed
    /// as skipped with the reason; the exit status is 0 when at least one
    /// file was replicated or nothing needed it, 1 when every file was
    /// skipped.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["pid", "paths"])))]
    Replicate {
        /// Nodes to copy onto: "all", or a list like 0,1.
        #[arg(long, default_value = "all")]
        nodes: String,
        /// Replicate the program and libraries of this running process
        /// (instead of PATHs).
        #[arg(long, value_name = "PID")]
        pid: Option<u32>,
        /// Files to replicate.
        #[arg(value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Drop every replica of files and release their fences. Needs root.
    ///
    /// Every PATH is tried, whatever happens to the others; each failure is
    /// named, and the exit status is 1 when any file was not evicted.
    Evict {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Show the replica list: source, generation, target, bytes, attached
    /// pids, state; then the processes the daemon left on their own
    /// mappings, and why.
    ///
    /// Root sees every file; another user the files it could read itself
    /// and only its own processes. The list comes from the daemon in pages,
    /// so it may hold any number of files.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the NUMA nodes, their CPUs, memory and distances (no daemon
    /// needed).
    Topology {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Read sysfs under this root instead of asking hwloc (for
        /// inspecting another machine's sysfs copy).
        #[arg(long)]
        sysfs_root: Option<PathBuf>,
    },
    /// Read a file through the client API, as a program would, and print
    /// what backed it (the node's replica, or the file and why) and an
    /// FNV-1a checksum of its bytes.
    Map {
        /// Ask for this node's replica instead of the home node's.
        #[arg(long)]
        node: Option<u32>,
        path: PathBuf,
    },
    /// Run a command with the preload shim, bound to a node, so that its
    /// program and libraries run from that node's replicas.
    ///
    /// With --node N: the command may run only on node N's CPUs and
    /// prefers node N's memory (MPOL_PREFERRED: its own memory stays local
    /// while the node has room, and comes from other nodes after, never an
    /// out-of-memory kill). Without --node it keeps replicactl's CPUs and
    /// memory policy.
    ///
    /// The shim goes first in LD_PRELOAD (other entries are kept after it);
    /// a --socket other than the default is passed on as REPLICAD_SOCKET.
    /// The daemon need not run: the shim then leaves the program on its own
    /// files. Replicate the files first (`replicactl replicate --pid`, or
    /// by path) for the shim to find replicas.
    ///
    /// The shim is --shim, else $REPLICAD_PRELOAD, else libreplicad_preload.so
    /// beside replicactl, in ../lib/replicad/ from it, in
    /// /usr/local/lib/replicad/ or in /usr/lib/replicad/.
    ///
    /// Exit status: the command's own; 125 when replicactl fails before
    /// running it (no shim, no such node), 126 when the command cannot be
    /// executed, 127 when it is not found.
    /// Show, per file and node, where the pages that processes map sit:
    /// pages mapped by node of residence, processes mapping it by the node
    /// they run on, bytes they map from other nodes (remote), and the pages
    /// of its replicas. Needs root.
    ///
    /// Without PATHs: every file the planner's scanner saw in its last full
    /// pass (the processes the policies cover). With PATHs, or before the
    /// first pass: a pass over every process made now. Sorted by remote
    /// bytes, most first.
    #[command(after_help = "Example:
  replicactl heat /srv/models/weights.bin
  replicactl heat --json | jq '.rows[0]'")]
    Heat {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only these files.
        #[arg(value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Show what the planner would do now: copies to make (bytes per
    /// node, within each node's budget), page caches to migrate, copies to
    /// drop, and files left alone with the reason. In `observe` mode
    /// nothing of it is carried out. Needs root.
    Plan {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A live view of `heat`, most remote bytes first, refreshed every
    /// --interval seconds; q (or Ctrl-C) quits. Needs root.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2)]
        interval: u64,
        /// Rows to show.
        #[arg(long, default_value_t = 20)]
        rows: usize,
        /// Print one refresh and exit (for scripts and tests).
        #[arg(long)]
        once: bool,
    },
    /// Move a file's page cache to node N: no copy, no extra memory, for a
    /// file whose users all run on N. Pages not in the page cache are not
    /// read in. Needs root.
    Migrate {
        /// The node to move the pages to.
        #[arg(long, value_name = "N")]
        node: u32,
        path: PathBuf,
    },
    #[command(
        override_usage = "replicactl run [--node N] [--shim PATH] -- CMD [ARGS...]",
        after_help = "Example:\n  replicactl run --node 1 -- ./server --port 8080"
    )]
    Run {
        /// Bind to node N's CPUs and prefer its memory.
        #[arg(long, value_name = "N")]
        node: Option<u32>,
        /// The preload shim (libreplicad_preload.so) to use.
        #[arg(long, value_name = "PATH")]
        shim: Option<PathBuf>,
        /// The command and its arguments; put `--` before it.
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
}

fn heat(cli: &Cli, paths: Vec<PathBuf>) -> anyhow::Result<HeatReport> {
    match ask(cli, &Request::Heat { paths })? {
        Response::Heat { mut report } => {
            report.rows.sort_by(|a, b| {
                let ra: u64 = a.remote_bytes.values().sum();
                let rb: u64 = b.remote_bytes.values().sum();
                rb.cmp(&ra).then(a.path.cmp(&b.path))
            });
            Ok(report)
        }
        other => bail!("unexpected answer: {other:?}"),
    }
}

/// `N0=12 N1=3`, or `-`.
fn per_node<T: std::fmt::Display>(m: &std::collections::BTreeMap<String, T>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter()
        .map(|(n, v)| format!("N{n}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Bytes as `12.0M`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// The `heat` table: one row per file, at most `limit`.
pub fn heat_table(r: &HeatReport, limit: usize) -> String {
    let mut s = format!(
        "{:>8}  {:>8}  {:<18}  {:<18}  {:<14}  {:<6}  PATH\n",
        "REMOTE", "MAPPED", "PAGES(node)", "SHARERS(node)", "REPLICA PAGES", "KIND"
    );
    let cached = r.rows.iter().any(|row| !row.cached_pages.is_empty());
    for row in r.rows.iter().take(limit) {
        let remote: u64 = row.remote_bytes.values().sum();
        let mut sharers = per_node(&row.sharers);
        if row.sharers_spanning > 0 {
            sharers.push_str(&format!(" span={}", row.sharers_spanning));
        }
        s.push_str(&format!(
            "{:>8}  {:>8}  {:<18}  {:<18}  {:<14}  {:<6}  {}\n",
            human(remote),
            human(row.mapped_bytes),
            per_node(&row.mapped_pages),
            sharers,
            per_node(&row.replica_pages),
            row.kinds.join(","),
            row.path.display()
        ));
        if cached {
            s.push_str(&format!(
                "{:>8}  page cache: {}\n",
                "",
                per_node(&row.cached_pages)
            ));
        }
    }
    s.push_str(&format!(
        "{} files; {} processes in the pass ({:.1} ms CPU); {}\n",
        r.rows.len(),
        r.processes,
        r.pass_cpu_us as f64 / 1e3,
        if r.passes == 0 {
            "a pass made for this request".to_string()
        } else {
            format!("the planner's pass {}", r.passes)
        }
    ));
    s
}

/// The `plan` table.
pub fn plan_table(r: &PlanReport) -> String {
    if !r.note.is_empty() {
        return format!("{}\n", r.note);
    }
    let mut s = format!(
        "{:<9}  {:>4}  {:>8}  {:>8}  {:<9}  {:<10}  PATH (reason)\n",
        "ACTION", "NODE", "BYTES", "REMOTE", "MODE", "POLICY"
    );
    for a in &r.actions {
        s.push_str(&format!(
            "{:<9}  {:>4}  {:>8}  {:>8}  {:<9}  {:<10}  {}{}\n",
            a.action,
            a.node.map_or("-".into(), |n| n.to_string()),
            human(a.bytes),
            human(a.remote_bytes),
            a.mode,
            a.policy,
            a.path.display(),
            if a.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", a.reason)
            }
        ));
    }
    if r.actions.is_empty() {
        s.push_str("(nothing to do: no file is read from a remote node)\n");
    }
    for (n, b) in &r.budget {
        s.push_str(&format!(
            "node {n}: {} of {} budget used\n",
            human(r.used.get(n).copied().unwrap_or(0)),
            human(*b)
        ));
    }
    s
}

/// `replicactl top`: redraw the heat table until q.
fn top(
    cli: &Cli,
    interval: u64,
    rows: usize,
    once: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    // Raw-ish input: no echo, no line buffering, so q needs no Enter.
    let saved = if tty && !once {
        let mut t = nix::sys::termios::tcgetattr(std::io::stdin())?;
        let old = t.clone();
        t.local_flags
            .remove(nix::sys::termios::LocalFlags::ICANON | nix::sys::termios::LocalFlags::ECHO);
        nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &t)?;
        Some(old)
    } else {
        None
    };
    let stdin = std::io::stdin();
    let result = (|| -> anyhow::Result<()> {
        loop {
            let report = heat(cli, Vec::new())?;
            if tty && !once {
                write!(out, "\x1b[H\x1b[2J")?;
            }
            writeln!(
                out,
                "replicad top: most remote bytes first, every {interval} s; q quits"
            )?;
            write!(out, "{}", heat_table(&report, rows))?;
            out.flush()?;
            if once {
                return Ok(());
            }
            let mut fds = [nix::poll::PollFd::new(
                stdin.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = u16::try_from(interval.saturating_mul(1000)).unwrap_or(u16::MAX);
            if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms))? > 0 {
                let mut b = [0u8; 16];
                let n = nix::unistd::read(stdin.as_fd(), &mut b)?;
                if n == 0 || b[..n].contains(&b'q') {
                    return Ok(());
                }
            }
        }
    })();
    if let Some(old) = saved {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &old,
        );
    }
    result
}

/// Parse "all" or "0,1,3".
pub fn parse_nodes(s: &str) -> anyhow::Result<NodeSelection> {
    if s.trim() == "all" {
        return Ok(NodeSelection::All);
    }
    let nodes = s
        .split(',')
        .map(|n| {
            n.trim().parse::<u32>().with_context(|| {
                format!("--nodes: {n:?} is not a node number (use \"all\" or e.g. 0,1)")
            })
        })
        .collect::<anyhow::Result<Vec<u32>>>()?;
    Ok(NodeSelection::List(nodes))
}

fn ask(cli: &Cli, req: &Request) -> anyhow::Result<Response> {
    let (resp, _fds) =
        replicad_client::request(&cli.socket, req, &[], Duration::from_secs(cli.timeout))?;
    Ok(resp)
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir()
        .context("reading the current directory")?
        .join(path))
}

/// Run one command; the result's error is printed by `main`.
pub fn run(cli: &Cli) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match &cli.command {
        Command::Replicate {
            nodes,
            pid: Some(pid),
            ..
        } => {
            let nodes = parse_nodes(nodes)?;
            eprintln!("replicating the text of pid {pid} ...");
            let answer = ask(cli, &Request::ReplicatePid { pid: *pid, nodes })
                .with_context(|| format!("replicating the text of pid {pid}"))?;
            match answer {
                Response::ReplicatedPid { sources, skipped } => {
                    write!(out, "{}", pid_table(*pid, &sources, &skipped))?;
                    if sources.is_empty() && !skipped.is_empty() {
                        bail!(
                            "nothing of pid {pid} was replicated: every file was skipped \
                             (reasons above)"
                        );
                    }
                }
                other => bail!("unexpected answer: {other:?}"),
            }
        }
        Command::Replicate {
            nodes,
            pid: None,
            paths,
        } => {
            let nodes = parse_nodes(nodes)?;
            let mut failed = 0;
            for path in paths {
                let path = absolute(path)?;
                eprintln!("replicating {} ...", path.display());
                match ask(
                    cli,
                    &Request::Replicate {
                        path: path.clone(),
                        nodes: nodes.clone(),
                    },
                ) {
                    Ok(Response::Replicated { source }) => {
                        writeln!(
                            out,
                            "{}: generation {} on {} ({})",
                            source.path.display(),
                            source.generation,
                            source
                                .replicas
                                .iter()
                                .map(|r| r.target.as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                            human_bytes(source.size)
                        )?;
                    }
                    Ok(other) => bail!("unexpected answer: {other:?}"),
                    Err(e) => {
                        if is_unreachable(&e) {
                            return Err(e);
                        }
                        eprintln!("replicactl: {e:#}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} files were not replicated", paths.len());
            }
        }
        Command::Evict { paths } => {
            let mut failed = Vec::new();
            for path in paths {
                let path = absolute(path)?;
                match ask(cli, &Request::Evict { path: path.clone() }) {
                    Ok(Response::Evicted { replicas }) => {
                        writeln!(out, "{}: {replicas} replicas evicted", path.display())?
                    }
                    Ok(other) => bail!("unexpected answer: {other:?}"),
                    Err(e) => {
                        if is_unreachable(&e) {
                            return Err(e);
                        }
                        eprintln!("replicactl: {}: {e:#}", path.display());
                        failed.push(path);
                    }
                }
            }
            if !failed.is_empty() {
                bail!(
                    "{} of {} files were not evicted: {}",
                    failed.len(),
                    paths.len(),
                    failed
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        Command::Status { json } => {
            let report = replicad_client::status(&cli.socket, Duration::from_secs(cli.timeout))?;
            if *json {
                serde_json::to_writer_pretty(&mut out, &report)?;
                writeln!(out)?;
            } else {
                write!(out, "{}", status_table(&report))?;
            }
        }
        Command::Heat { json, paths } => {
            let paths = paths
                .iter()
                .map(|p| absolute(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let report = heat(cli, paths)?;
            if *json {
                serde_json::to_writer_pretty(&mut out, &report)?;
                writeln!(out)?;
            } else {
                write!(out, "{}", heat_table(&report, usize::MAX))?;
            }
        }
        Command::Plan { json } => {
            let report = match ask(cli, &Request::Plan)? {
                Response::Plan { report } => report,
                other => bail!("unexpected answer: {other:?}"),
            };
            if *json {
                serde_json::to_writer_pretty(&mut out, &report)?;
                writeln!(out)?;
            } else {
                write!(out, "{}", plan_table(&report))?;
            }
        }
        Command::Top {
            interval,
            rows,
            once,
        } => top(cli, *interval, *rows, *once, &mut out)?,
        Command::Migrate { node, path } => {
            let path = absolute(path)?;
            match ask(
                cli,
                &Request::Migrate {
                    path: path.clone(),
                    node: *node,
                },
            )? {
                Response::Migrated {
                    before,
                    after,
                    moved,
                    failed,
                    ..
                } => writeln!(
                    out,
                    "{}: {moved} pages moved to node {node}, {failed} could not move; resident before {}, after {}",
                    path.display(),
                    per_node(&before),
                    per_node(&after)
                )?,
                other => bail!("unexpected answer: {other:?}"),
            }
        }
        Command::Topology { json, sysfs_root } => {
            let topo = match sysfs_root {
                Some(root) => Topology::from_sysfs(root)?,
                None => Topology::detect()?,
            };
            if *json {
                serde_json::to_writer_pretty(&mut out, &topo)?;
                writeln!(out)?;
            } else {
                write!(out, "{}", topo.render_table())?;
            }
        }
        Command::Map { node, path } => {
            let opts = replicad_client::MapOptions {
                socket: cli.socket.clone(),
                node: *node,
                timeout: Duration::from_secs(cli.timeout.min(30)),
            };
            let m = replicad_client::map_with(path, &opts)?;
            let backing = match m.backing() {
                replicad_client::Backing::Replica { node, generation } => {
                    format!("replica on node{node}, generation {generation}")
                }
                replicad_client::Backing::File { reason } => format!("the file itself ({reason})"),
            };
            writeln!(
                out,
                "{}: {} bytes, fnv1a64 {:016x}, backed by {backing}",
                path.display(),
                m.as_slice().len(),
                fnv1a(m.as_slice())
            )?;
        }
        Command::Run {
            node,
            shim,
            command,
        } => {
            drop(out);
            let Err(e) = run_command(cli, *node, shim.as_deref(), command);
            return Err(e.into());
        }
    }
    Ok(())
}

/// Why `replicactl run` did not become the command.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Before the command: no shim, no such node, binding failed.
    #[error("{0:#}")]
    Setup(anyhow::Error),
    /// `exec` failed.
    #[error("cannot run {command}: {reason}")]
    Exec {
        command: String,
        reason: String,
        not_found: bool,
    },
}

impl From<anyhow::Error> for RunError {
    fn from(e: anyhow::Error) -> Self {
        RunError::Setup(e)
    }
}

impl RunError {
    /// The exit status, as a shell would give it.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Setup(_) => EXIT_RUN_FAILED,
            RunError::Exec {
                not_found: true, ..
            } => EXIT_NOT_FOUND,
            RunError::Exec { .. } => EXIT_CANNOT_EXECUTE,
        }
    }
}

/// The exit status for an error `run` returned.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(r) = e.downcast_ref::<RunError>() {
        return r.exit_code();
    }
    if is_unreachable(e) {
        return EXIT_UNREACHABLE as u8;
    }
    1
}

/// `replicactl run`: set up this process (CPUs, memory policy,
/// environment) and exec `command`. Returns only on failure.
fn run_command(
    cli: &Cli,
    node: Option<u32>,
    shim: Option<&Path>,
    command: &[OsString],
) -> Result<std::convert::Infallible, RunError> {
    let Some((program, args)) = command.split_first() else {
        return Err(anyhow::anyhow!("no command given: replicactl run -- CMD [ARGS...]").into());
    };
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let system: Vec<&Path> = SYSTEM_SHIM_DIRS.iter().map(Path::new).collect();
    let shim = find_shim(
        shim,
        std::env::var_os(SHIM_ENV).as_deref(),
        exe_dir.as_deref(),
        &system,
    )?;
    let preload = compose_ld_preload(&shim, std::env::var_os("LD_PRELOAD").as_deref())?;
    if let Some(node) = node {
        let topology = Topology::from_sysfs(Path::new(
            replicad_replicator::topology::sysfs::DEFAULT_ROOT,
        ))
        .context("reading the NUMA nodes from /sys/devices/system/node")?;
        let cpus = node_cpus(&topology, node)?;
        bind_to_node(node, &cpus)?;
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).env("LD_PRELOAD", &preload);
    if cli.socket != Path::new(replicad_wire::proto::DEFAULT_SOCKET) {
        cmd.env(replicad_wire::proto::SOCKET_ENV, absolute(&cli.socket)?);
    }
    let e = cmd.exec();
    let name = program.to_string_lossy().into_owned();
    let not_found = e.kind() == std::io::ErrorKind::NotFound;
    let reason = if not_found && !program.as_bytes().contains(&b'/') {
        "command not found (not in PATH)".to_string()
    } else {
        e.to_string()
    };
    Err(RunError::Exec {
        command: name,
        reason,
        not_found,
    })
}

/// The CPUs of `node`, which must exist and have CPUs.
pub fn node_cpus(topology: &Topology, node: u32) -> anyhow::Result<Vec<u32>> {
    let n = topology
        .node(node)
        .map_err(|e| anyhow::anyhow!("--node {node}: {e} (`replicactl topology` shows them)"))?;
    if n.cpus.is_empty() {
        bail!(
            "node {node} has no CPUs (a memory-only node): pick a node with CPUs \
             (`replicactl topology` lists them)"
        );
    }
    Ok(n.cpus.clone())
}

/// Let this thread run only on `cpus` and prefer `node`'s memory; `exec`
/// keeps both.
fn bind_to_node(node: u32, cpus: &[u32]) -> anyhow::Result<()> {
    use nix::sched::{sched_setaffinity, CpuSet};
    let list = replicad_replicator::topology::format_cpulist(cpus);
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu as usize).with_context(|| {
            format!(
                "node {node}: CPU {cpu} is beyond the {} CPUs an affinity mask holds here",
                CpuSet::count()
            )
        })?;
    }
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).with_context(|| {
        format!(
            "binding to node {node}'s CPUs ({list}): sched_setaffinity failed (a cpuset \
             cgroup or taskset may exclude them; check `grep Cpus_allowed_list \
             /proc/self/status`)"
        )
    })?;
    match replicad_replicator::numa::set_preferred(node) {
        Ok(()) => Ok(()),
        // A kernel without NUMA has one node: nothing to prefer.
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("preferring node {node}'s memory (set_mempolicy)"))
        }
    }
}

/// Find the preload shim: `explicit` (--shim), else `env`
/// ($REPLICAD_PRELOAD), else [`SHIM_NAME`] beside replicactl (`exe_dir`),
/// in `exe_dir/../lib/replicad/`, then in each of `system_dirs`. A shim
/// named explicitly must exist; the rest are looked for in turn. The path
/// returned is absolute.
pub fn find_shim(
    explicit: Option<&Path>,
    env: Option<&OsStr>,
    exe_dir: Option<&Path>,
    system_dirs: &[&Path],
) -> anyhow::Result<PathBuf> {
    let named = |path: &Path, how: &str| -> anyhow::Result<PathBuf> {
        if !path.is_file() {
            bail!(
                "{how} {}: no such file (build the shim with `{SHIM_BUILD}`; it lands in \
                 target/release/{SHIM_NAME})",
                path.display()
            );
        }
        std::fs::canonicalize(path).with_context(|| format!("{how} {}", path.display()))
    };
    if let Some(p) = explicit {
        return named(p, "--shim");
    }
    if let Some(p) = env.filter(|p| !p.is_empty()) {
        return named(Path::new(p), &format!("${SHIM_ENV} ="));
    }
    let mut looked = Vec::new();
    if let Some(dir) = exe_dir {
        looked.push(dir.join(SHIM_NAME));
        looked.push(dir.join("../lib/replicad").join(SHIM_NAME));
    }
    looked.extend(system_dirs.iter().map(|d| d.join(SHIM_NAME)));
    if let Some(p) = looked.iter().find(|p| p.is_file()) {
        return std::fs::canonicalize(p).with_context(|| p.display().to_string());
    }
    let list: Vec<String> = looked
        .iter()
        .map(|p| format!("  {}", p.display()))
        .collect();
    bail!(
        "the preload shim {SHIM_NAME} was not found; looked in:\n{}\n\
         build it with `{SHIM_BUILD}` (it lands in target/release/) and pass --shim PATH, \
         set {SHIM_ENV}=PATH, or install it in {}/",
        list.join("\n"),
        SYSTEM_SHIM_DIRS[0]
    )
}

/// The value of `LD_PRELOAD` for the command: `shim` first, then the
/// entries of `existing` in their order. The dynamic loader splits the list
/// at spaces and colons, so `shim` may hold neither; entries naming another
/// copy of the shim are dropped (two shims would both remap), and an
/// `existing` without any is kept byte for byte after a colon.
pub fn compose_ld_preload(shim: &Path, existing: Option<&OsStr>) -> anyhow::Result<OsString> {
    let is_sep = |b: &u8| *b == b' ' || *b == b':';
    let shim_bytes = shim.as_os_str().as_bytes();
    if shim_bytes.iter().any(is_sep) {
        bail!(
            "the shim's path {} holds a space or a colon, which LD_PRELOAD cannot carry: \
             put the shim in a directory whose path has neither",
            shim.display()
        );
    }
    let existing = existing.map(OsStr::as_bytes).unwrap_or_default();
    let entries: Vec<&[u8]> = existing.split(is_sep).filter(|e| !e.is_empty()).collect();
    let is_shim = |e: &[u8]| {
        Path::new(OsStr::from_bytes(e))
            .file_name()
            .is_some_and(|n| n.as_bytes().starts_with(b"libreplicad_preload"))
    };
    let mut out = shim_bytes.to_vec();
    if entries.iter().any(|e| is_shim(e)) {
        for e in entries.into_iter().filter(|e| !is_shim(e)) {
            out.push(b':');
            out.extend_from_slice(e);
        }
    } else if !entries.is_empty() {
        out.push(b':');
        out.extend_from_slice(existing);
    }
    Ok(OsString::from_vec(out))
}

/// Whether an error means the daemon was not reachable at all.
pub fn is_unreachable(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<replicad_client::Error>(),
        Some(replicad_client::Error::Connect { .. })
    )
}

/// FNV-1a 64: a dependency-free checksum for `replicactl map`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// "1.5 MiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Rows as left-aligned columns two spaces apart (the first row is the
/// header).
fn render_rows<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The status report as a table: the replicas, then the processes left on
/// their own mappings.
pub fn status_table(report: &StatusReport) -> String {
    let mut out = if report.sources.is_empty() {
        "no replicas (replicate a file with `replicactl replicate PATH`)\n".to_string()
    } else {
        let mut rows = vec![[
            "SOURCE".to_string(),
            "GEN".into(),
            "TARGET".into(),
            "BYTES".into(),
            "ATTACHED".into(),
            "STATE".into(),
            "FENCE".into(),
        ]];
        for s in &report.sources {
            rows.extend(source_rows(s));
        }
        render_rows(&rows)
    };
    if !report.left_alone.is_empty() {
        out.push_str("\nleft on their own mappings:\n");
        out.push_str(&left_alone_table(&report.left_alone));
    }
    out
}

fn left_alone_table(left: &[LeftAlone]) -> String {
    let mut rows = vec![["PID".to_string(), "COMM".into(), "REASON".into()]];
    rows.extend(
        left.iter()
            .map(|l| [l.pid.to_string(), l.comm.clone(), l.reason.clone()]),
    );
    render_rows(&rows)
}

/// What `replicactl replicate --pid` prints: the files replicated, then
/// the ones skipped with the reason.
pub fn pid_table(pid: u32, sources: &[SourceStatus], skipped: &[Skipped]) -> String {
    let comm = replicad_procfs::ProcReader::default()
        .comm(pid)
        .ok()
        .flatten()
        .map(|c| format!(" ({c})"))
        .unwrap_or_default();
    let mut out = format!(
        "pid {pid}{comm}: {} replicated, {} skipped\n",
        plural(sources.len(), "file"),
        skipped.len()
    );
    if sources.is_empty() && skipped.is_empty() {
        out.push_str("it maps no program text (a kernel thread or a zombie?)\n");
        return out;
    }
    if !sources.is_empty() {
        let mut rows = vec![[
            "FILE".to_string(),
            "GEN".into(),
            "TARGETS".into(),
            "BYTES".into(),
            "FENCE".into(),
        ]];
        rows.extend(sources.iter().map(|s| {
            let targets: Vec<&str> = s.replicas.iter().map(|r| r.target.as_str()).collect();
            [
                s.path.display().to_string(),
                s.generation.to_string(),
                if targets.is_empty() {
                    "-".into()
                } else {
                    targets.join(",")
                },
                human_bytes(s.size),
                s.fence.clone(),
            ]
        }));
        out.push('\n');
        out.push_str(&render_rows(&rows));
    }
    if !skipped.is_empty() {
        let mut rows = vec![["SKIPPED".to_string(), "REASON".into()]];
        rows.extend(
            skipped
                .iter()
                .map(|k| [k.path.display().to_string(), k.reason.clone()]),
        );
        out.push('\n');
        out.push_str(&render_rows(&rows));
    }
    out
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn source_rows(s: &SourceStatus) -> Vec<[String; 7]> {
    if s.replicas.is_empty() {
        return vec![[
            s.path.display().to_string(),
            s.generation.to_string(),
            "-".into(),
            human_bytes(s.size),
            "-".into(),
            "-".into(),
            s.fence.clone(),
        ]];
    }
    s.replicas
        .iter()
        .map(|r| {
            [
                s.path.display().to_string(),
                r.generation.to_string(),
                r.target.clone(),
                human_bytes(r.bytes),
                if r.attachments.is_empty() {
                    "-".into()
                } else {
                    r.attachments
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                },
                r.state.to_string(),
                s.fence.clone(),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use replicad_wire::proto::{ReplicaState, ReplicaStatus};

    #[test]
    fn nodes_parse() {
        assert_eq!(parse_nodes("all").unwrap(), NodeSelection::All);
        assert_eq!(
            parse_nodes("0, 1").unwrap(),
            NodeSelection::List(vec![0, 1])
        );
        assert!(parse_nodes("0,x")
            .unwrap_err()
            .to_string()
            .contains("\"x\""));
    }

    #[test]
    fn table_has_every_column() {
        let report = StatusReport {
            sources: vec![SourceStatus {
                path: "/srv/w.bin".into(),
                dev: 1,
                ino: 2,
                generation: 3,
                size: 2 << 20,
                fence: "lease".into(),
                targets: vec!["node0".into()],
                replicas: vec![ReplicaStatus {
                    target: "node0".into(),
                    generation: 3,
                    bytes: 2 << 20,
                    state: ReplicaState::Valid,
                    attachments: vec![42, 43],
                    file: "/run/replicad/node0/1-2-g3".into(),
                    pages: 512,
                    pages_on_node: 512,
                }],
            }],
            left_alone: vec![],
            next: None,
        };
        let t = status_table(&report);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("SOURCE"), "{t}");
        for want in [
            "/srv/w.bin",
            "3",
            "node0",
            "2.0 MiB",
            "42,43",
            "valid",
            "lease",
        ] {
            assert!(lines[1].contains(want), "{want} missing in {t}");
        }
        assert!(status_table(&StatusReport::default()).contains("no replicas"));

        // Processes left alone come under the sources.
        let mut report = report;
        report.left_alone.push(LeftAlone {
            pid: 99,
            comm: "java".into(),
            reason: "no replica of its text on node0".into(),
        });
        let t = status_table(&report);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("SOURCE") && lines[1].contains("/srv/w.bin"),
            "{t}"
        );
        let header = lines.iter().position(|l| l.starts_with("PID")).unwrap();
        assert!(header > 1, "{t}");
        for want in ["99", "java", "no replica of its text on node0"] {
            assert!(lines[header + 1].contains(want), "{want} missing in {t}");
        }
    }

    #[test]
    fn table_shows_left_alone_processes() {
        let left = vec![LeftAlone {
            pid: 77,
            comm: "python3".into(),
            reason: "pid 77 may run on CPUs of several nodes".into(),
        }];
        let report = StatusReport {
            sources: vec![],
            left_alone: left.clone(),
            next: None,
        };
        let t = status_table(&report);
        assert!(t.starts_with("no replicas"), "{t}");
        let rows: Vec<&str> = t.lines().skip_while(|l| !l.starts_with("PID")).collect();
        assert!(
            rows[0].contains("COMM") && rows[0].contains("REASON"),
            "{t}"
        );
        for want in ["77", "python3", "several nodes"] {
            assert!(rows[1].contains(want), "{want} missing in {t}");
        }
        // JSON carries them too.
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["left_alone"][0]["comm"], "python3");
    }

    #[test]
    fn pid_table_lists_replicated_and_skipped() {
        let source = SourceStatus {
            path: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
            dev: 1,
            ino: 2,
            generation: 1,
            size: 3 << 20,
            fence: "lease".into(),
            targets: vec!["node0".into(), "node1".into()],
            replicas: ["node0", "node1"]
                .iter()
                .map(|t| ReplicaStatus {
                    target: t.to_string(),
                    generation: 1,
                    bytes: 3 << 20,
                    state: ReplicaState::Valid,
                    attachments: vec![],
                    file: String::new(),
                    pages: 768,
                    pages_on_node: 768,
                })
                .collect(),
        };
        let skipped = Skipped {
            path: "/opt/lib/libreplicad_preload.so".into(),
            reason: "the preload shim is never replicated".into(),
        };
        let t = pid_table(u32::MAX, &[source], &[skipped]);
        assert!(t.starts_with(&format!("pid {}: 1 file replicated, 1 skipped", u32::MAX)));
        let libc_row = t.lines().find(|l| l.contains("libc.so.6")).unwrap();
        for want in ["node0,node1", "3.0 MiB", "lease"] {
            assert!(libc_row.contains(want), "{want} missing in {t}");
        }
        assert!(t
            .lines()
            .any(|l| l.starts_with("SKIPPED") && l.contains("REASON")));
        let shim_row = t
            .lines()
            .find(|l| l.contains("libreplicad_preload"))
            .unwrap();
        assert!(shim_row.contains("never replicated"), "{t}");
        assert!(pid_table(u32::MAX, &[], &[]).contains("maps no program text"));
    }

    #[test]
    fn replicate_takes_paths_or_pid() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["replicactl"], args].concat());
        match parse(&["replicate", "--pid", "42"]).unwrap().command {
            Command::Replicate { pid, paths, .. } => {
                assert_eq!(pid, Some(42));
                assert!(paths.is_empty());
            }
            other => panic!("{other:?}"),
        }
        match parse(&["replicate", "/a", "/b"]).unwrap().command {
            Command::Replicate { pid, paths, .. } => {
                assert_eq!(pid, None);
                assert_eq!(paths.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        let both = parse(&["replicate", "--pid", "42", "/a"]).unwrap_err();
        assert!(both.to_string().contains("cannot be used with"), "{both}");
        assert!(parse(&["replicate"]).is_err());
        assert!(parse(&["replicate", "--pid", "x"]).is_err());
    }

    #[test]
    fn run_takes_the_command_after_its_options() {
        let cli = Cli::try_parse_from([
            "replicactl",
            "run",
            "--node",
            "1",
            "--",
            "sh",
            "-c",
            "x --node",
        ])
        .unwrap();
        match cli.command {
            Command::Run { node, command, .. } => {
                assert_eq!(node, Some(1));
                assert_eq!(command, ["sh", "-c", "x --node"]);
            }
            other => panic!("{other:?}"),
        }
        // Without `--`, everything from the first word on is the command.
        let cli = Cli::try_parse_from(["replicactl", "run", "ls", "-l"]).unwrap();
        match cli.command {
            Command::Run { node, command, .. } => {
                assert_eq!(node, None);
                assert_eq!(command, ["ls", "-l"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["replicactl", "run", "--node", "0"]).is_err());
    }

    #[test]
    fn ld_preload_puts_the_shim_first() {
        let shim = Path::new("/usr/lib/replicad/libreplicad_preload.so");
        let ld = |existing: Option<&str>| {
            compose_ld_preload(shim, existing.map(OsStr::new))
                .unwrap()
                .into_string()
                .unwrap()
        };
        let s = "/usr/lib/replicad/libreplicad_preload.so";
        assert_eq!(ld(None), s);
        assert_eq!(ld(Some("")), s);
        assert_eq!(ld(Some(" : ")), s);
        // Kept byte for byte after a colon, separators and all.
        assert_eq!(ld(Some("/lib/a.so")), format!("{s}:/lib/a.so"));
        assert_eq!(
            ld(Some("/lib/a.so /lib/b.so")),
            format!("{s}:/lib/a.so /lib/b.so")
        );
        // Another copy of the shim is dropped, the rest kept in order.
        assert_eq!(
            ld(Some("/lib/a.so /old/libreplicad_preload.so:/lib/b.so")),
            format!("{s}:/lib/a.so:/lib/b.so")
        );
        assert_eq!(ld(Some(s)), s);
        // A path LD_PRELOAD would split is refused.
        for bad in ["/opt/my lib/libreplicad_preload.so", "/opt/a:b/x.so"] {
            let e = compose_ld_preload(Path::new(bad), None).unwrap_err();
            assert!(e.to_string().contains("space or a colon"), "{e}");
        }
    }

    #[test]
    fn shim_is_found_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = |name: &str| {
            let d = tmp.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let put = |d: &Path| {
            let p = d.join(SHIM_NAME);
            std::fs::write(&p, b"\x7fELF").unwrap();
            std::fs::canonicalize(p).unwrap()
        };
        let bin = dir("prefix/bin");
        let lib = dir("prefix/lib/replicad");
        let sys1 = dir("usr-local");
        let sys2 = dir("usr");
        let system = [sys1.as_path(), sys2.as_path()];

        // Nothing anywhere: the error lists every place and how to build.
        let e = format!(
            "{:#}",
            find_shim(None, None, Some(&bin), &system).unwrap_err()
        );
        for want in [
            bin.join(SHIM_NAME),
            bin.join("../lib/replicad").join(SHIM_NAME),
            sys1.join(SHIM_NAME),
            sys2.join(SHIM_NAME),
        ] {
            assert!(e.contains(&want.display().to_string()), "{want:?} in {e}");
        }
        assert!(
            e.contains("cargo build --release -p replicad-preload"),
            "{e}"
        );

        // The last place first, then each earlier one takes over.
        let in_sys2 = put(&sys2);
        assert_eq!(find_shim(None, None, Some(&bin), &system).unwrap(), in_sys2);
        let in_sys1 = put(&sys1);
        assert_eq!(find_shim(None, None, Some(&bin), &system).unwrap(), in_sys1);
        let in_lib = put(&lib);
        assert_eq!(find_shim(None, None, Some(&bin), &system).unwrap(), in_lib);
        let beside = put(&bin);
        assert_eq!(find_shim(None, None, Some(&bin), &system).unwrap(), beside);
        assert_eq!(find_shim(None, None, None, &system).unwrap(), in_sys1);

        // The environment beats the search, --shim beats the environment.
        let env_dir = dir("env");
        let from_env = put(&env_dir);
        let env = from_env.as_os_str();
        assert_eq!(
            find_shim(None, Some(env), Some(&bin), &system).unwrap(),
            from_env
        );
        assert_eq!(
            find_shim(None, Some(OsStr::new("")), Some(&bin), &system).unwrap(),
            beside
        );
        let explicit = put(&dir("explicit"));
        assert_eq!(
            find_shim(Some(&explicit), Some(env), Some(&bin), &system).unwrap(),
            explicit
        );
        // Named but missing: an error naming it, no search.
        let missing = tmp.path().join("nope.so");
        let e = find_shim(Some(&missing), None, Some(&bin), &system).unwrap_err();
        assert!(e.to_string().starts_with("--shim "), "{e}");
        assert!(e.to_string().contains("nope.so: no such file"), "{e}");
        let e = find_shim(None, Some(missing.as_os_str()), Some(&bin), &system).unwrap_err();
        assert!(e.to_string().contains("$REPLICAD_PRELOAD"), "{e}");
    }

    #[test]
    fn node_cpus_come_from_the_topology() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("replicator/testdata/sysfs/2node");
        let topo = Topology::from_sysfs(&root).unwrap();
        let cpus = node_cpus(&topo, 1).unwrap();
        assert_eq!(
            replicad_replicator::topology::format_cpulist(&cpus),
            "20-39,60-79"
        );
        let e = format!("{:#}", node_cpus(&topo, 9).unwrap_err());
        assert!(e.contains("node 9 does not exist"), "{e}");
        assert!(e.contains("this machine has nodes 0-1"), "{e}");
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        let exec = |not_found| {
            anyhow::Error::from(RunError::Exec {
                command: "x".into(),
                reason: "y".into(),
                not_found,
            })
        };
        assert_eq!(exit_code(&exec(true)), 127);
        assert_eq!(exit_code(&exec(false)), 126);
        assert_eq!(
            exit_code(&RunError::Setup(anyhow::anyhow!("no shim")).into()),
            125
        );
        assert_eq!(exit_code(&anyhow::anyhow!("other")), 1);
    }

    #[test]
    fn checksum_and_sizes() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
