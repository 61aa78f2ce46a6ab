//! The wiring of the `replicad` daemon and the `replicactl` CLI: config,
//! control socket, HTTP, signals. The engine lives in `replicad-replicator`,
//! the client API and protocol in `replicad-client`.

pub mod config;
pub mod ctl;
pub mod daemon;
pub mod http;
pub mod server;
