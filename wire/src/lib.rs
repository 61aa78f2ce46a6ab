//! replicad's wire format: what crosses the boundary between the daemon and
//! every other process. The daemon, `replicactl`, the client API and the
//! preload shim all speak it; the engine knows nothing of it (the daemon
//! translates at its edge).
//!
//! ```text
//!  client / shim / replicactl                       replicad
//!        │  proto: 8-byte header + JSON body, one per packet      │
//!        │  sock:  SOCK_SEQPACKET, fds by SCM_RIGHTS, SO_PEERCRED │
//!        ├──────── Request (+ fds) ──────────────────────────────>│
//!        │<─────── Response (+ fds) ──────────────────────────────┤
//!        │                                                        │
//!        └─ published: <run_dir>/replicas.set, a seqlocked shared-memory
//!           table the daemon writes and every shim reads: which sources
//!           have a valid replica on which nodes, so that files without
//!           one cost no round trip.
//! ```

pub mod proto;
pub mod published;
pub mod sock;
