//! The DR rehearsal and upkeep subcommands: `rebound test-failover` and
//! `test-failover-cleanup` (a writable copy of a point while replication
//! goes on), `rebound verify` (source against replica, chunk by chunk, with
//! repair) and `rebound move` (another process server at the same site).

use super::{chosen_point, connect, json, print, watch, Output, TargetArgs, WaitArgs, POINT_HELP};
use anyhow::{anyhow, Result};
use clap::Subcommand;
use rebound_proto::control as pb;

#[derive(Subcommand, Debug)]
pub enum DrCmd {
    /// Rehearse a failover without stopping replication: the master target
    /// serves a writable copy-on-write copy of the point over NBD (export
    /// `<machine>/<disk>@test`) and runs its `test_power_on` hook. The point
    /// stays pinned (retention keeps it) until `rebound test-failover-cleanup`.
    #[command(after_help = POINT_HELP)]
    TestFailover {
        #[command(flatten)]
        targets: TargetArgs,
        /// The recovery point to test (same choices as failover).
        #[arg(long)]
        point: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// End a test failover: runs the `test_power_off` hook, stops serving
    /// the test exports, deletes what was written to the test copy and
    /// unpins the point.
    TestFailoverCleanup {
        #[command(flatten)]
        targets: TargetArgs,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Compare a protected machine's source with its replica, chunk by
    /// chunk, while it keeps running: the agent cuts a crash-consistent tag
    /// and hashes the source as it was at that tag, the master target
    /// hashes its view of the same point. With --wait it prints the point,
    /// the chunks compared and each differing chunk (disk/offset);
    /// `--output json` prints the result. `rebound machines` shows the last
    /// verify.
    Verify {
        machine: String,
        /// The id of the tag verify cuts (default: verify-<time>). A verify
        /// cannot check an older point: the agent keeps no history, so it
        /// always compares the source as it is now, at a new tag.
        #[arg(long)]
        point: Option<String>,
        /// Send the current content of every differing chunk through the
        /// change stream, so the next recovery point is exact.
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Move a protected machine's replication to another process server at
    /// the same site (scale-out, PS maintenance) without losing a point and
    /// without a full resync; the old PS drops its cache once the new one
    /// carries everything.
    Move {
        machine: String,
        /// The process server to carry the replication from now on.
        #[arg(long)]
        ps: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

pub async fn run(cmd: DrCmd) -> Result<()> {
    match cmd {
        DrCmd::TestFailover {
            targets,
            point,
            wait,
        } => {
            let choice = chosen_point(&point)?;
            let mut c = connect(&wait.cs).await?;
            let r = c
                .test_failover(pb::TestFailoverRequest {
                    targets: Some(targets.to_proto()),
                    point: Some(choice),
                })
                .await;
            watch::started(&mut c, &wait, r, "starting a test failover").await
        }
        DrCmd::TestFailoverCleanup { targets, wait } => {
            let mut c = connect(&wait.cs).await?;
            let r = c
                .test_failover_cleanup(pb::TestFailoverCleanupRequest {
                    targets: Some(targets.to_proto()),
                })
                .await;
            watch::started(&mut c, &wait, r, "cleaning up a test failover").await
        }
        DrCmd::Verify {
            machine,
            point,
            repair,
            wait,
        } => verify(machine, point, repair, wait).await,
        DrCmd::Move { machine, ps, wait } => {
            let mut c = connect(&wait.cs).await?;
            let r = c
                .r#move(pb::MoveRequest {
                    machine: machine.clone(),
                    ps: ps.clone(),
                })
                .await;
            watch::started(&mut c, &wait, r, &format!("moving {machine} to {ps}")).await
        }
    }
}

/// Starts a verify; with `--wait`, follows it and prints the machine's last
/// verify.
async fn verify(
    machine: String,
    point: Option<String>,
    repair: bool,
    wait: WaitArgs,
) -> Result<()> {
    let mut c = connect(&wait.cs).await?;
    let r = c
        .verify(pb::VerifyRequest {
            machine: machine.clone(),
            point: point.unwrap_or_default(),
            repair,
        })
        .await;
    let job = watch::job_of(&wait, r, &format!("verifying {machine}"))?;
    if !wait.wait {
        watch::print_started(&job, wait.output);
        return Ok(());
    }
    let last = watch::track(&mut c, &wait.cs, &job.id, wait.output).await?;
    watch::failed(&last)?;
    let r = wait.cs.answer(
        c.machines(pb::MachinesRequest {}).await,
        "reading the machine's last verify",
    )?;
    let m = r
        .machines
        .iter()
        .find(|m| m.id == machine)
        .ok_or_else(|| anyhow!("machine {machine} is gone from `rebound machines`"))?;
    let v = m.last_verify.clone().unwrap_or_default();
    match wait.output {
        Output::Json => json::print(&json::verify_result(&v)),
        Output::Table => {
            watch::succeeded_line(&last);
            print::verify_result(&machine, &v);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::tests::T;
    use crate::operator::OperatorCmd;
    use clap::Parser;

    fn dr(args: &[&str]) -> DrCmd {
        let mut a = vec!["t"];
        a.extend_from_slice(args);
        match T::try_parse_from(a).unwrap().cmd {
            OperatorCmd::Dr(d) => d,
            other => panic!("{args:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn test_failover_takes_machines_or_a_plan_and_a_point() {
        let DrCmd::TestFailover {
            targets,
            point,
            wait,
        } = dr(&[
            "test-failover",
            "m1",
            "m2",
            "--point",
            "latest-app",
            "--wait",
        ])
        else {
            panic!("not test-failover");
        };
        assert_eq!(targets.machines, ["m1", "m2"]);
        assert_eq!(point, "latest-app");
        assert!(wait.wait);
        let DrCmd::TestFailover { targets, .. } =
            dr(&["test-failover", "--plan", "erp", "--point", "latest"])
        else {
            panic!("not test-failover");
        };
        assert_eq!(targets.plan.as_deref(), Some("erp"));
        assert!(
            T::try_parse_from(["t", "test-failover", "m1"]).is_err(),
            "--point is required"
        );
        assert!(T::try_parse_from(["t", "test-failover", "--point", "latest"]).is_err());
        assert!(
            T::try_parse_from(["t", "test-failover", "m1", "--plan", "p", "--point", "x"]).is_err()
        );
        assert!(matches!(
            dr(&["test-failover-cleanup", "--plan", "erp", "--wait"]),
            DrCmd::TestFailoverCleanup { ref targets, ref wait } if targets.plan.as_deref() == Some("erp") && wait.wait
        ));
        assert!(T::try_parse_from(["t", "test-failover-cleanup"]).is_err());
    }

    #[test]
    fn verify_and_move_parse() {
        assert!(matches!(
            dr(&["verify", "m1"]),
            DrCmd::Verify { ref machine, point: None, repair: false, ref wait } if machine == "m1" && !wait.wait
        ));
        assert!(matches!(
            dr(&["verify", "m1", "--point", "v1", "--repair", "--wait", "--output", "json"]),
            DrCmd::Verify { point: Some(ref p), repair: true, ref wait, .. }
                if p == "v1" && wait.wait && wait.output == Output::Json
        ));
        assert!(matches!(
            dr(&["verify", "m1", "--wait", "-o", "json"]),
            DrCmd::Verify { ref wait, .. } if wait.output == Output::Json
        ));
        assert!(T::try_parse_from(["t", "verify"]).is_err());
        assert!(matches!(
            dr(&["move", "m1", "--ps", "ps2", "--wait"]),
            DrCmd::Move { ref machine, ref ps, ref wait } if machine == "m1" && ps == "ps2" && wait.wait
        ));
        assert!(
            T::try_parse_from(["t", "move", "m1"]).is_err(),
            "--ps is required"
        );
    }
}
