//! The configuration server manages its fleet (DESIGN.md §8 "State"): what
//! `rebound components` shows of every agent, PS and MT (version against
//! the CS's, certificate expiry, health), forgetting a decommissioned one,
//! a machine's policy pushed to its running agent and MT, and the RPO alert
//! raised from the status agents report.

pub mod components;
pub mod policy;
pub mod revoke;
pub mod rpo;

#[cfg(test)]
mod tests;
