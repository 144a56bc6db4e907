//! veilmesh: a mesh VPN daemon. The binary in `main.rs` is a thin CLI over
//! these modules; the integration tests and benchmarks use them too.

pub mod config;
pub mod control;
/// The sans-IO core, its own crate (`crates/core`): no runtime, no sockets.
pub use veilmesh_core as core;
pub mod daemon;
pub mod exit;
pub mod hosts;
pub use veilmesh_core::identity;
pub mod invite;
pub mod metrics;
pub mod netdev;
pub mod notify;
pub mod privileges;
pub mod rendezvous;
