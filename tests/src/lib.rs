//! The integration-test harness: a lab of real Rebound processes.
//!
//! Every test starts the real binaries (`rebound-agent`, `rebound-ps`,
//! `rebound-mt`) as child processes on loopback, in a temp dir with a
//! generated PKI, and drives them with real NBD clients (qemu-io, qemu-img,
//! nbdcopy, fio). Correctness is always checked by content: blake3 of the
//! source at a point against blake3 of the master target's view of it.

pub mod clients;
pub mod lab;
pub mod sites;

pub use clients::*;
pub use lab::*;
