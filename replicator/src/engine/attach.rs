//! A client's `Map`: hand it one read-only fd of its node's replica of a
//! file it opened itself (the fd it passes is the proof it may read it).

use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;

use super::{lock, Inner, Replicator};
use crate::model::{ReplicaState, SourceKey, Target};
use crate::{sys, Error, Result};

/// What `attach` hands a client.
#[derive(Debug)]
pub enum Attach {
    /// A read-only fd of the replica.
    Replica {
        fd: OwnedFd,
        node: u32,
        generation: u64,
        size: u64,
    },
    /// No replica for this caller; it should use the file itself.
    Original { reason: String },
}

impl Replicator {
    /// Hand `pid` a read-only fd of its node's replica of the file behind
    /// `fd` (which the client opened itself: proof that it may read it).
    pub fn attach(&self, pid: u32, fd: BorrowedFd<'_>, node: Option<u32>) -> Result<Attach> {
        let inner = &self.inner;
        let result = inner.attach(pid, fd, node);
        let label = match &result {
            Ok(Attach::Replica { .. }) => "replica",
            Ok(Attach::Original { .. }) => "original",
            Err(_) => "refused",
        };
        inner.metrics.attaches.with_label_values(&[label]).inc();
        result
    }

    /// `pid`, which connected as `uid`, keeps its fallback table at
    /// `table` and has `ranges` (source, start, end) on replicas (its
    /// Hello or Map said so): a revoke carries its private pages there to
    /// its spares (`carry.rs`) while it is still `uid`'s to inspect.
    pub fn note_table(&self, pid: u32, uid: u32, table: u64, ranges: &[(SourceKey, u64, u64)]) {
        self.inner.note_table(pid, uid, table, ranges);
    }
}

impl Inner {
    fn attach(&self, pid: u32, fd: BorrowedFd<'_>, node: Option<u32>) -> Result<Attach> {
        let fd_err = |reason: String| Error::ClientFd { pid, reason };
        // The fd must be open for reading: an O_PATH fd proves nothing.
        let flags = sys::status_flags(fd).map_err(|e| fd_err(format!("F_GETFL: {e}")))?;
        if flags & libc::O_PATH != 0 || flags & libc::O_ACCMODE == libc::O_WRONLY {
            return Err(Error::ClientFdNotReadable { pid });
        }
        let meta = std::fs::File::from(
            fd.try_clone_to_owned()
                .map_err(|e| fd_err(format!("dup: {e}")))?,
        )
        .metadata()
        .map_err(|e| fd_err(format!("fstat: {e}")))?;
        let ft = meta.file_type();
        if !ft.is_file() {
            return Err(Error::ClientFdNotRegular {
                pid,
                kind: if ft.is_dir() {
                    "directory"
                } else if ft.is_fifo() {
                    "FIFO"
                } else if ft.is_socket() {
                    "socket"
                } else {
                    "special file"
                },
            });
        }
        let key = {
            use std::os::unix::fs::MetadataExt;
            SourceKey {
                dev: meta.dev(),
                ino: meta.ino(),
            }
        };
        let node = match node {
            Some(n) => {
                self.topology.node(n)?;
                n
            }
            None => {
                let cpus = match self.proc.cpus_allowed(pid) {
                    Ok(Some(cpus)) => cpus,
                    // The client is gone: nobody reads the answer.
                    Ok(None) => return Err(Error::NoSuchProcess { pid }),
                    Err(e) => return Err(Error::proc(pid, "status", e)),
                };
                match self.topology.home_node(&cpus) {
                    Some(n) => n,
                    None => {
                        return Ok(Attach::Original {
                            reason: format!(
                                "pid {pid} may run on CPUs of several nodes: it has no home node \
                                 (bind it to one node, or ask for a node explicitly)"
                            ),
                        })
                    }
                }
            }
        };
        let target = Target::Node(node);
        let attachment = self.attachment(pid);
        let mut list = lock(&self.list);
        let Some(src) = list.get_mut(key) else {
            return Ok(Attach::Original {
                reason: "the file is not replicated".into(),
            });
        };
        if !src.fenced() {
            return Ok(Attach::Original {
                reason: "a writer holds the file; its replicas are revoked".into(),
            });
        }
        let seq = src.generation.seq;
        let Some(replica) = src
            .replicas
            .iter_mut()
            .find(|r| r.target == target && r.generation.seq == seq)
        else {
            return Ok(Attach::Original {
                reason: format!("no replica on {target}"),
            });
        };
        let file = match (&replica.state, &replica.file) {
            (ReplicaState::Valid, Some(file)) => file,
            (state, _) => {
                return Ok(Attach::Original {
                    reason: format!("the replica on {target} is {state}"),
                })
            }
        };
        let rfd = file.open_readonly()?;
        replica.attachments.insert(attachment);
        Ok(Attach::Replica {
            fd: rfd,
            node,
            generation: seq,
            size: replica.generation.size,
        })
    }
}
