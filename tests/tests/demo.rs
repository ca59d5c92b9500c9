//! The README's first command, `rebound demo`, is part of the suite: it must
//! run the whole DR story (protect, failover, change-point, commit,
//! reprotect, failback, commit, reprotect) on a fresh machine and print its
//! summary with every blake3 check counted and the measured RTO.

use rebound_lab::cli;

#[test]
fn rebound_demo_passes_and_prints_its_summary() {
    let r = cli::rebound(&["demo"]).unwrap();
    assert!(r.ok, "rebound demo failed:\n{}", r.text());
    let stdout = &r.stdout;
    for line in [
        "Rebound demo summary",
        "recovery points verified by blake3 : 7",
        "hand-overs verified by blake3      : 2",
        "change-point checks by blake3      : 2",
        "tag-to-applied lag",
        "RTO failover onprem→azure",
        "RTO failover azure→onprem",
        "reprotect azure→onprem",
        "reprotect onprem→azure",
        "demo passed",
    ] {
        assert!(
            stdout.contains(line),
            "demo output lacks {line:?}:\n{stdout}"
        );
    }
}
