//! `[[policy]]` and `[scan]`: the config's words for the engine's
//! [`Policies`] and [`ScanConfig`], checked with file, line and reason.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use replicad_replicator::heat::{Budget, Kind, Mode, Policies, Policy, ScanConfig};

use crate::config::ConfigError;

/// `[scan]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Scan {
    /// Time between scanner steps and planner runs (`"10s"`).
    pub interval: String,
    /// Share of one core the scanner may use (`"1%"`).
    pub cpu_budget: String,
    /// A file changed more often than this per hour is not read-mostly.
    pub max_writes_per_hour: f64,
    /// Memory pressure: PSI `memory` `some avg10` over this (percent).
    pub psi_some_avg10: f64,
    /// Memory pressure: a node with less free memory than this (`"0"`:
    /// never), bytes or a share of the node.
    pub min_free: String,
}

impl Default for Scan {
    fn default() -> Self {
        Scan {
            interval: "10s".into(),
            cpu_budget: "1%".into(),
            max_writes_per_hour: ScanConfig::default().max_writes_per_hour,
            psi_some_avg10: 10.0,
            min_free: "0".into(),
        }
    }
}

/// One `[[policy]]` as written.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    #[serde(default = "every_cgroup")]
    pub cgroups: Vec<String>,
    #[serde(default = "observe")]
    pub mode: String,
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default = "both_kinds")]
    pub kinds: Vec<String>,
    #[serde(default = "one")]
    pub min_sharers: u32,
    #[serde(default = "min_remote")]
    pub min_remote: String,
    #[serde(default = "node_budget")]
    pub node_budget: String,
    /// Unset: as `[store] huge_pages` (the only setting there is for now).
    #[serde(default)]
    pub huge_pages: Option<bool>,
    #[serde(default = "evict_after")]
    pub evict_after: String,
}

fn every_cgroup() -> Vec<String> {
    vec!["/**".into()]
}
fn observe() -> String {
    "observe".into()
}
fn both_kinds() -> Vec<String> {
    vec!["text".into(), "data".into()]
}
fn one() -> u32 {
    1
}
fn min_remote() -> String {
    "1m".into()
}
fn node_budget() -> String {
    "10%".into()
}
fn evict_after() -> String {
    "10m".into()
}

/// The policies with no config file: every cgroup; shared-library text is
/// replicated within 256 MiB a node, data is only observed.
pub fn default_policies() -> Vec<PolicyConfig> {
    let base =
        |name: &str, mode: &str, kinds: &[&str], min_remote: &str, budget: &str| PolicyConfig {
            name: name.into(),
            cgroups: every_cgroup(),
            mode: mode.into(),
            include: vec![],
            exclude: vec![],
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
            min_sharers: 1,
            min_remote: min_remote.into(),
            node_budget: budget.into(),
            huge_pages: None,
            evict_after: "10m".into(),
        };
    vec![
        base("text", "replicate", &["text"], "256k", "256m"),
        base("data", "observe", &["data"], "4m", "25%"),
    ]
}

/// Bytes with an optional k/m/g/t suffix (powers of 1024, as tmpfs reads
/// them; `"4m"`, `"8G"`, `"1t"`, `"4096"`).
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        b'g' | b'G' => (&s[..s.len() - 1], 1 << 30),
        b't' | b'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

/// A percentage `"25%"` (0 < p <= 100) or bytes.
pub fn parse_budget(s: &str) -> Option<Budget> {
    match s.trim().strip_suffix('%') {
        Some(p) => {
            let p: f64 = p.trim().parse().ok()?;
            (p > 0.0 && p <= 100.0).then_some(Budget::Percent(p))
        }
        None => parse_bytes(s).map(Budget::Bytes),
    }
}

/// `"500ms"`, `"10s"`, `"10m"`, `"2h"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "ms" => return Some(Duration::from_millis(n)),
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

/// The 1-based line of `key` in the `index`-th `[[policy]]` section of
/// `text` (the section's header when the key is not written there).
pub fn policy_line(text: &str, index: usize, key: &str) -> usize {
    section_line(text, "[[policy]]", index, key)
}

