//! The machines' power state in a [`Sites`] lab, for callers that measure
//! it (the demo's RTO): when the MT's power_on hook booted a machine at a
//! site, waiting for that boot to finish, and an orderly power-off of the
//! whole lab (agents first, then PSs and MTs, the CS last) whose errors are
//! reported instead of the SIGKILLs of the lab's drop.

use crate::process::START_TIMEOUT;
use crate::sites::{mt_id, Sites};
use crate::wait::wait_until;
use anyhow::{Context, Result};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

impl Sites {
    /// The file where the power_on hook records when it ran (ms since the
    /// epoch) at a site.
    fn powered_on_file(&self, machine: &str, site: &str) -> PathBuf {
        self.path(&format!("agents/{machine}@{site}/powered_on_ms"))
    }

    /// Forgets an earlier boot at `site`, before a hand-over to it, so
    /// [`Sites::wait_booted`] waits for the next one.
    pub fn forget_boot(&self, machine: &str, site: &str) {
        let _ = std::fs::remove_file(self.powered_on_file(machine, site));
    }

    /// Waits until the power_on hook ran at `site` and the agent it started
    /// serves NBD and its admin socket; when the hook ran (ms since the
    /// epoch).
    pub fn wait_booted(&mut self, machine: &str, site: &str, timeout: Duration) -> Result<u64> {
        let f = self.powered_on_file(machine, site);
        wait_until(&format!("power_on of {machine} at {site}"), timeout, || {
            f.exists()
        })?;
        let text = std::fs::read_to_string(&f)
            .with_context(|| format!("reading the power_on time {}", f.display()))?;
        let ms = text
            .trim()
            .parse::<u64>()
            .with_context(|| format!("{} holds {text:?}, not a time in ms", f.display()))?;
        self.wait_powered_on(machine, site, timeout)?;
        let sock = self.agent_state_dir(machine, site)?.join("admin.sock");
        wait_until(
            &format!("the admin socket of {machine}'s agent at {site}"),
            START_TIMEOUT,
            || UnixStream::connect(&sock).is_ok(),
        )?;
        Ok(ms)
    }

    /// SIGTERMs every machine's agent at every site, then each site's PSs
    /// and MT, the CS last, each waited for; the first error, after trying
    /// them all.
    pub fn shutdown(&mut self) -> Result<()> {
        let mut first = None;
        for m in self.opts.machines.clone() {
            for site in self.opts.sites.clone() {
                if let Err(e) = self.stop_agent(&m, &site) {
                    first.get_or_insert(e);
                }
            }
        }
        let mut servers: Vec<String> = Vec::new();
        for (site, a) in &self.sites {
            servers.extend(a.ps.iter().map(|(id, _)| id.clone()));
            servers.push(mt_id(site));
        }
        servers.push("cs".into());
        for name in servers {
            if let Err(e) = self.stop(&name) {
                first.get_or_insert(e.context(format!("stopping {name}")));
            }
        }
        first.map_or(Ok(()), Err)
    }
}
