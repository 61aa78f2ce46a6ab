//! replicad's engine: it keeps node-local copies of hot read-mostly files,
//! coherent with their source through a write fence. No I/O wiring lives
//! here (no sockets, no HTTP, no async runtime): the daemon in `src/` calls
//! in.
//!
//! ```text
//!  Topology ── nodes 0..N (CPUs, memory, distances)
//!     │
//!  Store ──── one tmpfs per node (mpol=bind:N), or memfd + mbind
//!     │            └─ ReplicaFile: one source generation on one node
//!  ReplicaList ── Source (dev, ino) ── fence (read lease) ── Generation
//!     │                └─ Replica (target, state) ── attachments (pids)
//!  Replicator ─── replicate / evict / attach / status
//!     └─ fence thread: lease break ─> Revoking ─> truncate ─> release
//!     └─ generation worker: writer gone + settle ─> new generation
//! ```
//!
//! Invariants the engine keeps (and the tests show): a replica is `Valid`
//! only while its source's fence is held and its bytes equal the source's at
//! its generation; the fence is released only after every replica of the
//! source is truncated (so unmapped from every process); a replica on node N
//! has every page on node N.

pub mod copy;
pub mod engine;
mod error;
pub mod fence;
pub mod list;
pub mod metrics;
pub mod numa;
pub mod ratelimit;
pub mod store;
pub mod sys;
pub mod topology;

pub use engine::{EngineConfig, Replicator};
pub use error::{Error, Result};
pub use list::{Generation, SourceKey, Target};
pub use metrics::Metrics;
pub use topology::{Node, Topology};
