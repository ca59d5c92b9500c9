//! Scraping a daemon's `/metrics` and `/healthz` as a Prometheus server
//! would: a real HTTP client (ureq) and a Prometheus text-format parser
//! (`prometheus_parse`), so a test sees what an operator's monitoring sees,
//! not the daemon's own idea of its numbers.
//!
//! Where a daemon serves them comes from its config file's
//! `metrics_listen` ([`metrics_addr`]); [`crate::Lab::metrics_addr`] and
//! [`crate::Sites::metrics_addr`] find that file for a lab's daemon.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// How long one scrape may take before it counts as failed.
const TIMEOUT: Duration = Duration::from_secs(10);

/// One parsed `/metrics` answer.
#[derive(Debug, Clone)]
pub struct Scrape {
    text: String,
    parsed: prometheus_parse::Scrape,
}

/// A client that reads any status (a 503 from `/healthz` is an answer, not
/// an error) and never goes through a proxy from the environment: the
/// daemons listen on loopback.
fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(TIMEOUT))
        .build()
        .into()
}

/// GET `http://addr/path`: the status and the body.
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let url = format!("http://{addr}{path}");
    let mut resp = client()
        .get(&url)
        .call()
        .with_context(|| format!("GET {url}: is the daemon running with this metrics_listen?"))?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .with_context(|| format!("GET {url}: cannot read the body"))?;
    Ok((status, body))
}

/// GET `http://addr/metrics` and parse it; fails unless the daemon answers
/// 200.
pub fn scrape(addr: SocketAddr) -> Result<Scrape> {
    let (status, body) = get(addr, "/metrics")?;
    if status != 200 {
        bail!("GET http://{addr}/metrics answered {status}: {body}");
    }
    Scrape::parse(body).with_context(|| format!("the scrape of http://{addr}/metrics"))
}

/// GET `http://addr/healthz`: its status (200 ready, 503 recovering) and
/// body.
pub fn healthz(addr: SocketAddr) -> Result<(u16, String)> {
    get(addr, "/healthz")
}

/// The `metrics_listen` address in a daemon's TOML config; an error when
/// the key is missing or empty (the endpoint is off).
pub fn metrics_addr(config_toml: &Path) -> Result<SocketAddr> {
    let text = std::fs::read_to_string(config_toml)
        .with_context(|| format!("cannot read {}", config_toml.display()))?;
    let doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("cannot parse {}", config_toml.display()))?;
    let listen = doc
        .get("metrics_listen")
        .and_then(toml::Value::as_str)
        .map(str::trim)
        .unwrap_or_default();
    if listen.is_empty() {
        bail!(
            "{} has no metrics_listen: the daemon's metrics endpoint is off",
            config_toml.display()
        );
    }
    listen.parse().map_err(|e| {
        anyhow!(
            "metrics_listen {listen:?} in {} is not an address: {e}",
            config_toml.display()
        )
    })
}

impl Scrape {
    /// Parses a Prometheus (or OpenMetrics) text exposition.
    pub fn parse(text: String) -> Result<Scrape> {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed =
            prometheus_parse::Scrape::parse(lines).context("not the Prometheus text format")?;
        Ok(Scrape { text, parsed })
    }

