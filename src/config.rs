//! replicad's configuration: TOML, every key optional, an embedded default.
//! Errors name the file, the line and the reason; a reload that fails keeps
//! the running config.
//!
//! One source of defaults: a key left out takes the engine's default
//! ([`StoreConfig::default`], [`EngineConfig::default`]); the embedded
//! default file (`src/default-config.toml`) spells those same values out,
//! and `deploy/replicad.toml` is its copy for operators. Tests keep all
//! three equal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::policy::{default_policies, PolicyConfig, Scan};

use replicad_replicator::engine::HomeNode;
use replicad_replicator::heat::{Budget, Policies, ScanConfig};
use replicad_replicator::model::NodeSelection;
use replicad_replicator::store::StoreConfig;
use replicad_replicator::EngineConfig;

/// The embedded default configuration (also `replicad --print-default-config`).
pub const DEFAULT: &str = include_str!("default-config.toml");

/// Where `/metrics` and `/status` listen unless `daemon.metrics_listen`
/// says otherwise.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// Config file problems.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {reason}")]
    Parse {
        file: PathBuf,
        line: usize,
        column: usize,
        reason: String,
    },
    #[error("{file}:{line}: {key}: {reason}")]
    Line {
        file: PathBuf,
        line: usize,
        key: String,
        reason: String,
    },
    #[error("{file}: {key}: {reason}")]
    Invalid {
        file: PathBuf,
        key: String,
        reason: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub daemon: Daemon,
    pub store: Store,
    pub fence: Fence,
    /// Files to replicate at start and keep replicated.
    pub replicate: Vec<Replicate>,
    /// Home nodes for processes whose CPUs span several nodes, by cgroup.
    pub home_node: Vec<HomeNodeConfig>,
    /// How the heat scanner paces itself.
    pub scan: Scan,
    /// What the planner may do, by cgroup (see [`crate::policy`]); none
    /// written: [`default_policies`].
    pub policy: Vec<PolicyConfig>,
    /// What `policy` and `scan` mean to the engine (built by `check`).
    #[serde(skip)]
    pub heat: Heat,
}

/// The engine's policies and scanner pacing, checked.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Heat {
    pub policies: Policies,
    pub scan: ScanConfig,
    /// PSI `memory some avg10` above which memory is short.
    pub psi_some_avg10: f64,
    /// Free memory under which a node is short.
    pub min_free: Option<Budget>,
}

impl Default for Config {
    fn default() -> Self {
        let scan = Scan::default();
        let policy = default_policies();
        let store = Store::default();
        let heat = Heat::build(
            &policy,
            &scan,
            store.huge_pages,
            "",
            Path::new("(defaults)"),
        )
        .unwrap_or_default();
        Config {
            daemon: Daemon::default(),
            store: Store::default(),
            fence: Fence::default(),
            replicate: Vec::new(),
            home_node: Vec::new(),
            scan,
            policy,
            heat,
        }
    }
}

