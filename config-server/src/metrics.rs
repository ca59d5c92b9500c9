//! The CS's `rebound_cs_*` metrics (docs/METRICS.md): machines by state,
//! RPO and its threshold per machine, jobs by kind and state and how long
//! finished ones ran, components up, open alerts. The store is async and a
//! scrape must not wait on it, so the alert evaluator (which reads the
//! fleet every second anyway) leaves a [`Snapshot`] here and the scrape
//! copies it into the gauges.

use crate::alerts::evaluate::{Kind, Open};
use crate::alerts::readings::Rules;
use crate::alerts::view::View;
use crate::store::{Job, JobFilter, Policy, ReplState, Store, StoreError, RPO_ALERT_OFF};
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
    /// (machine, site, RPO seconds when known, threshold seconds unless
    /// the machine's RPO alert is off).
    pub rpo: Vec<(String, String, Option<f64>, Option<f64>)>,
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
                rpo_threshold_secs(rules, &m.policy),
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

/// The RPO alert threshold of a machine under `policy`, in seconds; `None`
/// while its RPO alert is off (`rebound_cs_rpo_threshold_seconds` is then
/// absent).
pub fn rpo_threshold_secs(rules: &Rules, policy: &Policy) -> Option<f64> {
    (policy.rpo_alert_ms != RPO_ALERT_OFF)
        .then(|| rules.rpo_threshold_ms(policy.rpo_alert_ms) as f64 / 1000.0)
}

/// Jobs by kind and state: pending and running ones read every round,
/// finished ones counted once each (from the most recent at start, then
/// as they finish) and their run time observed into the histogram.
#[derive(Debug, Default)]
pub struct JobTally {
    active: BTreeMap<(String, &'static str), i64>,
    /// The ids of the jobs pending or running at the last round: one that
    /// is no longer active has finished, however many jobs came after it.
    active_ids: HashSet<String>,
    finished: BTreeMap<(String, &'static str), i64>,
    /// The finished jobs of the last recent window already counted (only
    /// that window: a job older than it never comes back into it).
    seen: HashSet<String>,
    /// Whether the first read (the jobs finished before this CS) is done.
    started: bool,
}

/// How many finished jobs the count starts from (the most recent, not the
/// whole history).
const JOBS_AT_START: u32 = 1_000;
/// How many recent jobs each round (every second) looks at for jobs that
/// were created and finished between two rounds: more than finish in a
/// second.
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
        let active = store.list_job_heads(&JobFilter::all_active()).await?;
        self.active.clear();
        let mut active_ids = HashSet::with_capacity(active.len());
        for j in active {
            *self
                .active
                .entry((j.kind.clone(), j.state.as_str()))
                .or_default() += 1;
            active_ids.insert(j.id);
        }
        let gone: Vec<String> = self.active_ids.difference(&active_ids).cloned().collect();
        self.active_ids = active_ids;
        let mut counted = std::mem::take(&mut self.seen);
        for id in gone {
            if counted.contains(&id) {
                continue;
            }
            // Deleted jobs, or ones put back to pending, are not counted.
            if let Some(j) = store.get_job(&id).await? {
                if j.state.finished() {
                    self.count_finished(&j, &mut observe);
                    counted.insert(id);
                }
            }
        }
        let recent = JobFilter {
            limit: if first { JOBS_AT_START } else { JOBS_PER_ROUND },
            ..JobFilter::default()
        };
        for j in store.list_job_heads(&recent).await? {
            if !j.state.finished() {
                continue;
            }
            if !counted.contains(&j.id) {
                if first {
                    self.count_finished(&j, &mut |_, _| {});
                } else {
                    self.count_finished(&j, &mut observe);
                }
            }
            self.seen.insert(j.id);
        }
        self.started = true;
        Ok(())
    }

