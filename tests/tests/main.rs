//! The integration suite: real Rebound binaries as child processes on
//! loopback (the `rebound-lab` crate), driven by real NBD clients and the
//! `rebound` CLI. One test binary with a module per area, so the suite
//! links once.

mod alerts;
mod bad_frames;
mod bad_input;
mod bench_smoke;
mod cs_backup;
mod dashboards;
mod demo;
mod disk_full_mt;
mod disk_full_ps;
mod failed_over_writes;
mod faults;
mod faults_network;
mod faults_resume;
mod fleet;
mod journal_damage;
mod lifecycle;
mod lifecycle_cli;
mod lifecycle_errors;
mod lifecycle_sites;
mod link_errors;
mod metrics;
mod move_ps;
mod multi_host;
mod packaging;
mod plans;
mod replication;
mod reprotect_diff;
mod resync;
mod retention;
mod retention_clock;
mod rollback;
mod service_manager;
mod soak;
mod source_copy;
mod standby;
mod support;
mod test_failover;
mod timers;
mod trust_authz;
mod trust_enrollment;
mod trust_nbd;
mod trust_renewal;
mod trust_revocation;
mod trust_roles;
mod verify;
