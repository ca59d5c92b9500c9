//! Checks that several integration modules share, so each test says what
//! it expects in one line.

use rebound_lab::Lab;
use std::time::Duration;

/// Tags a crash point now and asserts that, once applied at the MT (within
/// `within`), the point's view of disk0 equals the source at tagging time.
/// `what` says in the failure which convergence was expected.
pub fn assert_tag_converges(lab: &Lab, within: Duration, what: &str) {
    let (id, seq, h) = lab.tag_hash("crash").unwrap();
    assert_eq!(
        lab.applied_point_hash(&id, seq, within).unwrap(),
        h,
        "{what}: point {id} (seq {seq}) differs from the source"
    );
}

/// [`assert_tag_converges`], then the bytes the agent's resync has sent
/// since it started (its `resync_bytes_sent` counter).
pub fn resync_bytes_to_converge(lab: &Lab, within: Duration, what: &str) -> u64 {
    assert_tag_converges(lab, within, what);
    lab.agent_counter("resync_bytes_sent").unwrap()
}
