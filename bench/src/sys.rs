//! The few system calls the bench makes that the standard library has no
//! safe form of: CPU affinity for the cost section's placement, SIGTERM to
//! a child so it can flush and exit, the clock tick rate of /proc's CPU
//! times, and dropping a file from the page cache before a read rate is
//! measured. Every `unsafe` block of the crate is here.
#![allow(unsafe_code)]

use anyhow::{bail, Result};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// A set of CPUs, as `sched_setaffinity` takes it.
#[derive(Clone)]
pub struct Cpus(libc::cpu_set_t);

impl Cpus {
    /// The CPUs this process may run on.
    pub fn allowed() -> Result<Cpus> {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; the call fills it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: pid 0 is the calling thread; the size is the set's own.
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
        if rc != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        Ok(Cpus(set))
    }

    /// The CPU numbers in the set, ascending.
    pub fn list(&self) -> Vec<usize> {
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: CPU_ISSET reads a bit of a valid set, index in range.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &self.0) })
            .collect()
    }

    /// The set of exactly these CPUs.
    pub fn of(cpus: &[usize]) -> Cpus {
        // SAFETY: a zeroed cpu_set_t is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in cpus {
            // SAFETY: CPU_SET writes one bit of a valid set (its index is
            // bounds-checked: a CPU past CPU_SETSIZE panics, never writes).
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        Cpus(set)
    }

    /// Binds every thread of `pid` (threads it starts later inherit it).
    pub fn pin_process(&self, pid: u32) -> Result<()> {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))?;
        for t in tasks {
            let tid: i32 = match t?.file_name().to_string_lossy().parse() {
                Ok(t) => t,
                Err(_) => continue,
            };
            // SAFETY: sets the affinity of one of our children's threads.
            let rc =
                unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&self.0), &self.0) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                // A thread that ended meanwhile is fine.
                if e.raw_os_error() != Some(libc::ESRCH) {
                    bail!("sched_setaffinity of thread {tid} of pid {pid}: {e}");
                }
            }
        }
        Ok(())
    }

    /// Makes `cmd` start bound to this set.
    pub fn pin_command(&self, cmd: &mut Command) {
        let set = self.0;
        // SAFETY: only sched_setaffinity (async-signal-safe) runs between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    pub fn describe(&self) -> String {
        let l: Vec<String> = self.list().iter().map(|c| c.to_string()).collect();
        format!("CPU {}", l.join(","))
    }
}

/// Asks a child process to stop (SIGTERM), so it can flush and exit on
/// its own; the caller waits for it.
pub fn terminate(pid: u32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) reads no memory of ours; the pid is one of our children.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// Clock ticks per second of the CPU times in /proc/PID/stat and /proc/stat.
pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    hz.max(1.0)
}

/// Drops a file's pages from the page cache (after it was made durable), so
/// the next read comes from the device.
pub fn drop_from_page_cache(f: &std::fs::File) -> std::io::Result<()> {
    // SAFETY: posix_fadvise on an open fd we own; it reads no memory of ours.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}
