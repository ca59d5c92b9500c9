//! Section 7, scale (`--only scale`): one PS and one MT carrying hundreds of
//! disks fed by a load generator that speaks the agent's ingest protocol for
//! many machines from one process ([`ingest`]), and the configuration server
//! with a thousand agents on its control channel ([`control`]).

pub mod control;
