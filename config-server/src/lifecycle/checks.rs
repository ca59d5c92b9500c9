//! The failover checks of DESIGN.md §8, as pure functions so they are
//! tested without a server:
//! - the direction given must match the replication's direction;
//! - every machine (every machine of a plan) needs at least one recovery
//!   point, and the error names the machines that have none;
//! - `latest-multi` needs a group point that every member has.

use crate::error::CsError;
use crate::store::{Point, PointSummary, Replication};
use std::collections::HashMap;

/// `--from/--to` must equal the replication's direction.
pub fn direction(repl: &Replication, from: &str, to: &str) -> Result<(), CsError> {
    if repl.from_site == from && repl.to_site == to {
        return Ok(());
    }
    Err(CsError::FailedPrecondition(format!(
        "{} replicates from {} to {}, not from {from} to {to}: use --from {} --to {}",
        repl.machine, repl.from_site, repl.to_site, repl.from_site, repl.to_site
    )))
}

/// Every machine must have at least one recovery point. `members` pairs each
/// machine with the latest summary its MT reported for its replication.
pub fn have_points(
    members: &[(String, Option<PointSummary>)],
    plan: Option<&str>,
) -> Result<(), CsError> {
    let missing: Vec<&str> = members
        .iter()
        .filter(|(_, s)| s.as_ref().is_none_or(|s| s.count == 0))
        .map(|(m, _)| m.as_str())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let whose = match plan {
        Some(p) => format!(" in plan {p}"),
        None => String::new(),
    };
    Err(CsError::FailedPrecondition(format!(
        "no recovery point yet for {}{whose}: a failover needs at least one point for every \
         machine; wait until the initial sync cuts a first point (`rebound machines` shows the \
         last point of each machine)",
        missing.join(", ")
    )))
}

/// `latest-app` needs an app-consistent point on every machine. Checked
/// before the job starts, so a planned failover never fences and drains a
/// source only to find there is no point to roll back to.
pub fn have_app_points(members: &[(String, Option<PointSummary>)]) -> Result<(), CsError> {
    let missing: Vec<&str> = members
        .iter()
        .filter(|(_, s)| s.as_ref().is_none_or(|s| s.latest_app.is_none()))
        .map(|(m, _)| m.as_str())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(CsError::FailedPrecondition(format!(
        "no app-consistent recovery point for {}: choose --point latest (crash-consistent), or \
         wait for the next app point (policy app_interval) and check with `rebound points`",
        missing.join(", ")
    )))
}

