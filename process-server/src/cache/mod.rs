//! The durable frame cache (DESIGN.md §6), between the agents' ingest
//! streams and the forwarders to the master target. A frame's way through
//! it, each step in the module named for it:
//!
//! 1. `registry.rs`: the agent's hello finds (or creates) its replication,
//!    refused when another machine claims the id;
//! 2. `cap.rs`: the frame's bytes are reserved against the cache cap; a full
//!    cache stops reading the stream (backpressure);
//! 3. `replication.rs`: [`Replication::append`] queues the frame for the
//!    replication's writer;
//! 4. `group_commit.rs`: the writer appends it as an entry of the newest
//!    segment (format in `crate::segment`), fsyncs once for the whole batch
//!    queued across streams, and only then acknowledges with the durable
//!    seq; once the master target has applied a segment it deletes it;
//! 5. `reader.rs`: the forwarder reads synced frames in seq order.
//!
//! On restart `recovery.rs` cuts a torn tail off the newest segment and
//! `info.rs` brings back the agent's hello, so forwarding resumes before the
//! agent reconnects.

mod applied_mark;
mod cap;
mod error;
mod group_commit;
mod info;
mod reader;
mod recovery;
mod registry;
mod replication;
#[cfg(test)]
mod tests;

pub use cap::{Account, Reservation, Share};
pub use error::{AppendError, CacheError, SegmentFailure};
pub use reader::{Cursor, Item, ReadError};
pub use registry::Cache;
pub use replication::{Replication, SegMeta, Stats};

/// Largest segment file before the writer starts a new one.
pub const SEGMENT_MAX_BYTES: u64 = 64 << 20;
