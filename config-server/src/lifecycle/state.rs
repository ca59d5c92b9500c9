//! The replication state machine of DESIGN.md §8:
//!
//! ```text
//! Unprotected -protect-> InitialSync -first point-> Protected
//! Protected -failover-> FailingOver -> FailedOver
//! FailedOver -change point-> FailedOver
//! FailedOver -commit-> Committed
//! Committed -reprotect-> WaitingForAgent -agent registered-> InitialSync -> Protected
//! InitialSync | Protected -unprotect-> Unprotected
//! ```
//!
//! Every transition is checked here, in one table, so an illegal request
//! gets an error naming the machine, its state and what to do instead. A job
//! that failed half-way leaves the machine in the transitional state, and
//! re-running the same operation from there is allowed (a retry).

use crate::error::CsError;
use crate::store::ReplState;
use std::fmt;

/// What is being done to a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Protect,
    /// The MT reported the first recovery point.
    FirstPoint,
    Failover,
    /// Rollback and hand-over finished.
    FailoverDone,
    ChangePoint,
    Commit,
    Reprotect,
    /// The agent registered at the machine's new site.
    AgentRegistered,
    /// End the protection (`rebound unprotect`).
    Unprotect,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Protect => "protect",
            Op::FirstPoint => "finish the initial sync of",
            Op::Failover => "fail over",
            Op::FailoverDone => "finish the failover of",
            Op::ChangePoint => "change the recovery point of",
            Op::Commit => "commit",
            Op::Reprotect => "reprotect",
            Op::AgentRegistered => "start the reverse replication of",
            Op::Unprotect => "unprotect",
        })
    }
}

/// The state after `op` from `from`, or why `op` is not allowed.
pub fn next(machine: &str, from: ReplState, op: Op) -> Result<ReplState, CsError> {
    use Op::*;
    use ReplState::*;
    let to = match (from, op) {
        (Unprotected, Protect) | (InitialSync, Protect) => InitialSync,
        (InitialSync, FirstPoint) => Protected,
        (Protected, Failover) | (FailingOver, Failover) => FailingOver,
        (FailingOver, FailoverDone) => FailedOver,
        (FailedOver, ChangePoint) => FailedOver,
        (FailedOver, Commit) => Committed,
        (Committed, Reprotect) | (WaitingForAgent, Reprotect) => WaitingForAgent,
        (WaitingForAgent, AgentRegistered) => InitialSync,
        (InitialSync, Unprotect) | (Protected, Unprotect) => Unprotected,
        _ => {
            return Err(CsError::FailedPrecondition(format!(
                "cannot {op} {machine}: it is {from}; {}",
                hint(machine, from, op)
            )))
        }
    };
    Ok(to)
}

