//! Fuzz targets for every decoder Rebound reads untrusted or damaged bytes
//! with: the NBD handshake and requests, change frames, undo-journal
//! records, PS segment entries, the point catalog, the agent's dirty log,
//! enrollment and control-channel messages.
//!
//! Each target is a plain `pub fn <target>(data: &[u8])` that drives the
//! real decoder of its crate and asserts what the decoder promises: it never
//! panics, whatever it accepts is consistent, and decode → encode round
//! trips where the format allows. Keeping the targets here, on stable,
//! lets the test suite replay the committed corpus (`fuzz/corpus/<target>/`)
//! without a nightly toolchain; `fuzz/harness` is the cargo-fuzz project
//! whose targets only call these functions (see `fuzz/README.md`).
#![forbid(unsafe_code)]

mod control;
mod dirty_log;
mod enrollment;
mod frame;
mod input;
mod nbd;
mod point_catalog;
mod ps_segment;
mod scratch;
mod tail;
mod undo_journal;

pub use control::control;
pub use dirty_log::dirty_log;
pub use enrollment::enrollment;
pub use frame::frame;
pub use nbd::{nbd_handshake, nbd_request};
pub use point_catalog::point_catalog;
pub use ps_segment::ps_segment;
pub use undo_journal::undo_journal;

/// A fuzz target: takes any bytes, panics only on a broken invariant.
pub type Target = fn(&[u8]);

/// Every target by name, as the corpus directories are named.
pub const TARGETS: &[(&str, Target)] = &[
    ("nbd_handshake", nbd_handshake),
    ("nbd_request", nbd_request),
    ("frame", frame),
    ("undo_journal", undo_journal),
    ("ps_segment", ps_segment),
    ("point_catalog", point_catalog),
    ("dirty_log", dirty_log),
    ("enrollment", enrollment),
    ("control", control),
];
