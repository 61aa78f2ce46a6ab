//! The CPU replica store: where node-local copies of source files live.
//!
//! ```text
//!  Store ── node 0: tmpfs "replicad-node0" at <run_dir>/node0 (mpol=bind:0)
//!       │      └─ ReplicaFile "<dev>-<ino>-g<generation>" (xattrs: source, generation, path)
//!       └─ node 1: memfd + mbind (where mounting is not allowed)
//!              └─ ReplicaFile memfd "replicad:<basename>:g<generation>"
//! ```
//!
//! A replica's life: [`Store::create`] -> [`ReplicaFile::fill`] (copy, see
//! [`crate::copy`]) -> [`ReplicaFile::placement`] (every page on its node?)
//! -> [`ReplicaFile::seal`] (mode 0400, memfd seals, then
//! `FS_IMMUTABLE_FL`: nobody writes it, root included) ->
//! [`ReplicaFile::open_readonly`], a fresh read-only open for each client
//! -> [`ReplicaFile::revoke`] (clear the flag, truncate: the kernel unmaps
//! it from every process) -> [`ReplicaFile::remove`].
//!
//! Open files: a tmpfs replica holds its fd only while it is filled and
//! sealed; from then on it is held by its path in the node store plus its
//! (dev, ino) ([`ReplicaPath`]), and every operation opens it for that
//! moment (`O_NOFOLLOW`, then checks it is still that inode). So is it in
//! the fence keeper. A source then costs one open file, its lease, however
//! many nodes it is on. A memfd has no path: it keeps its fd.
//!
//! The source is never mapped, only read, so a writer that truncates it
//! cannot crash the daemon; the daemon never touches a replica's bytes from
//! userspace either (only the kernel does, through syscalls), so a revoke
//! racing a copy is an error, not a SIGBUS.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use nix::mount::{MntFlags, MsFlags};
use nix::sys::memfd::{memfd_create, MFdFlags};

use replicad_procfs::ProcReader;

use crate::copy::{self, CopyError, CopyJob, CopyMethod, Mapping};
use crate::{numa, sys, Error, Result};

/// Where the kernel lists this process's mounts.
/// xattr naming the source: `"<dev>:<ino>"`.
pub const XATTR_SOURCE: &str = "trusted.replicad.source";
/// xattr naming the generation: `"<seq>:<size>:<mtime_ns>:<ctime_ns>"`.
pub const XATTR_GENERATION: &str = "trusted.replicad.generation";
/// xattr holding the source path's bytes.
pub const XATTR_PATH: &str = "trusted.replicad.path";
/// xattr naming the node the replica is for (decimal), so that a daemon
/// that adopts it from the fence keeper knows its target.
pub const XATTR_NODE: &str = "trusted.replicad.node";
/// Pages queried per `move_pages` call by [`ReplicaFile::placement`].
const PLACEMENT_BATCH: usize = 4096;
/// The longest memfd name the kernel takes (`NAME_MAX` less `"memfd:"`).
const MEMFD_NAME_MAX: usize = 249;

/// How the store is configured.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Run directory; node stores are `<run_dir>/node<N>`.
    pub run_dir: PathBuf,
    /// tmpfs `size=` for each node store (e.g. "50%", "8g"); `None`: the
    /// tmpfs default.
    pub size: Option<String>,
    /// Mount with `huge=within_size`.
    pub huge_pages: bool,
    /// Never mount: memfd + mbind only.
    pub force_memfd: bool,
    /// Threads for copying one large replica.
    pub copy_threads: usize,
}

/// The defaults of the whole product: the daemon's `[store]` defaults and
/// its embedded default config are these.
impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            run_dir: PathBuf::from("/run/replicad"),
            size: Some("50%".into()),
            // Replicas of 2 MiB and more in 2 MiB pages: copies ~4x faster,
            // revokes ~5x cheaper (BENCHMARKS.md).
            huge_pages: true,
            force_memfd: false,
            copy_threads: 2,
        }
    }
}

/// Identity of one replica: its source and generation. Written to the
/// replica file's xattrs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaIdent {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub generation: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl ReplicaIdent {
    /// The identity of generation `generation` of the file `path` whose
    /// metadata is `md`.
    pub fn of_file(path: &Path, md: &fs::Metadata, generation: u64) -> ReplicaIdent {
        use std::os::unix::fs::MetadataExt;
        ReplicaIdent {
            path: path.to_path_buf(),
            dev: md.dev(),
            ino: md.ino(),
            generation,
            size: md.size(),
            mtime_ns: sys::nanos(md.mtime(), md.mtime_nsec()),
            ctime_ns: sys::nanos(md.ctime(), md.ctime_nsec()),
        }
    }

    /// The value of [`XATTR_SOURCE`].
    pub fn source_xattr(&self) -> String {
        format!("{}:{}", self.dev, self.ino)
    }

    /// The value of [`XATTR_GENERATION`].
    pub fn generation_xattr(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.generation, self.size, self.mtime_ns, self.ctime_ns
        )
    }

    /// The identity and node a replica's xattrs give (see
    /// [`Store::adopt`]); `Err` names what is missing or malformed.
    pub fn from_xattrs(fd: BorrowedFd<'_>) -> std::result::Result<(ReplicaIdent, u32), String> {
        let text = |name: &str| -> std::result::Result<Vec<u8>, String> {
            match sys::get_xattr(fd, name) {
                Ok(Some(v)) => Ok(v),
                Ok(None) => Err(format!("no {name} xattr")),
                Err(e) => Err(format!("cannot read its {name} xattr: {e}")),
            }
        };
        let numbers = |name: &str, want: usize| -> std::result::Result<Vec<i128>, String> {
            let v = text(name)?;
            let nums: Option<Vec<i128>> = std::str::from_utf8(&v)
                .ok()
                .map(|s| {
                    s.split(':')
                        .map(|n| n.parse().ok())
                        .collect::<Option<Vec<_>>>()
                })
                .and_then(|n| n)
                .filter(|n| n.len() == want);
            nums.ok_or_else(|| format!("a malformed {name} xattr"))
        };
        let source = numbers(XATTR_SOURCE, 2)?;
        let generation = numbers(XATTR_GENERATION, 4)?;
        let node = numbers(XATTR_NODE, 1)?;
        let path = PathBuf::from(OsStr::from_bytes(&text(XATTR_PATH)?));
        let u64_of = |v: i128| u64::try_from(v).map_err(|_| "an xattr out of range".to_string());
        let i64_of = |v: i128| i64::try_from(v).map_err(|_| "an xattr out of range".to_string());
        let ident = ReplicaIdent {
            path,
            dev: u64_of(source[0])?,
            ino: u64_of(source[1])?,
            generation: u64_of(generation[0])?,
            size: u64_of(generation[1])?,
            mtime_ns: i64_of(generation[2])?,
            ctime_ns: i64_of(generation[3])?,
        };
        let node = u32::try_from(node[0]).map_err(|_| "an xattr out of range".to_string())?;
        Ok((ident, node))
    }
}

/// Where pages of a replica sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Placement {
    pub pages: u64,
    pub misplaced: u64,
}

/// What one copy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyStats {
    pub bytes: u64,
    pub nanos: u64,
}

/// What backs one node's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// A tmpfs mounted with `mpol=bind:N` (by this store or adopted).
    Tmpfs,
    /// memfds whose pages are bound to the node with `mbind`.
    Memfd,
}

#[derive(Debug)]
struct NodeStore {
    dir: PathBuf,
    kind: StoreKind,
    /// This store mounted (or adopted) the tmpfs, so `close` unmounts it.
    mounted: bool,
}

/// The per-node stores.
#[derive(Debug)]
pub struct Store {
    cfg: StoreConfig,
    nodes: BTreeMap<u32, NodeStore>,
    leftovers: usize,
    method: CopyMethod,
    closed: AtomicBool,
}

