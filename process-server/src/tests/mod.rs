//! In-process tests of the process server over real mutual TLS, by topic;
//! [`support`] holds the fake master target, agents and PKI they share.

mod authz;
mod backpressure;
mod cache_fairness;
mod control;
mod ingest_forward;
mod lost_tail;
mod metrics;
mod routes;
pub(crate) mod support;
