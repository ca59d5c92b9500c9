//! The integration suite: real Rebound binaries as child processes on
//! loopback (the `rebound-lab` crate), driven by real NBD clients and the
//! `rebound` CLI. One test binary with a module per area, so the suite
//! links once.

mod bad_frames;
mod bad_input;
mod bench_smoke;
mod demo;
mod disk_full_mt;
mod disk_full_ps;
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
mod multi_host;
mod packaging;
mod replication;
mod resync;
mod retention;
mod retention_clock;
mod rollback;
mod service_manager;
mod soak;
mod support;
mod trust_authz;
mod trust_enrollment;
mod trust_nbd;
mod trust_renewal;
mod trust_revocation;
mod trust_roles;
