//! The CS's `rebound_cs_*` metrics (docs/METRICS.md): machines by state,
//! RPO and its threshold per machine, jobs by kind and state and how long
//! finished ones ran, components up, open alerts. The store is async and a
//! scrape must not wait on it, so the alert evaluator (which reads the
//! fleet every second anyway) leaves a [`Snapshot`] here and the scrape
//! copies it into the gauges.

use crate::alerts::evaluate::{Kind, Open};
use crate::alerts::readings::Rules;
use crate::alerts::view::View;
use crate::store::{Job, JobFilter, ReplState, Store, StoreError};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use rebound_common::metrics::{Endpoint, Readiness, Registry};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const REPL_STATES: [ReplState; 7] = [
    ReplState::Unprotected,
    ReplState::InitialSync,
    ReplState::Protected,
    ReplState::FailingOver,
    ReplState::FailedOver,
    ReplState::Committed,
    ReplState::WaitingForAgent,
];

/// What the gauges show, as the evaluator last saw it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub machines: BTreeMap<&'static str, i64>,
    /// (machine, site, RPO seconds when known, threshold seconds).
    pub rpo: Vec<(String, String, Option<f64>, f64)>,
    pub jobs: BTreeMap<(String, &'static str), i64>,
    /// (role, component, site, up).
    pub components: Vec<(String, String, String, bool)>,
    pub alerts: BTreeMap<&'static str, i64>,
}

impl Snapshot {
    /// The gauges of `view`, `jobs` and the `open` alerts.
    pub fn of(view: &View, rules: &Rules, jobs: &JobTally, open: &Open) -> Snapshot {
        let mut s = Snapshot::default();
        for st in REPL_STATES {
            s.machines.insert(st.as_str(), 0);
        }
        for m in &view.machines {
            *s.machines.entry(view.state(&m.id).as_str()).or_default() += 1;
            s.rpo.push((
                m.id.clone(),
                m.site.clone(),
                view.rpo_ms(&m.id).map(|ms| ms as f64 / 1000.0),
                rules.rpo_threshold_ms(m.policy.rpo_alert_ms) as f64 / 1000.0,
            ));
        }
        s.jobs = jobs.counts();
        for c in &view.components {
            s.components.push((
                c.role.as_str().to_string(),
                c.id.clone(),
                c.site.clone(),
                c.health == crate::store::Health::Online,
            ));
        }
        for k in Kind::ALL {
            s.alerts.insert(k.as_str(), 0);
        }
        for (kind, _) in open.keys() {
            if let Some(k) = Kind::ALL.iter().find(|k| k.as_str() == kind) {
                *s.alerts.entry(k.as_str()).or_default() += 1;
            }
        }
        s
    }
}

