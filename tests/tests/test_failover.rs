//! Test failover (DESIGN.md §7 views, §9): a writable copy-on-write view of
//! a pinned point at the MT, served over NBD, while replication and
//! retention go on; cleanup discards it and unpins.
