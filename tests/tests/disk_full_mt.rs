//! ENOSPC at the master target's journal or replica: an event, backpressure,
//! nothing acknowledged lost, and apply resumes by itself when space returns.
