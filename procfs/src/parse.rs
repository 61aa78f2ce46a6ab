//! Pure parsers of the text (and auxv bytes) the kernel prints under
//! `/proc/<pid>/`. Each takes what was read and returns a typed value or a
//! [`ParseError`] naming the 1-based line; none reads a file, none panics
//! on any input (the fuzz target `procfs` and the randomized tests check
//! that). [`crate::ProcReader`] calls them and adds the path.

use std::collections::BTreeMap;

use crate::cpulist::{parse_cpulist, quote};

/// Text that does not parse: where, and why. [`crate::ProcReader`] turns it
/// into [`crate::Error::Parse`] with the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line (for `auxv`, the 1-based pair); 0: the text as a
    /// whole (a field it must hold is missing).
    pub line: usize,
    /// What is wrong, quoting at most a little of the text.
    pub reason: String,
}

impl ParseError {
    fn new(line: usize, reason: impl Into<String>) -> Self {
        ParseError {
            line,
            reason: reason.into(),
        }
    }
}

/// `auxv` key ending the vector.
pub const AT_NULL: u64 = 0;
/// `auxv` key: the base address of the dynamic loader (0 or absent for a
/// static program).
pub const AT_BASE: u64 = 7;

/// `/proc/<pid>/stat`, the fields replicad uses (`proc_pid_stat(5)`
/// numbering in the field docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// (1) The process id.
    pub pid: u32,
    /// (2) The command name, without the parentheses; may hold spaces and
    /// `)`.
    pub comm: String,
    /// (3) `R`, `S`, `D`, `Z`, `T`, `t`, `X`, `I` ...
    pub state: char,
    /// (4) Parent pid.
    pub ppid: u32,
    /// (5) Process group.
    pub pgrp: i32,
    /// (6) Session.
    pub session: i32,
    /// (7) Controlling terminal.
    pub tty_nr: i32,
    /// (9) `PF_*` flags.
    pub flags: u32,
    /// (10) Minor faults.
    pub minflt: u64,
    /// (12) Major faults.
    pub majflt: u64,
    /// (14) User time, clock ticks.
    pub utime: u64,
    /// (15) System time, clock ticks.
    pub stime: u64,
    /// (18) Priority.
    pub priority: i64,
    /// (19) Nice value.
    pub nice: i64,
    /// (20) Threads.
    pub num_threads: u64,
    /// (22) Start time in clock ticks after boot: with the pid, tells a
    /// recycled pid from the process that was seen.
    pub start_time: u64,
    /// (23) Virtual size, bytes.
    pub vsize: u64,
    /// (24) Resident set, pages.
    pub rss_pages: u64,
}

/// The fields of `stat` after the comm, counted from `state` (field 3).
const STAT_AFTER_COMM: usize = 22; // state (3) ..= rss (24)