impl Heat {
    fn build(
        policy: &[PolicyConfig],
        scan: &Scan,
        store_huge_pages: bool,
        text: &str,
        file: &Path,
    ) -> Result<Heat, ConfigError> {
        let (policies, scan, psi, min_free) =
            crate::policy::build(policy, scan, store_huge_pages, text, file)?;
        Ok(Heat {
            policies,
            scan,
            psi_some_avg10: psi,
            min_free: (min_free != Budget::Bytes(0)).then_some(min_free),
        })
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HomeNodeConfig {
    /// Cgroup path as `/proc/<pid>/cgroup` shows it; covers the cgroups below.
    pub cgroup: String,
    pub node: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Daemon {
    /// Run directory: node stores and, by default, the socket.
    pub run_dir: PathBuf,
    /// Control socket; default `<run_dir>/replicad.sock`.
    pub socket: Option<PathBuf>,
    /// Where `/metrics` and `/status` listen; "" turns HTTP off.
    pub metrics_listen: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Store {
    /// tmpfs `size=` of each node store: bytes with k/m/g, or a percentage.
    pub size: Option<String>,
    pub huge_pages: bool,
    pub force_memfd: bool,
    pub copy_threads: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Fence {
    /// Quiet time after a writer before a new generation is copied.
    pub settle_ms: u64,
    /// Longest back-off between attempts to take a fence back.
    pub retry_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Replicate {
    pub path: PathBuf,
    #[serde(default = "all_nodes")]
    pub nodes: Nodes,
}

/// `"all"` or a list of node numbers.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Nodes {
    Word(String),
    List(Vec<u32>),
}

fn all_nodes() -> Nodes {
    Nodes::Word("all".into())
}

impl Nodes {
    pub fn selection(&self) -> Option<NodeSelection> {
        match self {
            Nodes::Word(w) if w == "all" => Some(NodeSelection::All),
            Nodes::Word(_) => None,
            Nodes::List(l) => Some(NodeSelection::List(l.clone())),
        }
    }
}

impl Default for Daemon {
    fn default() -> Self {
        Daemon {
            run_dir: StoreConfig::default().run_dir,
            socket: None,
            metrics_listen: DEFAULT_METRICS_LISTEN.into(),
        }
    }
}

/// The store's own defaults.
impl Default for Store {
    fn default() -> Self {
        let StoreConfig {
            run_dir: _, // [daemon] run_dir
            size,
            huge_pages,
            force_memfd,
            copy_threads,
        } = StoreConfig::default();
        Store {
            size,
            huge_pages,
            force_memfd,
            copy_threads,
        }
    }
}

/// The engine's own defaults.
impl Default for Fence {
    fn default() -> Self {
        let e = EngineConfig::default();
        Fence {
            settle_ms: millis(e.settle),
            retry_max_ms: millis(e.retry_max),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Line and column (1-based) of byte offset `at` in `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

impl Config {
    /// Parse and check config text; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            let source_line = text.lines().nth(line - 1).unwrap_or("").trim();
            let reason = if source_line.is_empty() {
                e.message().to_string()
            } else {
                format!("{} (in `{source_line}`)", e.message())
            };
            ConfigError::Parse {
                file: file.to_path_buf(),
                line,
                column,
                reason,
            }
        })?;
        cfg.check(file)?;
        cfg.heat = Heat::build(&cfg.policy, &cfg.scan, cfg.store.huge_pages, text, file)?;
        Ok(cfg)
    }

    /// Read and parse a config file.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        Config::parse(&text, file)
    }

    /// The embedded default.
    pub fn embedded() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT, Path::new("(embedded default)"))
    }

    fn check(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        if !self.daemon.run_dir.is_absolute() {
            return Err(bad(
                "daemon.run_dir",
                format!("{} is not an absolute path", self.daemon.run_dir.display()),
            ));
        }
        if let Some(s) = &self.daemon.socket {
            if !s.is_absolute() {
                return Err(bad(
                    "daemon.socket",
                    format!("{} is not absolute", s.display()),
                ));
            }
        }
        if !self.daemon.metrics_listen.is_empty()
            && self.daemon.metrics_listen.parse::<SocketAddr>().is_err()
        {
            return Err(bad(
                "daemon.metrics_listen",
                format!(
                    "{:?} is not an address:port (e.g. 127.0.0.1:9464; \"\" turns HTTP off)",
                    self.daemon.metrics_listen
                ),
            ));
        }
        if let Some(size) = &self.store.size {
            if !valid_size(size) {
                return Err(bad(
                    "store.size",
                    format!("{size:?} is not a size: use bytes with k/m/g (\"8g\") or a percentage (\"50%\")"),
                ));
            }
        }
        if !(1..=64).contains(&self.store.copy_threads) {
            return Err(bad(
                "store.copy_threads",
                format!("{} is not between 1 and 64", self.store.copy_threads),
            ));
        }
        if self.fence.settle_ms > 600_000 || self.fence.retry_max_ms > 600_000 {
            return Err(bad(
                "fence",
                "times over 10 minutes are not sensible".into(),
            ));
        }
        for (i, h) in self.home_node.iter().enumerate() {
            if !h.cgroup.starts_with('/') {
                return Err(bad(
                    &format!("home_node[{i}].cgroup"),
                    format!(
                        "{:?} is not a cgroup path: write it as /proc/<pid>/cgroup shows it, \
                         e.g. \"/system.slice/model-server.service\"",
                        h.cgroup
                    ),
                ));
            }
        }
        for (i, r) in self.replicate.iter().enumerate() {
            if !r.path.is_absolute() {
                return Err(bad(
                    &format!("replicate[{i}].path"),
                    format!("{} is not an absolute path", r.path.display()),
                ));
            }
            if r.nodes.selection().is_none() {
                return Err(bad(
                    &format!("replicate[{i}].nodes"),
                    "must be \"all\" or a list of node numbers like [0, 1]".into(),
                ));
            }
        }
        Ok(())
    }

    /// The control socket path.
    pub fn socket(&self) -> PathBuf {
        self.daemon
            .socket
            .clone()
            .unwrap_or_else(|| self.daemon.run_dir.join("replicad.sock"))
    }

    /// The engine's part of the config.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            store: StoreConfig {
                run_dir: self.daemon.run_dir.clone(),
                size: self.store.size.clone(),
                huge_pages: self.store.huge_pages,
                force_memfd: self.store.force_memfd,
                copy_threads: self.store.copy_threads,
            },
            settle: Duration::from_millis(self.fence.settle_ms),
            retry_max: Duration::from_millis(self.fence.retry_max_ms.max(1)),
            home_nodes: self
                .home_node
                .iter()
                .map(|h| HomeNode {
                    cgroup: h.cgroup.clone(),
                    node: h.node,
                })
                .collect(),
            ..EngineConfig::default()
        }
    }
}

fn valid_size(s: &str) -> bool {
    let s = s.trim();
    let digits = s.trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G', '%']);
    let suffix = &s[digits.len()..];
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && suffix.len() <= 1
        && (suffix != "%" || digits.parse::<u32>().is_ok_and(|p| (1..=100).contains(&p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded default spells out the Default impls: running without
    /// a config file and with an empty one is the same.
    #[test]
    fn embedded_default_equals_the_defaults() {
        let cfg = Config::embedded().unwrap();
        assert_eq!(cfg.daemon.run_dir, PathBuf::from("/run/replicad"));
        assert_eq!(cfg.socket(), PathBuf::from("/run/replicad/replicad.sock"));
        assert_eq!(cfg, Config::default());
        assert_eq!(Config::parse("", Path::new("empty")).unwrap(), cfg);
    }

    /// `deploy/replicad.toml`, the operators' copy, holds the embedded
    /// default's values.
    #[test]
    fn deploy_copy_equals_the_embedded_default() {
        let deploy = Config::parse(
            include_str!("../deploy/replicad.toml"),
            Path::new("deploy/replicad.toml"),
        )
        .unwrap();
        assert_eq!(deploy, Config::embedded().unwrap());
    }

    /// The daemon's defaults are the engine's: what `Config::default()`
    /// hands the engine is `EngineConfig::default()`, field by field.
    #[test]
    fn defaults_are_the_engines() {
        let got = Config::default().engine();
        let want = EngineConfig::default();
        // Destructured so that a field added to either struct fails to
        // compile here until it is compared.
        let EngineConfig {
            store,
            settle,
            retry_max,
            prune_every,
            home_nodes,
            max_sources,
        } = want;
        let StoreConfig {
            run_dir,
            size,
            huge_pages,
            force_memfd,
            copy_threads,
        } = store;
        assert_eq!(got.store.run_dir, run_dir);
        assert_eq!(got.store.size, size);
        assert_eq!(got.store.huge_pages, huge_pages);
        assert_eq!(got.store.force_memfd, force_memfd);
        assert_eq!(got.store.copy_threads, copy_threads);
        assert_eq!(got.settle, settle);
        assert_eq!(got.retry_max, retry_max);
        assert_eq!(got.prune_every, prune_every);
        // Set by the daemon from its open-file limit, not by the config.
        assert_eq!(got.max_sources, max_sources);
        assert_eq!(got.home_nodes, home_nodes);
    }

    #[test]
    fn home_nodes_reach_the_engine() {
        let cfg = Config::parse(
            "[[home_node]]\ncgroup = \"/system.slice/m.service\"\nnode = 1\n",
            Path::new("f"),
        )
        .unwrap();
        assert_eq!(
            cfg.engine().home_nodes,
            vec![HomeNode {
                cgroup: "/system.slice/m.service".into(),
                node: 1
            }]
        );
        let e =
            Config::parse("[[home_node]]\ncgroup = \"m\"\nnode = 1\n", Path::new("f")).unwrap_err();
        assert!(e.to_string().contains("home_node[0].cgroup"), "{e}");
        let e = Config::parse("[[home_node]]\ncgroup = \"/m\"\n", Path::new("f")).unwrap_err();
        assert!(e.to_string().contains("node"), "{e}");
    }

    #[test]
    fn errors_name_file_line_and_reason() {
        let text = "[daemon]\nrun_dir = \"/x\"\nbogus = 1\n";
        let e = Config::parse(text, Path::new("/etc/r.toml")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("/etc/r.toml:3:"), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");

        let e = Config::parse("[store]\ncopy_threads = 0\n", Path::new("f")).unwrap_err();
        assert!(e.to_string().contains("store.copy_threads"), "{e}");
        let e = Config::parse("[store]\nsize = \"lots\"\n", Path::new("f")).unwrap_err();
        assert!(e.to_string().contains("store.size"), "{e}");
        let e = Config::parse("[daemon]\nmetrics_listen = \"x\"\n", Path::new("f")).unwrap_err();
        assert!(e.to_string().contains("metrics_listen"), "{e}");
        let e = Config::parse("[[replicate]]\npath = \"rel\"\n", Path::new("f")).unwrap_err();
        assert!(e.to_string().contains("replicate[0].path"), "{e}");
        let e = Config::parse(
            "[[replicate]]\npath = \"/a\"\nnodes = \"some\"\n",
            Path::new("f"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("replicate[0].nodes"), "{e}");
    }

    #[test]
    fn replicate_entries() {
        let cfg = Config::parse(
            "[[replicate]]\npath = \"/a\"\n[[replicate]]\npath = \"/b\"\nnodes = [0, 1]\n",
            Path::new("f"),
        )
        .unwrap();
        assert_eq!(cfg.replicate[0].nodes.selection(), Some(NodeSelection::All));
        assert_eq!(
            cfg.replicate[1].nodes.selection(),
            Some(NodeSelection::List(vec![0, 1]))
        );
    }

    #[test]
    fn sizes() {
        for ok in ["50%", "8g", "100m", "4096", "1K"] {
            assert!(valid_size(ok), "{ok}");
        }
        for bad in ["", "%", "0%", "101%", "1gg", "-1", "1t", "ten"] {
            assert!(!valid_size(bad), "{bad}");
        }
    }

    /// Arbitrary text never panics the parser (the fuzz target does this at
    /// scale).
    #[test]
    fn random_text_never_panics() {
        let mut x: u64 = 88172645463325252;
        let pieces = [
            "[daemon]",
            "[store]",
            "[fence]",
            "[[replicate]]",
            "\n",
            "=",
            "\"",
            "run_dir",
            "size",
            "path",
            "nodes",
            "[0,1]",
            "\"all\"",
            "1",
            "-",
            "#",
            "é",
            "{",
            "}",
            " ",
        ];
        for _ in 0..5000 {
            let mut s = String::new();
            for _ in 0..(x % 30) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s.push_str(pieces[(x % pieces.len() as u64) as usize]);
            }
            let _ = Config::parse(&s, Path::new("fuzz"));
            x = x.wrapping_add(1);
        }
    }
}
