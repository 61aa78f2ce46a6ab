//! The replica list as views, for `status` and for answers.

use super::{lock, relock, Inner, Replicator};
use crate::list::Source;
use crate::model::{ReplicaView, SourceView, StatusView};

impl Replicator {
    /// The whole replica list, after pruning dead attachments.
    pub fn status(&self) -> StatusView {
        self.inner.prune();
        let list = lock(&self.inner.list);
        let sources = list.iter().map(|s| self.inner.source_view(s)).collect();
        drop(list);
        let left_alone = relock(&self.inner.left_alone)
            .iter()
            .map(|(_, l)| l.clone())
            .collect();
        StatusView {
            sources,
            left_alone,
        }
    }
}

impl Inner {
    pub(super) fn source_view(&self, src: &Source) -> SourceView {
        SourceView {
            path: src.path.clone(),
            key: src.key,
            generation: src.generation.seq,
            size: src.generation.size,
            fence: src.fence,
            fenced: src.fenced(),
            targets: src.targets.clone(),
            replicas: src
                .replicas
                .iter()
                .map(|r| ReplicaView {
                    target: r.target,
                    generation: r.generation.seq,
                    bytes: r.generation.size,
                    state: r.state,
                    attachments: r.attachments.iter().map(|a| a.pid).collect(),
                    file: r.file.as_ref().map(|f| f.label()).unwrap_or_default(),
                    pages: r.placement.map_or(0, |p| p.pages),
                    pages_on_node: r.placement.map_or(0, |p| p.pages - p.misplaced),
                })
                .collect(),
        }
    }
}
