//! `replicactl`: ask the daemon to replicate or evict files, show the
//! replica list and the machine's topology, and read a file through the
//! client API the way a program would.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use replicad_client::proto::{NodeSelection, Request, Response, SourceStatus, StatusReport};
use replicad_replicator::Topology;

/// Exit code when the daemon cannot be reached.
pub const EXIT_UNREACHABLE: i32 = 3;

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
                  replicactl status                              # the replica list\n  \
                  replicactl map /srv/model.bin                  # read it as a client would\n  \
                  replicactl evict /srv/model.bin\n  \
                  replicactl topology"
)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "REPLICAD_SOCKET", default_value = replicad_client::proto::DEFAULT_SOCKET)]
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
    /// every page sits on its node. Needs root.
    Replicate {
        /// Nodes to copy onto: "all", or a list like 0,1.
        #[arg(long, default_value = "all")]
        nodes: String,
        /// Files to replicate.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Drop every replica of files and release their fences. Needs root.
    Evict {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Show the replica list: source, generation, target, bytes, attached
    /// pids, state.
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
        Command::Replicate { nodes, paths } => {
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
            for path in paths {
                let path = absolute(path)?;
                match ask(cli, &Request::Evict { path: path.clone() })? {
                    Response::Evicted { replicas } => {
                        writeln!(out, "{}: {replicas} replicas evicted", path.display())?
                    }
                    other => bail!("unexpected answer: {other:?}"),
                }
            }
        }
        Command::Status { json } => match ask(cli, &Request::Status)? {
            Response::Status { report } => {
                if *json {
                    serde_json::to_writer_pretty(&mut out, &report)?;
                    writeln!(out)?;
                } else {
                    write!(out, "{}", status_table(&report))?;
                }
            }
            other => bail!("unexpected answer: {other:?}"),
        },
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
    }
    Ok(())
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

/// The status report as a table.
pub fn status_table(report: &StatusReport) -> String {
    if report.sources.is_empty() {
        return "no replicas (replicate a file with `replicactl replicate PATH`)\n".into();
    }
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
    let widths: Vec<usize> = (0..7)
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
    use replicad_client::proto::{ReplicaState, ReplicaStatus};

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
                }],
            }],
            left_alone: vec![],
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
    }

    #[test]
    fn checksum_and_sizes() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
