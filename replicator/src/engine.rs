//! The engine. STUB.
/// Engine configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {}
/// The engine.
#[derive(Debug)]
pub struct Replicator {}