impl Store {
    /// Open (mount) the node stores and remove every replica an earlier run
    /// left behind, except the files in `keep` (`(dev, ino)`: replicas
    /// adopted from the fence keeper, which fenced them all along).
    ///
    /// A node dir that is already a tmpfs mountpoint (a crashed earlier run)
    /// is adopted: reused, and unmounted by [`Store::close`] like one this
    /// store mounted. A node whose tmpfs cannot be mounted (or every node
    /// with `force_memfd`) uses memfd + `mbind`, with a warning.
    pub fn open(
        cfg: &StoreConfig,
        nodes: &[u32],
        keep: &std::collections::BTreeSet<(u64, u64)>,
    ) -> Result<Store> {
        let mut store = Store {
            cfg: cfg.clone(),
            nodes: BTreeMap::new(),
            leftovers: 0,
            method: CopyMethod::DEFAULT,
            closed: AtomicBool::new(false),
        };
        // Replicas of an earlier run that nobody fenced since: they may be
        // stale. Remove them before anything else.
        let unique: std::collections::BTreeSet<u32> = nodes.iter().copied().collect();
        let mut dirs = Vec::with_capacity(unique.len());
        for node in unique {
            let dir = cfg.run_dir.join(format!("node{node}"));
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| Error::io(&dir, e))?;
            store.leftovers += remove_leftovers(&dir, keep)?;
            dirs.push((node, dir));
        }
        // Populated tmpfs replicas are held by their path there: nobody
        // else may write the run directory or a node store.
        if !cfg.force_memfd {
            check_private(&cfg.run_dir)?;
        }
        reserve_fds();
        for (node, dir) in dirs {
            let ns = store.open_node(node, dir)?;
            if ns.kind == StoreKind::Tmpfs {
                if let Err(e) = check_private(&ns.dir) {
                    if ns.mounted {
                        let _ = nix::mount::umount2(&ns.dir, MntFlags::MNT_DETACH);
                    }
                    return Err(e);
                }
            }
            store.nodes.insert(node, ns);
        }
        Ok(store)
    }

    fn open_node(&self, node: u32, dir: PathBuf) -> Result<NodeStore> {
        let canon = fs::canonicalize(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = ProcReader::default().self_path("mountinfo");
        let mountinfo = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let memfd = |dir: PathBuf| NodeStore {
            dir,
            kind: StoreKind::Memfd,
            mounted: false,
        };
        match mount_at(&mountinfo, &canon) {
            Some(m) if m.fstype == b"tmpfs" => {
                tracing::info!(node, dir = %dir.display(), "reusing the tmpfs already mounted there");
                // The run directory is ours: the tmpfs a crashed run left
                // is ours too, and `close` unmounts it like one we made.
                return Ok(NodeStore {
                    dir,
                    kind: StoreKind::Tmpfs,
                    mounted: true,
                });
            }
            Some(m) => {
                tracing::warn!(
                    node,
                    dir = %dir.display(),
                    fstype = %String::from_utf8_lossy(&m.fstype),
                    "the store dir is a mountpoint but not tmpfs; using memfd + mbind for this node"
                );
                return Ok(memfd(dir));
            }
            None => {}
        }
        // A plain directory until the tmpfs covers it.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(&dir, e))?;
        if self.cfg.force_memfd {
            tracing::warn!(node, dir = %dir.display(), reason = "force_memfd is set", "using memfd + mbind for this node");
            return Ok(memfd(dir));
        }
        match self.mount(node, &dir) {
            Ok(()) => Ok(NodeStore {
                dir,
                kind: StoreKind::Tmpfs,
                mounted: true,
            }),
            Err(e) => {
                tracing::warn!(node, dir = %dir.display(), reason = %e, "cannot mount the node store; using memfd + mbind for this node");
                Ok(memfd(dir))
            }
        }
    }

    fn mount(&self, node: u32, dir: &Path) -> Result<()> {
        let source = format!("replicad-node{node}");
        let options = |huge: bool| {
            let mut o = format!("mpol=bind:{node},mode=0700");
            if let Some(size) = &self.cfg.size {
                o.push_str(",size=");
                o.push_str(size);
            }
            if huge {
                o.push_str(",huge=within_size");
            }
            o
        };
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        let mount = |data: &str| {
            nix::mount::mount(Some(source.as_str()), dir, Some("tmpfs"), flags, Some(data))
        };
        let mut data = options(self.cfg.huge_pages);
        let mut result = mount(&data);
        if result == Err(nix::errno::Errno::EINVAL) && self.cfg.huge_pages {
            tracing::warn!(node, dir = %dir.display(), "tmpfs refused huge=within_size; mounting without huge pages");
            data = options(false);
            result = mount(&data);
        }
        result.map_err(|e| Error::Mount {
            node,
            dir: dir.to_path_buf(),
            source: e.into(),
        })?;
        tracing::info!(node, dir = %dir.display(), options = %data, "mounted the node store");
        Ok(())
    }

    /// How many leftover replica files `open` removed.
    pub fn leftovers_removed(&self) -> usize {
        self.leftovers
    }

    /// The copy method new replicas use ([`CopyMethod::DEFAULT`] unless
    /// set).
    pub fn copy_method(&self) -> CopyMethod {
        self.method
    }

    /// Use `method` for replicas created from now on.
    pub fn set_copy_method(&mut self, method: CopyMethod) {
        self.method = method;
    }

    /// The nodes this store serves.
    pub fn nodes(&self) -> impl Iterator<Item = u32> + '_ {
        self.nodes.keys().copied()
    }

    /// What backs `node`'s store, if this store serves `node`.
    pub fn kind(&self, node: u32) -> Option<StoreKind> {
        self.nodes.get(&node).map(|n| n.kind)
    }

    /// `node`'s store directory, if this store serves `node`.
    pub fn dir(&self, node: u32) -> Option<&Path> {
        self.nodes.get(&node).map(|n| n.dir.as_path())
    }

    /// Create an empty replica file on `node`.
    pub fn create(&self, node: u32, ident: &ReplicaIdent) -> Result<ReplicaFile> {
        let ns = self.nodes.get(&node).ok_or_else(|| Error::NoSuchNode {
            node,
            have: self
                .nodes
                .keys()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
        })?;
        let file = match ns.kind {
            StoreKind::Tmpfs => self.create_tmpfs(node, ns, ident)?,
            StoreKind::Memfd => self.create_memfd(node, ns, ident)?,
        };
        crate::debug_limited!(
            "created replica {} of {} on node {node}",
            file.label(),
            ident.path.display()
        );
        Ok(file)
    }

    fn create_tmpfs(&self, node: u32, ns: &NodeStore, ident: &ReplicaIdent) -> Result<ReplicaFile> {
        let path = ns
            .dir
            .join(format!("{}-{}-g{}", ident.dev, ident.ino, ident.generation));
        match unlink_replica(&path) {
            Ok(()) => crate::info_limited!("removed a stale replica file {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
        // std always adds O_CLOEXEC; create_new is O_CREAT | O_EXCL.
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o400)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| self.create_error(node, ns, ident, &path, e))?;
        let fd = OwnedFd::from(file);
        let st = match nix::sys::stat::fstat(&fd) {
            Ok(st) => st,
            Err(e) => {
                let _ = fs::remove_file(&path);
                return Err(Error::io(&path, e.into()));
            }
        };
        if let Err(e) =
            set_xattrs(fd.as_fd(), ident).and_then(|()| set_node_xattr(fd.as_fd(), node))
        {
            let _ = fs::remove_file(&path);
            return Err(self.create_error(node, ns, ident, &path, e));
        }
        Ok(ReplicaFile {
            fd: Some(fd),
            dev: st.st_dev,
            ino: st.st_ino,
            node,
            dir: ns.dir.clone(),
            backing: Backing::Tmpfs(path),
            method: self.method,
            threads: self.cfg.copy_threads,
        })
    }

    fn create_memfd(&self, node: u32, ns: &NodeStore, ident: &ReplicaIdent) -> Result<ReplicaFile> {
        let name = memfd_name(ident);
        let label = PathBuf::from(format!("memfd:{name}"));
        let fd = memfd_create(
            name.as_str(),
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|e| self.create_error(node, ns, ident, &label, e.into()))?;
        if let Err(e) =
            set_xattrs(fd.as_fd(), ident).and_then(|()| set_node_xattr(fd.as_fd(), node))
        {
            tracing::debug!(replica = %label.display(), error = %e, "memfd replica without xattrs");
        }
        let st = nix::sys::stat::fstat(&fd).map_err(|e| Error::io(&label, e.into()))?;
        Ok(ReplicaFile {
            fd: Some(fd),
            dev: st.st_dev,
            ino: st.st_ino,
            node,
            dir: ns.dir.clone(),
            backing: Backing::Memfd(name),
            method: self.method,
            threads: self.cfg.copy_threads,
        })
    }

    fn create_error(
        &self,
        node: u32,
        ns: &NodeStore,
        ident: &ReplicaIdent,
        path: &Path,
        e: io::Error,
    ) -> Error {
        if is_no_space(&e) {
            Error::NoSpace {
                node,
                dir: ns.dir.clone(),
                path: ident.path.clone(),
            }
        } else {
            Error::io(path, e)
        }
    }

    /// Take over a replica file a fence keeper held through a daemon's
    /// death (a memfd, or a tmpfs replica an fd store of an earlier version
    /// kept): its identity and node from its xattrs, where it lives from
    /// `/proc/self/fd`. `Err` says why it cannot be served (then the caller
    /// truncates it): no readable identity, a node this store does not
    /// serve, unlinked (revoked), or cut short. An adopted tmpfs replica
    /// keeps no fd (it is held by its path, as [`Store::adopt_path`]).
    pub fn adopt(
        &self,
        fd: OwnedFd,
    ) -> std::result::Result<(ReplicaFile, ReplicaIdent), (OwnedFd, String)> {
        let link = match fs::read_link(ProcReader::default().self_fd_path(fd.as_raw_fd())) {
            Ok(l) => l.into_os_string().into_vec(),
            Err(e) => return Err((fd, format!("cannot name it: {e}"))),
        };
        let backing = if let Some(name) = link.strip_prefix(b"/memfd:") {
            let name = name.strip_suffix(b" (deleted)").unwrap_or(name);
            Backing::Memfd(String::from_utf8_lossy(name).into_owned())
        } else {
            Backing::Tmpfs(PathBuf::from(OsStr::from_bytes(&link)))
        };
        match self.check_adopted(fd.as_fd(), backing) {
            Ok((mut file, ident)) => {
                if file.is_memfd() {
                    file.fd = Some(fd);
                }
                Ok((file, ident))
            }
            Err(why) => Err((fd, why)),
        }
    }

    /// Take over the tmpfs replica at `replica.path` (handed by a fence
    /// keeper, or found in the store for what systemd's fd store kept),
    /// checked as [`Store::adopt`] does, through an open of that moment
    /// that must be `replica`'s inode. `Err` says why it cannot be served
    /// (then the caller truncates it, see [`ReplicaPath::truncate`]).
    pub fn adopt_path(
        &self,
        replica: ReplicaPath,
    ) -> std::result::Result<(ReplicaFile, ReplicaIdent), (ReplicaPath, String)> {
        let file = match replica.open() {
            Ok(Some(f)) => f,
            Ok(None) => {
                let why = format!(
                    "{} is no longer in the store (nothing, or another file, is there now)",
                    replica.path.display()
                );
                return Err((replica, why));
            }
            Err(e) => {
                let why = format!("cannot open {}: {e}", replica.path.display());
                return Err((replica, why));
            }
        };
        let backing = Backing::Tmpfs(replica.path.clone());
        self.check_adopted(file.as_fd(), backing)
            .map_err(|why| (replica, why))
    }

    /// What [`Store::adopt`] and [`Store::adopt_path`] check, on an open
    /// `fd` of the replica; the file returned holds no fd.
    fn check_adopted(
        &self,
        fd: BorrowedFd<'_>,
        backing: Backing,
    ) -> std::result::Result<(ReplicaFile, ReplicaIdent), String> {
        use std::os::unix::fs::MetadataExt;
        let (ident, node) = ReplicaIdent::from_xattrs(fd)?;
        let Some(ns) = self.nodes.get(&node) else {
            return Err(format!(
                "it is for node {node}, which this store does not serve"
            ));
        };
        let st = nix::sys::stat::fstat(fd).map_err(|e| format!("fstat: {e}"))?;
        if st.st_size as u64 != ident.size {
            return Err(format!(
                "{} bytes where its generation has {}",
                st.st_size, ident.size
            ));
        }
        if let Backing::Tmpfs(path) = &backing {
            let here = fs::symlink_metadata(path)
                .is_ok_and(|m| (m.dev(), m.ino()) == (st.st_dev, st.st_ino));
            if !here || path.parent() != Some(ns.dir.as_path()) {
                return Err(format!(
                    "{} is no longer in the node {node} store",
                    path.display()
                ));
            }
        }
        // Immutable already, unless an earlier version of replicad made
        // it: from now on it is.
        make_immutable(fd, &backing).map_err(|e| format!("cannot make it immutable: {e}"))?;
        Ok((
            ReplicaFile {
                fd: None,
                dev: st.st_dev,
                ino: st.st_ino,
                node,
                dir: ns.dir.clone(),
                backing,
                method: self.method,
                threads: self.cfg.copy_threads,
            },
            ident,
        ))
    }

    /// Unmount every node store (replicas must be gone first).
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        for (&node, ns) in &self.nodes {
            if ns.mounted {
                match nix::mount::umount2(&ns.dir, MntFlags::MNT_DETACH) {
                    Ok(()) => {
                        tracing::info!(node, dir = %ns.dir.display(), "unmounted the node store")
                    }
                    Err(e) => {
                        tracing::warn!(node, dir = %ns.dir.display(), error = %e, "cannot unmount the node store");
                        continue;
                    }
                }
            } else if ns.kind == StoreKind::Tmpfs {
                continue;
            }
            if let Err(e) = fs::remove_dir(&ns.dir) {
                tracing::warn!(node, dir = %ns.dir.display(), error = %e, "cannot remove the node store dir");
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

fn set_xattrs(fd: BorrowedFd<'_>, ident: &ReplicaIdent) -> io::Result<()> {
    sys::set_xattr(fd, XATTR_SOURCE, ident.source_xattr().as_bytes())?;
    sys::set_xattr(fd, XATTR_GENERATION, ident.generation_xattr().as_bytes())?;
    sys::set_xattr(fd, XATTR_PATH, ident.path.as_os_str().as_bytes())
}

fn set_node_xattr(fd: BorrowedFd<'_>, node: u32) -> io::Result<()> {
    sys::set_xattr(fd, XATTR_NODE, node.to_string().as_bytes())
}

/// `replicad:<basename>:g<generation>`, cut to what memfd_create takes, with
/// no NUL.
fn memfd_name(ident: &ReplicaIdent) -> String {
    let base = ident
        .path
        .file_name()
        .unwrap_or_else(|| OsStr::new("?"))
        .to_string_lossy()
        .replace('\0', "?");
    let suffix = format!(":g{}", ident.generation);
    let room = MEMFD_NAME_MAX - "replicad:".len() - suffix.len();
    let mut cut = base.len().min(room);
    while !base.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("replicad:{}{suffix}", &base[..cut])
}

/// Remove everything in `dir` (replicas of an earlier run); returns how
/// many entries went.
fn remove_leftovers(dir: &Path, keep: &std::collections::BTreeSet<(u64, u64)>) -> Result<usize> {
    use std::os::unix::fs::MetadataExt;
    let mut removed = 0;
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if fs::symlink_metadata(&path).is_ok_and(|m| keep.contains(&(m.dev(), m.ino()))) {
            continue;
        }
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let origin = if is_dir { None } else { leftover_origin(&path) };
        // Only what is surely a replica of ours is truncated: a regular
        // file with our (root-only, trusted.*) identity xattr and no other
        // link. Processes may still map it (its daemon was killed, and its
        // fence with it): truncate, so their next touch falls back to the
        // file, not only unlink, which would leave them the old bytes for
        // as long as they run. Every regular file loses its immutable flag,
        // or it could not be unlinked.
        if !is_dir {
            if let Err(e) = truncate_leftover(&path, origin.is_some()) {
                crate::warn_limited!(
                    "cannot clear the immutable flag of {} (left by an earlier run) or \
                     truncate it: {e}; processes that still map it keep its bytes",
                    path.display()
                );
            }
        }
        let result = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match result {
            Ok(()) => {
                crate::info_limited!(
                    "removed {}, a replica{} left by an earlier run",
                    path.display(),
                    origin.unwrap_or_default()
                );
                removed += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    Ok(removed)
}

/// Clear the immutable flag of the regular file at `path`, and when it is
/// surely a replica of ours (`ours`, one link), cut it to nothing: the
/// kernel unmaps it from every process. Replicas are sealed (mode 0400,
/// immutable); root opens them once the flag is gone.
fn truncate_leftover(path: &Path, ours: bool) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let before = fs::symlink_metadata(path)?;
    if !before.file_type().is_file() {
        return Ok(());
    }
    // Read-only first: an immutable file cannot be opened for writing.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if (meta.dev(), meta.ino()) != (before.dev(), before.ino()) || !meta.file_type().is_file() {
        return Ok(());
    }
    sys::clear_immutable(file.as_fd())?;
    if !ours || meta.nlink() != 1 {
        return Ok(());
    }
    // The same inode, now open for writing.
    let writable = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(ProcReader::default().self_fd_path(file.as_raw_fd()))?;
    writable.set_len(0)
}

/// Unlink the replica file at `path`, clearing its immutable flag first
/// (an immutable file cannot be unlinked).
fn unlink_replica(path: &Path) -> io::Result<()> {
    if let Ok(file) = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        if file.metadata().is_ok_and(|m| m.file_type().is_file()) {
            if let Err(e) = sys::clear_immutable(file.as_fd()) {
                crate::warn_limited!("cannot clear the immutable flag of {}: {e}", path.display());
            }
        }
    }
    fs::remove_file(path)
}

/// Make a sealed replica immutable (`FS_IMMUTABLE_FL`): no open for
/// writing, no truncate(2), fallocate, unlink, xattr or mode change, root
/// included. A tmpfs replica that cannot be is an error; a memfd's seals
/// already refuse writes and growing, so there it is only a warning (root
/// could reopen it for writing through /proc and shrink it).
fn make_immutable(fd: BorrowedFd<'_>, backing: &Backing) -> io::Result<()> {
    match (sys::set_immutable(fd), backing) {
        (Ok(()), _) => Ok(()),
        (Err(e), Backing::Tmpfs(_)) => Err(e),
        (Err(e), Backing::Memfd(name)) => {
            crate::warn_limited!(
                "memfd replica memfd:{name} cannot be made immutable ({e}): its seals refuse \
                 writes, but root could reopen it through /proc and shrink it"
            );
            Ok(())
        }
    }
}

/// What a leftover replica's xattrs say it was a copy of: " of <source>
/// (dev:ino, generation g)", or `None` without readable xattrs.
fn leftover_origin(path: &Path) -> Option<String> {
    if !fs::symlink_metadata(path).ok()?.file_type().is_file() {
        return None;
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let text = |name| {
        sys::get_xattr(file.as_fd(), name)
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    };
    let source = text(XATTR_PATH)?;
    let ident = text(XATTR_SOURCE).unwrap_or_default();
    let generation = text(XATTR_GENERATION).unwrap_or_default();
    Some(format!(" of {source} ({ident}, generation {generation})"))
}

/// One line of mountinfo that matters here.
#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    fstype: Vec<u8>,
    source: Vec<u8>,
}

/// The mount visible at `dir` in `mountinfo` text (the last one listed
/// there, as later mounts cover earlier ones), if any.
fn mount_at(mountinfo: &[u8], dir: &Path) -> Option<MountEntry> {
    let want = dir.as_os_str().as_bytes();
    let mut found = None;
    for line in mountinfo.split(|&b| b == b'\n') {
        let mut fields = line.split(|&b| b == b' ');
        let Some(point) = fields.nth(4) else { continue };
        if unescape(point) != want {
            continue;
        }
        // Optional fields, then "-", fstype, source.
        let mut rest = fields.skip_while(|f| *f != b"-").skip(1);
        if let (Some(fstype), Some(source)) = (rest.next(), rest.next()) {
            found = Some(MountEntry {
                fstype: unescape(fstype),
                source: unescape(source),
            });
        }
    }
    found
}

/// Undo mountinfo's octal escapes (`\040` for space, and so on).
fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' && i + 4 <= s.len() {
            let oct = &s[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(b) = u8::try_from(v) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

#[derive(Debug)]
enum Backing {
    /// A file in the node's tmpfs.
    Tmpfs(PathBuf),
    /// A memfd with this name.
    Memfd(String),
}

/// A populated tmpfs replica as the daemon and the fence keeper hold it: no
/// open file, its path in the node store (a directory only replicad's uid
/// may write, see [`Store::open`]) and the inode that path must name. The
/// path is resolved again at every use, so each use opens it with
/// `O_NOFOLLOW` and checks the inode before it touches anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaPath {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
}

/// Open files kept back for the fence: a revoke opens each tmpfs replica
/// (twice) to cut it, and must not fail for want of a free fd while the
/// table is full (clients, status pages), or readers would keep a replica
/// the writer is let past. See [`with_fd_room`].
const FD_RESERVE: usize = 4;
static FD_RESERVE_FDS: std::sync::Mutex<Vec<OwnedFd>> = std::sync::Mutex::new(Vec::new());

/// Fill the fence's reserve of open files (`/dev/null`, read-only), up to
/// [`FD_RESERVE`]. Called when the store opens and when the keeper starts;
/// again after the reserve was drawn on.
pub fn reserve_fds() {
    let mut kept = FD_RESERVE_FDS.lock().unwrap_or_else(|p| p.into_inner());
    while kept.len() < FD_RESERVE {
        match fs::File::open("/dev/null") {
            Ok(f) => kept.push(OwnedFd::from(f)),
            Err(_) => break,
        }
    }
}

/// Run `open`; while the fd table is full (`EMFILE`), give back one fd
/// of the reserve and try again; then take back what fits.
fn with_fd_room<T>(open: impl Fn() -> io::Result<T>) -> io::Result<T> {
    let mut result = open();
    let mut drew = 0;
    while matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EMFILE)) {
        let freed = FD_RESERVE_FDS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        if freed.is_none() {
            break;
        }
        drop(freed);
        drew += 1;
        result = open();
    }
    if drew > 0 {
        crate::warn_limited!(
            "the open-file table is full: the fence drew {drew} of its reserve of \
             {FD_RESERVE} to cut a replica (raise LimitNOFILE=, or replicate fewer files)"
        );
        reserve_fds();
    }
    result
}

