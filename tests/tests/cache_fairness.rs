//! One stuck replication cannot fill the shared process-server cache and pause
//! every other agent on that PS.
