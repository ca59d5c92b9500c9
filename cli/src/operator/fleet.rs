//! The fleet subcommands: `rebound components` (every agent, PS and MT
//! with version, certificate expiry and health), `rebound alerts` (what the
//! CS has raised and not yet cleared), `rebound policy set`, `rebound
//! unprotect` and `rebound remove`; and the policy flags that `protect`,
//! `reprotect` and `policy set` share.

use super::parse::{parse_duration, parse_size, BadDuration};
use super::{connect, json, print, watch, CsArgs, ShowArgs, WaitArgs};
use anyhow::{bail, Result};
use clap::Subcommand;
use rebound_proto::control as pb;
use std::time::Duration;

/// The retention at the MT and the RPO alert of a machine's policy.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PolicyArgs {
    /// Keep recovery points this long at the master target, e.g. 24h, 20s
    /// (default: the MT's [retention] window).
    #[arg(long, value_parser = parse_duration)]
    pub retention_window: Option<Duration>,
    /// Cap on the replication's retention journal at the master target,
    /// e.g. 10G, 512M (default: the MT's [retention] cap).
    #[arg(long, value_parser = parse_size)]
    pub retention_size: Option<u64>,
    /// Raise an `rpo-exceeded` alert when the machine's RPO passes this,
    /// e.g. 30s; it clears at 80 % of it. `default` (or 0): the CS's
    /// ([alerts] rpo_threshold in its config, 60 s); `off`: never alert on
    /// this machine's RPO.
    #[arg(long, value_name = "DURATION|default|off", value_parser = parse_rpo_alert)]
    pub rpo_alert: Option<RpoAlert>,
}

/// `--rpo-alert`: when a machine's RPO raises an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpoAlert {
    After(Duration),
    /// The CS's `[alerts] rpo_threshold`.
    Default,
    Off,
}

/// The `rpo_alert_ms` that turns a machine's RPO alert off (the largest
/// value, as the CS reads it).
pub const RPO_ALERT_OFF_MS: u64 = u64::MAX;

/// The name of the RPO alert in `SetPolicyRequest.reset`.
const RESET_RPO_ALERT: &str = "rpo_alert";

fn parse_rpo_alert(s: &str) -> Result<RpoAlert, BadDuration> {
    match s.trim() {
        "default" => Ok(RpoAlert::Default),
        "off" => Ok(RpoAlert::Off),
        _ => parse_duration(s).map(|d| {
            if d.is_zero() {
                RpoAlert::Default
            } else {
                RpoAlert::After(d)
            }
        }),
    }
}

fn ms_u32(d: Duration) -> u32 {
    d.as_millis().clamp(1, u32::MAX as u128) as u32
}

/// The policy the flags give (`None` when none is set); unset fields are 0,
/// which the CS reads as "keep" (policy set) or "default" (protect); so is
/// `--rpo-alert default` (`policy set` also names it in
/// [`PolicySet::reset`]).
pub fn policy(
    crash: Option<Duration>,
    app: Option<Duration>,
    more: &PolicyArgs,
) -> Option<pb::Policy> {
    let p = pb::Policy {
        crash_interval_ms: crash.map(ms_u32).unwrap_or(0),
        app_interval_secs: app
            .map(|d| d.as_secs().clamp(1, u32::MAX as u64) as u32)
            .unwrap_or(0),
        freeze_timeout_ms: 0,
        retention_window_secs: more
            .retention_window
            .map(|d| d.as_secs().max(1))
            .unwrap_or(0),
        retention_max_bytes: more.retention_size.unwrap_or(0),
        rpo_alert_ms: match more.rpo_alert {
            // Below the sentinel: a duration never turns the alert off.
            Some(RpoAlert::After(d)) => {
                d.as_millis().clamp(1, u128::from(RPO_ALERT_OFF_MS - 1)) as u64
            }
            Some(RpoAlert::Off) => RPO_ALERT_OFF_MS,
            Some(RpoAlert::Default) | None => 0,
        },
        verify_interval_secs: 0,
    };
    (p != pb::Policy::default()).then_some(p)
}

