//! `replicate --pid`: replicate the text a running process maps.
//!
//! ```text
//!  /proc/<pid>/maps ── r-xp file mappings ── dedupe (dev, ino)
//!        │                                        │
//!        │        skip: the store's own files, the preload shim
//!        ▼                                        ▼
//!  /proc/<pid>/map_files/<start>-<end> ── open, fstat == maps dev/ino
//!        └─ replicate_file ── SourceStatus, or Skipped { path, reason }
//! ```
//!
//! Each file is opened through `map_files` rather than by its path: that
//! is the inode the process maps even when the path means something else in
//! our mount namespace, or the file was replaced by a rename. Only root
//! (`CAP_SYS_ADMIN`) may open those links.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use replicad_procfs::{MapsLine, ProcReader};

use crate::model::{NodeSelection, Skipped, SourceView};
use crate::{Error, Replicator, Result};

/// File name prefix of the preload shim, which is never replicated (its
/// text runs the SIGBUS fallback).
const SHIM_PREFIX: &str = "libreplicad_preload";

/// Name prefix of the store's memfd replicas, as maps shows them.
const MEMFD_REPLICA_PREFIX: &str = "/memfd:replicad:";

/// What maps appends to the path of an unlinked file.
const DELETED_SUFFIX: &str = " (deleted)";

/// One file whose text a process maps: the first `r-xp` mapping of it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TextFile {
    start: u64,
    end: u64,
    dev: u64,
    ino: u64,
    /// The path as maps shows it, without " (deleted)".
    path: PathBuf,
    deleted: bool,
}

impl TextFile {
    /// The name of the mapping's link under `map_files` (hex, no leading
    /// zeros: the kernel refuses padded names).
    fn map_files_name(&self) -> String {
        format!("{:x}-{:x}", self.start, self.end)
    }
}

/// A process's maps and mapped files, read through a procfs reader.
#[derive(Debug, Clone, Default)]
struct ProcMaps {
    proc: ProcReader,
}

impl ProcMaps {
    #[cfg(test)]
    fn new(root: impl Into<PathBuf>) -> Self {
        ProcMaps {
            proc: ProcReader::new(root),
        }
    }

    /// The (dev, ino) of the dynamic loader `pid` runs with: the mapping
    /// holding `AT_BASE` from its auxv. `None` for a static program, or if
    /// auxv cannot be read.
    fn loader(&self, pid: u32, maps: &str) -> Option<(u64, u64)> {
        let base = self.proc.at_base(pid).ok().flatten()?;
        maps.lines()
            .filter_map(MapsLine::parse)
            .find(|l| l.start <= base && base < l.end && l.ino != 0)
            .map(|l| (l.dev, l.ino))
    }

    /// The text of the process's maps.
    fn read(&self, pid: u32) -> Result<String> {
        match self.proc.maps_text(pid) {
            Ok(Some(text)) => Ok(text),
            Ok(None) => Err(Error::NoSuchProcess { pid }),
            Err(e) => Err(Error::proc(pid, "maps", e)),
        }
    }

    /// Open the file behind one mapping and check it is the inode maps
    /// names. `Err` holds the reason to skip it.
    fn open(&self, pid: u32, f: &TextFile) -> std::result::Result<File, String> {
        let link = self
            .proc
            .pid_dir(pid)
            .join("map_files")
            .join(f.map_files_name());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&link)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => format!(
                    "{}: the mapping is gone (pid {pid} exited or unmapped it meanwhile)",
                    link.display()
                ),
                std::io::ErrorKind::PermissionDenied => format!(
                    "{}: {e}: opening another process's mapped files needs CAP_SYS_ADMIN; \
                     run replicad as root",
                    link.display()
                ),
                _ => format!("{}: {e}", link.display()),
            })?;
        let meta = file
            .metadata()
            .map_err(|e| format!("{}: fstat: {e}", link.display()))?;
        if (meta.dev(), meta.ino()) != (f.dev, f.ino) {
            return Err(format!(
                "the file opened through {} is dev {} ino {}, not dev {} ino {} as maps says \
                 (the mapping changed meanwhile, or a filesystem whose maps show another \
                 device or inode than stat: overlayfs, btrfs subvolumes): replicate it by \
                 path instead",
                link.display(),
                dev_str(meta.dev()),
                meta.ino(),
                dev_str(f.dev),
                f.ino
            ));
        }
        Ok(file)
    }
}

/// `major:minor` of an `st_dev`.
fn dev_str(dev: u64) -> String {
    format!("{}:{}", libc::major(dev), libc::minor(dev))
}

