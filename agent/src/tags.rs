//! Recovery-point tags (DESIGN.md §5 "Tags").
//!
//! A tag is a record in the change stream, so it is cut under the ordering
//! point like a write ([`crate::capture::Capture::cut_tag`]); this module
//! holds the naming rule. The crash-tag timer is
//! [`crate::control::crash_tag_loop`], because the control plane can change
//! its interval.
//!
//! Choice: the timer cuts a crash tag every `crash_interval` only when some
//! record went into the stream since the last tag. An idle machine would
//! otherwise fill the recovery-point catalog with identical points; the
//! newest point of an idle machine is still exact because nothing changed
//! after it. Explicit requests (admin socket) always cut a tag. The timer
//! skips while a resync window is open or writes are missing from the
//! stream (bitmap mode), because no point there is consistent.

use rebound_common::frame::TagKind;

/// Tag ids are `"<kind>-<seq>"` (e.g. `crash-1042`), unique per replication
/// because seqs are.
pub fn tag_id(kind: TagKind, seq: u64) -> String {
    format!("{}-{seq}", kind.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert_eq!(tag_id(TagKind::Crash, 1042), "crash-1042");
        assert_eq!(tag_id(TagKind::App, 7), "app-7");
    }
}
