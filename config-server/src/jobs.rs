//! The job engine (DESIGN.md §8): every lifecycle transition runs as a job
//! with steps, progress, a status line, warnings and an error, persisted in
//! the store after every change so `rebound jobs` can show it and a CS
//! restart does not lose it.
//!
//! The engine knows nothing about DR: steps are opaque JSON actions that a
//! [`StepRunner`] (the lifecycle code) executes. On start the engine resumes
//! every job that was pending or running: steps already done are skipped; a
//! step that was running when the CS stopped runs again only if the runner
//! says it is safe to repeat ([`StepRunner::resumable`]), otherwise the job
//! fails cleanly with that reason recorded.

use crate::error::CsError;
use crate::store::{now_ms, Job, JobState, JobStep, StepState, Store};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::broadcast;
use tracing::{error, info, warn};

/// What running one step returns (boxed so [`StepRunner`] is object safe).
pub type StepFut<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), CsError>> + Send + 'a>>;

/// Executes steps. Implemented by the lifecycle code.
pub trait StepRunner: Send + Sync {
    /// Runs one step (`action` is what [`JobEngine::create`] was given).
    fn run_step<'a>(&'a self, ctx: &'a mut JobCtx, action: &'a str) -> StepFut<'a>;
    /// True when a step that was running when the CS stopped may run again.
    fn resumable(&self, action: &str) -> bool;
}

/// A step of a new job: its name for humans and its action for the runner.
#[derive(Debug, Clone)]
pub struct NewStep {
    pub name: String,
    pub action: String,
}

/// What a running step sees of its job.
pub struct JobCtx {
    engine: Arc<JobEngine>,
    job: Job,
    step: usize,
}

impl JobCtx {
    pub fn job_id(&self) -> &str {
        &self.job.id
    }
    pub fn job(&self) -> &Job {
        &self.job
    }
    /// A value a previous step stored with [`JobCtx::set`].
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let data: serde_json::Value = serde_json::from_str(&self.job.data).ok()?;
        serde_json::from_value(data.get(key)?.clone()).ok()
    }
    /// Stores a value for later steps (persisted, so it survives a restart).
    pub async fn set<T: Serialize>(&mut self, key: &str, value: &T) -> Result<(), CsError> {
        let mut data: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&self.job.data).unwrap_or_default();
        let v = serde_json::to_value(value)
            .map_err(|e| CsError::Internal(format!("job data {key}: {e}")))?;
        data.insert(key.to_string(), v);
        self.job.data = serde_json::Value::Object(data).to_string();
        self.save().await
    }
    /// Sets the job's status line and the step's detail (only when changed).
    pub async fn status(&mut self, text: impl Into<String>) -> Result<(), CsError> {
        let text = text.into();
        if self.job.status == text {
            return Ok(());
        }
        info!(job = %self.job.id, "{text}");
        self.job.status = text.clone();
        self.job.steps[self.step].detail = text;
        self.save().await
    }
    /// Adds a warning to the job (shown by the CLI).
    pub async fn warn(&mut self, text: impl Into<String>) -> Result<(), CsError> {
        let text = text.into();
        if text.is_empty() || self.job.warnings.contains(&text) {
            return Ok(());
        }
        warn!(job = %self.job.id, "{text}");
        self.job.warnings.push(text);
        self.save().await
    }
    async fn save(&self) -> Result<(), CsError> {
        self.engine.save(&self.job).await
    }
}

/// Runs and persists jobs.
pub struct JobEngine {
    store: Arc<dyn Store>,
    runner: OnceLock<Arc<dyn StepRunner>>,
    updates: broadcast::Sender<Job>,
    /// The jobs running here, with their tasks (to abort them all when
    /// the CS must stop writing at once).
    running: Mutex<HashMap<String, tokio::task::AbortHandle>>,
}

impl JobEngine {
    pub fn new(store: Arc<dyn Store>) -> Arc<JobEngine> {
        Arc::new(JobEngine {
            store,
            runner: OnceLock::new(),
            updates: broadcast::channel(256).0,
            running: Mutex::new(HashMap::new()),
        })
    }

    /// Sets the step runner (once; the runner usually holds the engine too).
    pub fn set_runner(&self, runner: Arc<dyn StepRunner>) {
        let _ = self.runner.set(runner);
    }

    /// Every change to every job, as it is saved.
    pub fn subscribe(&self) -> broadcast::Receiver<Job> {
        self.updates.subscribe()
    }

    async fn save(&self, job: &Job) -> Result<(), CsError> {
        self.store.put_job(job).await?;
        let _ = self.updates.send(job.clone());
        Ok(())
    }

    /// Persists a new pending job. Start it with [`JobEngine::start`].
    pub async fn create(
        &self,
        kind: &str,
        machines: Vec<String>,
        plan: &str,
        spec: String,
        steps: Vec<NewStep>,
    ) -> Result<Job, CsError> {
        let now = now_ms();
        let job = Job {
            id: new_job_id(kind, now),
            kind: kind.to_string(),
            machines,
            plan: plan.to_string(),
            spec,
            data: "{}".into(),
            state: JobState::Pending,
            progress: 0,
            status: "queued".into(),
            error: String::new(),
            warnings: Vec::new(),
            created_ms: now,
            started_ms: 0,
            ended_ms: 0,
            steps: steps
                .into_iter()
                .enumerate()
                .map(|(i, s)| JobStep {
                    index: i as u32,
                    name: s.name,
                    action: s.action,
                    state: StepState::Pending,
                    detail: String::new(),
                    error: String::new(),
                    started_ms: 0,
                    ended_ms: 0,
                })
                .collect(),
        };
        self.save(&job).await?;
        Ok(job)
    }

