//! The machines' power in a [`Sites`] lab: the MT hooks that boot and
//! stop a machine at a site (`power_on.sh` starts a `rebound-agent` over the
//! handed-over replica files, with each disk's hand-over journal;
//! `power_off.sh` stops it), the test-failover hooks (`test_power_on.sh`,
//! `test_power_off.sh`, which only record the environment the MT gave them
//! in `agents/<m>@<site>/test_power_on.env` / `test_power_off.env`), and
//! for callers that measure power (the demo's RTO): when the power_on hook
//! booted a machine at a site, waiting for that boot to finish, and an
//! orderly power-off of the whole lab (agents first, then PSs and MTs, the
//! CS last) whose errors are reported instead of the SIGKILLs of the lab's
//! drop.

use crate::process::START_TIMEOUT;
use crate::sites::{mt_id, Sites, STATE_DIR_MARK};
use crate::wait::wait_until;
use anyhow::{anyhow, Context, Result};
use rebound_mt::config::HooksConfig;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// The MT hooks of the lab, by `[hooks]` field and script name.
const HOOKS: [&str; 4] = ["power_on", "power_off", "test_power_on", "test_power_off"];

/// The power_on hook: completes the agent template of the machine at the
/// MT's site with a fresh state dir and the handed-over replica files (and
/// each disk's hand-over journal, when the MT names one) and starts the
/// agent detached. `$1` is the site; the MT gives REBOUND_MACHINE,
/// REBOUND_REPLICATION, REBOUND_POINT, REBOUND_DISKS and
/// REBOUND_JOURNAL_<DISK>.
const POWER_ON: &str = r#"#!/bin/sh
# power_on hook of the lab: boot $REBOUND_MACHINE at site $1 from the replica.
set -e
site="$1"
m="$REBOUND_MACHINE"
base=@BASE@
d="$base/agents/$m@$site"
date +%s%3N > "$d/powered_on_ms.tmp"
# A fresh state dir per hand-over (the machine booted from this replica).
state="$d/state-$REBOUND_REPLICATION"
mkdir -p "$state"
echo "$REBOUND_POINT" > "$d/powered_on"
sed "s|@MARK@|$state|" "$d/agent.in.toml" > "$d/agent.toml"
printf '%s' "$state" > "$d/state_dir"
for f in $REBOUND_DISKS; do
  n=$(basename "$f" .img)
  printf '\n[[disks]]\nname = "%s"\npath = "%s"\n' "$n" "$f" >> "$d/agent.toml"
  v="REBOUND_JOURNAL_$(printf '%s' "$n" | tr 'a-z' 'A-Z' | tr -c 'A-Z0-9' '_')"
  eval "j=\${$v:-}"
  if [ -n "$j" ]; then
    printf 'handover_journal = "%s"\n' "$j" >> "$d/agent.toml"
  fi
done
RUST_LOG=info setsid @AGENT@ run --config "$d/agent.toml" >> "$d/agent.log" 2>&1 < /dev/null &
echo $! > "$base/agents/$m@$site.pid"
mv "$d/powered_on_ms.tmp" "$d/powered_on_ms"
"#;