/// The files whose text `maps` shows mapped (private executable file
/// mappings, `r-xp`), each once by (dev, ino), in the order they first
/// appear (the program first). A line that does not parse is an error
/// naming its number: nothing is guessed.
fn text_files(pid: u32, maps: &str) -> Result<Vec<TextFile>> {
    let mut files: Vec<TextFile> = Vec::new();
    for (i, line) in maps.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let m = MapsLine::parse(line).ok_or_else(|| Error::Proc {
            pid,
            file: "maps",
            reason: format!(
                "line {}: not a maps line: {:?}",
                i + 1,
                line.chars().take(120).collect::<String>()
            ),
        })?;
        if &m.perms != b"r-xp" || m.ino == 0 || m.path.starts_with('[') {
            continue;
        }
        if files.iter().any(|f| (f.dev, f.ino) == (m.dev, m.ino)) {
            continue;
        }
        let (path, deleted) = match m.path.strip_suffix(DELETED_SUFFIX) {
            Some(p) => (p, true),
            None => (m.path, false),
        };
        files.push(TextFile {
            start: m.start,
            end: m.end,
            dev: m.dev,
            ino: m.ino,
            path: PathBuf::from(path),
            deleted,
        });
    }
    Ok(files)
}

/// Why `f` is never replicated, if it is not: the store's own replicas
/// (a process already on a replica maps it from the store) and the shim.
fn never_replicated(f: &TextFile, run_dir: &Path) -> Option<String> {
    if f.path.starts_with(run_dir) {
        return Some(format!(
            "a replica in replicad's own store ({}): the process already runs on a replica",
            run_dir.display()
        ));
    }
    if f.path.to_string_lossy().starts_with(MEMFD_REPLICA_PREFIX) {
        return Some("a replica (memfd) of replicad's own store".into());
    }
    let name = f.path.file_name().map(|n| n.to_string_lossy());
    if name.is_some_and(|n| n.starts_with(SHIM_PREFIX)) {
        return Some(
            "the preload shim is never replicated: its text must stay on the file for the \
             fallback to work"
                .into(),
        );
    }
    if f.deleted {
        return Some(
            "the file was deleted (replaced by an upgrade?): replicas of unlinked files are \
             dropped; restart the process on the new file"
                .into(),
        );
    }
    None
}

impl Replicator {
    /// Replicate every file whose text `pid` maps onto `nodes`: the
    /// program and its libraries (private executable file mappings). Files
    /// that cannot be replicated (open for writing, on a filesystem that
    /// cannot be fenced, the shim, the store's own) are listed in the
    /// second vector with the reason; only a missing process, an unreadable
    /// maps, a bad node or a shutdown fail the whole request.
    pub fn replicate_pid(
        &self,
        pid: u32,
        nodes: &NodeSelection,
    ) -> Result<(Vec<SourceView>, Vec<Skipped>)> {
        let proc = ProcMaps {
            proc: self.inner.proc.clone(),
        };
        self.replicate_pid_in(&proc, pid, nodes)
    }

    fn replicate_pid_in(
        &self,
        proc: &ProcMaps,
        pid: u32,
        nodes: &NodeSelection,
    ) -> Result<(Vec<SourceView>, Vec<Skipped>)> {
        self.check_running()?;
        // A node the machine lacks fails the request, not every file.
        self.targets(nodes)?;
        let maps = proc.read(pid)?;
        let loader = proc.loader(pid, &maps);
        let files = text_files(pid, &maps)?;
        let run_dir = &self.inner.cfg.store.run_dir;
        let mut sources = Vec::new();
        let mut skipped = Vec::new();
        for f in files {
            if loader == Some((f.dev, f.ino)) {
                skipped.push(Skipped {
                    path: f.path,
                    reason: "the dynamic loader: the shim never moves it (its code runs while \
                             the shim remaps), so a replica would go unused"
                        .into(),
                });
                continue;
            }
            if let Some(reason) = never_replicated(&f, run_dir) {
                skipped.push(Skipped {
                    path: f.path,
                    reason,
                });
                continue;
            }
            let file = match proc.open(pid, &f) {
                Ok(file) => file,
                Err(reason) => {
                    skipped.push(Skipped {
                        path: f.path,
                        reason,
                    });
                    continue;
                }
            };
            match self.replicate_file(file, &f.path, nodes) {
                Ok(status) => sources.push(status),
                Err(e @ (Error::ShuttingDown | Error::NoSuchNode { .. })) => return Err(e),
                Err(e) => {
                    skipped.push(Skipped {
                        path: f.path,
                        reason: e.to_string(),
                    });
                }
            }
        }
        // One line per request (an admin's), not one per file.
        tracing::info!(
            "replicate --pid {pid}: {} files replicated, {} skipped",
            sources.len(),
            skipped.len()
        );
        Ok((sources, skipped))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const MAPS: &str = "\
55fbc2704000-55fbc2706000 r--p 00000000 fe:00 247774                     /usr/bin/sleep
55fbc2706000-55fbc270b000 r-xp 00002000 fe:00 247774                     /usr/bin/sleep
55fc00d91000-55fc00db2000 rw-p 00000000 00:00 0                          [heap]
7f8d0c5e6000-7f8d0c60c000 r--p 00000000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f8d0c60c000-7f8d0c762000 r-xp 00026000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f8d0c762000-7f8d0c7b5000 r-xp 0017c000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f8d0c7b9000-7f8d0c7bb000 rw-p 001d3000 fe:00 326279                     /usr/lib/x86_64-linux-gnu/libc.so.6
7f8d0c7c9000-7f8d0c7d0000 r-xs 00000000 fe:00 325745                     /usr/lib/shared.cache
7f8d0c7d0000-7f8d0c7d1000 r-xp 00000000 fe:00 400001                     /opt/old lib.so (deleted)
7f8d0c7d9000-7f8d0c7db000 r-xp 00000000 00:00 0                          [vdso]
7f8d0c7dc000-7f8d0c802000 r-xp 00001000 fe:00 325843                     /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn selects_private_text_once_per_file() {
        let files = text_files(7, MAPS).unwrap();
        let paths: Vec<&str> = files.iter().map(|f| f.path.to_str().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "/usr/bin/sleep",
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
                "/opt/old lib.so",
                "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            ]
        );
        // The first r-xp mapping of libc is the one opened.
        assert_eq!(files[1].start, 0x7f8d_0c60_c000);
        assert_eq!(files[1].map_files_name(), "7f8d0c60c000-7f8d0c762000");
        assert_eq!(files[1].dev, libc::makedev(0xfe, 0));
        assert_eq!(files[1].ino, 326279);
        assert!(files[2].deleted && !files[1].deleted);
    }

    #[test]
    fn map_files_names_have_no_padding() {
        let f = &text_files(1, "00400000-0040b000 r-xp 00000000 08:01 12 /bin/x\n").unwrap()[0];
        assert_eq!(f.map_files_name(), "400000-40b000");
    }

    #[test]
    fn bad_line_is_named_by_number() {
        let maps = "55fbc2704000-55fbc2706000 r-xp 00000000 fe:00 1 /a\nnot a maps line\n";
        let e = text_files(42, maps).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("/proc/42/maps: line 2:"), "{msg}");
        assert!(msg.contains("not a maps line"), "{msg}");
        assert!(text_files(1, "").unwrap().is_empty());
    }

