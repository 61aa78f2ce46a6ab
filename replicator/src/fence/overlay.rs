//! overlayfs: a lease on the merged file is broken by writes through the
//! overlay, but not by a write to a layer's own file (the lower file
//! before copy-up, the upper file after it), which the overlay shows at
//! once. So a source on an overlay is fenced on the real files of its
//! layers too: a write to any of them revokes.

use std::path::{Path, PathBuf};

use replicad_procfs::{MountInfo, ProcReader};

/// overlayfs' `f_type`.
pub const OVERLAYFS_MAGIC: i64 = 0x794c_7630;

/// The real files behind `path` (a file on the overlay mount whose device
/// is `dev`): the upper layer's copy if there is one, and the first lower
/// layer that holds it. Empty if the mount cannot be found (then only the
/// merged file is fenced, and the caller says so).
pub fn layer_files(proc: &ProcReader, path: &Path, dev: u64) -> Vec<PathBuf> {
    let Ok(mounts) = proc.mountinfo(None) else {
        return Vec::new();
    };
    let Some(m) = mounts
        .iter()
        .find(|m| m.dev == dev && m.fstype == "overlay")
    else {
        return Vec::new();
    };
    let Ok(canon) = std::fs::canonicalize(path) else {
        return Vec::new();
    };
    let Ok(rel) = canon.strip_prefix(&m.mount_point) else {
        return Vec::new();
    };
    let rel = Path::new(m.root.trim_start_matches('/')).join(rel);
    let (upper, lowers) = layers(m);
    let mut files = Vec::new();
    if let Some(u) = upper {
        let f = u.join(&rel);
        if f.is_file() {
            files.push(f);
        }
    }
    if let Some(f) = lowers.iter().map(|l| l.join(&rel)).find(|f| f.is_file()) {
        files.push(f);
    }
    files
}

/// The upper directory and the lower directories (top first) of an
/// overlay mount, from its superblock options.
fn layers(m: &MountInfo) -> (Option<PathBuf>, Vec<PathBuf>) {
    let mut upper = None;
    let mut lowers = Vec::new();
    // mountinfo escapes paths in octal (`\040` a space); an empty
    // lower element starts the data-only layers (`l1::d1`), which hold
    // file data for metacopy files, not the files themselves.
    let path = |p: &str| PathBuf::from(replicad_procfs::unescape_octal(p));
    for opt in split_options(&m.super_options) {
        if let Some(u) = opt.strip_prefix("upperdir=") {
            upper = Some(path(u));
        } else if let Some(l) = opt.strip_prefix("lowerdir=") {
            lowers.extend(
                split_unescaped(l, ':')
                    .into_iter()
                    .take_while(|p| !p.is_empty())
                    .map(|p| path(&p)),
            );
        } else if let Some(l) = opt.strip_prefix("lowerdir+=") {
            lowers.push(path(l));
        }
    }
    (upper, lowers)
}

/// Superblock options split at unescaped commas (overlayfs escapes `,`
/// and `:` in paths with a backslash).
fn split_options(s: &str) -> Vec<String> {
    split_unescaped(s, ',')
}

fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    if n != sep {
                        cur.push('\\');
                    }
                    cur.push(n);
                }
            }
            c if c == sep => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(super_options: &str) -> MountInfo {
        MountInfo {
            mount_id: 1,
            parent_id: 0,
            dev: 39,
            root: "/".into(),
            mount_point: "/m".into(),
            options: "rw".into(),
            optional: Vec::new(),
            fstype: "overlay".into(),
            source: "overlay".into(),
            super_options: super_options.into(),
        }
    }

    #[test]
    fn layers_come_from_the_superblock_options() {
        let m = mount("rw,lowerdir=/l1:/l\\:2,upperdir=/u,workdir=/w,uuid=on");
        let (u, l) = layers(&m);
        assert_eq!(u, Some(PathBuf::from("/u")));
        assert_eq!(l, [PathBuf::from("/l1"), PathBuf::from("/l:2")]);
        // As mountinfo really shows them: octal escapes, and data-only
        // layers after an empty element.
        let (u, l) = layers(&mount(
            "rw,lowerdir=/tmp/l\\040b:/tmp/l::/data,upperdir=/u\\040x",
        ));
        assert_eq!(u, Some(PathBuf::from("/u x")));
        assert_eq!(l, [PathBuf::from("/tmp/l b"), PathBuf::from("/tmp/l")]);
        let (u, l) = layers(&mount("ro,lowerdir=/a:/b"));
        assert_eq!(u, None);
        assert_eq!(l.len(), 2);
        assert_eq!(split_options("a\\,b,c"), ["a,b", "c"]);
    }
}
