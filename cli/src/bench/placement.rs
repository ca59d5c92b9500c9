//! Where the processes of the cost-of-protection section run.
//!
//! Deployed, the agent and the workload share the protected machine, while
//! the PS and the MT run on their own servers (DESIGN.md §2). On one bench
//! machine they would otherwise compete for the same cores, and the cost
//! figures would charge the protected machine with the replication work of
//! the other sites. With two CPUs or more, the section splits them: the
//! protected machine (fio, and the agent or `qemu-nbd`) gets the first
//! allowed CPU, the PS and MT the others. Both sides of every ratio run on
//! the same one CPU, so the ratio stays fair.

use anyhow::{bail, Result};
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

    fn of(cpus: &[usize]) -> Cpus {
        // SAFETY: as in `allowed`; CPU_SET writes a bit in range.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in cpus {
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

/// The split of the section: `None` with a single allowed CPU.
pub struct Placement {
    pub protected: Cpus,
    pub recovery: Cpus,
    pub all: Cpus,
}

impl Placement {
    pub fn split() -> Result<Option<Placement>> {
        let all = Cpus::allowed()?;
        let list = all.list();
        if list.len() < 2 {
            return Ok(None);
        }
        Ok(Some(Placement {
            protected: Cpus::of(&list[..1]),
            recovery: Cpus::of(&list[1..]),
            all,
        }))
    }

    pub fn describe(&self) -> String {
        format!(
            "fio + agent / qemu-nbd on {}, PS + MT on {}",
            self.protected.describe(),
            self.recovery.describe()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_child_runs_only_on_its_cpu() {
        let all = Cpus::allowed().unwrap();
        let first = Cpus::of(&all.list()[..1]);
        let mut cmd = Command::new("grep");
        cmd.args(["Cpus_allowed_list", "/proc/self/status"]);
        first.pin_command(&mut cmd);
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let want = all.list()[0].to_string();
        assert_eq!(
            text.split_whitespace().last(),
            Some(want.as_str()),
            "{text}"
        );
    }
}