#[derive(Subcommand, Debug)]
pub enum FleetCmd {
    /// Every agent, process server and master target: site, address,
    /// version (flagged when it differs from the CS's), certificate expiry,
    /// last heartbeat, online/offline.
    Components {
        #[command(flatten)]
        args: ShowArgs,
    },
    /// The alerts the CS has raised and not yet cleared (rpo-exceeded,
    /// component-offline, retention-shrunk, ps-cache-full, link-error), as
    /// its webhooks receive them; `--all` adds the last 100 cleared.
    Alerts {
        /// Also list the alerts cleared recently.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        args: ShowArgs,
    },
    /// A machine's policy: crash/app point intervals (the agent), retention
    /// (its master target), RPO alert (the CS). Reaches the running
    /// components without a restart.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// End a machine's protection: the agent stops streaming (the machine
    /// keeps its disks), the process server drops its cache, the master
    /// target ends the replication and keeps the replica (or deletes it with
    /// --delete-replica). The machine is then Unprotected.
    Unprotect {
        machine: String,
        /// Delete the replica disks at the master target too.
        #[arg(long)]
        delete_replica: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Forget a decommissioned component: `rebound remove ps:ps-onprem` or
    /// `rebound remove ps ps-onprem`. Refused while it is online or a
    /// replication uses it.
    Remove {
        /// ROLE:ID, or ROLE followed by ID (role: agent, ps or mt).
        component: String,
        /// The id, when the role is given alone.
        id: Option<String>,
        #[command(flatten)]
        cs: CsArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Change a machine's policy; fields not given keep their value.
    Set(PolicySet),
}

/// `rebound policy set`'s arguments.
#[derive(clap::Args, Debug)]
pub struct PolicySet {
    pub machine: String,
    /// Crash-consistent point interval, e.g. 5s, 300ms.
    #[arg(long, value_parser = parse_duration)]
    pub crash_interval: Option<Duration>,
    /// App-consistent point interval, e.g. 1h.
    #[arg(long, value_parser = parse_duration)]
    pub app_interval: Option<Duration>,
    #[command(flatten)]
    pub more: PolicyArgs,
    /// Run `rebound verify` (no repair) on the machine this often, e.g.
    /// 24h (`rebound machines` shows the last result).
    #[arg(long, value_parser = parse_duration)]
    pub verify_interval: Option<Duration>,
    #[command(flatten)]
    pub args: ShowArgs,
}

impl PolicySet {
    /// The fields the flags put back to their default
    /// (`SetPolicyRequest.reset`).
    pub fn reset(&self) -> Vec<String> {
        match self.more.rpo_alert {
            Some(RpoAlert::Default) => vec![RESET_RPO_ALERT.to_string()],
            _ => Vec::new(),
        }
    }

    /// The changes the flags ask for (`None`: none).
    pub fn policy(&self) -> Option<pb::Policy> {
        let verify = self.verify_interval.map(|d| d.as_secs().max(1));
        match policy(self.crash_interval, self.app_interval, &self.more) {
            Some(p) => Some(pb::Policy {
                verify_interval_secs: verify.unwrap_or(0),
                ..p
            }),
            None => verify.map(|v| pb::Policy {
                verify_interval_secs: v,
                ..Default::default()
            }),
        }
    }
}

/// `ROLE:ID`, or `ROLE` and `ID` apart.
pub fn component_name(component: &str, id: Option<&str>) -> Result<(String, String)> {
    let (role, id) = match (component.split_once(':'), id) {
        (Some((r, i)), None) => (r, i),
        (None, Some(i)) => (component, i),
        _ => bail!(
            "name the component as ROLE:ID or ROLE ID, e.g. ps:ps-onprem \
             (`rebound components` lists them)"
        ),
    };
    if !matches!(role, "agent" | "ps" | "mt") || id.is_empty() {
        bail!(
            "{component:?}: the role is agent, ps or mt and the id is not empty, e.g. ps:ps-onprem"
        );
    }
    Ok((role.to_string(), id.to_string()))
}

pub async fn run(cmd: FleetCmd) -> Result<()> {
    match cmd {
        FleetCmd::Components { args } => {
            let mut c = connect(&args.cs).await?;
            let r = args.cs.answer(
                c.components(pb::ComponentsRequest {}).await,
                "listing the components",
            )?;
            args.show(&r, json::components, print::components)
        }
        FleetCmd::Alerts { all, args } => {
            let mut c = connect(&args.cs).await?;
            let r = args.cs.answer(
                c.alerts(pb::AlertsRequest { all }).await,
                "listing the alerts",
            )?;
            let to_json = |r: &pb::AlertsResponse| json::list("alerts", &r.alerts, json::alert);
            args.show(&r, to_json, |r| print::alerts(&r.alerts, all))
        }
        FleetCmd::Policy {
            cmd: PolicyCmd::Set(set),
        } => {
            let (machine, args) = (&set.machine, &set.args);
            let reset = set.reset();
            let Some(p) = set
                .policy()
                .or_else(|| (!reset.is_empty()).then(pb::Policy::default))
            else {
                bail!(
                    "nothing to set: give --crash-interval, --app-interval, --retention-window, \
                     --retention-size, --rpo-alert or --verify-interval"
                );
            };
            let mut c = connect(&args.cs).await?;
            let r = args.cs.answer(
                c.set_policy(pb::SetPolicyRequest {
                    machine: machine.clone(),
                    policy: Some(p),
                    reset,
                })
                .await,
                &format!("setting the policy of {machine}"),
            )?;
            args.show(&r, json::policy_set, |r| print::policy_set(machine, r))
        }
        FleetCmd::Unprotect {
            machine,
            delete_replica,
            wait,
        } => {
            let mut c = connect(&wait.cs).await?;
            let r = c
                .unprotect(pb::UnprotectRequest {
                    machine: machine.clone(),
                    delete_replica,
                })
                .await;
            watch::started(&mut c, &wait, r, &format!("unprotecting {machine}")).await
        }
        FleetCmd::Remove { component, id, cs } => {
            let (role, id) = component_name(&component, id.as_deref())?;
            let mut c = connect(&cs).await?;
            let req = pb::RemoveComponentRequest {
                role: role.clone(),
                id: id.clone(),
            };
            cs.answer(
                c.remove_component(req).await,
                &format!("removing {role}:{id}"),
            )?;
            println!("{role}:{id} forgotten");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::tests::T;
    use crate::operator::OperatorCmd;
    use clap::Parser;

    fn fleet(args: &[&str]) -> FleetCmd {
        let mut a = vec!["t"];
        a.extend_from_slice(args);
        match T::try_parse_from(a).unwrap().cmd {
            OperatorCmd::Fleet(f) => f,
            other => panic!("{args:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn policy_set_takes_durations_and_sizes() {
        let FleetCmd::Policy {
            cmd: PolicyCmd::Set(set),
        } = fleet(&[
            "policy",
            "set",
            "m1",
            "--crash-interval",
            "300ms",
            "--retention-window",
            "20s",
            "--retention-size",
            "10G",
            "--rpo-alert",
            "1m",
        ])
        else {
            panic!("not policy set");
        };
        assert_eq!(set.machine, "m1");
        let p = set.policy().unwrap();
        assert_eq!(p.crash_interval_ms, 300);
        assert_eq!(p.app_interval_secs, 0, "not given: keeps its value");
        assert_eq!(p.retention_window_secs, 20);
        assert_eq!(p.retention_max_bytes, 10 << 30);
        assert_eq!(p.rpo_alert_ms, 60_000);
        assert!(policy(None, None, &PolicyArgs::default()).is_none());
        let default_rpo = PolicyArgs {
            rpo_alert: Some(RpoAlert::Default),
            ..PolicyArgs::default()
        };
        assert!(
            policy(None, None, &default_rpo).is_none(),
            "--rpo-alert default (or 0) is the CS default, not 1 ms"
        );
        let FleetCmd::Policy {
            cmd: PolicyCmd::Set(set),
        } = fleet(&["policy", "set", "m1", "--verify-interval", "1h"])
        else {
            panic!("not policy set");
        };
        let p = set.policy().unwrap();
        assert_eq!(p.verify_interval_secs, 3600);
        assert_eq!(p.crash_interval_ms, 0, "not given: keeps its value");
        let bad = T::try_parse_from(["t", "policy", "set", "m1", "--retention-size", "lots"]);
        assert!(bad.is_err());
    }

    #[test]
    fn rpo_alert_takes_a_duration_default_or_off() {
        let set = |value: &str| {
            let FleetCmd::Policy {
                cmd: PolicyCmd::Set(set),
            } = fleet(&["policy", "set", "m1", "--rpo-alert", value])
            else {
                panic!("not policy set");
            };
            set
        };
        let s = set("30s");
        assert_eq!(s.policy().unwrap().rpo_alert_ms, 30_000);
        assert!(s.reset().is_empty());
        for default in ["default", "0"] {
            let s = set(default);
            assert_eq!(s.policy(), None, "{default}: nothing set ...");
            assert_eq!(s.reset(), vec!["rpo_alert"], "... and the alert reset");
        }
        let s = set("off");
        assert_eq!(s.policy().unwrap().rpo_alert_ms, RPO_ALERT_OFF_MS);
        assert!(s.reset().is_empty());
        let bad = T::try_parse_from(["t", "policy", "set", "m1", "--rpo-alert", "never"]);
        assert!(bad.is_err());
    }

    #[test]
    fn protect_and_reprotect_take_the_retention_flags() {
        let t = T::try_parse_from([
            "t",
            "protect",
            "m1",
            "--to",
            "b",
            "--ps",
            "p",
            "--mt",
            "m",
            "--retention-window",
            "1h",
        ])
        .unwrap();
        assert!(matches!(
            t.cmd,
            OperatorCmd::Protect { ref policy, .. } if policy.retention_window == Some(Duration::from_secs(3600))
        ));
        let t = T::try_parse_from([
            "t",
            "reprotect",
            "m1",
            "--ps",
            "p",
            "--retention-size",
            "512M",
            "--rpo-alert",
            "30s",
        ])
        .unwrap();
        assert!(matches!(
            t.cmd,
            OperatorCmd::Reprotect { ref policy, .. }
                if policy.retention_size == Some(512 << 20) && policy.rpo_alert == Some(RpoAlert::After(Duration::from_secs(30)))
        ));
    }

    #[test]
    fn unprotect_components_and_remove_parse() {
        assert!(matches!(
            fleet(&["unprotect", "m1", "--delete-replica", "--wait"]),
            FleetCmd::Unprotect { ref machine, delete_replica: true, ref wait } if machine == "m1" && wait.wait
        ));
        assert!(matches!(
            fleet(&["unprotect", "m1"]),
            FleetCmd::Unprotect {
                delete_replica: false,
                ..
            }
        ));
        assert!(matches!(
            fleet(&["components", "--output", "json"]),
            FleetCmd::Components { .. }
        ));
        let FleetCmd::Remove { component, id, .. } = fleet(&["remove", "ps", "ps-onprem"]) else {
            panic!("not remove");
        };
        assert_eq!(
            component_name(&component, id.as_deref()).unwrap(),
            ("ps".to_string(), "ps-onprem".to_string())
        );
        assert_eq!(
            component_name("mt:mt-azure", None).unwrap(),
            ("mt".to_string(), "mt-azure".to_string())
        );
        for (c, id) in [
            ("ps", None),
            ("cs:x", None),
            ("ps:", None),
            ("ps:a", Some("b")),
        ] {
            assert!(component_name(c, id).is_err(), "{c} {id:?}");
        }
    }
}