/// Jobs by kind and state: pending and running ones read every round,
/// finished ones counted once each (from the most recent at start, then
/// as they finish) and their run time observed into the histogram.
#[derive(Debug, Default)]
pub struct JobTally {
    active: BTreeMap<(String, &'static str), i64>,
    finished: BTreeMap<(String, &'static str), i64>,
    seen: HashSet<String>,
    /// Whether the first read (the jobs finished before this CS) is done.
    started: bool,
}

/// How many finished jobs the count starts from (the most recent; each
/// job read costs a query for its steps, so not the whole history).
const JOBS_AT_START: u32 = 1_000;
/// How many recent jobs each round (every second) looks at for newly
/// finished ones: more than finish in a second.
const JOBS_PER_ROUND: u32 = 20;

impl JobTally {
    /// Reads the jobs; `observe` gets (kind, seconds) of each job seen
    /// finishing after the first call.
    pub async fn refresh(
        &mut self,
        store: &dyn Store,
        mut observe: impl FnMut(&str, f64),
    ) -> Result<(), StoreError> {
        let first = !self.started;
        let recent = JobFilter {
            limit: if first { JOBS_AT_START } else { JOBS_PER_ROUND },
            ..JobFilter::default()
        };
        self.active.clear();
        for j in store.list_jobs(&JobFilter::all_active()).await? {
            *self
                .active
                .entry((j.kind.clone(), j.state.as_str()))
                .or_default() += 1;
        }
        for j in store.list_jobs(&recent).await? {
            if j.state.finished() && self.seen.insert(j.id.clone()) {
                *self
                    .finished
                    .entry((j.kind.clone(), j.state.as_str()))
                    .or_default() += 1;
                if !first {
                    observe(&j.kind, run_secs(&j));
                }
            }
        }
        self.started = true;
        Ok(())
    }

    fn counts(&self) -> BTreeMap<(String, &'static str), i64> {
        let mut out = self.finished.clone();
        for (k, n) in &self.active {
            *out.entry(k.clone()).or_default() += n;
        }
        out
    }
}

fn run_secs(j: &Job) -> f64 {
    let start = if j.started_ms > 0 {
        j.started_ms
    } else {
        j.created_ms
    };
    j.ended_ms.saturating_sub(start) as f64 / 1000.0
}

/// The CS's metric families and the snapshot the scrape copies.
#[derive(Clone)]
pub struct CsMetrics {
    machines: Family<Labels, Gauge>,
    rpo: Family<Labels, FloatGauge>,
    rpo_threshold: Family<Labels, FloatGauge>,
    jobs: Family<Labels, Gauge>,
    job_duration: Family<Labels, Histogram>,
    component_up: Family<Labels, Gauge>,
    alerts: Family<Labels, Gauge>,
    snapshot: Arc<Mutex<Snapshot>>,
}

impl CsMetrics {
    /// The families, registered in a new registry.
    pub fn new() -> (CsMetrics, Registry) {
        let mut r = Registry::default();
        let m = CsMetrics {
            machines: Family::default(),
            rpo: Family::default(),
            rpo_threshold: Family::default(),
            jobs: Family::default(),
            // 1 s to about 9 days.
            job_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1.0, 4.0, 11))
            }),
            component_up: Family::default(),
            alerts: Family::default(),
            snapshot: Arc::default(),
        };
        r.register(
            "rebound_cs_machines",
            "machines by replication state",
            m.machines.clone(),
        );
        r.register(
            "rebound_cs_rpo_seconds",
            "the machine's RPO: age of its oldest write not yet applied at the MT",
            m.rpo.clone(),
        );
        r.register(
            "rebound_cs_rpo_threshold_seconds",
            "the machine's RPO alert threshold",
            m.rpo_threshold.clone(),
        );
        r.register("rebound_cs_jobs", "jobs by kind and state", m.jobs.clone());
        r.register(
            "rebound_cs_job_duration_seconds",
            "how long finished jobs ran",
            m.job_duration.clone(),
        );
        r.register(
            "rebound_cs_component_up",
            "1 while the component is online",
            m.component_up.clone(),
        );
        r.register("rebound_cs_alerts", "open alerts", m.alerts.clone());
        // Every kind from the start: a dashboard finds the histogram before
        // the first job ends.
        for kind in crate::lifecycle::spec::JobSpec::KINDS {
            let _ = m.job_duration.get_or_create(&labels(&[("kind", kind)]));
        }
        (m, r)
    }

    /// The endpoint serving `registry`, with the scrape copying the
    /// snapshot into the gauges.
    pub fn endpoint(&self, registry: Registry, readiness: Readiness) -> Endpoint {
        let mut ep = Endpoint::new(registry, readiness);
        let me = self.clone();
        ep.on_scrape(move || me.copy_snapshot());
        ep
    }

    pub fn set_snapshot(&self, s: Snapshot) {
        if let Ok(mut g) = self.snapshot.lock() {
            *g = s;
        }
    }

    pub fn observe_job(&self, kind: &str, secs: f64) {
        self.job_duration
            .get_or_create(&labels(&[("kind", kind)]))
            .observe(secs);
    }

    fn copy_snapshot(&self) {
        let Ok(s) = self.snapshot.lock().map(|g| g.clone()) else {
            return;
        };
        // Cleared first: machines, jobs and components that are gone drop
        // out of the scrape.
        for f in [&self.machines, &self.jobs, &self.component_up, &self.alerts] {
            f.clear();
        }
        self.rpo.clear();
        self.rpo_threshold.clear();
        for (state, n) in &s.machines {
            self.machines
                .get_or_create(&labels(&[("state", state)]))
                .set(*n);
        }
        for (machine, site, rpo, threshold) in &s.rpo {
            let l = labels(&[("machine", machine), ("site", site)]);
            if let Some(v) = rpo {
                self.rpo.get_or_create(&l).set(*v);
            }
            self.rpo_threshold.get_or_create(&l).set(*threshold);
        }
        for ((kind, state), n) in &s.jobs {
            self.jobs
                .get_or_create(&labels(&[("kind", kind), ("state", state)]))
                .set(*n);
        }
        for (role, id, site, up) in &s.components {
            self.component_up
                .get_or_create(&labels(&[
                    ("role", role),
                    ("component", id),
                    ("site", site),
                ]))
                .set(i64::from(*up));
        }
        for (kind, n) in &s.alerts {
            self.alerts
                .get_or_create(&labels(&[("kind", kind)]))
                .set(*n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Job, JobState};

    #[test]
    fn a_scrape_shows_the_snapshot() {
        let (m, r) = CsMetrics::new();
        let ep = m.endpoint(r, Readiness::new());
        let mut s = Snapshot::default();
        s.machines.insert("Protected", 2);
        s.rpo.push(("m1".into(), "onprem".into(), Some(3.5), 60.0));
        s.rpo.push(("m2".into(), "onprem".into(), None, 2.0));
        s.jobs
            .insert(("protect".into(), JobState::Succeeded.as_str()), 4);
        s.components
            .push(("ps".into(), "ps1".into(), "onprem".into(), true));
        s.alerts.insert("rpo-exceeded", 1);
        m.set_snapshot(s);
        m.observe_job("protect", 12.0);
        let text = ep.render();
        for want in [
            "rebound_cs_machines{state=\"Protected\"} 2",
            "rebound_cs_rpo_seconds{machine=\"m1\",site=\"onprem\"} 3.5",
            "rebound_cs_rpo_threshold_seconds{machine=\"m2\",site=\"onprem\"} 2.0",
            "rebound_cs_jobs{kind=\"protect\",state=\"succeeded\"} 4",
            "rebound_cs_component_up{role=\"ps\",component=\"ps1\",site=\"onprem\"} 1",
            "rebound_cs_alerts{kind=\"rpo-exceeded\"} 1",
            "rebound_cs_job_duration_seconds_count{kind=\"protect\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        assert!(
            !text.contains("rebound_cs_rpo_seconds{machine=\"m2\""),
            "{text}"
        );
        // A machine that is gone drops out.
        m.set_snapshot(Snapshot::default());
        assert!(!ep.render().contains("m1"));
    }

    #[tokio::test]
    async fn jobs_are_counted_by_kind_and_state_and_timed_once_finished() {
        use crate::store::SqliteStore;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("cs.db")).await.unwrap();
        let job = |id: &str, state: JobState, ended_ms: u64| Job {
            id: id.into(),
            kind: "protect".into(),
            machines: vec!["m1".into()],
            plan: String::new(),
            spec: "{}".into(),
            data: "{}".into(),
            state,
            progress: 0,
            status: String::new(),
            error: String::new(),
            warnings: Vec::new(),
            created_ms: 1_000,
            started_ms: 2_000,
            ended_ms,
            steps: Vec::new(),
        };
        store
            .put_job(&job("old", JobState::Failed, 3_000))
            .await
            .unwrap();
        store
            .put_job(&job("run", JobState::Running, 0))
            .await
            .unwrap();
        let mut tally = JobTally::default();
        let mut timed = Vec::new();
        tally
            .refresh(&store, |k, s| timed.push((k.to_string(), s)))
            .await
            .unwrap();
        assert!(
            timed.is_empty(),
            "jobs finished before the start are not timed"
        );
        let count = |t: &JobTally, state: &'static str| {
            t.counts().get(&("protect".to_string(), state)).copied()
        };
        assert_eq!(count(&tally, "failed"), Some(1));
        assert_eq!(count(&tally, "running"), Some(1));
        store
            .put_job(&job("run", JobState::Succeeded, 12_000))
            .await
            .unwrap();
        for _ in 0..2 {
            tally
                .refresh(&store, |k, s| timed.push((k.to_string(), s)))
                .await
                .unwrap();
        }
        assert_eq!(timed, vec![("protect".to_string(), 10.0)], "timed once");
        assert_eq!(count(&tally, "running"), None);
        assert_eq!(count(&tally, "succeeded"), Some(1));
        store.close().await;
    }
}
