//! The configuration server manages its fleet: `rebound components`,
//! `rebound policy set` reaching a running agent and MT, the retention set
//! at reprotect, `rebound unprotect` and `rebound remove`.
