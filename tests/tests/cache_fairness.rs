//! One stuck replication cannot fill the shared process-server cache and pause
//! every other agent on that PS.
//!
//! Tested in the process server's crate
//! (`process-server/src/tests/cache_fairness.rs`): a real PS with two
//! replications over real mutual-TLS ingest streams, one whose master
//! target went down, the other streaming twice the cache cap. One PS with
//! two machines on routes to different master targets is what that test
//! sets up directly; the multi-site lab has one master target per site.