impl ReplicaPath {
    /// Open it read-only for this moment: `Ok(None)` when the path names
    /// nothing now, or another file (the replica is gone: whoever unlinked
    /// it truncated it first).
    pub fn open(&self) -> io::Result<Option<fs::File>> {
        self.open_with(false)
    }

    fn open_with(&self, write: bool) -> io::Result<Option<fs::File>> {
        let opened = with_fd_room(|| {
            fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .custom_flags(
                    libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
                )
                .open(&self.path)
        });
        let file = match opened {
            Ok(f) => f,
            // ELOOP: a symlink in its place, not our file.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let st = nix::sys::stat::fstat(&file)?;
        let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
        Ok(((st.st_dev, st.st_ino) == (self.dev, self.ino) && regular).then_some(file))
    }

    /// Cut it to nothing: the kernel unmaps it from every process. Opened
    /// read-only first (an immutable file cannot be opened for writing),
    /// checked to be this inode, its immutable flag cleared, then opened
    /// for writing, checked again, and `ftruncate`d. `Ok(false)`: it was
    /// gone already (see [`ReplicaPath::open`]), nothing to cut.
    pub fn truncate(&self) -> io::Result<bool> {
        let Some(file) = self.open()? else {
            return Ok(false);
        };
        let cleared = sys::clear_immutable(file.as_fd());
        let writable = match self.open_with(true) {
            // Mode 0400: root opens it anyway; a daemon of another uid,
            // its owner, makes it writable for itself first.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                nix::sys::stat::fchmod(
                    &file,
                    nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
                )?;
                self.open_with(true)?
            }
            other => other?,
        };
        let Some(writable) = writable else {
            return Ok(false);
        };
        nix::unistd::ftruncate(&writable, 0)?;
        cleared.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("truncated, but its immutable flag cannot be cleared: {e}"),
            )
        })?;
        Ok(true)
    }

    /// [`ReplicaPath::truncate`], naming the replica and what to do in
    /// the error, and saying (rate-limited) when it was gone already.
    pub fn revoke(&self) -> io::Result<()> {
        match self.truncate() {
            Ok(true) => Ok(()),
            Ok(false) => {
                crate::debug_limited!(
                    "replica {} is gone from the store already (truncated by whoever unlinked it)",
                    self.path.display()
                );
                Ok(())
            }
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!(
                    "cannot truncate the replica {}: {e}; processes that map it keep its bytes \
                     until it is removed (`chattr -i` it, then truncate or remove it)",
                    self.path.display()
                ),
            )),
        }
    }

    /// Unlink it, if the path still names it (a truncated replica has no
    /// immutable flag left).
    pub fn unlink(&self) -> io::Result<()> {
        let Some(file) = self.open()? else {
            return Ok(());
        };
        let _ = sys::clear_immutable(file.as_fd());
        drop(file);
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// Check that `dir` is a directory owned by this process's uid that no one
/// else may write: replicas are found again by their path there.
fn check_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let md = fs::symlink_metadata(dir).map_err(|e| Error::io(dir, e))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let why = if !md.is_dir() {
        Some("is not a directory".to_string())
    } else if md.uid() != me {
        Some(format!("is owned by uid {}, not {me}", md.uid()))
    } else if md.mode() & 0o022 != 0 {
        Some(format!(
            "has mode {:o}, writable by others",
            md.mode() & 0o7777
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(Error::StoreDirUnsafe {
            dir: dir.to_path_buf(),
            why,
        }),
        None => Ok(()),
    }
}

/// Every regular file in the node stores `<run_dir>/node<N>` of `nodes`
/// that names a source in its identity xattr: `(source (dev, ino), where it
/// is)`. A daemon taking over what systemd's fd store kept finds its
/// tmpfs replicas so (the store keeps only their sources' lease fds);
/// [`Store::adopt_path`] then checks each one whole.
pub fn replicas_in(run_dir: &Path, nodes: &[u32]) -> Vec<((u64, u64), ReplicaPath)> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    for node in nodes {
        let dir = run_dir.join(format!("node{node}"));
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(md) = fs::symlink_metadata(&path) else {
                continue;
            };
            if !md.file_type().is_file() {
                continue;
            }
            let at = ReplicaPath {
                path,
                dev: md.dev(),
                ino: md.ino(),
            };
            let Ok(Some(file)) = at.open() else {
                continue;
            };
            let source = sys::get_xattr(file.as_fd(), XATTR_SOURCE)
                .ok()
                .flatten()
                .and_then(|v| {
                    let text = String::from_utf8(v).ok()?;
                    let (dev, ino) = text.split_once(':')?;
                    Some((dev.parse().ok()?, ino.parse().ok()?))
                });
            if let Some(source) = source {
                found.push((source, at));
            }
        }
    }
    found
}

