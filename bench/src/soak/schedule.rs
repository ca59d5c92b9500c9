//! The seeded plan of a soak: when each component is killed with SIGKILL
//! and how long it stays down, and which network fault hits which link
//! when (through the lab's fault proxies). The whole plan is drawn from the seed
//! before the run starts, so the same seed gives the same schedule; only
//! the wall-clock timing of what the processes do in between varies.
//!
//! Kills come in rounds of the three components in a shuffled order, so
//! each component is killed about a third of the time even in a short run.

use rebound_lab::{Component, Fault, FaultSchedule, Rng};
use std::time::Duration;

/// Gap between two kills, in milliseconds (uniform in this range): about a
/// kill every 6 s, so each component about every 18 s.
const KILL_GAP_MS: (u64, u64) = (4_000, 8_000);
/// How long a killed component stays down before its restart.
const DOWN_MS: (u64, u64) = (100, 2_000);
/// Gap between two network faults; they take turns on the two links.
const FAULT_GAP_MS: (u64, u64) = (1_000, 3_000);
/// No kill in the first seconds, while the first copy of the disks is sent.
const FIRST_KILL_MS: u64 = 5_000;

/// A link of the lab, each through its fault proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Link {
    AgentPs,
    PsMt,
}

impl Link {
    pub fn name(self) -> &'static str {
        match self {
            Link::AgentPs => "agent-ps",
            Link::PsMt => "ps-mt",
        }
    }
}

/// The name of a fault's kind, for the counts.
pub fn fault_kind(f: &Fault) -> &'static str {
    match f {
        Fault::Cut => "cut",
        Fault::Stall(_) => "stall",
        Fault::Delay { .. } => "delay",
        Fault::Truncate => "truncate",
    }
}

/// One thing the soak does to the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL `component`, restart it `down` later.
    Kill {
        component: Component,
        down: Duration,
    },
    /// Inject `fault` into `link`'s proxy.
    Fault { link: Link, fault: Fault },
}

/// An action and when it happens, from the start of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at: Duration,
    pub action: Action,
}

fn between(rng: &mut Rng, (lo, hi): (u64, u64)) -> u64 {
    lo + rng.below(hi - lo)
}

/// Every event of a run of `length` with `seed`, in time order.
pub fn plan(seed: u64, length: Duration) -> Vec<Event> {
    let mut rng = Rng::new(seed);
    let mut events = Vec::new();
    let mut at = FIRST_KILL_MS;
    let mut round: Vec<Component> = Vec::new();
    while Duration::from_millis(at) < length {
        if round.is_empty() {
            round = vec![Component::Agent, Component::Ps, Component::Mt];
            // Fisher-Yates from the seeded generator.
            for i in (1..round.len()).rev() {
                round.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let component = round.pop().unwrap_or(Component::Agent);
        let down = Duration::from_millis(between(&mut rng, DOWN_MS));
        events.push(Event {
            at: Duration::from_millis(at),
            action: Action::Kill { component, down },
        });
        at += between(&mut rng, KILL_GAP_MS);
    }
    let mut faults = FaultSchedule::new(seed ^ 0xfa17_5eed);
    let mut at = between(&mut rng, FAULT_GAP_MS);
    let mut turn = 0u64;
    while Duration::from_millis(at) < length {
        turn += 1;
        let link = if turn % 2 == 1 {
            Link::AgentPs
        } else {
            Link::PsMt
        };
        events.push(Event {
            at: Duration::from_millis(at),
            action: Action::Fault {
                link,
                fault: faults.next_fault(),
            },
        });
        at += between(&mut rng, FAULT_GAP_MS);
    }
    // Stable: a kill and a fault at the same millisecond keep plan order.
    events.sort_by_key(|e| e.at);
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kills(events: &[Event], c: Component) -> usize {
        events
            .iter()
            .filter(|e| matches!(e.action, Action::Kill { component, .. } if component == c))
            .count()
    }

    #[test]
    fn the_same_seed_gives_the_same_plan_and_another_seed_another() {
        let ten = Duration::from_secs(600);
        assert_eq!(plan(7, ten), plan(7, ten));
        assert_ne!(plan(7, ten), plan(8, ten));
    }

    #[test]
    fn ten_minutes_kill_each_component_at_least_twenty_times() {
        for seed in 0..20 {
            let p = plan(seed, Duration::from_secs(600));
            for c in [Component::Agent, Component::Ps, Component::Mt] {
                let n = kills(&p, c);
                assert!(n >= 20, "seed {seed}: {c:?} killed {n} times");
            }
            assert!(p.windows(2).all(|w| w[0].at <= w[1].at), "seed {seed}");
            assert!(p.iter().all(|e| e.at < Duration::from_secs(600)));
        }
    }

    #[test]
    fn ten_minutes_cut_and_stall_both_links_at_least_twenty_times() {
        for seed in 0..20 {
            let p = plan(seed, Duration::from_secs(600));
            for link in [Link::AgentPs, Link::PsMt] {
                for kind in ["cut", "stall", "delay", "truncate"] {
                    let n = p
                        .iter()
                        .filter(|e| {
                            matches!(&e.action, Action::Fault { link: l, fault }
                                if *l == link && fault_kind(fault) == kind)
                        })
                        .count();
                    let least = if matches!(kind, "cut" | "stall") {
                        20
                    } else {
                        5
                    };
                    assert!(n >= least, "seed {seed}: {kind} on {link:?} {n} times");
                }
            }
        }
    }

    #[test]
    fn one_minute_kills_every_component() {
        let p = plan(1, Duration::from_secs(60));
        for c in [Component::Agent, Component::Ps, Component::Mt] {
            assert!(kills(&p, c) >= 2, "{c:?}: {p:?}");
        }
    }
}