    fn count_finished(&mut self, j: &Job, observe: &mut impl FnMut(&str, f64)) {
        *self
            .finished
            .entry((j.kind.clone(), j.state.as_str()))
            .or_default() += 1;
        observe(&j.kind, run_secs(j));
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
    evaluated: FloatGauge,
    active: Gauge,
    snapshot: Arc<Mutex<Snapshot>>,
    /// The label sets each family shows, held across a whole copy so two
    /// scrapes at once do not interleave their copies.
    shown: Arc<Mutex<Shown>>,
}

/// The label sets in the families the snapshot fills, so a copy removes
/// only the ones that are gone: a series is never missing from a scrape
/// while it still exists.
#[derive(Default)]
struct Shown {
    machines: HashSet<Labels>,
    rpo: HashSet<Labels>,
    rpo_threshold: HashSet<Labels>,
    jobs: HashSet<Labels>,
    component_up: HashSet<Labels>,
    alerts: HashSet<Labels>,
}

/// Sets `values` in `family` and removes the label sets of `shown` that
/// are not among them; `shown` becomes the label sets of `values`.
fn show<M, C, V>(
    family: &Family<Labels, M, C>,
    shown: &mut HashSet<Labels>,
    values: Vec<(Labels, V)>,
    set: impl Fn(&M, V),
) where
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    let now: HashSet<Labels> = values.iter().map(|(l, _)| l.clone()).collect();
    for gone in shown.difference(&now) {
        family.remove(gone);
    }
    for (l, v) in values {
        set(&family.get_or_create(&l), v);
    }
    *shown = now;
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
            evaluated: FloatGauge::default(),
            active: Gauge::default(),
            snapshot: Arc::default(),
            shown: Arc::default(),
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
            "the machine's RPO alert threshold (absent while its RPO alert is off)",
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
        r.register(
            "rebound_cs_alerts_evaluated_timestamp_seconds",
            "when the alert evaluator last finished a round (Unix time; 0 before the first)",
            m.evaluated.clone(),
        );
        r.register(
            "rebound_cs_active",
            "1 while this CS serves (on PostgreSQL: holds the store lease), 0 while it waits \
             as a standby",
            m.active.clone(),
        );
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

    /// The gauges of a round that succeeded; also marks the round as
    /// evaluated now.
    pub fn set_snapshot(&self, s: Snapshot) {
        if let Ok(mut g) = self.snapshot.lock() {
            *g = s;
        }
        self.set_evaluated(rebound_common::time::now_ms());
    }

    /// Marks an alert round that succeeded at `time_ms`
    /// (`rebound_cs_alerts_evaluated_timestamp_seconds`): a rule fires when
    /// it stops moving.
    pub fn set_evaluated(&self, time_ms: u64) {
        self.evaluated.set(time_ms as f64 / 1000.0);
    }

    /// Whether this CS serves (`rebound_cs_active`): 0 while it waits for
    /// the store lease as a standby.
    pub fn set_active(&self, active: bool) {
        self.active.set(i64::from(active));
    }

    pub fn observe_job(&self, kind: &str, secs: f64) {
        self.job_duration
            .get_or_create(&labels(&[("kind", kind)]))
            .observe(secs);
    }

