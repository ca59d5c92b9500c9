//! Failures an operator can see: a broken link (agent to PS, PS to MT)
//! reaches the configuration server as an event naming the cause and the
//! fix, and the job waiting on that link shows it.
