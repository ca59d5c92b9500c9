//! ENOSPC at the process server's cache: an event, backpressure, nothing
//! acknowledged lost, and replication resumes by itself when space returns.
