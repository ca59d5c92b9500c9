//! `rebound verify`: the source at a tag against the MT's view of the same
//! point, chunk by chunk, without stopping writes; `--repair` resends the
//! chunks that differ.
