//! The wiring of the `replicad` daemon and the `replicactl` CLI: config,
//! control socket, HTTP, signals. The engine lives in `replicad-replicator`,
//! the wire format in `replicad-wire`, the client API in `replicad-client`;
//! [`wire`] is the one place where engine types become wire types.

pub mod config;
pub mod ctl;
pub mod daemon;
pub mod http;
pub mod planner;
pub mod policy;
pub mod server;
pub mod wire;
