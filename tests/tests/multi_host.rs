//! Every component on a host of its own (its own loopback address), each
//! enrolled with its own names, driven only through the `rebound` CLI and
//! the commands docs/DEPLOY.md gives, through the whole DR lifecycle.
