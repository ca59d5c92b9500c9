//! Common pieces shared by every Rebound component (DESIGN.md §2): the
//! change-frame codec, block hashing, PKI and TLS loading, config loading,
//! telemetry init, durable-file helpers and the NBD server.
pub mod chunk;
pub mod config;
pub mod durable;
pub mod frame;
pub mod nbd;
pub mod pki;
pub mod telemetry;
pub mod tls;
