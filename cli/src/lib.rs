//! The operator CLI `rebound`.
//!
//! The operator subcommands (`status`, `machines`, `protect`, `failover`,
//! `commit`, `reprotect`, `jobs`, `plan`, `group`, ...) talk to the
//! configuration server with the admin certificate ([`operator`]). The CLI
//! can also talk to a master target directly (`points --mt`, `rollback`,
//! `restore-pre-images`), write a lab PKI and run the demo; `rebound bench`
//! and `rebound soak` run the separate `rebound-bench` binary ([`bench`]).
#![forbid(unsafe_code)]

pub mod bench;
pub mod certs;
pub mod demo;
pub mod mt_admin;
pub mod operator;