/// An open fd of a replica for one operation: the one it holds, or one
/// opened for the moment (a populated tmpfs replica holds none).
#[derive(Debug)]
enum Handle<'a> {
    Held(BorrowedFd<'a>),
    Opened(fs::File),
}

impl AsFd for Handle<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Handle::Held(fd) => *fd,
            Handle::Opened(f) => f.as_fd(),
        }
    }
}

/// One replica file.
#[derive(Debug)]
pub struct ReplicaFile {
    /// A memfd's, always; a tmpfs replica's only until [`ReplicaFile::seal`].
    fd: Option<OwnedFd>,
    dev: u64,
    ino: u64,
    node: u32,
    dir: PathBuf,
    backing: Backing,
    method: CopyMethod,
    threads: usize,
}

/// Why a replica cannot be written: it holds no fd any more.
fn sealed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "the replica is sealed (it holds no writable fd)",
    )
}

impl ReplicaFile {
    /// Copy `len` bytes of `src` into the replica.
    pub fn fill(
        &self,
        src: BorrowedFd<'_>,
        len: u64,
        abort: &AtomicBool,
        ident: &ReplicaIdent,
    ) -> Result<CopyStats> {
        self.fill_with(src, len, abort, ident, self.method, self.threads)
    }

    /// [`ReplicaFile::fill`] with an explicit method and thread count (the
    /// bench compares them).
    pub fn fill_with(
        &self,
        src: BorrowedFd<'_>,
        len: u64,
        abort: &AtomicBool,
        ident: &ReplicaIdent,
        method: CopyMethod,
        threads: usize,
    ) -> Result<CopyStats> {
        let start = Instant::now();
        let result = self.copy_in(src, len, abort, method, threads);
        if let Err(e) = result {
            // Give the memory back at once; the caller removes the file.
            if let Err(t) = self.truncate() {
                crate::warn_limited!("cannot truncate the failed replica {}: {t}", self.label());
            }
            return Err(self.copy_error(e, ident));
        }
        let stats = CopyStats {
            bytes: len,
            nanos: u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
        };
        crate::debug_limited!(
            "filled replica {}: {len} bytes in {} ns by {method}",
            self.label(),
            stats.nanos
        );
        Ok(stats)
    }

    fn copy_in(
        &self,
        src: BorrowedFd<'_>,
        len: u64,
        abort: &AtomicBool,
        method: CopyMethod,
        threads: usize,
    ) -> Result<(), CopyError> {
        if abort.load(Ordering::Acquire) {
            return Err(CopyError::Aborted);
        }
        let fd = self
            .fd
            .as_ref()
            .ok_or_else(|| CopyError::Write(sealed_error()))?;
        // Full size first: tmpfs `huge=within_size` then uses huge pages for
        // the whole file, and the mapping below covers it.
        let size = libc::off_t::try_from(len)
            .map_err(|_| CopyError::Write(io::Error::from_raw_os_error(libc::EFBIG)))?;
        if let Err(errno) = nix::unistd::ftruncate(fd, size) {
            let e = io::Error::from(errno);
            return Err(if is_no_space(&e) {
                CopyError::NoSpace(e)
            } else {
                CopyError::Write(e)
            });
        }
        let memfd = self.is_memfd();
        let mut map = None;
        if len > 0 && (memfd || method.needs_mapping()) {
            let m = Mapping::shared(
                fd.as_fd(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                0,
            )
            .map_err(CopyError::Write)?;
            if memfd {
                // The memfd's shared policy: every page allocated for it from
                // now on, by fault or write, comes from the node.
                numa::mbind(
                    m.as_ptr(),
                    m.len(),
                    self.node,
                    numa::MF_STRICT | numa::MF_MOVE,
                )
                .map_err(CopyError::Write)?;
            }
            map = Some(m);
        }
        if !method.needs_mapping() {
            map = None;
        }
        copy::copy(&CopyJob {
            src,
            dst: fd.as_fd(),
            dst_map: map.as_ref(),
            len,
            method,
            threads,
            abort,
        })
        // `map` is unmapped here, before `seal` may need no writable mapping.
    }

    fn copy_error(&self, e: CopyError, ident: &ReplicaIdent) -> Error {
        match e {
            CopyError::Aborted => Error::SourceChanged {
                path: ident.path.clone(),
                what: "was opened for writing",
            },
            CopyError::Shrank { .. } => Error::SourceChanged {
                path: ident.path.clone(),
                what: "shrank",
            },
            CopyError::NoSpace(_) => Error::NoSpace {
                node: self.node,
                dir: self.dir.clone(),
                path: ident.path.clone(),
            },
            CopyError::Read(e) => Error::io(&ident.path, e),
            CopyError::Write(e) => Error::Io {
                path: self.label_path(),
                source: e,
            },
        }
    }

    fn is_memfd(&self) -> bool {
        matches!(self.backing, Backing::Memfd(_))
    }

    /// An fd of the replica for one operation: the one it holds, or (a
    /// populated tmpfs replica) a read-only open of its path, checked to
    /// be its inode.
    fn handle(&self) -> io::Result<Handle<'_>> {
        if let Some(fd) = &self.fd {
            return Ok(Handle::Held(fd.as_fd()));
        }
        let at = self.replica_path().ok_or_else(sealed_error)?;
        match at.open()? {
            Some(f) => Ok(Handle::Opened(f)),
            None => Err(io::Error::other(
                "another file has taken the replica's place in the store, or it is gone",
            )),
        }
    }

    /// Its size now.
    pub fn size(&self) -> Result<u64> {
        let io_err = |e| Error::Io {
            path: self.label_path(),
            source: e,
        };
        let h = self.handle().map_err(io_err)?;
        Ok(nix::sys::stat::fstat(&h)
            .map_err(|e| io_err(e.into()))?
            .st_size as u64)
    }

    /// Where the replica's pages are.
    pub fn placement(&self) -> Result<Placement> {
        let io_err = |e| Error::Io {
            path: self.label_path(),
            source: e,
        };
        let h = self.handle().map_err(io_err)?;
        let len = nix::sys::stat::fstat(&h)
            .map_err(|e| io_err(e.into()))?
            .st_size as u64;
        if len == 0 {
            return Ok(Placement::default());
        }
        let map = Mapping::shared(h.as_fd(), len as usize, libc::PROT_READ, libc::MAP_POPULATE)
            .map_err(io_err)?;
        // The mapping keeps the file; the open goes now.
        drop(h);
        let page = page_size();
        let pages = len.div_ceil(page as u64);
        let node = self.node as i32;
        let base = map.as_ptr().cast::<u8>().cast_const();
        let mut misplaced = 0u64;
        let mut addrs = Vec::with_capacity(PLACEMENT_BATCH);
        let mut first = 0u64;
        while first < pages {
            let count = (pages - first).min(PLACEMENT_BATCH as u64);
            addrs.clear();
            addrs.extend((first..first + count).map(|i| {
                base.wrapping_add((i as usize) * page)
                    .cast::<libc::c_void>()
            }));
            let status = numa::page_nodes(&addrs).map_err(io_err)?;
            misplaced += status.iter().filter(|&&s| s != node).count() as u64;
            first += count;
        }
        Ok(Placement { pages, misplaced })
    }

