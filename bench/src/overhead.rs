//! `--metrics both`: what serving metrics costs. The cost-of-protection
//! (section 2) and sustained (section 3) rows are measured twice, on a lab
//! whose daemons serve no metrics and on the main lab, whose daemons serve
//! them while [`crate::scraper`] scrapes each once a second; the table keeps
//! the metrics-on figures (what a deployment runs) and a second table sets
//! both side by side.
//!
//! The lab without metrics runs first, in its own directory, so the main
//! lab's later sections (RPO, RTO, memory) are as in a run without the
//! option.

use anyhow::Result;
use serde_json::{json, Value};
use std::fmt::Write as _;

use crate::report::Row;
use crate::{cost, sustained, Bench};

/// The rows measured both ways.
pub const PREFIXES: [&str; 2] = ["cost.", "sustained."];

/// The rows as measured with metrics off, and their section details.
#[derive(Debug, Clone, Default)]
pub struct Off {
    pub rows: Vec<Row>,
    pub details: serde_json::Map<String, Value>,
}

fn measured_both_ways(id: &str) -> bool {
    PREFIXES.iter().any(|p| id.starts_with(p))
}

/// Sections 2 and 3 on a lab with metrics off; their rows are then taken
/// out of the table (the main lab fills them again with metrics on).
pub fn run_off(b: &mut Bench) -> Result<Off> {
    b.progress("metrics off: sections 2 and 3 on a lab whose daemons serve no metrics");
    let mut lab = crate::open_main_lab(b, "main-metrics-off", false)?;
    let r = cost::run(b, &mut lab);
    b.outcome(&["cost."], r);
    let r = sustained::run(b, &mut lab);
    b.outcome(&["sustained."], r);
    drop(lab);
    b.clean_section(&b.dir.join("main-metrics-off"));

    let rows = b
        .report
        .rows()
        .iter()
        .filter(|r| measured_both_ways(r.id))
        .cloned()
        .collect();
    let keys: Vec<String> = b
        .details
        .keys()
        .filter(|k| measured_both_ways(k))
        .cloned()
        .collect();
    let mut details = serde_json::Map::new();
    for k in keys {
        if let Some(v) = b.details.remove(&k) {
            details.insert(k, v);
        }
    }
    for p in PREFIXES {
        b.report.reset(p);
    }
    Ok(Off { rows, details })
}

/// The JSON details of the comparison (`details.metrics_off`).
pub fn json(off: &Off) -> Value {
    json!({"rows": off.rows, "details": off.details})
}

/// The side-by-side table: every row measured both ways, its value with
/// metrics on (this run's table) and off, and the change.
pub fn table(on: &[Row], off: &Off) -> String {
    let fw = off.rows.iter().map(|r| r.figure.len()).max().unwrap_or(10);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Metrics on (scraped every {} s) vs off",
        crate::scraper::INTERVAL.as_secs()
    );
    let _ = writeln!(
        out,
        "{:<fw$}  {:>14}  {:>14}  {:>8}",
        "FIGURE", "METRICS ON", "METRICS OFF", "ON/OFF"
    );
    for o in &off.rows {
        let Some(r) = on.iter().find(|r| r.id == o.id) else {
            continue;
        };
        let show = |v: Option<f64>| {
            v.map(|v| format!("{v:.2} {}", r.unit))
                .unwrap_or_else(|| "-".into())
        };
        let ratio = match (r.value, o.value) {
            (Some(a), Some(z)) if z != 0.0 => format!("{:.3}", a / z),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<fw$}  {:>14}  {:>14}  {:>8}",
            r.figure,
            show(r.value),
            show(o.value),
            ratio
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Report, Verdict};

    #[test]
    fn the_off_rows_are_set_beside_the_on_rows() {
        let mut r = Report::default();
        r.set("sustained.text", 90.0, "off");
        let off = Off {
            rows: r
                .rows()
                .iter()
                .filter(|r| measured_both_ways(r.id))
                .cloned()
                .collect(),
            details: Default::default(),
        };
        r.reset("sustained.");
        let row = |r: &Report| r.rows().iter().find(|x| x.id == "sustained.text").cloned();
        assert_eq!(
            row(&r).map(|x| (x.value, x.verdict)),
            Some((None, Verdict::Error))
        );
        r.set("sustained.text", 81.0, "on");
        let t = table(r.rows(), &off);
        let line = t
            .lines()
            .find(|l| l.contains("81.00 MB/s"))
            .unwrap_or_else(|| panic!("{t}"));
        assert!(line.contains("90.00 MB/s") && line.contains("0.900"), "{t}");
        assert!(!t.contains("limits"), "{t}");
    }
}
