//! The operator's side of a [`Sites`] lab: the `rebound` CLI run against
//! its configuration server, and waits on what the CLI lists (machine
//! states, components online, jobs).

use crate::cli::{self, CliRun};
use crate::sites::Sites;
use crate::wait::wait_for;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

impl Sites {
    /// Runs `rebound ARGS` against the lab's CS with the admin certificate.
    pub fn cli(&self, args: &[&str]) -> Result<CliRun> {
        self.cli_with_certs(args, &self.cs_dir)
    }

    /// The same with another certificate dir (holding ca.pem, admin.pem,
    /// admin.key).
    pub fn cli_with_certs(&self, args: &[&str], certs: &Path) -> Result<CliRun> {
        cli::run(&self.bins, &self.cs_dial, certs, args)
    }

    /// A CLI command that must succeed; its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let r = self.cli(args)?;
        if !r.ok {
            bail!(
                "rebound {} failed:\n{}\n--- cs log ---\n{}",
                args.join(" "),
                r.text(),
                self.log_tail("cs", 30)
            );
        }
        Ok(r.stdout)
    }

    /// A listing with `--output json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let out = self.cli_ok(&a)?;
        serde_json::from_str(&out).with_context(|| format!("rebound {a:?} printed {out:?}"))
    }

    /// One machine from `rebound machines --output json`.
    pub fn machine(&self, id: &str) -> Result<Value> {
        let v = self.cli_json(&["machines"])?;
        v["machines"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["id"] == id).cloned())
            .ok_or_else(|| anyhow!("machine {id} not in `rebound machines`: {v}"))
    }

    /// Polls `probe` every 200 ms until it gives a value; the error names
    /// the last thing seen.
    fn poll<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut(&mut Value) -> Result<Option<T>>,
    ) -> Result<T> {
        let mut last = Value::Null;
        let mut found = None;
        let res = wait_for(what, timeout, Duration::from_millis(200), || {
            found = probe(&mut last)?;
            Ok(found.is_some())
        });
        res.map_err(|e| anyhow!("{e}; last seen: {last}"))?;
        found.ok_or_else(|| anyhow!("{what}: nothing found"))
    }

    /// Waits until the machine's replication state is `state`.
    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Result<Value> {
        self.poll(&format!("{id} to be {state}"), timeout, |last| {
            if let Ok(m) = self.machine(id) {
                if m["state"] == state {
                    return Ok(Some(m));
                }
                *last = m;
            }
            Ok(None)
        })
    }

    /// Waits until a component is online at the CS (`rebound status`).
    pub fn wait_online(&self, role: &str, id: &str, timeout: Duration) -> Result<()> {
        self.poll(
            &format!("{role}:{id} to be online at the CS"),
            timeout,
            |last| {
                if let Ok(v) = self.cli_json(&["status"]) {
                    let found = v["components"].as_array().and_then(|cs| {
                        cs.iter()
                            .find(|c| c["role"] == role && c["id"] == id)
                            .cloned()
                    });
                    if found.as_ref().is_some_and(|c| c["health"] == "online") {
                        return Ok(Some(()));
                    }
                    *last = found.unwrap_or(v);
                }
                Ok(None)
            },
        )
    }

    /// Runs a lifecycle command with `--wait --output json`; the final job.
    pub fn job(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.push("--wait");
        self.cli_json(&a)
    }

    /// The machine's recovery points (`rebound points M --output json`).
    pub fn points(&self, machine: &str) -> Result<Value> {
        self.cli_json(&["points", machine])
    }

    /// A job as `rebound jobs ID --output json` shows it.
    pub fn get_job(&self, id: &str) -> Result<Value> {
        self.cli_json(&["jobs", id])
    }

    /// Waits until the job's status line contains `text`.
    pub fn wait_job_status(&self, id: &str, text: &str, timeout: Duration) -> Result<Value> {
        self.poll(
            &format!("job {id} status to read {text:?}"),
            timeout,
            |last| {
                let j = self.get_job(id)?;
                if j["status"].as_str().is_some_and(|s| s.contains(text)) {
                    return Ok(Some(j));
                }
                if j["state"] == "failed" || j["state"] == "succeeded" {
                    bail!("job {id} ended before its status read {text:?}: {j}");
                }
                *last = j;
                Ok(None)
            },
        )
    }
}
