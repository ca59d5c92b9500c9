//! Section 7, scale (`--only scale`): one PS and one MT carrying hundreds of
//! disks fed by a load generator that speaks the agent's ingest protocol for
//! many machines from one process ([`ingest`], [`loadgen`]), and the
//! configuration server with a thousand agents on its control channel
//! ([`control`]). A failing part marks only its own rows. `--quick` runs
//! both parts small (8 machines x 2 disks for 5 s; 30 agents) with the full
//! run's timeouts, as the smoke test runs it beside the rest of the suite.

pub mod control;
pub mod ingest;
pub mod ingest_watch;
pub mod loadgen;

use crate::Bench;

/// Runs both parts of the section; each records its own outcome.
pub fn run(b: &mut Bench) {
    let r = ingest::run(b);
    b.outcome(&["scale.ingest."], r);
    b.progress("scale: control channel");
    let r = control::run(b);
    b.outcome(&["scale.control."], r);
}
