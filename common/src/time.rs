//! Wall-clock time as the change stream and the control plane carry it:
//! milliseconds since the Unix epoch. One definition, so that a tag's time,
//! a heartbeat's time and a job's start time are read the same way.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 when the clock is set before 1970.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
