//! `commit --remove-source-copy` while the source agent is offline: the CS
//! remembers it and removes the copy when that agent comes back.

use crate::lifecycle::{
    a, b, protect, replica_hash, succeeded, unplanned_failover_after_killing_the_source, JOB,
};
use rebound_lab::*;
use std::time::Duration;

#[test]
fn remove_source_copy_while_the_source_is_offline_happens_when_it_returns() {
    let mut s = Sites::start(SitesOptions::default()).expect("sites");
    let m = "m1";
    protect(&s, m, a(), b());
    let (_, _, repl, h) = unplanned_failover_after_killing_the_source(&mut s, m, 0x81);

    let j = s
        .job(&["commit", m, "--remove-source-copy"])
        .expect("commit --remove-source-copy");
    succeeded(&j);
    let said = format!("{} {}", j["status"], j["warnings"]);
    assert!(
        said.contains("pending") && said.contains(a()),
        "the commit does not say the removal at {} is pending: {j:#}",
        a()
    );
    s.wait_state(m, "Committed", JOB).unwrap();
    let source = s.source_disk(m, "disk0");
    assert!(source.exists(), "removed with no agent to remove it?");

    // The old agent comes back at the old site: the CS has it remove its
    // disks; the machine keeps running at the new site.
    s.start_agent(m, a()).unwrap();
    wait_until(
        &format!("{} removed by the returning agent", source.display()),
        Duration::from_secs(60),
        || !source.exists(),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\n--- cs log ---\n{}\n--- agent log ---\n{}",
            s.log_tail("cs", 30),
            s.log_tail(&format!("agent-{m}@{}", a()), 30)
        )
    });
    let mm = s.machine(m).unwrap();
    assert_eq!(mm["state"], "Committed", "{mm}");
    assert_eq!(replica_hash(&s, b(), &repl), h, "the running copy changed");
}
