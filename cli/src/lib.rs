//! The operator CLI