/// What to do instead, for a refused transition.
fn hint(m: &str, from: ReplState, op: Op) -> String {
    use ReplState::*;
    match (from, op) {
        (Unprotected, Op::Unprotect) => format!(
            "it is not protected, so there is nothing to end (`rebound machines` shows {m}'s state)"
        ),
        (FailingOver | FailedOver, Op::Unprotect) => format!(
            "a failover is in progress or not committed; finish it first (`rebound commit {m}`): \
             after a committed failover no replication runs"
        ),
        (Committed, Op::Unprotect) => format!(
            "its failover is committed, so no replication runs and it runs from its replica at \
             the other site; reprotect it (`rebound reprotect {m} --ps PS`) to protect it again"
        ),
        (WaitingForAgent, Op::Unprotect) => format!(
            "a reprotect waits for the agent on {m}; let it finish, then unprotect the new \
             replication"
        ),
        (Unprotected, _) => format!(
            "protect it first (`rebound protect {m} --to SITE --ps PS --mt MT`)"
        ),
        (InitialSync, _) => format!(
            "wait until its initial sync cuts a first recovery point and it is Protected \
             (`rebound machines` shows the state, `rebound jobs --machine {m}` the sync)"
        ),
        (Protected, Op::Protect) => format!("it is already protected (`rebound machines` shows {m}'s replication)"),
        (Protected, _) => format!(
            "it is still replicating; fail it over first (`rebound failover {m} --from SITE --to SITE --point latest`)"
        ),
        (FailingOver, _) => format!(
            "a failover is in progress or failed half-way; see `rebound jobs --machine {m}` and re-run \
             the failover to finish it"
        ),
        (FailedOver, Op::Failover) => format!(
            "it has already failed over; commit it (`rebound commit {m}`) or pick another point \
             (`rebound change-point {m} --point ...`)"
        ),
        (FailedOver, _) => format!(
            "it has failed over and is not committed yet; commit it first (`rebound commit {m}`)"
        ),
        (Committed, Op::Failover) | (Committed, Op::Protect) => format!(
            "its failover is committed; reprotect it in the reverse direction first \
             (`rebound reprotect {m} --ps PS`), then it can fail back"
        ),
        (Committed, _) => format!(
            "its failover is committed; the next step is `rebound reprotect {m} --ps PS`"
        ),
        (WaitingForAgent, _) => format!(
            "a reprotect waits for the agent on {m} to register; start the agent at the machine's \
             site, or re-run the reprotect"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplState::*;

    #[test]
    fn the_whole_loop_is_legal() {
        let m = "m1";
        let mut s = Unprotected;
        for op in [
            Op::Protect,
            Op::FirstPoint,
            Op::Failover,
            Op::FailoverDone,
            Op::ChangePoint,
            Op::Commit,
            Op::Reprotect,
            Op::AgentRegistered,
            Op::FirstPoint,
            // failback
            Op::Failover,
            Op::FailoverDone,
            Op::Commit,
            Op::Reprotect,
            Op::AgentRegistered,
            Op::FirstPoint,
        ] {
            s = next(m, s, op).unwrap_or_else(|e| panic!("{op} from {s}: {e}"));
        }
        assert_eq!(s, Protected);
        assert_eq!(next(m, s, Op::Unprotect).unwrap(), Unprotected);
        assert_eq!(next(m, InitialSync, Op::Unprotect).unwrap(), Unprotected);
        assert_eq!(next(m, Unprotected, Op::Protect).unwrap(), InitialSync);
        // Retries of half-done operations are allowed.
        assert_eq!(next(m, FailingOver, Op::Failover).unwrap(), FailingOver);
        assert_eq!(next(m, InitialSync, Op::Protect).unwrap(), InitialSync);
        assert_eq!(
            next(m, WaitingForAgent, Op::Reprotect).unwrap(),
            WaitingForAgent
        );
    }

    #[test]
    fn illegal_transitions_name_machine_state_and_what_to_do() {
        let cases = [
            (Unprotected, Op::Failover, "rebound protect m7"),
            (InitialSync, Op::Failover, "first recovery point"),
            (Protected, Op::Commit, "fail it over first"),
            (Protected, Op::Protect, "already protected"),
            (FailedOver, Op::Reprotect, "rebound commit m7"),
            (FailedOver, Op::Failover, "change-point"),
            (Committed, Op::Failover, "rebound reprotect m7"),
            (Committed, Op::Commit, "rebound reprotect m7"),
            (WaitingForAgent, Op::Failover, "agent on m7"),
            (Protected, Op::ChangePoint, "fail it over first"),
            (Unprotected, Op::Unprotect, "not protected"),
            (FailingOver, Op::Unprotect, "rebound commit m7"),
            (FailedOver, Op::Unprotect, "rebound commit m7"),
            (Committed, Op::Unprotect, "rebound reprotect m7"),
        ];
        for (state, op, want) in cases {
            let e = next("m7", state, op).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, CsError::FailedPrecondition(_)));
            assert!(msg.contains("m7"), "{msg}");
            assert!(msg.contains(state.as_str()), "{msg}");
            assert!(msg.contains(want), "{state} {op}: {msg}");
        }
    }
}
