//! Why a file could not be fenced: one typed reason, from which both the
//! message and the metric label come.

use std::io;

/// Why a write fence could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum FenceFailure {
    /// Someone holds the file open for writing (fds or writable shared
    /// mappings); the pids, where they could be found.
    #[error(
        "it is open for writing by {}; a write fence needs every writer gone: close the \
         writer and retry",
        who(.writers)
    )]
    OpenForWrite { writers: Vec<(u32, String)> },
    /// The filesystem refused the lease for another reason.
    #[error("the filesystem refused a read lease ({0}); files there cannot be replicated")]
    LeaseRefused(io::Error),
    /// A filesystem where contents change without a local write.
    #[error(
        "it is on {name}, where contents can change without a local write (or are made up \
         on read), so no lease can fence it"
    )]
    Filesystem { name: &'static str },
    /// On overlayfs, but the files of its layers could not be found (its
    /// mount is not in our mountinfo, or the file is not in any layer we
    /// can read): a write to a layer's own file would go unfenced.
    #[error(
        "it is on overlayfs and its layers' own files were not found in /proc/self/mountinfo, \
         so a write to them directly could not be fenced; replicate it where its overlay \
         mount is visible to replicad (the same mount namespace)"
    )]
    OverlayLayers,
}

fn who(writers: &[(u32, String)]) -> String {
    if writers.is_empty() {
        return String::from("another process");
    }
    writers
        .iter()
        .map(|(pid, comm)| format!("pid {pid} ({comm})"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl FenceFailure {
    /// The `reason` label of `replicad_fence_failures_total`.
    pub fn label(&self) -> &'static str {
        match self {
            FenceFailure::OpenForWrite { .. } => "open_for_write",
            FenceFailure::LeaseRefused(_) => "lease_refused",
            FenceFailure::Filesystem { .. } => "filesystem",
            FenceFailure::OverlayLayers => "overlay_layers",
        }
    }

    /// Every label, for metrics that exist at zero from the start.
    pub const LABELS: [&'static str; 4] = [
        "open_for_write",
        "lease_refused",
        "filesystem",
        "overlay_layers",
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_map_to_their_labels() {
        let cases = [
            (
                FenceFailure::OpenForWrite {
                    writers: vec![(42, "vim".into())],
                },
                "open_for_write",
            ),
            (
                FenceFailure::LeaseRefused(io::Error::from_raw_os_error(libc::EINVAL)),
                "lease_refused",
            ),
            (FenceFailure::Filesystem { name: "nfs" }, "filesystem"),
            (FenceFailure::OverlayLayers, "overlay_layers"),
        ];
        for (f, label) in &cases {
            assert_eq!(f.label(), *label, "{f}");
            assert!(FenceFailure::LABELS.contains(label));
        }
        assert_eq!(cases.len(), FenceFailure::LABELS.len());
        let msg = cases[0].0.to_string();
        assert!(msg.contains("pid 42 (vim)"), "{msg}");
        let anon = FenceFailure::OpenForWrite { writers: vec![] }.to_string();
        assert!(anon.contains("another process"), "{anon}");
    }
}
