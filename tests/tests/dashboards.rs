//! The Grafana dashboard (packaging/grafana/rebound.json) and the Prometheus
//! alert rules (packaging/prometheus/rebound-rules.yml) an operator installs
//! must read metrics the daemons really serve: a renamed or missing metric
//! would leave a panel empty or an alert silent on the day it matters, with
//! nothing failing. So every `rebound_…` name their queries use must appear
//! in a scrape of a running lab, and promtool (Debian's `prometheus`
//! package, which the test command installs) must accept the rules and the
//! dashboard's queries.

use crate::lifecycle::{a, b, protect, MIB};
use rebound_lab::metrics::scrape;
use rebound_lab::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const RULES: &str = "packaging/prometheus/rebound-rules.yml";
const DASHBOARD: &str = "packaging/grafana/rebound.json";
/// How long the lab may take to report every series after the point is cut
/// (status reaches the CS every few seconds).
const SERIES_WAIT: Duration = Duration::from_secs(60);

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// `promtool check rules <file>`; panics with promtool's output if it
/// fails, or with what to install if promtool is missing.
fn promtool_check_rules(file: &std::path::Path) {
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install Debian's `prometheus` package \
                 (apt-get install prometheus; scripts/test installs it when missing)"
            )
        });
    assert!(
        out.status.success(),
        "promtool check rules {} failed:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `expr:` of every rule, read line by line: a one-line expression, or
/// a folded/literal block (`expr: >-`) of the lines indented below it.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let key = line.trim_start();
        let key = key.strip_prefix("- ").unwrap_or(key).trim_start();
        let Some(rest) = key.strip_prefix("expr:") else {
            continue;
        };
        let key_indent = line.len() - key.len();
        let rest = rest.trim();
        if !rest.starts_with('>') && !rest.starts_with('|') {
            exprs.push(rest.to_string());
            continue;
        }
        let mut block = Vec::new();
        while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > key_indent) {
            block.push(lines[i].trim());
            i += 1;
        }
        exprs.push(block.join(" ").trim().to_string());
    }
    exprs
}

/// Every query of the dashboard: the panels' `expr` and the template
/// variables' `query`/`definition`, wherever they nest.
fn dashboard_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// The `rebound_…` metric names a query uses, histograms by their base name.
fn metric_names(query: &str) -> BTreeSet<String> {
    let bytes = query.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(at) = query[i..].find("rebound_") {
        let start = i + at;
        let mut end = start + "rebound_".len();
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if start == 0 || !word(bytes[start - 1]) {
            let name = &query[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(base.to_string());
        }
        i = end;
    }
    names
}

/// The dashboard's queries as PromQL promtool can check: Grafana's
/// variables replaced by what they expand to.
fn as_promql(query: &str) -> String {
    query
        .replace("$__rate_interval", "1m")
        .replace("$__range", "1h")
        .replace("$site", ".*")
        .replace("$machine", ".*")
}

#[test]
fn alert_rules_pass_promtool_check_rules() {
    promtool_check_rules(&repo_file(RULES));
    let exprs = rule_exprs(&read(RULES));
    assert!(exprs.len() >= 6, "{RULES}: too few rules read: {exprs:?}");
    let rpo = exprs
        .iter()
        .find(|e| e.contains("rebound_cs_rpo_seconds"))
        .expect("an RPO rule");
    assert!(
        rpo.contains("rebound_cs_rpo_threshold_seconds"),
        "the RPO rule must compare with the machine's threshold: {rpo}"
    );
}

#[test]
fn dashboard_queries_are_valid_promql() {
    let d = dashboard();
    assert_eq!(d["schemaVersion"].as_u64().map(|v| v >= 36), Some(true));
    assert_eq!(d["__inputs"][0]["name"], "DS_PROMETHEUS", "{DASHBOARD}");
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["site", "machine"], "{DASHBOARD}: template variables");
    let mut queries = Vec::new();
    dashboard_queries(&d["panels"], &mut queries);
    assert!(
        queries.len() >= 20,
        "{DASHBOARD}: {} queries",
        queries.len()
    );
    // promtool checks expressions inside rules: one recording rule each.
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        let q = serde_json::to_string(&as_promql(q)).expect("a JSON string is YAML");
        yaml += &format!("      - record: dashboard_query_{i}\n        expr: {q}\n");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, yaml).expect("write the queries");
    promtool_check_rules(&file);
}

#[test]
fn every_metric_the_dashboard_and_rules_use_is_served() {
    let mut used = BTreeSet::new();
    for e in rule_exprs(&read(RULES)) {
        used.extend(metric_names(&e));
    }
    let mut queries = Vec::new();
    dashboard_queries(&dashboard(), &mut queries);
    for q in &queries {
        used.extend(metric_names(q));
    }
    assert!(used.len() >= 30, "too few metric names read: {used:?}");

    // All four daemons, a machine protected and replicating, a point cut.
    let s = Sites::start(SitesOptions::default()).expect("sites");
    protect(&s, "m1", a(), b());
    s.write("m1", a(), "disk0", 0, 4 * MIB, 0x5a)
        .expect("write");
    let (tag, _) = s.tag("m1", a(), "crash").expect("tag");
    let hash = blake3_file(&s.source_disk("m1", "disk0")).expect("hash the source");
    s.wait_view_hash(b(), "m1", "disk0", &tag, &hash, Duration::from_secs(60))
        .expect("the point reaches the MT");
    // A second job: the job duration histogram has a series once a job
    // finished while the CS watched (the CS leaves out the jobs it finds
    // finished at its start).
    let v = s.job(&["verify", "m1"]).expect("verify");
    assert_eq!(v["error"], "", "{v:#}");

    let daemons = [
        "cs".to_string(),
        ps_id(a()),
        ps_id(b()),
        mt_id(a()),
        mt_id(b()),
        format!("agent:m1@{}", a()),
    ];
    let started = Instant::now();
    let missing = loop {
        let mut served = BTreeSet::new();
        for who in &daemons {
            let addr = s.metrics_addr(who).expect("metrics address");
            let got = scrape(addr).unwrap_or_else(|e| panic!("scraping {who} at {addr}: {e:#}"));
            served.extend(got.names());
        }
        let missing: Vec<&String> = used.difference(&served).collect();
        if missing.is_empty() || started.elapsed() > SERIES_WAIT {
            break missing
                .into_iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>();
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(
        missing.is_empty(),
        "metrics the dashboard or the alert rules use that no daemon serves \
         (after {} s of replication): {missing:?}",
        started.elapsed().as_secs()
    );
}

#[test]
fn metric_names_strip_histogram_series_and_skip_longer_words() {
    let q = "histogram_quantile(0.99, sum by (le) (rate(rebound_mt_fsync_seconds_bucket[1m]))) \
             / x_rebound_not_a_name + rebound_cs_rpo_seconds";
    let got: Vec<String> = metric_names(q).into_iter().collect();
    assert_eq!(got, ["rebound_cs_rpo_seconds", "rebound_mt_fsync_seconds"]);
    let exprs =
        rule_exprs("  - expr: a > b\n    for: 1m\n  - expr: >-\n      c\n      > d\n    for: 1m\n");
    assert_eq!(exprs, ["a > b", "c > d"]);
}