    /// Sum of the samples of `name` whose labels include all of `labels`.
    /// A histogram's base name sums its observation counts (the `+Inf`
    /// bucket); `_sum` and `_count` are samples of their own.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in &self.parsed.samples {
            let bucket = s.metric.len() == name.len() + "_bucket".len()
                && s.metric.starts_with(name)
                && s.metric.ends_with("_bucket");
            if s.metric != name && !bucket {
                continue;
            }
            if !labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)) {
                continue;
            }
            let v = match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(b) => {
                    b.iter().map(|c| c.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => continue,
            };
            *found.get_or_insert(0.0) += v;
        }
        found
    }

    /// Every metric name in the scrape (histograms by their base name and
    /// their `_bucket`/`_sum`/`_count` series).
    pub fn names(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for s in &self.parsed.samples {
            if let prometheus_parse::Value::Histogram(_) = s.value {
                names.insert(format!("{}_bucket", s.metric));
            }
            names.insert(s.metric.clone());
        }
        names
    }

    /// The label sets of `name`'s samples (for messages and for finding
    /// which machines or replications a daemon reports).
    pub fn labels(&self, name: &str) -> Vec<std::collections::BTreeMap<String, String>> {
        (self.parsed.samples.iter())
            .filter(|s| s.metric == name)
            .map(|s| {
                s.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .collect()
    }

    /// The text as the daemon served it.
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What prometheus_client's encoder writes (OpenMetrics text).
    const TEXT: &str = r#"# HELP rebound_agent_written_bytes Bytes of writes captured.
# TYPE rebound_agent_written_bytes counter
rebound_agent_written_bytes_total{machine="m1",disk="disk0"} 4096
rebound_agent_written_bytes_total{machine="m1",disk="disk1"} 1024
rebound_agent_written_bytes_total{machine="m2",disk="disk0"} 7
# HELP rebound_agent_mode Current mode.
# TYPE rebound_agent_mode gauge
rebound_agent_mode{machine="m1",mode="data"} 1
rebound_agent_mode{machine="m1",mode="bitmap"} 0
# HELP rebound_ps_cache_capacity_bytes The cache cap.
# TYPE rebound_ps_cache_capacity_bytes gauge
rebound_ps_cache_capacity_bytes 8589934592
# HELP rebound_mt_fsync_seconds Fsync latency.
# TYPE rebound_mt_fsync_seconds histogram
rebound_mt_fsync_seconds_sum 0.25
rebound_mt_fsync_seconds_count 3
rebound_mt_fsync_seconds_bucket{le="0.001"} 1
rebound_mt_fsync_seconds_bucket{le="0.01"} 2
rebound_mt_fsync_seconds_bucket{le="+Inf"} 3
# EOF
"#;

    fn scrape() -> Scrape {
        Scrape::parse(TEXT.to_string()).expect("parses")
    }

    #[test]
    fn value_sums_the_samples_whose_labels_match() {
        let s = scrape();
        let name = "rebound_agent_written_bytes_total";
        assert_eq!(s.value(name, &[]), Some(5127.0));
        assert_eq!(s.value(name, &[("machine", "m1")]), Some(5120.0));
        assert_eq!(
            s.value(name, &[("machine", "m1"), ("disk", "disk1")]),
            Some(1024.0)
        );
        assert_eq!(s.value(name, &[("machine", "m3")]), None);
        assert_eq!(
            s.value("rebound_agent_mode", &[("mode", "data")]),
            Some(1.0)
        );
        assert_eq!(
            s.value("rebound_ps_cache_capacity_bytes", &[]),
            Some(8589934592.0)
        );
        assert_eq!(s.value("rebound_nothing", &[]), None);
    }

    #[test]
    fn histograms_count_their_observations_and_keep_sum_and_count() {
        let s = scrape();
        assert_eq!(s.value("rebound_mt_fsync_seconds", &[]), Some(3.0));
        assert_eq!(s.value("rebound_mt_fsync_seconds_count", &[]), Some(3.0));
        assert_eq!(s.value("rebound_mt_fsync_seconds_sum", &[]), Some(0.25));
    }

    #[test]
    fn names_lists_every_series_name() {
        let names = scrape().names();
        for n in [
            "rebound_agent_written_bytes_total",
            "rebound_agent_mode",
            "rebound_ps_cache_capacity_bytes",
            "rebound_mt_fsync_seconds",
            "rebound_mt_fsync_seconds_bucket",
            "rebound_mt_fsync_seconds_sum",
            "rebound_mt_fsync_seconds_count",
        ] {
            assert!(names.contains(n), "{n} missing from {names:?}");
        }
        assert_eq!(names.len(), 7, "{names:?}");
        assert_eq!(
            scrape().labels("rebound_agent_mode").len(),
            2,
            "one label set per mode"
        );
        assert!(scrape().text().ends_with("# EOF\n"));
    }

    #[test]
    fn metrics_addr_reads_metrics_listen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path().join("agent.toml");
        std::fs::write(
            &p,
            "machine_id = \"m1\"\nmetrics_listen = \"127.0.0.7:9471\"\n",
        )
        .expect("write");
        assert_eq!(
            metrics_addr(&p).expect("an address"),
            "127.0.0.7:9471".parse().expect("addr")
        );
        std::fs::write(&p, "metrics_listen = \"\"\n").expect("write");
        let e = metrics_addr(&p).expect_err("off").to_string();
        assert!(e.contains("off"), "{e}");
    }

    #[test]
    fn an_unreachable_daemon_is_a_clear_error() {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let e = format!("{:#}", super::scrape(addr).expect_err("nothing listens"));
        assert!(e.contains("127.0.0.1:1/metrics"), "{e}");
    }
}