    /// Make the replica read-only for good: mode 0400, memfd seals, then
    /// the immutable flag (last: the mode, like xattrs, cannot change on
    /// an immutable file). A tmpfs replica then closes its fd: from here
    /// on it is held by its path ([`ReplicaFile::replica_path`]).
    pub fn seal(&mut self) -> Result<()> {
        let io_err = |e| Error::Io {
            path: self.label_path(),
            source: e,
        };
        let fd = self.fd.as_ref().ok_or_else(|| io_err(sealed_error()))?;
        nix::sys::stat::fchmod(fd, nix::sys::stat::Mode::S_IRUSR).map_err(|e| io_err(e.into()))?;
        if let Backing::Memfd(_) = self.backing {
            // `fill` keeps no writable mapping, so F_SEAL_WRITE cannot be
            // refused with EBUSY. Shrinking stays allowed: `revoke` needs it.
            use nix::fcntl::{fcntl, FcntlArg, SealFlag};
            let seals = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
            fcntl(fd, FcntlArg::F_ADD_SEALS(seals)).map_err(|e| io_err(e.into()))?;
        }
        make_immutable(fd.as_fd(), &self.backing).map_err(|source| Error::Immutable {
            path: self.label_path(),
            source,
        })?;
        if !self.is_memfd() {
            self.fd = None;
        }
        Ok(())
    }

    /// A read-only fd for one client: a fresh open file description of
    /// the replica, never one another client holds (status flags set with
    /// `F_SETFL`, `flock` locks and leases belong to the description).
    /// tmpfs: the store path (checked to still be this replica); memfd:
    /// reopened through /proc/self/fd.
    pub fn open_readonly(&self) -> Result<OwnedFd> {
        let err = |source| Error::Io {
            path: self.label_path(),
            source,
        };
        let path = match (&self.backing, &self.fd) {
            (Backing::Tmpfs(_), _) => {
                let at = self.replica_path().ok_or_else(|| err(sealed_error()))?;
                return match at.open().map_err(err)? {
                    Some(f) => Ok(OwnedFd::from(f)),
                    None => Err(err(io::Error::other(
                        "another file has taken the replica's place in the store (or it is \
                         gone): not served; replicate it again",
                    ))),
                };
            }
            // The magic link must be followed.
            (Backing::Memfd(_), Some(fd)) => ProcReader::default().self_fd_path(fd.as_raw_fd()),
            (Backing::Memfd(_), None) => return Err(err(sealed_error())),
        };
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path)
            .map_err(err)?;
        let got = nix::sys::stat::fstat(&file).map_err(|e| err(e.into()))?;
        if (got.st_dev, got.st_ino) != (self.dev, self.ino) {
            return Err(err(io::Error::other(
                "another file has taken the replica's place in the store",
            )));
        }
        Ok(OwnedFd::from(file))
    }

    fn truncate(&self) -> io::Result<()> {
        match &self.fd {
            Some(fd) => sys::truncate_to_zero(fd.as_fd()),
            None => match self.replica_path() {
                Some(at) => at.revoke(),
                None => Err(sealed_error()),
            },
        }
    }

    /// Clear the immutable flag and truncate to 0: the kernel unmaps it
    /// from every process. A tmpfs replica whose path names nothing or
    /// another file now is gone already (its remover truncated it).
    pub fn revoke(&self) -> std::io::Result<()> {
        self.truncate()
    }

    /// Revoke and unlink.
    pub fn remove(self) {
        if let Err(e) = self.revoke() {
            crate::warn_limited!("cannot truncate the replica {}: {e}", self.label());
        }
        if let Some(at) = self.replica_path() {
            if let Err(e) = at.unlink() {
                crate::warn_limited!("cannot unlink the replica {}: {e}", at.path.display())
            }
        }
        // A held fd closes as `self` drops.
    }

    /// The node it is on.
    pub fn node(&self) -> u32 {
        self.node
    }

    /// Path in the store, or `memfd:<name>`.
    pub fn label(&self) -> String {
        match &self.backing {
            Backing::Tmpfs(path) => path.display().to_string(),
            Backing::Memfd(name) => format!("memfd:{name}"),
        }
    }

    fn label_path(&self) -> PathBuf {
        match &self.backing {
            Backing::Tmpfs(path) => path.clone(),
            Backing::Memfd(name) => PathBuf::from(format!("memfd:{name}")),
        }
    }

    /// The replica's inode: `(dev, ino)`.
    pub fn dev_ino(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// Where a tmpfs replica is (how the daemon and the fence keeper hold
    /// it once populated); `None` for a memfd.
    pub fn replica_path(&self) -> Option<ReplicaPath> {
        match &self.backing {
            Backing::Tmpfs(path) => Some(ReplicaPath {
                path: path.clone(),
                dev: self.dev,
                ino: self.ino,
            }),
            Backing::Memfd(_) => None,
        }
    }

    /// The fd the replica holds, for the daemon's use (device upload, the
    /// fence keeper): a memfd's, or a tmpfs replica's until it is sealed
    /// (`None` after: it is held by path). Clients get
    /// [`ReplicaFile::open_readonly`] fds only.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }
}

