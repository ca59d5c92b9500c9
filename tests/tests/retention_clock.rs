//! Retention decided by the master target's clock, not the agent's: an agent
//! clock a day behind or ahead changes no retention decision.
