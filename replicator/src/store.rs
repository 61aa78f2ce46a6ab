//! The CPU replica store. STUB: interface only; replaced by the real
//! implementation.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use crate::{Error, Result};

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

/// The per-node stores.
#[derive(Debug)]
pub struct Store {
    _cfg: StoreConfig,
}

impl Store {
    /// Open (mount) the node stores and remove every replica an earlier run
    /// left behind.
    pub fn open(cfg: &StoreConfig, _nodes: &[u32]) -> Result<Store> {
        Ok(Store { _cfg: cfg.clone() })
    }

    /// How many leftover replica files `open` removed.
    pub fn leftovers_removed(&self) -> usize {
        0
    }

    /// Create an empty replica file on `node`.
    pub fn create(&self, node: u32, ident: &ReplicaIdent) -> Result<ReplicaFile> {
        Err(Error::NoSpace {
            node,
            dir: PathBuf::new(),
            path: ident.path.clone(),
        })
    }

    /// Unmount every node store (replicas must be gone first).
    pub fn close(&self) {}
}

/// One replica file.
#[derive(Debug)]
pub struct ReplicaFile {
    _fd: OwnedFd,
}

impl ReplicaFile {
    /// Copy `len` bytes of `src` into the replica.
    pub fn fill(
        &self,
        _src: BorrowedFd<'_>,
        _len: u64,
        _abort: &AtomicBool,
        _ident: &ReplicaIdent,
    ) -> Result<CopyStats> {
        Ok(CopyStats::default())
    }

    /// Where the replica's pages are.
    pub fn placement(&self) -> Result<Placement> {
        Ok(Placement::default())
    }

    /// Make the replica read-only for good (mode, seals).
    pub fn seal(&self) -> Result<()> {
        Ok(())
    }

    /// A read-only fd for a client.
    pub fn open_readonly(&self) -> std::io::Result<OwnedFd> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }

    /// Truncate to 0: the kernel unmaps it from every process.
    pub fn revoke(&self) -> std::io::Result<()> {
        Ok(())
    }

    /// Revoke and unlink.
    pub fn remove(self) {}

    /// The node it is on.
    pub fn node(&self) -> u32 {
        0
    }

    /// Path in the store, or `memfd:<name>`.
    pub fn label(&self) -> String {
        String::new()
    }
}
