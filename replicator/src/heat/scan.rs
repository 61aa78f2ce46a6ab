//! The heat scanner: which files the processes that a policy covers map,
//! and on which node each page they map sits.
//!
//! ```text
//!  pass = every pid in /proc, a few per step:
//!    cgroup ── covered by a policy that is not off? else forget the pid
//!    maps ──── private read-only file mappings (not the store's own files,
//!              not the shim): none? remember that, read nothing more
//!    numa_maps (only then) ── pages per node of each candidate mapping
//!    Cpus_allowed ── the one node the process runs on (or none: it spans)
//!  step ends when its CPU time reaches the step budget; the pass goes on
//!  at the next step. heat() folds the processes seen into one row per file.
//! ```
//!
//! A process that exits or whose files vanish mid-read is skipped; the
//! kernel's answers are parsed, never trusted to be well-formed (a line
//! that does not parse leaves the process out of this pass).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use replicad_procfs::ProcReader;

use super::policy::{Kind, Policies};
use crate::model::SourceKey;
use crate::Topology;

/// File name prefix of the preload shim: never a candidate.
const SHIM_PREFIX: &str = "libreplicad_preload";

/// One candidate mapping of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedFile {
    pub key: SourceKey,
    pub path: String,
    pub kind: Kind,
    /// Bytes the mapping spans.
    pub len: u64,
    /// Pages of the mapping resident on each node (numa_maps `N<n>=`).
    pub pages_per_node: BTreeMap<u32, u64>,
    /// The policy deciding for it (index into [`Policies::list`]).
    pub policy: usize,
}

/// What one pass saw of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcHeat {
    /// The node its CPUs lie on; `None` when they span several.
    pub node: Option<u32>,
    pub cgroups: Vec<String>,
    pub files: Vec<MappedFile>,
    /// It maps a replica from the store (it is attached).
    pub attached: bool,
}

/// Cost of one full pass over the processes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PassStats {
    /// Processes read (maps at least).
    pub processes: u64,
    /// Processes whose numa_maps was read (they map a candidate).
    pub numa_reads: u64,
    /// Processes that vanished or whose files did not parse.
    pub skipped: u64,
    /// CPU time this thread spent on the pass.
    pub cpu: Duration,
    /// Wall time from the first step to the last.
    pub wall: Duration,
    /// Steps the pass took.
    pub steps: u64,
}

/// One file as the scanner sees it across processes.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceHeat {
    pub key: SourceKey,
    pub path: String,
    pub kinds: Vec<Kind>,
    /// Largest mapping of it, in bytes.
    pub mapped_bytes: u64,
    /// Processes mapping it, by the node they run on (`None`: spanning).
    pub sharers: BTreeMap<u32, u32>,
    pub sharers_spanning: u32,
    /// Pages mapped, by the node they sit on: the most any one process
    /// maps there (processes sharing the file share its pages).
    pub resident: BTreeMap<u32, u64>,
    /// Remote-mapped pages by the node of the processes mapping them: the
    /// most any process on that node maps from other nodes.
    pub remote: BTreeMap<u32, u64>,
    /// Changes to the file seen per hour (mtime/ctime moved, or the fence
    /// broke for a writer).
    pub writes_per_hour: f64,
    /// The policy of the first process that maps it.
    pub policy: usize,
}

impl SourceHeat {
    /// Remote-mapped pages over every node.
    pub fn remote_pages(&self) -> u64 {
        self.remote.values().sum()
    }
}

/// One process's view of one file: pages per node over all its ranges,
/// the first range, the kinds, the bytes mapped.
type PerProcess<'a> = (BTreeMap<u32, u64>, &'a MappedFile, Vec<Kind>, u64);

#[derive(Debug, Default)]
struct WriteTrack {
    seen: Option<(i64, i64, i64, i64)>,
    writes: VecDeque<Instant>,
    /// A write break was noted since the last pass: the mtime it moved is
    /// that write, not another.
    broke: bool,
}

/// The scanner. Not `Sync`: one thread steps it.
#[derive(Debug)]
pub struct Scanner {
    proc: ProcReader,
    topology: Topology,
    /// Files under here are the store's replicas, never candidates.
    store_dir: PathBuf,
    procs: HashMap<u32, ProcHeat>,
    queue: VecDeque<u32>,
    current: PassStats,
    pass_began: Option<Instant>,
    last: Option<PassStats>,
    passes: u64,
    writes: HashMap<SourceKey, WriteTrack>,
    /// Whether the current pass has seen every pid (the first one counts
    /// from an empty map).
    complete: bool,
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

impl Scanner {
    pub fn new(proc: ProcReader, topology: Topology, store_dir: PathBuf) -> Scanner {
        Scanner {
            proc,
            topology,
            store_dir,
            procs: HashMap::new(),
            queue: VecDeque::new(),
            current: PassStats::default(),
            pass_began: None,
            last: None,
            passes: 0,
            writes: HashMap::new(),
            complete: false,
        }
    }