/// The newest group point every member has (by its common group tag).
/// `app_only` restricts to app-consistent group points (`latest-multi-app`).
pub fn newest_common_group_point(
    members: &[(String, Option<PointSummary>)],
    app_only: bool,
) -> Result<Point, CsError> {
    let kind = if app_only {
        "app-consistent group point"
    } else {
        "group point"
    };
    if members.is_empty() {
        return Err(CsError::InvalidArgument(format!(
            "no machines to find a {kind} for"
        )));
    }
    // tag -> (members that have it, newest time seen)
    let mut seen: HashMap<&str, (usize, &Point)> = HashMap::new();
    let mut without = Vec::new();
    for (m, s) in members {
        let points: Vec<&Point> = s
            .iter()
            .flat_map(|s| s.group_points.iter())
            .filter(|p| !p.group.is_empty() && (!app_only || p.kind == "app"))
            .collect();
        if points.is_empty() {
            without.push(m.as_str());
        }
        let mut tags: Vec<&str> = Vec::new();
        for p in points {
            if tags.contains(&p.group.as_str()) {
                continue;
            }
            tags.push(&p.group);
            let e = seen.entry(&p.group).or_insert((0, p));
            e.0 += 1;
            if p.time_ms > e.1.time_ms {
                e.1 = p;
            }
        }
    }
    if !without.is_empty() {
        return Err(CsError::FailedPrecondition(format!(
            "no {kind} yet for {}: wait for the consistency group to cut one (or cut one now with \
             `rebound group cut GROUP`), or fail over with --point latest",
            without.join(", ")
        )));
    }
    seen.into_values()
        .filter(|(n, _)| *n == members.len())
        .map(|(_, p)| p)
        .max_by_key(|p| p.time_ms)
        .cloned()
        .ok_or_else(|| {
            let names: Vec<&str> = members.iter().map(|(m, _)| m.as_str()).collect();
            CsError::FailedPrecondition(format!(
                "no {kind} is held by every one of {}: their retention windows share none; \
                 fail over with --point latest or cut a new group point",
                names.join(", ")
            ))
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn latest_app_needs_an_app_point_on_every_machine() {
        let with_app = PointSummary {
            count: 1,
            latest_app: Some(Point::default()),
            ..Default::default()
        };
        let crash_only = PointSummary {
            count: 1,
            ..Default::default()
        };
        let members = vec![
            ("m1".to_string(), Some(with_app)),
            ("m2".to_string(), Some(crash_only)),
            ("m3".to_string(), None),
        ];
        let e = super::have_app_points(&members).unwrap_err().to_string();
        assert!(e.contains("m2, m3") && !e.contains("m1"), "{e}");
        assert!(super::have_app_points(&members[..1]).is_ok());
    }

    use super::*;

    fn repl() -> Replication {
        Replication::test_protected("r1", 0)
    }

    fn gp(tag: &str, time: u64, kind: &str) -> Point {
        Point {
            id: tag.into(),
            kind: kind.into(),
            time_ms: time,
            seq: time,
            group: tag.into(),
        }
    }

    fn summary(points: Vec<Point>) -> Option<PointSummary> {
        Some(PointSummary {
            count: points.len() as u32 + 1,
            group_points: points,
            ..Default::default()
        })
    }

    #[test]
    fn wrong_direction_says_the_right_one() {
        assert!(direction(&repl(), "onprem", "azure").is_ok());
        let e = direction(&repl(), "azure", "onprem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("m1 replicates from onprem to azure"), "{e}");
        assert!(e.contains("--from onprem --to azure"), "{e}");
    }

    #[test]
    fn missing_points_name_every_machine() {
        let members = vec![
            ("m1".to_string(), summary(vec![])),
            ("m2".to_string(), None),
            (
                "m3".to_string(),
                Some(PointSummary {
                    count: 0,
                    ..Default::default()
                }),
            ),
        ];
        let e = have_points(&members, Some("p1")).unwrap_err().to_string();
        assert!(
            e.contains("no recovery point yet for m2, m3 in plan p1"),
            "{e}"
        );
        assert!(!e.contains("m1,"), "{e}");
        assert!(have_points(&members[..1], None).is_ok());
    }

    #[test]
    fn latest_multi_is_the_newest_tag_every_member_has() {
        let members = vec![
            (
                "m1".to_string(),
                summary(vec![
                    gp("g@1", 1, "crash"),
                    gp("g@2", 2, "app"),
                    gp("g@3", 3, "crash"),
                ]),
            ),
            (
                "m2".to_string(),
                summary(vec![gp("g@1", 1, "crash"), gp("g@2", 2, "app")]),
            ),
            (
                "m3".to_string(),
                summary(vec![gp("g@2", 2, "app"), gp("g@3", 3, "crash")]),
            ),
        ];
        assert_eq!(
            newest_common_group_point(&members, false).unwrap().group,
            "g@2"
        );
        assert_eq!(
            newest_common_group_point(&members, true).unwrap().group,
            "g@2"
        );
        let partial = vec![
            ("m1".to_string(), summary(vec![gp("g@1", 1, "crash")])),
            ("m2".to_string(), summary(vec![gp("g@2", 2, "crash")])),
        ];
        let e = newest_common_group_point(&partial, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("every one of m1, m2"), "{e}");
        let none = vec![
            ("m1".to_string(), summary(vec![])),
            ("m2".to_string(), None),
        ];
        let e = newest_common_group_point(&none, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no group point yet for m1, m2"), "{e}");
    }
}
