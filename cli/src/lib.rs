//! The operator CLI `rebound`.
//!
//! Until the configuration server exists (issue 3), the CLI talks to a master
//! target directly with the admin certificate: list recovery points, roll a
//! replica back and restore its pre-images. It also writes a lab PKI and runs
//! the demo.
pub mod certs;
pub mod demo;
pub mod mt_admin;