    /// Runs a job in the background (no-op when it already runs here).
    pub fn start(self: &Arc<Self>, id: &str) {
        // Held while spawning: the task removes itself under this lock, so
        // it always finds its entry.
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.contains_key(id) {
            return;
        }
        let engine = self.clone();
        let job = id.to_string();
        let task = tokio::spawn(async move {
            if let Err(e) = engine.clone().run(&job).await {
                error!(job = %job, error = %e, "job could not be recorded");
            }
            engine
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&job);
        });
        running.insert(id.to_string(), task.abort_handle());
    }

    /// Aborts every job task running here, mid-step: for a CS that lost the
    /// store lease, whose jobs the new active CS resumes. Returns how many.
    pub fn abort_all(&self) -> usize {
        let running = std::mem::take(&mut *self.running.lock().unwrap_or_else(|p| p.into_inner()));
        for task in running.values() {
            task.abort();
        }
        running.len()
    }

    /// Resumes (or fails cleanly) every job left pending or running by a
    /// previous CS process. Returns how many were picked up.
    pub async fn resume_all(self: &Arc<Self>) -> Result<usize, CsError> {
        let jobs = self
            .store
            .list_jobs(&crate::store::JobFilter::all_active())
            .await?;
        for j in &jobs {
            info!(job = %j.id, kind = %j.kind, "resuming job after a CS restart");
            self.start(&j.id);
        }
        Ok(jobs.len())
    }

    /// Waits until the job is finished and returns it.
    pub async fn wait(&self, id: &str) -> Result<Job, CsError> {
        let mut rx = self.subscribe();
        loop {
            let job = self
                .store
                .get_job(id)
                .await?
                .ok_or_else(|| CsError::NotFound(format!("no job {id}")))?;
            if job.state.finished() {
                return Ok(job);
            }
            loop {
                match rx.recv().await {
                    Ok(j) if j.id == id && j.state.finished() => return Ok(j),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(CsError::Internal("job engine stopped".into()))
                    }
                }
            }
        }
    }

    async fn run(self: Arc<Self>, id: &str) -> Result<(), CsError> {
        let Some(runner) = self.runner.get().cloned() else {
            return Err(CsError::Internal("job engine has no step runner".into()));
        };
        let Some(mut job) = self.store.get_job(id).await? else {
            return Err(CsError::NotFound(format!("no job {id}")));
        };
        if job.state.finished() {
            return Ok(());
        }
        if job.state == JobState::Pending {
            job.started_ms = now_ms();
        }
        job.state = JobState::Running;
        self.save(&job).await?;
        let total = job.steps.len().max(1) as u32;
        let mut ctx = JobCtx {
            engine: self.clone(),
            job,
            step: 0,
        };
        for i in 0..ctx.job.steps.len() {
            let step = ctx.job.steps[i].clone();
            match step.state {
                StepState::Done | StepState::Skipped => continue,
                StepState::Failed => {
                    return self
                        .fail(
                            &mut ctx,
                            i,
                            format!("step '{}' had failed: {}", step.name, step.error),
                        )
                        .await;
                }
                StepState::Running if !runner.resumable(&step.action) => {
                    let msg = format!(
                        "the configuration server stopped while step '{}' was running, and that \
                         step is not safe to repeat; check its effect by hand (`rebound machines`), \
                         then re-run the {} if needed",
                        step.name, ctx.job.kind
                    );
                    return self.fail(&mut ctx, i, msg).await;
                }
                StepState::Running | StepState::Pending => {}
            }
            ctx.step = i;
            ctx.job.steps[i].state = StepState::Running;
            if ctx.job.steps[i].started_ms == 0 {
                ctx.job.steps[i].started_ms = now_ms();
            }
            ctx.job.status = step.name.clone();
            self.save(&ctx.job).await?;
            let result = runner.run_step(&mut ctx, &step.action).await;
            match result {
                Ok(()) => {
                    let s = &mut ctx.job.steps[i];
                    s.state = StepState::Done;
                    s.ended_ms = now_ms();
                    ctx.job.progress = (i as u32 + 1) * 100 / total;
                    self.save(&ctx.job).await?;
                }
                Err(e) => {
                    let msg = e.to_string();
                    return self.fail(&mut ctx, i, msg).await;
                }
            }
        }
        ctx.job.state = JobState::Succeeded;
        ctx.job.progress = 100;
        ctx.job.status = "done".into();
        ctx.job.ended_ms = now_ms();
        info!(job = %ctx.job.id, kind = %ctx.job.kind, "job succeeded");
        self.save(&ctx.job).await
    }

    async fn fail(&self, ctx: &mut JobCtx, step: usize, msg: String) -> Result<(), CsError> {
        let now = now_ms();
        let s = &mut ctx.job.steps[step];
        s.state = StepState::Failed;
        s.error = msg.clone();
        s.ended_ms = now;
        let name = s.name.clone();
        ctx.job.state = JobState::Failed;
        ctx.job.error = format!("{name}: {msg}");
        ctx.job.status = format!("failed at {name}");
        ctx.job.ended_ms = now;
        error!(job = %ctx.job.id, kind = %ctx.job.kind, error = %ctx.job.error, "job failed");
        self.save(&ctx.job).await
    }
}

/// `<kind>-<ms>-<4 hex>`: sortable and unique enough for one CS.
fn new_job_id(kind: &str, now: u64) -> String {
    use rand::RngCore;
    let r = rand::rng().next_u32() & 0xffff;
    format!("{kind}-{now}-{r:04x}")
}

#[cfg(test)]
mod tests;
