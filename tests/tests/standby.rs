//! Two configuration servers on one PostgreSQL: kill -9 of the active one in
//! the middle of a failover job, the standby takes over and the job ends
//! exact.
