//! replicad's engine: it keeps node-local copies of hot read-mostly files,
//! coherent with their source through a write fence. No I/O wiring lives
//! here (no sockets, no HTTP, no async runtime, no wire format): the daemon
//! in `src/` calls in, and translates the engine's model at its edge.
//!
//! ```text
//!  Topology ── nodes 0..N (CPUs, memory, distances)
//!     │
//!  Store ──── one tmpfs per node (mpol=bind:N), or memfd + mbind
//!     │            └─ ReplicaFile: one source generation on one node
//!  ReplicaList ── Source (dev, ino) ── fence (Lease) ── Generation
//!     │                └─ Replica (target, state) ── attachments (pids)
//!  Replicator ─── replicate / evict / attach / hello / status
//!     └─ fence thread: lease break ─> Revoking ─> truncate ─> release
//!     └─ generation worker: writer gone + settle ─> new generation
//! ```
//!
//! [`model`] holds the engine's types; [`fence`] the lease, the kernel
//! calls behind [`fence::FenceOps`] and the thread that hears breaks;
//! [`engine`] the state machine over them; `/proc` is read through
//! `replicad-procfs`.
//!
//! Invariants the engine keeps (and the tests show): a replica is `Valid`
//! only while its source's fence is held and its bytes equal the source's at
//! its generation; the fence is released only after every replica of the
//! source is truncated (so unmapped from every process); a replica on node N
//! has every page on node N; a source whose copy failed holds no lease.

pub mod copy;
pub mod engine;
mod error;
pub mod fence;
pub mod heat;
pub mod list;
pub mod metrics;
pub mod model;
pub mod numa;
pub mod ratelimit;
pub mod residency;
pub mod store;
pub mod sys;
pub mod topology;

pub use engine::{EngineConfig, Migrated, Replicator, Wiring};
pub use error::{Error, Result};
pub use metrics::Metrics;
pub use model::{Generation, SourceKey, Target};
pub use topology::{Node, Topology};
