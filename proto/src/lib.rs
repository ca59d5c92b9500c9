//! Generated gRPC types and services of Rebound (`proto/rebound.proto`).
//!
//! Kept in its own crate so every component shares one definition of the wire
//! contract and the generated code is built once.
#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("rebound.v1");
}
pub use v1::*;
