//! A one-minute `rebound soak`: fio verify, random kills, network faults,
//! every retained point compared at the end.
//!
//! The soak itself decides pass or fail (exit status); this test checks
//! that it did what its summary promises: every component killed, both
//! links faulted, fio rounds verified, points compared, nothing different.

use rebound_lab::cli;

/// The number after `label` in a summary line (`agent 3` → 3).
fn number_after(line: &str, label: &str) -> Option<u64> {
    line.split(label)
        .nth(1)
        .and_then(|rest| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
        })
        .and_then(|n| n.parse().ok())
}

fn count(line: &str, label: &str) -> u64 {
    number_after(line, label).unwrap_or_else(|| panic!("no number after {label:?} in {line:?}"))
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("the soak printed no {prefix:?} line:\n{out}"))
}

#[test]
fn one_minute_soak_passes_with_kills_faults_and_exact_points() {
    let r = cli::rebound(&["soak", "--minutes", "1", "--seed", "3"]).unwrap();
    let out = &r.stdout;
    assert!(r.ok, "rebound soak failed:\n{}", r.text());
    assert!(out.contains("result:          PASS"), "{out}");

    let kills = line(out, "kill -9:");
    for c in ["agent", "ps", "mt"] {
        assert!(count(kills, c) >= 1, "{c} was never killed: {kills}");
    }
    for link in ["network agent-ps", "network ps-mt"] {
        let l = line(out, link);
        // A kind the seed never drew is left out of the line.
        let n = |kind| number_after(l, kind).unwrap_or(0);
        assert!(n("cut") + n("stall") >= 1, "{l}");
    }
    let fio = line(out, "fio rounds:");
    assert!(count(fio, "fio rounds:") >= 1, "no clean fio round: {fio}");
    assert_eq!(count(fio, "verify errors:"), 0, "{fio}");
    let checked = line(out, "points checked:");
    assert!(
        count(checked, "points checked:") >= 10,
        "too few points compared: {checked}"
    );
    assert!(line(out, "latest:").contains("equals the source"), "{out}");
    assert!(!out.contains("FAILURE"), "{out}");
}
