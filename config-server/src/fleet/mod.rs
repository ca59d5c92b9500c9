//! The configuration server manages its fleet (DESIGN.md §8 "State"): what
//! `rebound components` shows of every agent, PS and MT (version against
//! the CS's, certificate expiry, health), what `rebound machines` shows of
//! every machine, forgetting a decommissioned component, and a machine's
//! policy pushed to its running agent and MT. (The RPO alert is one of the
//! alerts of `crate::alerts`.)

pub mod components;
pub mod machines;
pub mod policy;
pub mod revoke;

#[cfg(test)]
mod tests;