/// Parse `/proc/<pid>/stat`. The comm is everything between the first `(`
/// and the LAST `)`: it may hold spaces, parentheses and newlines.
pub fn parse_stat(text: &str) -> Result<Stat, ParseError> {
    let text = text.strip_suffix('\n').unwrap_or(text);
    let (Some(open), Some(close)) = (text.find('('), text.rfind(')')) else {
        return Err(ParseError::new(1, "no \"(comm)\" in stat"));
    };
    if close < open {
        return Err(ParseError::new(1, "\")\" before \"(\" in stat"));
    }
    let head = text.get(..open).unwrap_or("").trim();
    let comm = text.get(open + 1..close).unwrap_or("");
    let rest = text.get(close + 1..).unwrap_or("");
    let pid: u32 = head
        .parse()
        .map_err(|_| ParseError::new(1, format!("pid {} is not a number", quote(head))))?;
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    if f.len() < STAT_AFTER_COMM {
        return Err(ParseError::new(
            1,
            format!(
                "stat is truncated: {} fields after the comm, {STAT_AFTER_COMM} needed",
                f.len()
            ),
        ));
    }
    // f[i] is field i + 3.
    fn num<T: std::str::FromStr>(f: &[&str], field: usize) -> Result<T, ParseError> {
        let s = f.get(field - 3).copied().unwrap_or("");
        s.parse()
            .map_err(|_| ParseError::new(1, format!("field {field} {} is not a number", quote(s))))
    }
    let mut state = f.first().copied().unwrap_or("").chars();
    let (Some(st), None) = (state.next(), state.next()) else {
        return Err(ParseError::new(1, "state (field 3) is not one character"));
    };
    Ok(Stat {
        pid,
        comm: comm.to_string(),
        state: st,
        ppid: num(&f, 4)?,
        pgrp: num(&f, 5)?,
        session: num(&f, 6)?,
        tty_nr: num(&f, 7)?,
        flags: num(&f, 9)?,
        minflt: num(&f, 10)?,
        majflt: num(&f, 12)?,
        utime: num(&f, 14)?,
        stime: num(&f, 15)?,
        priority: num(&f, 18)?,
        nice: num(&f, 19)?,
        num_threads: num(&f, 20)?,
        start_time: num(&f, 22)?,
        vsize: num(&f, 23)?,
        rss_pages: num(&f, 24)?,
    })
}

/// `/proc/<pid>/status`, the fields replicad uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// `Uid:` real, effective, saved, filesystem.
    pub uid: [u32; 4],
    /// `Gid:` real, effective, saved, filesystem.
    pub gid: [u32; 4],
    /// `Cpus_allowed_list:`, sorted.
    pub cpus_allowed: Vec<u32>,
    /// `Mems_allowed_list:`, sorted; empty on a kernel without cpusets
    /// (which does not print it).
    pub mems_allowed: Vec<u32>,
    /// `Threads:`.
    pub threads: u64,
    /// `VmRSS:` in kB; `None` for a kernel thread or a zombie.
    pub vm_rss_kb: Option<u64>,
    /// `Groups:` (supplementary groups), as listed; empty when the line is
    /// empty or absent.
    pub groups: Vec<u32>,
}

/// Parse `/proc/<pid>/status` (`Key:\tvalue` lines). `Uid`, `Gid`,
/// `Cpus_allowed_list` and `Threads` must be there (line 0 if one is not);
/// other keys are ignored.
pub fn parse_status(text: &str) -> Result<Status, ParseError> {
    let mut uid = None;
    let mut gid = None;
    let mut cpus = None;
    let mut mems = None;
    let mut threads = None;
    let mut rss = None;
    let mut groups = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let bad = |what: &str| ParseError::new(n, format!("{key}: {what} {}", quote(value)));
        match key {
            "Uid" | "Gid" => {
                let ids: Vec<u32> = value
                    .split_ascii_whitespace()
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad("not four ids"))?;
                let ids: [u32; 4] = ids.try_into().map_err(|_| bad("not four ids"))?;
                if key == "Uid" {
                    uid = Some(ids);
                } else {
                    gid = Some(ids);
                }
            }
            "Cpus_allowed_list" | "Mems_allowed_list" => {
                let list =
                    parse_cpulist(value).map_err(|e| ParseError::new(n, format!("{key}: {e}")))?;
                if key == "Cpus_allowed_list" {
                    cpus = Some(list);
                } else {
                    mems = Some(list);
                }
            }
            "Threads" => threads = Some(value.parse().map_err(|_| bad("not a number"))?),
            "Groups" => {
                groups = value
                    .split_ascii_whitespace()
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad("not a list of group ids"))?;
            }
            "VmRSS" => {
                let kb = value.strip_suffix("kB").map(str::trim).unwrap_or(value);
                rss = Some(kb.parse().map_err(|_| bad("not a size in kB"))?);
            }
            _ => {}
        }
    }
    let missing = |key: &str| ParseError::new(0, format!("status has no {key} line"));
    Ok(Status {
        uid: uid.ok_or_else(|| missing("Uid"))?,
        gid: gid.ok_or_else(|| missing("Gid"))?,
        cpus_allowed: cpus.ok_or_else(|| missing("Cpus_allowed_list"))?,
        mems_allowed: mems.unwrap_or_default(),
        threads: threads.ok_or_else(|| missing("Threads"))?,
        vm_rss_kb: rss,
        groups,
    })
}

