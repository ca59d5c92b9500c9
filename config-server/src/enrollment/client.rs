//! The component side of enrollment now lives in
//! [`rebound_common::enrollment`], so agents, process servers and master
//! targets enroll without linking the configuration server. Re-exported here
//! for callers of `rebound_cs::enroll`.

pub use rebound_common::enrollment::{enroll, enroll_with, EnrollError, EnrollOptions, Enrolled};
