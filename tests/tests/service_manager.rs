//! The daemons under a service manager: readiness (`READY=1`) only once a
//! daemon answers on its port, `STOPPING=1` and a clean stop on SIGTERM,
//! over a `NOTIFY_SOCKET` the test listens on.