/// `Cpus_allowed_list` of `status` text alone (what the engine and the
/// shim need, without the rest of [`parse_status`]'s checks).
pub fn parse_cpus_allowed(text: &str) -> Result<Vec<u32>, ParseError> {
    for (i, line) in text.lines().enumerate() {
        if let Some(v) = line.strip_prefix("Cpus_allowed_list:") {
            return parse_cpulist(v.trim())
                .map_err(|e| ParseError::new(i + 1, format!("Cpus_allowed_list: {e}")));
        }
    }
    Err(ParseError::new(0, "status has no Cpus_allowed_list line"))
}

/// One line of `/proc/<pid>/cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupEntry {
    /// Hierarchy id: 0 for the v2 unified hierarchy.
    pub hierarchy: u32,
    /// The v1 controllers bound to it (`cpu`, `cpuacct`, `name=systemd`);
    /// empty for v2.
    pub controllers: Vec<String>,
    /// The cgroup path, relative to the hierarchy's root (`/` for the root).
    pub path: String,
}

/// Parse `/proc/<pid>/cgroup`: v2 `0::/x`, v1 `N:ctrl,ctrl:/x`, or both
/// (hybrid). An empty file (a kernel with no hierarchy mounted) is one
/// entry `{0, [], "/"}`: the process is in the root.
pub fn parse_cgroup(text: &str) -> Result<Vec<CgroupEntry>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(ParseError::new(
                i + 1,
                format!("not \"id:controllers:path\": {}", quote(line)),
            ));
        };
        let hierarchy = id.parse().map_err(|_| {
            ParseError::new(i + 1, format!("hierarchy id {} is not a number", quote(id)))
        })?;
        out.push(CgroupEntry {
            hierarchy,
            controllers: ctrl
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect(),
            path: path.to_string(),
        });
    }
    if out.is_empty() {
        out.push(CgroupEntry {
            hierarchy: 0,
            controllers: Vec::new(),
            path: "/".to_string(),
        });
    }
    Ok(out)
}

/// `/proc/<pid>/fdinfo/<fd>`, the common fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdInfo {
    /// `pos:` file offset.
    pub pos: u64,
    /// `flags:` the `open(2)` flags (printed in octal).
    pub flags: u32,
    /// `mnt_id:` (kernel 3.15+).
    pub mnt_id: Option<u64>,
    /// `ino:` (kernel 5.14+).
    pub ino: Option<u64>,
}

impl FdInfo {
    /// The fd may write: `flags & O_ACCMODE` is not `O_RDONLY`.
    pub fn writable(&self) -> bool {
        self.flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32
    }
}

/// Parse `fdinfo` text. `pos` and `flags` must be there; the type-specific
/// lines (eventfd, epoll, inotify, locks) are ignored.
pub fn parse_fdinfo(text: &str) -> Result<FdInfo, ParseError> {
    let (mut pos, mut flags, mut mnt_id, mut ino) = (None, None, None, None);
    for (i, line) in text.lines().enumerate() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let bad = || ParseError::new(i + 1, format!("{key}: {} is not a number", quote(value)));
        match key {
            "pos" if pos.is_none() => pos = Some(value.parse().map_err(|_| bad())?),
            "flags" if flags.is_none() => {
                flags = Some(u32::from_str_radix(value, 8).map_err(|_| bad())?)
            }
            "mnt_id" if mnt_id.is_none() => mnt_id = Some(value.parse().map_err(|_| bad())?),
            "ino" if ino.is_none() => ino = Some(value.parse().map_err(|_| bad())?),
            _ => {}
        }
    }
    Ok(FdInfo {
        pos: pos.ok_or_else(|| ParseError::new(0, "fdinfo has no pos line"))?,
        flags: flags.ok_or_else(|| ParseError::new(0, "fdinfo has no flags line"))?,
        mnt_id,
        ino,
    })
}

