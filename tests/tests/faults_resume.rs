//! A process server that lost its cache, and an agent that lost its dirty log
//! or restarted after the PS lost acknowledged records: the stream never skips
//! records and the next point is exact.
