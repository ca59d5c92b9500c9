//! Common pieces shared by every Rebound component (DESIGN.md §2): the
//! allocator setting and large-block cache, the change-frame codec, block
//! hashing, PKI and TLS loading, config loading, telemetry init, the
//! `/metrics` and `/healthz` endpoint ([`metrics`]), durable-file helpers, the hand-over journal ([`handover_journal`], the
//! agent's and the master target's shared file), the NBD server, and the
//! component side of the control plane: the control-channel client
//! ([`control`]) and the enrollment client ([`enrollment`]).
//!
//! Unsafe code is confined to the allocator ([`block_cache`]) and the libc
//! wrappers in `sys`.
#![deny(unsafe_code)]

pub mod alloc;
#[allow(unsafe_code)]
pub mod block_cache;
pub mod chunk;
pub mod cli_args;
pub mod config;
pub mod control;
pub mod durable;
pub mod enrollment;
pub mod frame;
pub mod handover_journal;
pub mod limits;
pub mod link_error;
pub mod metrics;
pub mod nbd;
pub mod pki;
pub mod serve;
pub mod service_manager;
pub mod signal;
#[allow(unsafe_code)]
pub mod sys;
pub mod telemetry;
pub mod time;
pub mod tls;
