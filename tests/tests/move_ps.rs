//! `rebound move`: a protected machine switches to another PS of its site
//! under writes, without losing a point and without a full resync.
