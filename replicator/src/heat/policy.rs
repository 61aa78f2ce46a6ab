//! Per-cgroup policy: which processes the scanner looks at, which of their
//! file mappings count, and what the planner may do with them. The daemon
//! builds these from `[[policy]]` sections of its config; the engine only
//! matches and obeys them.

use std::time::Duration;

use super::glob::glob_match;

/// What a policy lets the planner do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Not scanned, never replicated.
    Off,
    /// Scanned and planned; the plan is reported (`replicactl plan`) and
    /// nothing changes.
    Observe,
    /// Scanned, planned and carried out.
    Replicate,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Observe => "observe",
            Mode::Replicate => "replicate",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "off" => Some(Mode::Off),
            "observe" => Some(Mode::Observe),
            "replicate" => Some(Mode::Replicate),
            _ => None,
        }
    }
}

/// What a mapping holds, as its protection says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Executable (`r-xp`): program and library text.
    Text,
    /// Read-only, not executable (`r--p`): mapped data files, rodata.
    Data,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Data => "data",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "text" => Some(Kind::Text),
            "data" => Some(Kind::Data),
            _ => None,
        }
    }
}

/// Bytes a policy may place on each node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    Bytes(u64),
    /// A share of the node's memory, in percent (0 < p <= 100).
    Percent(f64),
}

impl Budget {
    /// The budget on a node with `node_bytes` of memory.
    pub fn bytes(&self, node_bytes: u64) -> u64 {
        match *self {
            Budget::Bytes(b) => b,
            Budget::Percent(p) => (node_bytes as f64 * p / 100.0) as u64,
        }
    }
}

/// One `[[policy]]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    /// Globs over cgroup paths as `/proc/<pid>/cgroup` shows them.
    pub cgroups: Vec<String>,
    pub mode: Mode,
    /// Path globs a file must match (empty: every file).
    pub include: Vec<String>,
    /// Path globs that rule a file out.
    pub exclude: Vec<String>,
    pub kinds: Vec<Kind>,
    /// Fewest processes on a node that map a file before it gets a copy.
    pub min_sharers: u32,
    /// Fewest remote-mapped bytes on a node before it gets a copy.
    pub min_remote: u64,
    pub node_budget: Budget,
    pub huge_pages: bool,
    /// A replica the planner made that no process maps for this long goes.
    pub evict_after: Duration,
}

impl Policy {
    /// A policy that observes every file of every process (`replicactl
    /// heat` with no policy, benchmarks).
    pub fn observe_everything(name: &str) -> Policy {
        Policy {
            name: name.into(),
            cgroups: vec!["/**".into()],
            mode: Mode::Observe,
            include: vec![],
            exclude: vec![],
            kinds: vec![Kind::Text, Kind::Data],
            min_sharers: 1,
            min_remote: 0,
            node_budget: Budget::Bytes(0),
            huge_pages: false,
            evict_after: Duration::from_secs(600),
        }
    }

    /// Whether a process in `cgroups` (its cgroup paths) falls under this
    /// policy.
    pub fn covers(&self, cgroups: &[String]) -> bool {
        cgroups
            .iter()
            .any(|c| self.cgroups.iter().any(|g| glob_match(g, c)))
    }

    /// Whether a mapping of `path` of `kind` counts under this policy.
    pub fn wants(&self, path: &str, kind: Kind) -> bool {
        self.kinds.contains(&kind)
            && (self.include.is_empty() || self.include.iter().any(|g| glob_match(g, path)))
            && !self.exclude.iter().any(|g| glob_match(g, path))
    }
}

/// The policies in config order: the first that covers a process and
/// wants a mapping decides for that mapping.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policies {
    pub list: Vec<Policy>,
}

impl Policies {
    /// The policy deciding for a mapping of `path` (`kind`) by a process
    /// in `cgroups`: the first that covers the process and wants the file.
    pub fn decide(&self, cgroups: &[String], path: &str, kind: Kind) -> Option<(usize, &Policy)> {
        self.decide_among(&self.covering(cgroups), path, kind)
            .map(|i| (i, &self.list[i]))
    }

