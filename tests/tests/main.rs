//! The integration suite: real Rebound binaries as child processes on
//! loopback (the `rebound-lab` crate), driven by real NBD clients and the
//! `rebound` CLI. One test binary with a module per area, so the suite
//! links once.

mod bad_input;
mod bench_smoke;
mod demo;
mod faults;
mod fleet;
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
mod rollback;
mod service_manager;
mod support;
mod trust_authz;
mod trust_enrollment;
mod trust_nbd;
mod trust_renewal;
mod trust_revocation;
mod trust_roles;
