//! Malformed frames (seq ranges that do not match their records, u64::MAX,
//! empty bodies) are refused with a clear error at the PS and the MT, and
//! replication goes on.
