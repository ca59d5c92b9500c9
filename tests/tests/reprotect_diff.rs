//! The first reprotect after a failover seeds the returning replica from the
//! disks the machine left at its old site (kept at commit), so only the
//! chunks that changed cross the network.
