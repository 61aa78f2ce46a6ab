//! The replica list. STUB.
/// A source file's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey { pub dev: u64, pub ino: u64 }
/// Where a replica lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target { Node(u32) }
/// A source's generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation { pub seq: u64, pub size: u64, pub mtime_ns: i64, pub ctime_ns: i64 }
