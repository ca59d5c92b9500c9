//! The process server: durable frame cache and forwarding to the master target