    fn copy_snapshot(&self) {
        let Ok(mut shown) = self.shown.lock() else {
            return;
        };
        let Ok(s) = self.snapshot.lock().map(|g| g.clone()) else {
            return;
        };
        let shown = &mut *shown;
        let set_i = |g: &Gauge, v: i64| {
            g.set(v);
        };
        let set_f = |g: &FloatGauge, v: f64| {
            g.set(v);
        };
        let machine = |m: &str, site: &str| labels(&[("machine", m), ("site", site)]);
        show(
            &self.machines,
            &mut shown.machines,
            s.machines
                .iter()
                .map(|(state, n)| (labels(&[("state", state)]), *n))
                .collect(),
            set_i,
        );
        show(
            &self.rpo,
            &mut shown.rpo,
            s.rpo
                .iter()
                .filter_map(|(m, site, rpo, _)| rpo.map(|v| (machine(m, site), v)))
                .collect(),
            set_f,
        );
        show(
            &self.rpo_threshold,
            &mut shown.rpo_threshold,
            s.rpo
                .iter()
                .filter_map(|(m, site, _, t)| t.map(|v| (machine(m, site), v)))
                .collect(),
            set_f,
        );
        show(
            &self.jobs,
            &mut shown.jobs,
            s.jobs
                .iter()
                .map(|((kind, state), n)| (labels(&[("kind", kind), ("state", state)]), *n))
                .collect(),
            set_i,
        );
        show(
            &self.component_up,
            &mut shown.component_up,
            s.components
                .iter()
                .map(|(role, id, site, up)| {
                    let l = labels(&[("role", role), ("component", id), ("site", site)]);
                    (l, i64::from(*up))
                })
                .collect(),
            set_i,
        );
        show(
            &self.alerts,
            &mut shown.alerts,
            s.alerts
                .iter()
                .map(|(kind, n)| (labels(&[("kind", kind)]), *n))
                .collect(),
            set_i,
        );
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
        s.rpo
            .push(("m1".into(), "onprem".into(), Some(3.5), Some(60.0)));
        s.rpo.push(("m2".into(), "onprem".into(), None, Some(2.0)));
        s.rpo.push(("m3".into(), "onprem".into(), Some(1.0), None));
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
        assert!(
            !text.contains("rebound_cs_rpo_threshold_seconds{machine=\"m3\""),
            "an RPO alert that is off has no threshold: {text}"
        );
        let evaluated = text
            .lines()
            .find_map(|l| l.strip_prefix("rebound_cs_alerts_evaluated_timestamp_seconds "))
            .and_then(|v| v.parse::<f64>().ok());
        assert!(evaluated.is_some_and(|t| t > 1.0e9), "{text}");
        // A machine that is gone drops out.
        m.set_snapshot(Snapshot::default());
        assert!(!ep.render().contains("m1"));
    }

    /// A job of `kind` on m1, created at 1 s, started at 2 s.
    fn job(id: &str, kind: &str, state: JobState, ended_ms: u64) -> Job {
        Job {
            created_ms: 1_000,
            ended_ms,
            ..Job::test_of(id, kind, &["m1"], state, 2_000)
        }
    }

    /// One round of `tally`, the jobs it times added to `timed`.
    async fn refresh(tally: &mut JobTally, store: &dyn Store, timed: &mut Vec<(String, f64)>) {
        tally
            .refresh(store, |k, s| timed.push((k.to_string(), s)))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn jobs_are_counted_by_kind_and_state_and_timed_once_finished() {
        use crate::store::SqliteStore;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("cs.db")).await.unwrap();
        let job = |id: &str, state: JobState, ended_ms: u64| job(id, "protect", state, ended_ms);
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
        refresh(&mut tally, &store, &mut timed).await;
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
            refresh(&mut tally, &store, &mut timed).await;
        }
        assert_eq!(timed, vec![("protect".to_string(), 10.0)], "timed once");
        assert_eq!(count(&tally, "running"), None);
        assert_eq!(count(&tally, "succeeded"), Some(1));
        store.close().await;
    }

    #[tokio::test]
    async fn a_long_job_finishing_after_many_newer_ones_is_timed() {
        use crate::store::SqliteStore;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("cs.db")).await.unwrap();
        let mut tally = JobTally::default();
        let mut timed = Vec::new();
        store
            .put_job(&job("long", "failover", JobState::Running, 0))
            .await
            .unwrap();
        refresh(&mut tally, &store, &mut timed).await;
        for i in 0..(JOBS_PER_ROUND + 5) {
            let id = format!("verify-{i}");
            store
                .put_job(&job(&id, "verify", JobState::Succeeded, 3_000))
                .await
                .unwrap();
        }
        refresh(&mut tally, &store, &mut timed).await;
        assert_eq!(timed.len(), (JOBS_PER_ROUND) as usize, "the window's");
        timed.clear();
        store
            .put_job(&job("long", "failover", JobState::Succeeded, 7_202_000))
            .await
            .unwrap();
        for _ in 0..2 {
            refresh(&mut tally, &store, &mut timed).await;
        }
        assert_eq!(timed, vec![("failover".to_string(), 7_200.0)], "timed once");
        let counts = tally.counts();
        assert_eq!(counts.get(&("failover".to_string(), "succeeded")), Some(&1));
        assert_eq!(counts.get(&("failover".to_string(), "running")), None);
        assert!(tally.seen.len() <= JOBS_PER_ROUND as usize, "bounded");
        store.close().await;
    }
}