    /// Full passes finished.
    pub fn passes(&self) -> u64 {
        self.passes
    }

    /// The last full pass's cost.
    pub fn last_pass(&self) -> Option<PassStats> {
        self.last
    }

    /// Whether at least one full pass finished since the scanner started.
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// The processes the scanner knows, by pid.
    pub fn processes(&self) -> &HashMap<u32, ProcHeat> {
        &self.procs
    }

    /// Scan processes until this step's CPU time reaches `budget` or the
    /// pass ends (then a new pass starts at the next step). Returns
    /// whether a pass ended in this step.
    pub fn step(&mut self, policies: &Policies, budget: Duration) -> bool {
        let cpu0 = thread_cpu();
        if self.queue.is_empty() {
            let pids = self.proc.pids().unwrap_or_default();
            let live: std::collections::HashSet<u32> = pids.iter().copied().collect();
            self.procs.retain(|pid, _| live.contains(pid));
            self.queue = pids.into();
            self.current = PassStats::default();
            self.pass_began = Some(Instant::now());
        }
        self.current.steps += 1;
        let mut ended = false;
        while let Some(pid) = self.queue.pop_front() {
            self.scan_one(pid, policies);
            if self.queue.is_empty() {
                ended = true;
                break;
            }
            if thread_cpu().saturating_sub(cpu0) >= budget {
                break;
            }
        }
        self.current.cpu += thread_cpu().saturating_sub(cpu0);
        if ended {
            self.note_writes();
            self.current.wall = self.pass_began.map(|t| t.elapsed()).unwrap_or_default();
            self.last = Some(self.current);
            self.passes += 1;
            self.complete = true;
        }
        ended
    }

    /// Run whole passes with no budget (`replicactl heat` with no daemon
    /// scanner running, tests, benchmarks).
    pub fn full_pass(&mut self, policies: &Policies) -> PassStats {
        self.queue.clear();
        while !self.step(policies, Duration::MAX) {}
        self.last.unwrap_or_default()
    }

    fn scan_one(&mut self, pid: u32, policies: &Policies) {
        match self.read_one(pid, policies) {
            Ok(Some(p)) => {
                self.current.processes += 1;
                if !p.files.is_empty() {
                    self.current.numa_reads += 1;
                }
                self.procs.insert(pid, p);
            }
            Ok(None) => {
                self.procs.remove(&pid);
            }
            Err(()) => {
                self.current.skipped += 1;
                self.procs.remove(&pid);
            }
        }
    }

    /// `Ok(None)`: not covered; `Err`: vanished or unreadable.
    fn read_one(&self, pid: u32, policies: &Policies) -> Result<Option<ProcHeat>, ()> {
        // Every file through one directory fd: a pid reused mid-read
        // reads as vanished instead of mixing two processes.
        let dir = self.proc.process(pid).map_err(|_| ())?.ok_or(())?;
        let entries = dir.cgroups().map_err(|_| ())?.ok_or(())?;
        let mut cgroups: Vec<String> = entries.into_iter().map(|e| e.path).collect();
        if cgroups.is_empty() {
            cgroups.push("/".into());
        }
        cgroups.sort();
        cgroups.dedup();
        if !policies.scans(&cgroups) {
            return Ok(None);
        }
        let text = dir.maps_text().map_err(|_| ())?.ok_or(())?;
        let covering = policies.covering(&cgroups);
        let store = self.store_dir.to_string_lossy();
        let mut attached = false;
        let mut wanted = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            // A line that does not parse leaves the process out of the pass.
            let l = replicad_procfs::MapsLine::parse(line).ok_or(())?;
            if !l.private_readonly_file()
                || !l.path.starts_with('/')
                || l.path.ends_with(" (deleted)")
            {
                continue;
            }
            if l.path.starts_with(&*store) || l.path.starts_with("/memfd:") {
                attached = true;
                continue;
            }
            let name = l.path.rsplit('/').next().unwrap_or("");
            if name.starts_with(SHIM_PREFIX) {
                continue;
            }
            let kind = if l.perms[2] == b'x' {
                Kind::Text
            } else {
                Kind::Data
            };
            if let Some(i) = policies.decide_among(&covering, l.path, kind) {
                if policies.list[i].mode == super::policy::Mode::Off {
                    continue;
                }
                wanted.push((l, kind, i));
            }
        }
        let node = dir
            .cpus_allowed()
            .map_err(|_| ())?
            .ok_or(())
            .map(|cpus| self.topology.home_node(&cpus))?;
        let mut files = Vec::with_capacity(wanted.len());
        if !wanted.is_empty() {
            let mut starts: Vec<u64> = wanted.iter().map(|(l, _, _)| l.start).collect();
            starts.sort_unstable();
            let numa = dir
                .numa_maps_of(|s| starts.binary_search(&s).is_ok())
                .map_err(|_| ())?
                .ok_or(())?;
            let mut by_start: HashMap<u64, BTreeMap<u32, u64>> = numa
                .into_iter()
                .map(|e| (e.start, e.pages_per_node))
                .collect();
            for (l, kind, policy) in wanted {
                files.push(MappedFile {
                    key: SourceKey {
                        dev: l.dev,
                        ino: l.ino,
                    },
                    path: l.path.to_string(),
                    kind,
                    len: l.len(),
                    pages_per_node: by_start.remove(&l.start).unwrap_or_default(),
                    policy,
                });
            }
        }
        Ok(Some(ProcHeat {
            node,
            cgroups,
            files,
            attached,
        }))
    }

