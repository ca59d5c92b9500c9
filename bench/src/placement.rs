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

use anyhow::Result;

pub use crate::sys::Cpus;

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
    use std::process::Command;

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