fn section_line(text: &str, header: &str, index: usize, key: &str) -> usize {
    let mut seen = 0usize;
    let mut header_line = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            if header_line.is_some() {
                break;
            }
            if t.split('#').next().unwrap_or("").trim() == header {
                if seen == index {
                    header_line = Some(i + 1);
                }
                seen += 1;
            }
            continue;
        }
        if header_line.is_some() {
            let k = t.split('=').next().unwrap_or("").trim();
            if k == key {
                return i + 1;
            }
        }
    }
    header_line.unwrap_or(1)
}

/// Check the policies and `[scan]` and build the engine's. `text` is the
/// file's text (for line numbers), `file` its name.
pub fn build(
    policies: &[PolicyConfig],
    scan: &Scan,
    store_huge_pages: bool,
    text: &str,
    file: &Path,
) -> Result<(Policies, ScanConfig, f64, Budget), ConfigError> {
    let scan_bad = |key: &str, reason: String| ConfigError::Line {
        file: file.to_path_buf(),
        line: section_line(text, "[scan]", 0, key),
        key: format!("scan.{key}"),
        reason,
    };
    let interval = parse_duration(&scan.interval)
        .filter(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_secs(3600))
        .ok_or_else(|| {
            scan_bad(
                "interval",
                format!(
                    "{:?} is not a time between 100ms and 1h (e.g. \"10s\")",
                    scan.interval
                ),
            )
        })?;
    let cpu_budget = match parse_budget(&scan.cpu_budget) {
        Some(Budget::Percent(p)) => p / 100.0,
        _ => {
            return Err(scan_bad(
                "cpu_budget",
                format!(
                    "{:?} is not a share of one core (e.g. \"1%\")",
                    scan.cpu_budget
                ),
            ))
        }
    };
    if !(scan.max_writes_per_hour >= 0.0 && scan.max_writes_per_hour.is_finite()) {
        return Err(scan_bad("max_writes_per_hour", "must be 0 or more".into()));
    }
    if !(0.0..=100.0).contains(&scan.psi_some_avg10) {
        return Err(scan_bad(
            "psi_some_avg10",
            "must be a percentage, 0 to 100".into(),
        ));
    }
    let min_free = if scan.min_free.trim() == "0" {
        Budget::Bytes(0)
    } else {
        parse_budget(&scan.min_free).ok_or_else(|| {
            scan_bad(
                "min_free",
                format!(
                    "{:?} is not bytes (\"512m\") or a share of the node (\"5%\")",
                    scan.min_free
                ),
            )
        })?
    };
    let mut list = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (i, p) in policies.iter().enumerate() {
        let bad = |key: &str, reason: String| ConfigError::Line {
            file: file.to_path_buf(),
            line: policy_line(text, i, key),
            key: format!("policy[{i}] ({}).{key}", p.name),
            reason,
        };
        if p.name.trim().is_empty() {
            return Err(bad("name", "a policy needs a name".into()));
        }
        if !names.insert(p.name.clone()) {
            return Err(bad("name", format!("{:?} names two policies", p.name)));
        }
        if p.cgroups.is_empty() {
            return Err(bad(
                "cgroups",
                "empty: name at least one cgroup glob, e.g. [\"/**\"]".into(),
            ));
        }
        if let Some(g) = p.cgroups.iter().find(|g| !g.starts_with('/')) {
            return Err(bad(
                "cgroups",
                format!("{g:?} is not a cgroup path glob: write it as /proc/<pid>/cgroup shows it, e.g. \"/system.slice/llama-*.service\""),
            ));
        }
        for (key, globs) in [("include", &p.include), ("exclude", &p.exclude)] {
            if let Some(g) = globs.iter().find(|g| !g.starts_with('/')) {
                return Err(bad(key, format!("{g:?} is not an absolute path glob")));
            }
        }
        let mode = Mode::parse(&p.mode).ok_or_else(|| {
            bad(
                "mode",
                format!(
                    "{:?} is not one of \"off\", \"observe\", \"replicate\"",
                    p.mode
                ),
            )
        })?;
        let mut kinds = Vec::new();
        for k in &p.kinds {
            let kind = Kind::parse(k)
                .ok_or_else(|| bad("kinds", format!("{k:?} is not \"text\" or \"data\"")))?;
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        if kinds.is_empty() {
            return Err(bad(
                "kinds",
                "empty: name \"text\", \"data\" or both".into(),
            ));
        }
        let min_remote = parse_bytes(&p.min_remote).ok_or_else(|| {
            bad(
                "min_remote",
                format!("{:?} is not bytes with k/m/g/t (e.g. \"4m\")", p.min_remote),
            )
        })?;
        let node_budget = parse_budget(&p.node_budget)
            .filter(|b| *b != Budget::Bytes(0))
            .ok_or_else(|| {
                bad(
                    "node_budget",
                    format!(
                        "{:?} is not bytes (\"2g\") or a share of the node's memory (\"25%\", at most 100%)",
                        p.node_budget
                    ),
                )
            })?;
        if let Some(h) = p.huge_pages.filter(|h| *h != store_huge_pages) {
            return Err(bad(
                "huge_pages",
                format!(
                    "{h} differs from [store] huge_pages = {store_huge_pages}: every copy sits in \
                     the node stores, mounted with huge pages or without for all of them; leave \
                     it out or set it as [store] does (huge pages per policy are not supported \
                     yet)"
                ),
            ));
        }
        let evict_after = parse_duration(&p.evict_after)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                bad(
                    "evict_after",
                    format!("{:?} is not a time (e.g. \"10m\")", p.evict_after),
                )
            })?;
        list.push(Policy {
            name: p.name.clone(),
            cgroups: p.cgroups.clone(),
            mode,
            include: p.include.clone(),
            exclude: p.exclude.clone(),
            kinds,
            min_sharers: p.min_sharers,
            min_remote,
            node_budget,
            huge_pages: p.huge_pages.unwrap_or(store_huge_pages),
            evict_after,
        });
    }
    Ok((
        Policies { list },
        ScanConfig {
            interval,
            cpu_budget,
            max_writes_per_hour: scan.max_writes_per_hour,
        },
        scan.psi_some_avg10,
        min_free,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_times_and_budgets() {
        assert_eq!(parse_bytes("4m"), Some(4 << 20));
        assert_eq!(parse_bytes("1t"), Some(1 << 40));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("8GiB"), None);
        assert_eq!(parse_bytes(""), None);
        assert_eq!(parse_bytes("99999999999999999999t"), None);
        assert_eq!(parse_budget("25%"), Some(Budget::Percent(25.0)));
        assert_eq!(parse_budget("150%"), None);
        assert_eq!(parse_budget("0%"), None);
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[test]
    fn lines_point_at_the_key_or_the_section() {
        let text = "[scan]\ninterval = \"1s\"\n\n[[policy]]\nname = \"a\"\n\n[[policy]]\nname = \"b\"\nmode = \"x\"\n";
        assert_eq!(policy_line(text, 1, "mode"), 9);
        assert_eq!(policy_line(text, 0, "mode"), 4);
        assert_eq!(section_line(text, "[scan]", 0, "interval"), 2);
    }

    fn err(text: &str) -> String {
        crate::config::Config::parse(text, Path::new("/etc/r.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn huge_pages_follow_the_store_and_a_different_one_is_refused() {
        let parse = |t: &str| crate::config::Config::parse(t, Path::new("/etc/r.toml"));
        // Unset: as the store (huge pages by default, or not).
        let c = parse("[[policy]]\nname = \"a\"\n").unwrap();
        assert!(c.heat.policies.list[0].huge_pages);
        let c = parse("[store]\nhuge_pages = false\n[[policy]]\nname = \"a\"\n").unwrap();
        assert!(!c.heat.policies.list[0].huge_pages);
        // The same as the store: taken.
        let c =
            parse("[store]\nhuge_pages = false\n[[policy]]\nname = \"a\"\nhuge_pages = false\n")
                .unwrap();
        assert!(!c.heat.policies.list[0].huge_pages);
        // Another value: refused with its line, the store's value and the fix.
        let e = err("[[policy]]\nname = \"a\"\nhuge_pages = false\n");
        assert!(
            e.starts_with("/etc/r.toml:3: policy[0] (a).huge_pages: false differs from [store] huge_pages = true"),
            "{e}"
        );
        assert!(e.contains("leave it out or set it as [store] does"), "{e}");
        // The embedded default with its stores mounted without huge pages.
        assert!(parse("[store]\nhuge_pages = false\n").is_ok());
    }

    #[test]
    fn bad_policies_are_refused_with_file_line_and_reason() {
        let e = err("[[policy]]\nname = \"a\"\nmode = \"copy\"\n");
        assert!(
            e.starts_with("/etc/r.toml:3: policy[0] (a).mode: \"copy\" is not one of"),
            "{e}"
        );
        let e =
            err("[[policy]]\nname = \"a\"\n\n[[policy]]\nname = \"b\"\nnode_budget = \"150%\"\n");
        assert!(
            e.starts_with("/etc/r.toml:6: policy[1] (b).node_budget"),
            "{e}"
        );
        let e = err("[[policy]]\nname = \"a\"\ncgroups = [\"system.slice\"]\n");
        assert!(
            e.contains(":3:") && e.contains("not a cgroup path glob"),
            "{e}"
        );
        let e = err("[[policy]]\nname = \"a\"\nkinds = [\"code\"]\n");
        assert!(e.contains(":3:") && e.contains("\"code\""), "{e}");
        let e = err("[[policy]]\nname = \"a\"\nmin_remote = \"lots\"\n");
        assert!(e.contains(":3:") && e.contains("min_remote"), "{e}");
        let e = err("[[policy]]\nname = \"a\"\nevict_after = \"0s\"\n");
        assert!(e.contains("evict_after"), "{e}");
        let e = err("[[policy]]\nname = \"a\"\n[[policy]]\nname = \"a\"\n");
        assert!(e.contains("names two policies"), "{e}");
        let e = err("[scan]\ninterval = \"10\"\n");
        assert!(e.starts_with("/etc/r.toml:2: scan.interval"), "{e}");
        let e = err("[scan]\ncpu_budget = \"0.01\"\n");
        assert!(e.contains("scan.cpu_budget"), "{e}");
        let e = err("[[policy]]\nname = \"a\"\nmodes = \"off\"\n");
        assert!(e.contains(":3:") && e.contains("modes"), "{e}");
    }

    #[test]
    fn policies_reach_the_engine() {
        let c = crate::config::Config::parse(
            "[scan]\ninterval = \"2s\"\ncpu_budget = \"5%\"\nmin_free = \"5%\"\n[[policy]]\nname = \"llama\"\n\
             cgroups = [\"/system.slice/llama-*.service\"]\nmode = \"replicate\"\nkinds = [\"data\"]\n\
             min_remote = \"4m\"\nnode_budget = \"2g\"\n",
            Path::new("f"),
        )
        .unwrap();
        let p = &c.heat.policies.list;
        assert_eq!(p.len(), 1, "a written policy replaces the defaults");
        assert_eq!(p[0].mode, Mode::Replicate);
        assert_eq!(p[0].kinds, [Kind::Data]);
        assert_eq!(p[0].min_remote, 4 << 20);
        assert_eq!(p[0].node_budget, Budget::Bytes(2 << 30));
        assert_eq!(c.heat.scan.interval, Duration::from_secs(2));
        assert!((c.heat.scan.cpu_budget - 0.05).abs() < 1e-9);
        assert_eq!(c.heat.min_free, Some(Budget::Percent(5.0)));
        let d = crate::config::Config::embedded().unwrap();
        let names: Vec<(&str, Mode)> = d
            .heat
            .policies
            .list
            .iter()
            .map(|p| (p.name.as_str(), p.mode))
            .collect();
        assert_eq!(names, [("text", Mode::Replicate), ("data", Mode::Observe)]);
        assert!(d
            .heat
            .policies
            .scans(&["/system.slice/x.service".to_string()]));
    }
}
