//! The published replica set: after every change of validity, which
//! sources have valid replicas of their current generation on which nodes.
//! The preload shim reads it (through the daemon's [`Publisher`]) to skip
//! the daemon for files without replicas.

use super::{relock, Inner};
use crate::list::ReplicaList;
use crate::model::{PublishedSource, ReplicaState};

impl Inner {
    /// Publish the set. Called with the list locked, so sets go out in list
    /// order.
    pub(super) fn publish(&self, list: &ReplicaList) {
        let mut guard = relock(&self.publisher);
        let Some(publisher) = guard.as_mut() else {
            return;
        };
        let sources: Vec<PublishedSource> = list
            .iter()
            .filter(|s| s.fenced())
            .map(|s| PublishedSource {
                key: s.key,
                generation: s.generation.seq,
                nodes: s
                    .replicas
                    .iter()
                    .filter(|r| {
                        r.state == ReplicaState::Valid && r.generation.seq == s.generation.seq
                    })
                    .filter_map(|r| r.target.node())
                    .collect(),
            })
            .filter(|p| !p.nodes.is_empty())
            .collect();
        publisher.publish(&sources);
    }
}