use replicad_procfs::page_size;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// A run dir under /tmp. Dropped after the Store of a test (declare it
    /// first), it unmounts whatever is still mounted under it, even when the
    /// test panicked or adopted a mount it does not unmount itself.
    struct RunDir {
        dir: tempfile::TempDir,
    }

    impl RunDir {
        fn new() -> RunDir {
            RunDir {
                dir: tempfile::Builder::new()
                    .prefix("replicad-store-test")
                    .tempdir_in("/tmp")
                    .unwrap(),
            }
        }

        fn cfg(&self, kind: StoreKind, size: Option<&str>) -> StoreConfig {
            StoreConfig {
                run_dir: self.dir.path().to_path_buf(),
                size: size.map(str::to_string),
                huge_pages: false,
                force_memfd: kind == StoreKind::Memfd,
                copy_threads: 2,
            }
        }
    }

    impl Drop for RunDir {
        fn drop(&mut self) {
            let Ok(entries) = fs::read_dir(self.dir.path()) else {
                return;
            };
            for e in entries.flatten() {
                for _ in 0..8 {
                    if nix::mount::umount2(&e.path(), MntFlags::MNT_DETACH).is_err() {
                        break;
                    }
                }
            }
        }
    }

    /// Skip `test` because of `why`: prints `SKIP`, or panics under
    /// `REPLICAD_STRICT=1` (scripts/test.sh sets it in CI and as root),
    /// where a skip is a failure; the rule of tests/common's `skip`.
    fn skip(test: &str, why: &str) {
        assert!(
            std::env::var("REPLICAD_STRICT").as_deref() != Ok("1"),
            "{test} cannot run: {why} (REPLICAD_STRICT=1: a skip is a failure)"
        );
        eprintln!("SKIP {test}: {why}");
    }

    /// A store of `kind` on node 0, or `None` after saying why the test
    /// skips (only unprivileged: as root a tmpfs store that does not mount
    /// is a failure).
    fn open_store(test: &str, rd: &RunDir, kind: StoreKind, size: Option<&str>) -> Option<Store> {
        if kind == StoreKind::Tmpfs && !is_root() {
            skip(test, "mounting tmpfs needs root");
            return None;
        }
        let store = Store::open(&rd.cfg(kind, size), &[0], &Default::default()).unwrap();
        assert_eq!(
            store.kind(0),
            Some(kind),
            "{test}: running as root, but the {kind:?} store did not open as {kind:?} (see the warning)"
        );
        Some(store)
    }

    /// `ShmemPmdMapped` (kB) of the mapping starting at `addr` in
    /// /proc/self/smaps: how much of it the kernel maps with huge (PMD)
    /// pages of a tmpfs file.
    fn shmem_pmd_mapped_kb(addr: usize) -> u64 {
        let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        while let Some(l) = lines.next() {
            let start = l.split('-').next().unwrap_or("");
            if usize::from_str_radix(start, 16).ok() != Some(addr) {
                continue;
            }
            for f in lines.by_ref() {
                if let Some(v) = f.strip_prefix("ShmemPmdMapped:") {
                    return v.trim().trim_end_matches("kB").trim().parse().unwrap();
                }
            }
        }
        panic!("no ShmemPmdMapped for the mapping at {addr:#x} in:\n{smaps}");
    }

    fn pattern(len: u64, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut v = Vec::with_capacity(len as usize + 8);
        while (v.len() as u64) < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.truncate(len as usize);
        v
    }

    /// A source file on disk (not tmpfs) holding `bytes`.
    fn source(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .prefix("replicad-src")
            .tempfile_in("/var/tmp")
            .unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    /// A large source made of one repeated MiB (cheap to build).
    fn big_source(len: u64) -> tempfile::NamedTempFile {
        let block = pattern(MIB, 99);
        let mut f = tempfile::Builder::new()
            .prefix("replicad-src")
            .tempfile_in("/var/tmp")
            .unwrap();
        for _ in 0..len / MIB {
            f.write_all(&block).unwrap();
        }
        f
    }

    fn ident(src: &tempfile::NamedTempFile, generation: u64) -> ReplicaIdent {
        let md = src.as_file().metadata().unwrap();
        ReplicaIdent::of_file(src.path(), &md, generation)
    }

    fn read_all(fd: OwnedFd) -> Vec<u8> {
        let f = fs::File::from(fd);
        let len = f.metadata().unwrap().len();
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    fn dir_entries(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    fn blocks(fd: BorrowedFd<'_>) -> i64 {
        // SAFETY: stat is plain old data; all-zero is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: st is valid for writes; fd is valid.
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        st.st_blocks
    }

    /// Run `then` as soon as the replica behind `fd` has its first pages
    /// (the copy is under way), or give up once `done` is set.
    fn when_filling(fd: BorrowedFd<'_>, done: &AtomicBool, then: impl FnOnce()) {
        while blocks(fd) == 0 {
            if done.load(Ordering::Acquire) {
                return;
            }
            std::hint::spin_loop();
        }
        then();
    }

    fn assert_source_changed(r: Result<CopyStats>, want: &str, ctx: &str) {
        match r {
            Err(Error::SourceChanged { what, .. }) => assert_eq!(what, want, "{ctx}"),
            other => panic!("{ctx}: expected SourceChanged {want:?}, got {other:?}"),
        }
    }

    /// A sealed replica is immutable (root's tmpfs, and root's memfd on
    /// this kernel): nobody, root included, opens it for writing, through
    /// its store path or through /proc from a client's read-only fd.
    fn assert_nobody_writes(ctx: &str, r: &ReplicaFile, ro: &OwnedFd, kind: StoreKind) {
        if !is_root() {
            // Unprivileged: mode 0400 and the seals are all there is.
            return;
        }
        assert!(
            sys::is_immutable(r.open_readonly().unwrap().as_fd()).unwrap(),
            "{ctx}: a sealed {kind:?} replica is not immutable"
        );
        let mut paths = vec![ProcReader::default().self_fd_path(ro.as_raw_fd())];
        if kind == StoreKind::Tmpfs {
            paths.push(PathBuf::from(r.label()));
        }
        for path in paths {
            for (read, write) in [(true, true), (false, true)] {
                let e = fs::OpenOptions::new()
                    .read(read)
                    .write(write)
                    .open(&path)
                    .map(drop)
                    .unwrap_err();
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::EPERM),
                    "{ctx}: root opened {} for writing: {e}",
                    path.display()
                );
            }
        }
        if kind == StoreKind::Tmpfs {
            let e = fs::remove_file(r.label()).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{ctx}: unlink: {e}");
        }
    }

    fn fill_suite(test: &str, kind: StoreKind) {
        let rd = RunDir::new();
        let Some(store) = open_store(test, &rd, kind, None) else {
            return;
        };
        let no = AtomicBool::new(false);
        let sizes = [0, 1, 4095, 4097, 2 * MIB + 3, 40 * MIB];
        let mut generation = 0;
        for len in sizes {
            let bytes = pattern(len, len);
            let src = source(&bytes);
            for method in CopyMethod::ALL {
                generation += 1;
                let ctx = format!("{test} {method} {len}");
                let id = ident(&src, generation);
                let mut r = store.create(0, &id).unwrap();
                assert_eq!(r.node(), 0);
                let stats = r
                    .fill_with(src.as_file().as_fd(), len, &no, &id, method, 2)
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert_eq!(stats.bytes, len, "{ctx}");
                r.seal().unwrap();
                // Every page on node 0.
                let p = r.placement().unwrap();
                assert_eq!(p.pages, len.div_ceil(4096), "{ctx}");
                assert_eq!(p.misplaced, 0, "{ctx}");
                // Identity in xattrs.
                // The memfd's own fd; a tmpfs replica holds none: an open.
                let opened = r.open_readonly().unwrap();
                let fd = r.fd().unwrap_or(opened.as_fd());
                let got = |name| sys::get_xattr(fd, name).unwrap();
                match got(XATTR_SOURCE) {
                    Some(v) => {
                        assert_eq!(v, id.source_xattr().into_bytes(), "{ctx}");
                        assert_eq!(
                            got(XATTR_GENERATION),
                            Some(id.generation_xattr().into_bytes())
                        );
                        assert_eq!(
                            got(XATTR_PATH),
                            Some(id.path.as_os_str().as_bytes().to_vec())
                        );
                    }
                    None if kind == StoreKind::Memfd => {
                        if generation == 1 {
                            skip(
                                &format!("{test} xattrs"),
                                "memfd has no trusted xattrs here",
                            );
                        }
                    }
                    None => panic!("{ctx}: tmpfs replica without xattrs"),
                }
                // Read-only for clients; sealed memfd refuses writes.
                let ro = r.open_readonly().unwrap();
                // SAFETY: one byte from a valid buffer to a valid fd.
                let w = unsafe { libc::pwrite(ro.as_raw_fd(), b"x".as_ptr().cast(), 1, 0) };
                assert_eq!(w, -1, "{ctx}: read-only fd took a write");
                if len > 0 {
                    let m = Mapping::shared(
                        ro.as_fd(),
                        len as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        0,
                    );
                    assert!(m.is_err(), "{ctx}: writable mapping of a read-only fd");
                }
                if kind == StoreKind::Memfd {
                    // SAFETY: one byte from a valid buffer to a valid fd.
                    let w = unsafe { libc::pwrite(fd.as_raw_fd(), b"x".as_ptr().cast(), 1, 0) };
                    assert_eq!(w, -1, "{ctx}: sealed memfd took a write");
                    assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
                    let m = Mapping::shared(
                        fd,
                        len.max(1) as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        0,
                    );
                    assert!(m.is_err(), "{ctx}: writable mapping of a sealed memfd");
                    assert!(r.label().starts_with("memfd:replicad:"), "{}", r.label());
                } else {
                    assert!(Path::new(&r.label()).exists());
                }
                assert_nobody_writes(&ctx, &r, &ro, kind);
                assert!(read_all(ro) == bytes, "{ctx}: bytes differ");
                let label = r.label();
                r.remove();
                if kind == StoreKind::Tmpfs {
                    assert!(!Path::new(&label).exists(), "{ctx}: not unlinked");
                }
            }
        }
        assert_eq!(dir_entries(store.dir(0).unwrap()), 0);
        store.close();
        assert!(
            !rd.dir.path().join("node0").exists(),
            "close left the node dir"
        );
    }

    #[test]
    fn store_tmpfs_fill_placement_xattrs_readonly() {
        fill_suite(
            "store_tmpfs_fill_placement_xattrs_readonly",
            StoreKind::Tmpfs,
        );
    }

    #[test]
    fn store_memfd_fill_placement_xattrs_readonly() {
        fill_suite(
            "store_memfd_fill_placement_xattrs_readonly",
            StoreKind::Memfd,
        );
    }

    #[test]
    fn store_tmpfs_huge_pages_fill() {
        let test = "store_tmpfs_huge_pages_fill";
        if !is_root() {
            return skip(test, "mounting tmpfs needs root");
        }
        let rd = RunDir::new();
        let mut cfg = rd.cfg(StoreKind::Tmpfs, Some("64m"));
        cfg.huge_pages = true;
        let store = Store::open(&cfg, &[0], &Default::default()).unwrap();
        assert_eq!(
            store.kind(0),
            Some(StoreKind::Tmpfs),
            "{test}: running as root, but the tmpfs store did not mount"
        );
        let bytes = pattern(40 * MIB + 5, 3);
        let src = source(&bytes);
        let id = ident(&src, 1);
        let r = store.create(0, &id).unwrap();
        r.fill(
            src.as_file().as_fd(),
            bytes.len() as u64,
            &AtomicBool::new(false),
            &id,
        )
        .unwrap();
        assert_eq!(r.placement().unwrap().misplaced, 0);
        // The replica really is in huge pages: mapped and touched, every
        // whole 2 MiB of it is mapped by PMD (huge=within_size gives the
        // last partial 2 MiB small pages).
        let len = bytes.len();
        let fd = r.open_readonly().unwrap();
        // SAFETY: a fresh shared read-only mapping of the replica's fd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let mut sum = 0u64;
        for off in (0..len).step_by(4096) {
            // SAFETY: inside the mapping made above.
            sum = sum.wrapping_add(u64::from(unsafe {
                std::ptr::read_volatile(ptr.cast::<u8>().add(off))
            }));
        }
        std::hint::black_box(sum);
        let huge_kb = shmem_pmd_mapped_kb(ptr as usize);
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(ptr, len) };
        let want_kb = (len as u64 / (2 * MIB)) * 2048;
        assert!(
            huge_kb >= want_kb,
            "{test}: only {huge_kb} kB of the {len}-byte replica is mapped with huge pages \
             (ShmemPmdMapped), want >= {want_kb} kB"
        );
        assert!(read_all(r.open_readonly().unwrap()) == bytes);
        r.remove();
    }

    #[test]
    fn store_tmpfs_full_is_no_space_and_leaves_nothing() {
        let test = "store_tmpfs_full_is_no_space_and_leaves_nothing";
        let rd = RunDir::new();
        let Some(store) = open_store(test, &rd, StoreKind::Tmpfs, Some("1m")) else {
            return;
        };
        let dir = store.dir(0).unwrap().to_path_buf();
        let no = AtomicBool::new(false);
        for (len, threads) in [(4 * MIB, 1), (40 * MIB, 2)] {
            let src = big_source(len);
            for method in CopyMethod::ALL {
                let id = ident(&src, 7);
                let r = store.create(0, &id).unwrap();
                match r.fill_with(src.as_file().as_fd(), len, &no, &id, method, threads) {
                    Err(Error::NoSpace { node, dir: d, path }) => {
                        assert_eq!((node, &d, &path), (0, &dir, &id.path), "{method}");
                    }
                    other => panic!("{method} {len}: expected NoSpace, got {other:?}"),
                }
                r.remove();
                assert_eq!(dir_entries(&dir), 0, "{method}: a file was left");
            }
        }
    }

    fn abort_suite(test: &str, kind: StoreKind) {
        let rd = RunDir::new();
        let Some(store) = open_store(test, &rd, kind, None) else {
            return;
        };
        let len = 128 * MIB;
        let src = big_source(len);
        let id = ident(&src, 1);
        for method in CopyMethod::ALL {
            // Set before the copy.
            let r = store.create(0, &id).unwrap();
            let set = AtomicBool::new(true);
            let res = r.fill_with(src.as_file().as_fd(), len, &set, &id, method, 2);
            assert_source_changed(
                res,
                "was opened for writing",
                &format!("{test} {method} before"),
            );
            assert_eq!(
                blocks(r.fd().unwrap()),
                0,
                "{method}: pages kept after abort"
            );
            r.remove();
            // Set while copying: once the replica has its first pages.
            let r = store.create(0, &id).unwrap();
            let abort = AtomicBool::new(false);
            let done = AtomicBool::new(false);
            let res = std::thread::scope(|s| {
                let (abort, done, fd) = (&abort, &done, r.fd().unwrap());
                s.spawn(move || when_filling(fd, done, || abort.store(true, Ordering::Release)));
                let res = r.fill_with(src.as_file().as_fd(), len, abort, &id, method, 2);
                done.store(true, Ordering::Release);
                res
            });
            assert_source_changed(
                res,
                "was opened for writing",
                &format!("{test} {method} during"),
            );
            r.remove();
        }
    }

    #[test]
    fn store_tmpfs_abort_is_source_changed() {
        abort_suite("store_tmpfs_abort_is_source_changed", StoreKind::Tmpfs);
    }

    #[test]
    fn store_memfd_abort_is_source_changed() {
        abort_suite("store_memfd_abort_is_source_changed", StoreKind::Memfd);
    }

    fn shrink_suite(test: &str, kind: StoreKind) {
        let rd = RunDir::new();
        let Some(store) = open_store(test, &rd, kind, None) else {
            return;
        };
        let no = AtomicBool::new(false);
        // Shorter than promised from the start.
        let src = source(&pattern(5000, 1));
        let id = ident(&src, 1);
        for method in CopyMethod::ALL {
            let r = store.create(0, &id).unwrap();
            let res = r.fill_with(src.as_file().as_fd(), 3 * MIB, &no, &id, method, 2);
            assert_source_changed(res, "shrank", &format!("{test} {method} short"));
            r.remove();
        }
        // Truncated by a "writer" while the copy runs: an error, no SIGBUS.
        let len = 128 * MIB;
        for method in CopyMethod::ALL {
            let src = big_source(len);
            let id = ident(&src, 2);
            let writer = fs::OpenOptions::new().write(true).open(src.path()).unwrap();
            let r = store.create(0, &id).unwrap();
            let done = AtomicBool::new(false);
            let res = std::thread::scope(|s| {
                let (done, fd, writer) = (&done, r.fd().unwrap(), &writer);
                s.spawn(move || when_filling(fd, done, || writer.set_len(MIB).unwrap()));
                let res = r.fill_with(src.as_file().as_fd(), len, &no, &id, method, 2);
                done.store(true, Ordering::Release);
                res
            });
            assert_source_changed(res, "shrank", &format!("{test} {method} truncated"));
            r.remove();
        }
    }

    #[test]
    fn store_tmpfs_truncated_source_is_shrank() {
        shrink_suite("store_tmpfs_truncated_source_is_shrank", StoreKind::Tmpfs);
    }

    #[test]
    fn store_memfd_truncated_source_is_shrank() {
        shrink_suite("store_memfd_truncated_source_is_shrank", StoreKind::Memfd);
    }

    /// How many of this process's fds name a file in `dir` (through
    /// `/proc/self/fd`, read with the procfs crate's reader).
    fn fds_into(dir: &Path) -> usize {
        let proc = ProcReader::default();
        let me = std::process::id();
        proc.fds(me)
            .unwrap()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|fd| fs::read_link(proc.fd_path(me, fd)).ok())
            .filter(|target| target.starts_with(dir))
            .count()
    }

    /// A populated (sealed) tmpfs replica holds no open file: it is held
    /// by its path and opened only for what each operation needs, which
    /// closes again.
    #[test]
    fn store_tmpfs_populated_replica_holds_no_fd() {
        let test = "store_tmpfs_populated_replica_holds_no_fd";
        let rd = RunDir::new();
        let Some(store) = open_store(test, &rd, StoreKind::Tmpfs, None) else {
            return;
        };
        let dir = fs::canonicalize(store.dir(0).unwrap()).unwrap();
        let bytes = pattern(3 * 4096, 21);
        let src = source(&bytes);
        let mut replicas = Vec::new();
        for generation in 1..=8 {
            let id = ident(&src, generation);
            let r = store.create(0, &id).unwrap();
            r.fill(
                src.as_file().as_fd(),
                3 * 4096,
                &AtomicBool::new(false),
                &id,
            )
            .unwrap();
            replicas.push(r);
        }
        // Filling, each holds its read-write fd.
        assert_eq!(fds_into(&dir), 8, "{test}: while filling");
        for r in &mut replicas {
            r.seal().unwrap();
            assert!(
                r.fd().is_none(),
                "{test}: a sealed tmpfs replica keeps its fd"
            );
        }
        assert_eq!(fds_into(&dir), 0, "{test}: populated replicas hold fds");
        // Every operation opens it for its moment only.
        let r = &replicas[0];
        assert_eq!(r.placement().unwrap().pages, 3, "{test}");
        assert_eq!(r.size().unwrap(), 3 * 4096, "{test}");
        let ro = r.open_readonly().unwrap();
        assert_eq!(fds_into(&dir), 1, "{test}: the client's fd");
        assert!(read_all(ro) == bytes, "{test}");
        assert_eq!(fds_into(&dir), 0, "{test}: after the client's fd closed");
        let at = r.replica_path().unwrap();
        assert_eq!(r.dev_ino(), (at.dev, at.ino));
        // A revoke truncates it by path (immutable flag cleared first).
        let mapped = r.open_readonly().unwrap();
        r.revoke().unwrap();
        assert_eq!(nix::sys::stat::fstat(&mapped).unwrap().st_size, 0, "{test}");
        drop(mapped);
        assert_eq!(fds_into(&dir), 0, "{test}: after revoke");
        for r in replicas {
            r.remove();
        }
        assert_eq!(dir_entries(&dir), 0, "{test}: removed replicas stay");
    }

    /// A sealed 5000-byte tmpfs replica of a pattern file (kept alive).
    fn sealed(store: &Store, seed: u64) -> (tempfile::NamedTempFile, ReplicaFile) {
        let src = source(&pattern(5000, seed));
        let id = ident(&src, 1);
        let mut r = store.create(0, &id).unwrap();
        r.fill(src.as_file().as_fd(), 5000, &AtomicBool::new(false), &id)
            .unwrap();
        r.seal().unwrap();
        (src, r)
    }

    /// A path re-resolved at each use is checked: nothing, another file or
    /// a symlink in the replica's place is not the replica (gone: nothing
    /// truncated, nothing served).
    #[test]
    fn store_tmpfs_replica_path_checks_the_inode() {
        let test = "store_tmpfs_replica_path_checks_the_inode";
        let rd = RunDir::new();
        let Some(store) = open_store(test, &rd, StoreKind::Tmpfs, None) else {
            return;
        };
        let (src, r) = sealed(&store, 3);
        let at = r.replica_path().unwrap();
        // Replaced by another file, then by a symlink to a file of ours.
        let ro = r.open_readonly().unwrap();
        sys::clear_immutable(ro.as_fd()).unwrap();
        let other = at.path.with_file_name("other");
        fs::write(&other, b"not the replica").unwrap();
        fs::rename(&other, &at.path).unwrap();
        assert!(at.open().unwrap().is_none(), "{test}: another file");
        assert!(!at.truncate().unwrap(), "{test}: another file is truncated");
        assert_eq!(fs::read(&at.path).unwrap(), b"not the replica");
        assert!(r.open_readonly().is_err(), "{test}: another file is served");
        fs::remove_file(&at.path).unwrap();
        std::os::unix::fs::symlink(src.path(), &at.path).unwrap();
        assert!(at.open().unwrap().is_none(), "{test}: a symlink");
        assert!(!at.truncate().unwrap(), "{test}: a symlink is followed");
        assert_eq!(src.as_file().metadata().unwrap().len(), 5000);
        fs::remove_file(&at.path).unwrap();
        // Nothing there: gone already, and a revoke says so without error.
        assert!(at.open().unwrap().is_none());
        r.revoke().unwrap();
        drop(ro);
        r.remove();
    }

    /// A full fd table does not stop a revoke: the cut draws on the
    /// fence's reserve. Run in a forked child, whose table is filled with
    /// `dup`s up to its limit (the test process's other threads must not
    /// see that).
    #[test]
    fn store_tmpfs_replica_is_cut_with_a_full_fd_table() {
        let test = "store_tmpfs_replica_is_cut_with_a_full_fd_table";
        let rd = RunDir::new();
        let Some(store) = open_store(test, &rd, StoreKind::Tmpfs, None) else {
            return;
        };
        let (_src, r) = sealed(&store, 4);
        let at = r.replica_path().unwrap();
        reserve_fds();
        // SAFETY: the child only makes syscalls and the truncate (glibc's
        // allocator is fork-safe), then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let mut code = 3;
            // SAFETY: dup of fd 0 until the table is full.
            while unsafe { libc::dup(0) } >= 0 {}
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EMFILE) {
                code = match at.truncate() {
                    Ok(true) => 0,
                    Ok(false) => 1,
                    Err(_) => 2,
                };
            }
            // SAFETY: leave the child without running the parent's atexit
            // handlers or test harness.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "{test}: {status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "{test}: 1 the replica was not there, 2 the cut failed, 3 the table never filled"
        );
        assert_eq!(fs::metadata(&at.path).unwrap().len(), 0, "{test}: not cut");
        r.remove();
    }

    /// The store directory is where replicas are found by path: one that
    /// others may write is refused.
    #[test]
    fn store_tmpfs_dir_writable_by_others_is_refused() {
        let test = "store_tmpfs_dir_writable_by_others_is_refused";
        if !is_root() {
            return skip(test, "mounting tmpfs needs root");
        }
        let rd = RunDir::new();
        fs::set_permissions(rd.dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
        match Store::open(&rd.cfg(StoreKind::Tmpfs, None), &[0], &Default::default()) {
            Err(Error::StoreDirUnsafe { dir, why }) => {
                assert_eq!(dir, rd.dir.path(), "{test}");
                assert!(why.contains("writable by others"), "{why}");
            }
            other => panic!("{test}: expected StoreDirUnsafe, got {other:?}"),
        }
    }

    #[test]
    fn store_tmpfs_leftovers_are_removed_by_next_open() {
        let test = "store_tmpfs_leftovers_are_removed_by_next_open";
        let rd = RunDir::new();
        let Some(first) = open_store(test, &rd, StoreKind::Tmpfs, None) else {
            return;
        };
        let src = source(&pattern(10_000, 5));
        let mut held = Vec::new();
        for generation in [1, 2] {
            let id = ident(&src, generation);
            let mut r = first.create(0, &id).unwrap();
            r.fill(src.as_file().as_fd(), 10_000, &AtomicBool::new(false), &id)
                .unwrap();
            if generation == 2 {
                // Sealed, so immutable: still truncated and unlinked.
                r.seal().unwrap();
            }
            held.push(r.open_readonly().unwrap());
            // Dropped without remove(): the file stays.
        }
        let dir = first.dir(0).unwrap().to_path_buf();
        assert_eq!(dir_entries(&dir), 2);
        // A crash: nothing is closed or unmounted.
        std::mem::forget(first);
        let second =
            Store::open(&rd.cfg(StoreKind::Tmpfs, None), &[0], &Default::default()).unwrap();
        assert_eq!(
            second.kind(0),
            Some(StoreKind::Tmpfs),
            "the mount is reused"
        );
        assert_eq!(second.leftovers_removed(), 2);
        assert_eq!(dir_entries(&dir), 0);
        for fd in &held {
            let len = nix::sys::stat::fstat(fd).unwrap().st_size;
            assert_eq!(len, 0, "a leftover replica was unlinked but not truncated");
        }
        // The adopted mount is ours: close unmounts it.
        second.close();
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mountinfo.contains(dir.to_str().unwrap()),
            "adopted store still mounted after close"
        );
    }

    #[test]
    fn store_memfd_leftovers_are_removed_by_next_open() {
        let rd = RunDir::new();
        let dir = rd.dir.path().join("node0");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("1-2-g3"), b"stale").unwrap();
        let store =
            Store::open(&rd.cfg(StoreKind::Memfd, None), &[0], &Default::default()).unwrap();
        assert_eq!(store.kind(0), Some(StoreKind::Memfd));
        assert_eq!(store.leftovers_removed(), 1);
        assert_eq!(dir_entries(&dir), 0);
    }

    /// process_vm_readv from our own address space: EFAULT instead of SIGBUS
    /// when the pages are gone.
    fn read_own(addr: *const libc::c_void, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        };
        let remote = libc::iovec {
            iov_base: addr.cast_mut(),
            iov_len: len,
        };
        // SAFETY: both iovecs describe valid ranges (the remote one is only
        // read by the kernel, which reports EFAULT rather than faulting us).
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    fn revoke_suite(test: &str, kind: StoreKind) {
        let rd = RunDir::new();
        let Some(store) = open_store(test, &rd, kind, None) else {
            return;
        };
        let bytes = pattern(MIB, 11);
        let src = source(&bytes);
        let id = ident(&src, 1);
        let mut r = store.create(0, &id).unwrap();
        r.fill(src.as_file().as_fd(), MIB, &AtomicBool::new(false), &id)
            .unwrap();
        r.seal().unwrap();
        let ro = r.open_readonly().unwrap();
        let map = Mapping::shared(ro.as_fd(), MIB as usize, libc::PROT_READ, 0).unwrap();
        let addr = map.as_ptr().cast_const();
        assert!(read_own(addr, 4096).unwrap() == bytes[..4096]);
        r.revoke().unwrap();
        let err = read_own(addr, 4096).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "{test}: {err}");
        // A process touching the mapping dies of SIGBUS.
        // SAFETY: the child only makes async-signal-safe calls (setrlimit,
        // a volatile load, _exit) before it dies or exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: as above; the mapping is inherited by the child.
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                std::ptr::read_volatile(addr.cast::<u8>());
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child; status is valid for writes.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS,
            "{test}: child status {status:#x}, wanted SIGBUS"
        );
        drop(map);
        r.remove();
    }

    #[test]
    fn store_tmpfs_revoke_raises_sigbus() {
        revoke_suite("store_tmpfs_revoke_raises_sigbus", StoreKind::Tmpfs);
    }

    #[test]
    fn store_memfd_revoke_raises_sigbus() {
        revoke_suite("store_memfd_revoke_raises_sigbus", StoreKind::Memfd);
    }

    /// Two clients' fds are two open file descriptions: status flags,
    /// file offset and flock locks set through one are not the other's.
    fn descriptions_suite(test: &str, kind: StoreKind) {
        let rd = RunDir::new();
        let Some(store) = open_store(test, &rd, kind, None) else {
            return;
        };
        let bytes = pattern(3 * 4096, 5);
        let src = source(&bytes);
        let id = ident(&src, 1);
        let mut r = store.create(0, &id).unwrap();
        r.fill(
            src.as_file().as_fd(),
            bytes.len() as u64,
            &AtomicBool::new(false),
            &id,
        )
        .unwrap();
        r.seal().unwrap();
        let a = r.open_readonly().unwrap();
        let b = r.open_readonly().unwrap();
        let flags = |fd: &OwnedFd| {
            // SAFETY: F_GETFL on a valid fd.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) }
        };
        let before = flags(&b);
        assert_eq!(before & libc::O_ACCMODE, libc::O_RDONLY, "{test}");
        let set = libc::O_APPEND | libc::O_NONBLOCK;
        // SAFETY: F_SETFL on a valid fd with an int argument.
        assert_eq!(unsafe { libc::fcntl(a.as_raw_fd(), libc::F_SETFL, set) }, 0);
        assert_eq!(flags(&a) & set, set, "{test}");
        assert_eq!(
            flags(&b),
            before,
            "{test}: F_SETFL on one client's fd reached another's"
        );
        // SAFETY: lseek on a valid fd.
        let moved = unsafe { libc::lseek(a.as_raw_fd(), 4096, libc::SEEK_SET) };
        assert_eq!(moved, 4096);
        // SAFETY: as above.
        let at = unsafe { libc::lseek(b.as_raw_fd(), 0, libc::SEEK_CUR) };
        assert_eq!(at, 0, "{test}: one client's file offset moved another's");
        // SAFETY: flock on valid fds.
        assert_eq!(unsafe { libc::flock(a.as_raw_fd(), libc::LOCK_EX) }, 0);
        // SAFETY: as above.
        let rc = unsafe { libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(
            (rc, io::Error::last_os_error().raw_os_error()),
            (-1, Some(libc::EWOULDBLOCK)),
            "{test}: one client's flock lock is another's"
        );
        assert!(read_all(b) == bytes, "{test}");
        if kind == StoreKind::Tmpfs {
            // Another file in the replica's place is not handed out.
            let path = PathBuf::from(r.label());
            sys::clear_immutable(r.open_readonly().unwrap().as_fd()).unwrap();
            fs::remove_file(&path).unwrap();
            fs::write(&path, b"other").unwrap();
            match r.open_readonly() {
                Err(Error::Io { path: p, source }) => {
                    assert_eq!(p, path, "{test}");
                    assert!(
                        source.to_string().contains("taken the replica's place"),
                        "{source}"
                    );
                }
                other => panic!("{test}: expected an Io error naming the replica, got {other:?}"),
            }
            fs::remove_file(&path).unwrap();
        }
        drop(a);
        r.remove();
    }

    #[test]
    fn store_tmpfs_each_client_gets_its_own_description() {
        descriptions_suite(
            "store_tmpfs_each_client_gets_its_own_description",
            StoreKind::Tmpfs,
        );
    }

    #[test]
    fn store_memfd_each_client_gets_its_own_description() {
        descriptions_suite(
            "store_memfd_each_client_gets_its_own_description",
            StoreKind::Memfd,
        );
    }

    /// A daemon adopting a replica from the keeper takes it immutable and
    /// keeps it so; one an earlier version left mutable becomes immutable.
    fn adopt_suite(test: &str, kind: StoreKind) {
        if !is_root() {
            return skip(test, "trusted xattrs and the immutable flag need root");
        }
        let rd = RunDir::new();
        let Some(store) = open_store(test, &rd, kind, None) else {
            return;
        };
        let bytes = pattern(5000, 9);
        let src = source(&bytes);
        for mutable in [false, true] {
            let id = ident(&src, 1 + u64::from(mutable));
            let mut r = store.create(0, &id).unwrap();
            r.fill(src.as_file().as_fd(), 5000, &AtomicBool::new(false), &id)
                .unwrap();
            r.seal().unwrap();
            if mutable {
                sys::clear_immutable(r.open_readonly().unwrap().as_fd()).unwrap();
            }
            // What the keeper hands over: a duplicate of a memfd's fd, a
            // tmpfs replica's path and inode.
            let (adopted, got) = match r.replica_path() {
                Some(at) => store
                    .adopt_path(at)
                    .unwrap_or_else(|(_, why)| panic!("{test}: not adopted: {why}")),
                None => store
                    .adopt(r.fd().unwrap().try_clone_to_owned().unwrap())
                    .unwrap_or_else(|(_, why)| panic!("{test}: not adopted: {why}")),
            };
            assert_eq!(got, id, "{test}");
            assert_eq!(adopted.label(), r.label(), "{test}");
            assert!(
                sys::is_immutable(adopted.open_readonly().unwrap().as_fd()).unwrap(),
                "{test}: an adopted replica (mutable before: {mutable}) is not immutable"
            );
            assert!(
                read_all(adopted.open_readonly().unwrap()) == bytes,
                "{test}"
            );
            drop(r);
            let label = adopted.label();
            adopted.remove();
            if kind == StoreKind::Tmpfs {
                assert!(!Path::new(&label).exists(), "{test}: not unlinked");
            }
        }
    }

    #[test]
    fn store_tmpfs_adopt_keeps_replicas_immutable() {
        adopt_suite(
            "store_tmpfs_adopt_keeps_replicas_immutable",
            StoreKind::Tmpfs,
        );
    }

    #[test]
    fn store_memfd_adopt_keeps_replicas_immutable() {
        adopt_suite(
            "store_memfd_adopt_keeps_replicas_immutable",
            StoreKind::Memfd,
        );
    }

    #[test]
    fn store_unknown_node_is_no_such_node() {
        let rd = RunDir::new();
        let store =
            Store::open(&rd.cfg(StoreKind::Memfd, None), &[0], &Default::default()).unwrap();
        let src = source(b"x");
        match store.create(3, &ident(&src, 1)) {
            Err(Error::NoSuchNode { node: 3, have }) => assert_eq!(have, "0"),
            other => panic!("{other:?}"),
        }
        assert_eq!(store.nodes().collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn store_mountinfo_parsing() {
        let text = b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
            99 22 0:50 / /tmp/run\\040dir/node0 rw,nosuid,nodev shared:7 - tmpfs replicad-node0 rw,size=1024k,mode=700,mpol=bind:0\n\
            100 99 0:51 / /tmp/x rw master:2 unbindable - ext4 /dev/vdb rw\n\
            101 22 0:52 / /tmp/x rw - tmpfs over rw\n";
        let m = mount_at(text, Path::new("/tmp/run dir/node0")).unwrap();
        assert_eq!(m.fstype, b"tmpfs");
        assert_eq!(m.source, b"replicad-node0");
        // The later mount covers the earlier one.
        assert_eq!(mount_at(text, Path::new("/tmp/x")).unwrap().source, b"over");
        assert_eq!(mount_at(text, Path::new("/tmp/run dir")), None);
        assert_eq!(mount_at(b"", Path::new("/")), None);
        assert_eq!(unescape(b"a\\134b\\011\\0"), b"a\\b\t\\0");
    }

    #[test]
    fn store_memfd_names_are_bounded() {
        let mut id = ReplicaIdent {
            path: PathBuf::from("/usr/lib/libc.so.6"),
            dev: 1,
            ino: 2,
            generation: 3,
            size: 0,
            mtime_ns: 0,
            ctime_ns: 0,
        };
        assert_eq!(memfd_name(&id), "replicad:libc.so.6:g3");
        id.path = PathBuf::from(format!("/x/{}", "é".repeat(200)));
        let name = memfd_name(&id);
        assert!(
            name.len() <= MEMFD_NAME_MAX && name.ends_with(":g3"),
            "{name}"
        );
        assert_eq!(id.source_xattr(), "1:2");
        assert_eq!(id.generation_xattr(), "3:0:0:0");
    }
}