/// The power_off hook: SIGTERMs the agent power_on started at site `$1`,
/// waits until it is gone (a zombie counts as gone), SIGKILLs it after
/// 10 s, removes its pid file and records when it ran.
const POWER_OFF: &str = r#"#!/bin/sh
# power_off hook of the lab: stop $REBOUND_MACHINE at site $1.
site="$1"
m="$REBOUND_MACHINE"
base=@BASE@
d="$base/agents/$m@$site"
pidf="$base/agents/$m@$site.pid"
alive() { [ -r "/proc/$1/stat" ] && ! grep -q ') Z ' "/proc/$1/stat" 2>/dev/null; }
if [ -f "$pidf" ]; then
  pid=$(cat "$pidf")
  if [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; then
    i=0
    while alive "$pid"; do
      i=$((i + 1))
      if [ "$i" -ge 100 ]; then
        echo "agent $pid of $m at $site did not stop in 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.1
        break
      fi
      sleep 0.1
    done
  fi
  rm -f "$pidf"
fi
mkdir -p "$d"
date +%s%3N > "$d/powered_off_ms"
"#;

/// A test-failover hook: records its whole environment in
/// `agents/<m>@<site>/<hook>.env` (`$1` is the site).
const RECORD_ENV: &str = r#"#!/bin/sh
# @HOOK@ hook of the lab: record the environment the MT gave.
site="$1"
d=@BASE@"/agents/$REBOUND_MACHINE@$site"
mkdir -p "$d"
env | sort > "$d/@HOOK@.env.tmp"
mv "$d/@HOOK@.env.tmp" "$d/@HOOK@.env"
"#;

impl Sites {
    /// Writes the lab's MT hook scripts into the lab dir.
    pub(crate) fn write_hook_scripts(&self) -> Result<()> {
        let base = format!("{:?}", self.dir);
        let agent = format!("{:?}", self.bins.path("rebound-agent")?);
        for hook in HOOKS {
            let text = match hook {
                "power_on" => POWER_ON.replace("@AGENT@", &agent),
                "power_off" => POWER_OFF.to_string(),
                _ => RECORD_ENV.replace("@HOOK@", hook),
            };
            let text = text
                .replace("@BASE@", &base)
                .replace("@MARK@", STATE_DIR_MARK);
            let path = self.path(&format!("{hook}.sh"));
            std::fs::write(&path, text)
                .with_context(|| format!("writing the {hook} hook {}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    }

    /// The `[hooks]` of the MT at `site`: every lab hook with the site as
    /// `$1`, or none when `on` is false.
    pub(crate) fn mt_hooks(&self, site: &str, on: bool) -> HooksConfig {
        let cmd = |hook: &str| match on {
            true => format!("{} {site}", self.path(&format!("{hook}.sh")).display()),
            false => String::new(),
        };
        HooksConfig {
            power_on: cmd("power_on"),
            power_off: cmd("power_off"),
            test_power_on: cmd("test_power_on"),
            test_power_off: cmd("test_power_off"),
            hook_timeout_secs: 30,
        }
    }

    /// The environment a test-failover hook (`"test_power_on"` or
    /// `"test_power_off"`) of the MT at `site` ran with for `machine`, if it
    /// ran.
    pub fn test_hook_env(
        &self,
        machine: &str,
        site: &str,
        hook: &str,
    ) -> Result<Option<BTreeMap<String, String>>> {
        let f = self.agent_dir(machine, site).join(format!("{hook}.env"));
        let text = match std::fs::read_to_string(&f) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", f.display())),
        };
        Ok(Some(
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    }

    /// Waits until the test-failover hook `hook` ran at `site` for
    /// `machine`; its environment.
    pub fn wait_test_hook_env(
        &self,
        machine: &str,
        site: &str,
        hook: &str,
        timeout: Duration,
    ) -> Result<BTreeMap<String, String>> {
        let mut env = None;
        wait_until(
            &format!("the {hook} hook of {machine} at {site}"),
            timeout,
            || {
                env = self.test_hook_env(machine, site, hook).ok().flatten();
                env.is_some()
            },
        )?;
        env.ok_or_else(|| anyhow!("the {hook} hook of {machine} at {site} left no environment"))
    }

    /// Forgets what a test-failover hook recorded for `machine` at `site`,
    /// so the next run is seen.
    pub fn forget_test_hook_env(&self, machine: &str, site: &str, hook: &str) {
        let _ = std::fs::remove_file(self.agent_dir(machine, site).join(format!("{hook}.env")));
    }

    /// When the power_off hook last ran for `machine` at `site` (ms since
    /// the epoch), if it did.
    pub fn powered_off_ms(&self, machine: &str, site: &str) -> Option<u64> {
        let f = self.agent_dir(machine, site).join("powered_off_ms");
        std::fs::read_to_string(f).ok()?.trim().parse().ok()
    }

    /// Whether the agent the power_on hook started at `site` is still
    /// running (its pid file names a live process).
    pub fn hook_agent_running(&self, machine: &str, site: &str) -> bool {
        std::fs::read_to_string(self.hook_pid_file(machine, site))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(crate::process::alive)
    }

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