/// Parse `/proc/<pid>/auxv`: native-endian `(key, value)` u64 pairs, up
/// to (not including) `AT_NULL`. Empty (a zombie, a kernel thread) is an
/// empty vector; a partial pair before `AT_NULL` is an error.
pub fn parse_auxv(bytes: &[u8]) -> Result<Vec<(u64, u64)>, ParseError> {
    let mut out = Vec::new();
    let mut chunks = bytes.chunks_exact(16);
    for pair in chunks.by_ref() {
        let word = |at: usize| {
            let mut w = [0u8; 8];
            if let Some(b) = pair.get(at..at + 8) {
                w.copy_from_slice(b);
            }
            u64::from_ne_bytes(w)
        };
        let (k, v) = (word(0), word(8));
        if k == AT_NULL {
            return Ok(out);
        }
        out.push((k, v));
    }
    if !chunks.remainder().is_empty() {
        return Err(ParseError::new(
            out.len() + 1,
            format!(
                "auxv is {} bytes, not whole 16-byte pairs, and has no AT_NULL",
                bytes.len()
            ),
        ));
    }
    Ok(out)
}

/// One line of `/proc/<pid>/numa_maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaMapsEntry {
    /// Start of the mapping (matches [`crate::MapsLine::start`]).
    pub start: u64,
    /// Memory policy: `default`, `bind:0-1`, `interleave:0-1`, `prefer:1` ...
    pub policy: String,
    /// `file=`: the mapped file, octal escapes (`\040`) decoded.
    pub file: Option<String>,
    /// `N<node>=<pages>`: pages on each node.
    pub pages_per_node: BTreeMap<u32, u64>,
    /// `anon=` pages.
    pub anon: u64,
    /// `dirty=` pages.
    pub dirty: u64,
    /// `mapped=` pages.
    pub mapped: u64,
    /// `kernelpagesize_kB=`: 4, or 2048 / 1048576 for huge pages; 0 when
    /// the line has no pages (the kernel then prints no counts).
    pub kernelpagesize_kb: u64,
    /// `huge`: a hugetlb mapping.
    pub huge: bool,
    /// `heap`.
    pub heap: bool,
    /// `stack`.
    pub stack: bool,
}

/// Parse `/proc/<pid>/numa_maps`. Unknown `key=value` and flag words
/// (`active=`, `swapcache=`, `mapmax=` ...) are ignored; a known count
/// that is not a number is an error.
pub fn parse_numa_maps(text: &str) -> Result<Vec<NumaMapsEntry>, ParseError> {
    parse_numa_maps_of(text, |_| true)
}

/// [`parse_numa_maps`] of the lines whose start `keep` accepts; the others
/// are read only as far as their start (the scanner wants a few mappings
/// of each process, and a line's start is all that names it).
pub fn parse_numa_maps_of(
    text: &str,
    mut keep: impl FnMut(u64) -> bool,
) -> Result<Vec<NumaMapsEntry>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_ascii_whitespace();
        let (Some(start), Some(policy)) = (words.next(), words.next()) else {
            return Err(ParseError::new(
                n,
                format!("not \"start policy ...\": {}", quote(line)),
            ));
        };
        let start = u64::from_str_radix(start, 16)
            .map_err(|_| ParseError::new(n, format!("start {} is not hex", quote(start))))?;
        if !keep(start) {
            continue;
        }
        let mut e = NumaMapsEntry {
            start,
            policy: policy.to_string(),
            file: None,
            pages_per_node: BTreeMap::new(),
            anon: 0,
            dirty: 0,
            mapped: 0,
            kernelpagesize_kb: 0,
            huge: false,
            heap: false,
            stack: false,
        };
        for w in words {
            let Some((key, value)) = w.split_once('=') else {
                match w {
                    "huge" => e.huge = true,
                    "heap" => e.heap = true,
                    "stack" => e.stack = true,
                    _ => {}
                }
                continue;
            };
            let count = || {
                value.parse::<u64>().map_err(|_| {
                    ParseError::new(n, format!("{key}= {} is not a number", quote(value)))
                })
            };
            match key {
                "file" => e.file = Some(unescape_octal(value)),
                "anon" => e.anon = count()?,
                "dirty" => e.dirty = count()?,
                "mapped" => e.mapped = count()?,
                "kernelpagesize_kB" => e.kernelpagesize_kb = count()?,
                _ => {
                    if let Some(node) = key.strip_prefix('N') {
                        if let Ok(node) = node.parse::<u32>() {
                            e.pages_per_node.insert(node, count()?);
                        }
                    }
                }
            }
        }
        out.push(e);
    }
    Ok(out)
}