    #[test]
    fn store_files_shim_and_deleted_are_skipped() {
        let run = Path::new("/run/replicad");
        let f = |path: &str, deleted: bool| TextFile {
            start: 0x1000,
            end: 0x2000,
            dev: 1,
            ino: 2,
            path: PathBuf::from(path),
            deleted,
        };
        assert!(
            never_replicated(&f("/run/replicad/node0/1-2-g1", false), run)
                .unwrap()
                .contains("own store")
        );
        assert!(never_replicated(&f("/memfd:replicad:libc.so.6:g1", true), run).is_some());
        assert!(
            never_replicated(&f("/usr/lib/replicad/libreplicad_preload.so", false), run)
                .unwrap()
                .contains("shim")
        );
        assert!(never_replicated(&f("/usr/lib/libx.so", true), run)
            .unwrap()
            .contains("deleted"));
        assert!(never_replicated(&f("/run/replicad2/libx.so", false), run).is_none());
        assert!(never_replicated(&f("/usr/lib/libx.so", false), run).is_none());
    }

    #[test]
    fn missing_pid_and_unreadable_maps() {
        let dir = tempfile::tempdir().unwrap();
        let proc = ProcMaps::new(dir.path());
        assert!(matches!(
            proc.read(123),
            Err(Error::NoSuchProcess { pid: 123 })
        ));
        // A directory where the file should be: an error naming the file.
        std::fs::create_dir_all(dir.path().join("5/maps")).unwrap();
        let e = proc.read(5).unwrap_err().to_string();
        assert!(e.starts_with("/proc/5/maps: cannot read it"), "{e}");
    }

    /// Our own maps, read and opened as the daemon does another's.
    #[test]
    fn opens_own_text_through_map_files() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP opens_own_text_through_map_files: map_files needs root");
            return;
        }
        let proc = ProcMaps::default();
        let pid = std::process::id();
        let files = text_files(pid, &proc.read(pid).unwrap()).unwrap();
        assert!(!files.is_empty());
        for f in &files {
            let file = proc.open(pid, f).unwrap();
            let meta = file.metadata().unwrap();
            assert_eq!((meta.dev(), meta.ino()), (f.dev, f.ino));
        }
        // A mapping that does not exist is a reason to skip, not a panic.
        let gone = TextFile {
            start: 0x1000,
            end: 0x2000,
            ..files[0].clone()
        };
        assert!(proc
            .open(pid, &gone)
            .unwrap_err()
            .contains("mapping is gone"));
        // Same link, other inode: refused.
        let other = TextFile {
            ino: files[0].ino + 1,
            ..files[0].clone()
        };
        assert!(proc.open(pid, &other).unwrap_err().contains("not dev"));
    }
}
