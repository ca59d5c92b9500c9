//! Labs of real Rebound processes, for the integration tests, the bench and
//! the demo.
//!
//! A lab starts the built binaries (`rebound-cs`, `rebound-ps`, `rebound-mt`,
//! `rebound-agent`) as child processes, each simulated host on its own
//! loopback address (127.0.0.x), with configs serialized from the crates'
//! own `Config` types, a PKI (a dev bundle for [`Lab`], enrollment at the
//! configuration server with each host's address as its name for
//! [`Sites`]), a log per process in the lab dir, and teardown on drop.
//! Content is checked with real NBD clients ([`clients`]); a lab's links can
//! run through fault proxies ([`proxy`]).
//!
//! - [`Lab`]: one machine's agent, a PS and an MT, no configuration server.
//! - [`Sites`]: a configuration server, per site PSs and an MT, and agents
//!   for many machines, moved between sites by the DR lifecycle.
//!
//! Anyhow errors: this is test and bench tooling, every error ends in a
//! report to a person.

#![forbid(unsafe_code)]

pub mod admin;
pub mod bin;
pub mod cli;
pub mod clients;
pub mod config;
pub mod cs_admin;
pub mod faults;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod operator;
pub mod pki;
pub mod power;
pub mod process;
pub mod proxy;
pub mod rng;
pub mod sites;
pub mod standalone;
pub mod wait;
pub mod webhook;

pub use admin::AgentAdmin;
pub use bin::{binary, Bins};
pub use cli::CliRun;
pub use clients::{
    blake3_export, blake3_file, nbd_uri, nbdcopy_to_file, qemu_io, run_command, run_tool, write_at,
};
pub use cs_admin::CsAdmin;
pub use net::{free_port, Host};
pub use process::Proc;
pub use proxy::{Fault, FaultProxy, FaultSchedule, ProxyStats};
pub use rebound_agent::config::Config as AgentConfig;
pub use rebound_mt::config::RetentionConfig;
pub use rng::{random_writes, Rng};
pub use sites::{mt_id, ps_id, Sites, SitesOptions};
pub use standalone::{Component, Lab, LabOptions};
pub use wait::{wait_for, wait_until};
