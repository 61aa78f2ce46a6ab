//! The preload shim's hello: which of a process's mappings its node's
//! replicas may back.

use std::os::fd::OwnedFd;

use replicad_client::proto::AttachRange;

use crate::{Replicator, Result};

/// What a hello hands the shim.
#[derive(Debug)]
pub struct ProcessAttach {
    pub node: u32,
    pub ranges: Vec<AttachRange>,
    /// Two per source: the replica's read-only fd, then a fresh read-only
    /// fd of the source (the shim's way back).
    pub fds: Vec<OwnedFd>,
    pub skipped: Vec<String>,
}

/// The answer to a hello.
#[derive(Debug)]
pub enum Hello {
    Attached(ProcessAttach),
    LeftAlone { reason: String },
}

impl Replicator {
    /// Attach `pid`'s eligible mappings. `alive` says whether the peer that
    /// asked is still the process `pid` names.
    pub fn hello(&self, _pid: u32, _node: Option<u32>, _alive: &dyn Fn() -> bool) -> Result<Hello> {
        Ok(Hello::LeftAlone {
            reason: "not yet".into(),
        })
    }
}
