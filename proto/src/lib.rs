//! Generated gRPC types and services of Rebound: the data plane
//! (`proto/rebound.proto`, module `v1`) and the control plane
//! (`proto/control.proto`, module `control`).
//!
//! Kept in its own crate so every component shares one definition of the wire
//! contract and the generated code is built once.
#![forbid(unsafe_code)]
#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("rebound.v1");
}
pub use v1::*;

/// The control plane: enrollment, the control channel, operator RPCs.
pub mod control {
    tonic::include_proto!("rebound.control.v1");
}