    /// The policies (indices) covering a process in `cgroups`, for
    /// [`Policies::decide_among`]: the cgroup globs once per process rather
    /// than once per mapping.
    pub fn covering(&self, cgroups: &[String]) -> Vec<usize> {
        (0..self.list.len())
            .filter(|&i| self.list[i].covers(cgroups))
            .collect()
    }

    /// [`Policies::decide`] for a process covered by `covering`.
    pub fn decide_among(&self, covering: &[usize], path: &str, kind: Kind) -> Option<usize> {
        covering
            .iter()
            .copied()
            .find(|&i| self.list[i].wants(path, kind))
    }

    /// Whether any policy other than `off` covers a process in `cgroups`.
    pub fn scans(&self, cgroups: &[String]) -> bool {
        self.list
            .iter()
            .any(|p| p.mode != Mode::Off && p.covers(cgroups))
    }
}

/// How the scanner paces itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScanConfig {
    /// Time between scan steps (and planner runs).
    pub interval: Duration,
    /// Share of one core the scanner may use, as a fraction (0.01 = 1%).
    pub cpu_budget: f64,
    /// A file changed more often than this per hour is not read-mostly.
    pub max_writes_per_hour: f64,
}

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            interval: Duration::from_secs(10),
            cpu_budget: 0.01,
            max_writes_per_hour: 6.0,
        }
    }
}

impl ScanConfig {
    /// CPU time one step may use.
    pub fn step_budget(&self) -> Duration {
        self.interval.mul_f64(self.cpu_budget.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn policy(name: &str, cgroups: &[&str], mode: Mode, kinds: &[Kind]) -> Policy {
        Policy {
            name: name.into(),
            cgroups: cgroups.iter().map(|s| s.to_string()).collect(),
            mode,
            include: vec![],
            exclude: vec![],
            kinds: kinds.to_vec(),
            min_sharers: 1,
            min_remote: 0,
            node_budget: Budget::Bytes(1 << 30),
            huge_pages: false,
            evict_after: Duration::from_secs(600),
        }
    }

    #[test]
    fn first_covering_policy_that_wants_the_file_decides() {
        let mut a = policy(
            "llama",
            &["/system.slice/llama-*.service"],
            Mode::Replicate,
            &[Kind::Data],
        );
        a.include = vec!["/srv/models/**".into()];
        let b = policy("rest", &["/**"], Mode::Observe, &[Kind::Text, Kind::Data]);
        let ps = Policies { list: vec![a, b] };
        let llama = vec!["/system.slice/llama-7b.service".to_string()];
        assert_eq!(
            ps.decide(&llama, "/srv/models/w.bin", Kind::Data)
                .unwrap()
                .1
                .name,
            "llama"
        );
        assert_eq!(
            ps.decide(&llama, "/usr/lib/libc.so.6", Kind::Text)
                .unwrap()
                .1
                .name,
            "rest"
        );
        let other = vec!["/user.slice".to_string()];
        assert_eq!(
            ps.decide(&other, "/srv/models/w.bin", Kind::Data)
                .unwrap()
                .1
                .name,
            "rest"
        );
        let mut off = policy("none", &["/**"], Mode::Off, &[Kind::Text]);
        off.exclude = vec!["/usr/**".into()];
        let ps = Policies { list: vec![off] };
        assert!(!ps.scans(&other));
        assert!(ps.decide(&other, "/usr/lib/x", Kind::Text).is_none());
    }

    #[test]
    fn budgets_and_step_budget() {
        assert_eq!(Budget::Percent(25.0).bytes(4 << 30), 1 << 30);
        assert_eq!(Budget::Bytes(5).bytes(1), 5);
        let s = ScanConfig::default();
        assert_eq!(s.step_budget(), Duration::from_millis(100));
    }
}
