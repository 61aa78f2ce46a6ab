//! [`map`]: a read-only mapping of a file backed by the caller's node copy.
//! STUB: replaced by the real implementation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Error;

/// What backs a [`Mapping`] when it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// The node's replica, at this generation.
    Replica { node: u32, generation: u64 },
    /// The file itself, and why.
    File { reason: String },
}

/// Options for [`map_with`].
#[derive(Debug, Clone)]
pub struct MapOptions {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// Ask for this node's replica instead of the caller's home node.
    pub node: Option<u32>,
    /// Time-out for the daemon's answer.
    pub timeout: Duration,
}

impl Default for MapOptions {
    fn default() -> Self {
        MapOptions {
            socket: crate::socket_path(),
            node: None,
            timeout: Duration::from_secs(2),
        }
    }
}

/// A read-only mapping of a whole file.
#[derive(Debug)]
pub struct Mapping {
    ptr: *const u8,
    len: usize,
    backing: Backing,
}

// SAFETY: the mapping is read-only memory owned by this value.
unsafe impl Send for Mapping {}
// SAFETY: the mapping is read-only memory owned by this value.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr/len describe a live read-only mapping owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    /// What backed the mapping when it was made.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }
}

/// Map `path` read-only through the caller's node replica, or the file.
pub fn map(path: impl AsRef<Path>) -> Result<Mapping, Error> {
    map_with(path, &MapOptions::default())
}

/// [`map`] with options.
pub fn map_with(path: impl AsRef<Path>, _opts: &MapOptions) -> Result<Mapping, Error> {
    Err(Error::Empty {
        path: path.as_ref().to_path_buf(),
    })
}