/// One line of `/proc/<pid>/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// (1) Mount id.
    pub mount_id: u32,
    /// (2) Parent's mount id.
    pub parent_id: u32,
    /// (3) `major:minor`, as `st_dev` encodes it (`makedev`).
    pub dev: u64,
    /// (4) The root of the mount within its filesystem, decoded.
    pub root: String,
    /// (5) Where it is mounted, relative to the reader's root, decoded
    /// (`\040` is a space).
    pub mount_point: String,
    /// (6) Per-mount options (`rw,relatime`).
    pub options: String,
    /// (7) Optional fields (`shared:7`, `master:1`), possibly none.
    pub optional: Vec<String>,
    /// (9) Filesystem type, decoded.
    pub fstype: String,
    /// (10) Source, decoded (may be empty).
    pub source: String,
    /// (11) Per-superblock options.
    pub super_options: String,
}

/// Parse `/proc/<pid>/mountinfo` (fields separated by single spaces; the
/// optional fields end at `-`). Octal escapes are decoded in the paths,
/// fstype and source.
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountInfo>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.is_empty() {
            continue;
        }
        let bad = |what: &str| ParseError::new(n, format!("{what}: {}", quote(line)));
        let mut f = line.split(' ');
        let (Some(id), Some(parent), Some(dev), Some(root), Some(point), Some(opts)) =
            (f.next(), f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            return Err(bad("fewer than six fields"));
        };
        let mut optional = Vec::new();
        let mut sep = false;
        for w in f.by_ref() {
            if w == "-" {
                sep = true;
                break;
            }
            optional.push(w.to_string());
        }
        let (true, Some(fstype), Some(source), Some(sopts)) = (sep, f.next(), f.next(), f.next())
        else {
            return Err(bad("no \"- fstype source options\""));
        };
        let (major, minor) = dev.split_once(':').ok_or_else(|| bad("no major:minor"))?;
        let (Ok(major), Ok(minor)) = (major.parse::<u32>(), minor.parse::<u32>()) else {
            return Err(bad("major:minor is not two numbers"));
        };
        out.push(MountInfo {
            mount_id: id.parse().map_err(|_| bad("mount id is not a number"))?,
            parent_id: parent
                .parse()
                .map_err(|_| bad("parent id is not a number"))?,
            dev: libc::makedev(major, minor),
            root: unescape_octal(root),
            mount_point: unescape_octal(point),
            options: opts.to_string(),
            optional,
            fstype: unescape_octal(fstype),
            source: unescape_octal(source),
            super_options: sopts.to_string(),
        });
    }
    Ok(out)
}

/// Undo the kernel's octal escapes (`\040` space, `\011` tab, `\012`
/// newline, `\134` backslash); anything else is kept as is. Bytes that are
/// not UTF-8 become U+FFFD.
pub fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'\\' {
            if let Some(oct) = b.get(i + 1..i + 4) {
                if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                    let v = oct
                        .iter()
                        .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                    if let Ok(byte) = u8::try_from(v) {
                        out.push(byte);
                        i += 4;
                        continue;
                    }
                }
            }
        }
        out.push(c);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
