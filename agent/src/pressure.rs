//! An agent that serves the host's own disks must keep serving while the
//! host is short of memory: reclaim writes dirty pages back through the
//! agent's NBD export, so an agent whose own pages were swapped out, or whose
//! allocations wait on that same reclaim, deadlocks the host. As the kernel
//! NBD and ublk servers do, the agent locks its memory and marks itself an
//! I/O flusher. Both need privileges; without them the agent still runs and
//! says which unit setting grants them.

use tracing::{info, warn};

use crate::sys;

/// Locks memory and sets the I/O-flusher mark, warning (and going on) for
/// each that is not permitted.
pub fn serve_under_memory_pressure() {
    // With a finite limit, locking future mappings would make every
    // allocation past the limit fail: better not locked than aborted.
    let locked = if sys::may_lock_all_memory() {
        sys::lock_memory()
    } else {
        Err(std::io::Error::from_raw_os_error(libc::ENOMEM))
    };
    match locked {
        Ok(()) => info!("memory locked (mlockall): the agent's pages are never swapped out"),
        Err(e) => warn!(
            "cannot lock the agent's memory (mlockall): {e} ({}); under memory pressure \
             a host whose disks the agent serves may deadlock",
            match e.raw_os_error() {
                Some(libc::ENOMEM) =>
                    "not root and RLIMIT_MEMLOCK is not unlimited: set LimitMEMLOCK=infinity \
                     in the unit (the packaged rebound-agent.service does)",
                Some(libc::EPERM) =>
                    "not permitted: run the agent as root, or with \
                     AmbientCapabilities=CAP_IPC_LOCK and LimitMEMLOCK=infinity",
                _ => "see mlockall(2)",
            }
        ),
    }
    match sys::set_io_flusher() {
        Ok(()) => info!("marked as an I/O flusher (PR_SET_IO_FLUSHER)"),
        Err(e) => warn!(
            "cannot mark the agent an I/O flusher (PR_SET_IO_FLUSHER): {e} ({}); memory \
             reclaim may wait on writes only the agent can complete",
            match e.raw_os_error() {
                Some(libc::EPERM) =>
                    "needs CAP_SYS_RESOURCE: run the agent as root (the packaged \
                     rebound-agent.service does) or with AmbientCapabilities=CAP_SYS_RESOURCE",
                Some(libc::EINVAL) => "the kernel is older than Linux 5.6",
                _ => "see prctl(2)",
            }
        ),
    }
}