    /// A writer broke the fence of `key` (the engine saw it).
    pub fn note_write(&mut self, key: SourceKey) {
        let t = self.writes.entry(key).or_default();
        t.writes.push_back(Instant::now());
        t.broke = true;
    }

    /// Once per pass: a file whose mtime or ctime moved since the last pass
    /// was written.
    fn note_writes(&mut self) {
        let mut paths: HashMap<SourceKey, &str> = HashMap::new();
        for p in self.procs.values() {
            for f in &p.files {
                paths.entry(f.key).or_insert(&f.path);
            }
        }
        let hour = Duration::from_secs(3600);
        let now = Instant::now();
        for (key, path) in paths {
            let Ok(md) = std::fs::metadata(path) else {
                continue;
            };
            if md.dev() != key.dev || md.ino() != key.ino {
                continue;
            }
            let stamp = (md.mtime(), md.mtime_nsec(), md.ctime(), md.ctime_nsec());
            let t = self.writes.entry(key).or_default();
            if t.seen.is_some_and(|s| s != stamp) && !t.broke {
                t.writes.push_back(now);
            }
            t.seen = Some(stamp);
            t.broke = false;
        }
        for t in self.writes.values_mut() {
            while t
                .writes
                .front()
                .is_some_and(|w| now.duration_since(*w) > hour)
            {
                t.writes.pop_front();
            }
        }
        let known: std::collections::HashSet<SourceKey> = self
            .procs
            .values()
            .flat_map(|p| p.files.iter().map(|f| f.key))
            .collect();
        self.writes
            .retain(|k, t| known.contains(k) || !t.writes.is_empty());
    }

    /// Writes per hour seen for `key`: over the last hour, or extrapolated
    /// from the time the scanner has watched it when that is shorter.
    fn writes_per_hour(&self, key: SourceKey) -> f64 {
        let Some(t) = self.writes.get(&key) else {
            return 0.0;
        };
        let Some(first) = t.writes.front() else {
            return 0.0;
        };
        let span = first
            .elapsed()
            .max(Duration::from_secs(60))
            .min(Duration::from_secs(3600));
        t.writes.len() as f64 * 3600.0 / span.as_secs_f64()
    }

    /// One row per file the covered processes map.
    pub fn heat(&self) -> Vec<SourceHeat> {
        let mut by: BTreeMap<SourceKey, SourceHeat> = BTreeMap::new();
        for p in self.procs.values() {
            // A process maps a file in several ranges: sum them per process first.
            let mut mine: BTreeMap<SourceKey, PerProcess<'_>> = BTreeMap::new();
            for f in &p.files {
                let e = mine
                    .entry(f.key)
                    .or_insert_with(|| (BTreeMap::new(), f, Vec::new(), 0));
                for (n, pages) in &f.pages_per_node {
                    *e.0.entry(*n).or_default() += pages;
                }
                if !e.2.contains(&f.kind) {
                    e.2.push(f.kind);
                }
                e.3 += f.len;
            }
            for (key, (pages, f, kinds, len)) in mine {
                let h = by.entry(key).or_insert_with(|| SourceHeat {
                    key,
                    path: f.path.clone(),
                    kinds: Vec::new(),
                    mapped_bytes: 0,
                    sharers: BTreeMap::new(),
                    sharers_spanning: 0,
                    resident: BTreeMap::new(),
                    remote: BTreeMap::new(),
                    writes_per_hour: self.writes_per_hour(key),
                    policy: f.policy,
                });
                for k in kinds {
                    if !h.kinds.contains(&k) {
                        h.kinds.push(k);
                    }
                }
                h.kinds.sort();
                h.mapped_bytes = h.mapped_bytes.max(len);
                for (n, c) in &pages {
                    let r = h.resident.entry(*n).or_default();
                    *r = (*r).max(*c);
                }
                match p.node {
                    Some(node) => {
                        *h.sharers.entry(node).or_default() += 1;
                        let remote: u64 = pages
                            .iter()
                            .filter(|(n, _)| **n != node)
                            .map(|(_, c)| c)
                            .sum();
                        let r = h.remote.entry(node).or_default();
                        *r = (*r).max(remote);
                    }
                    None => h.sharers_spanning += 1,
                }
            }
        }
        by.into_values().collect()
    }
}
