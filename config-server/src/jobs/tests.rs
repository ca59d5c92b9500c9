//! The job engine with a scripted runner: steps run in order and are
//! persisted; a failing step fails the job with its error; after a "restart"
//! (a new engine over the same database) an interrupted resumable step runs
//! again, and an interrupted unsafe one fails the job cleanly.

use super::*;
use crate::store::SqliteStore;
use std::time::Duration;

/// Actions: "ok", "fail", "unsafe", "data" (stores and reads job data),
/// "hang" (never ends).
struct Script {
    ran: Mutex<Vec<String>>,
}

impl StepRunner for Script {
    fn run_step<'a>(&'a self, ctx: &'a mut JobCtx, action: &'a str) -> StepFut<'a> {
        Box::pin(async move {
            self.ran.lock().unwrap().push(action.to_string());
            match action {
                "fail" => Err(CsError::Unavailable("mt:mt1 did not answer".into())),
                "data" => {
                    ctx.set("x", &41u32).await?;
                    ctx.status("working").await?;
                    ctx.warn("careful").await?;
                    assert_eq!(ctx.get::<u32>("x"), Some(41));
                    Ok(())
                }
                "hang" => std::future::pending().await,
                _ => Ok(()),
            }
        })
    }
    fn resumable(&self, action: &str) -> bool {
        action != "unsafe"
    }
}

/// A "test" job on m1 running `actions`.
async fn create(e: &JobEngine, actions: &[&str]) -> Job {
    e.create("test", vec!["m1".into()], "", "{}".into(), steps(actions))
        .await
        .unwrap()
}

fn steps(actions: &[&str]) -> Vec<NewStep> {
    actions
        .iter()
        .enumerate()
        .map(|(i, a)| NewStep {
            name: format!("step {i} ({a})"),
            action: a.to_string(),
        })
        .collect()
}

async fn engine(path: &std::path::Path) -> (Arc<JobEngine>, Arc<Script>, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(path).await.unwrap());
    let e = JobEngine::new(store.clone());
    let s = Arc::new(Script {
        ran: Mutex::new(Vec::new()),
    });
    e.set_runner(s.clone());
    (e, s, store)
}

async fn wait(e: &JobEngine, id: &str) -> Job {
    tokio::time::timeout(Duration::from_secs(10), e.wait(id))
        .await
        .expect("job finished in time")
        .unwrap()
}

#[tokio::test]
async fn steps_run_in_order_and_failures_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (e, script, store) = engine(&dir.path().join("cs.db")).await;
    let mut updates = e.subscribe();
    let j = create(&e, &["ok", "data", "ok"]).await;
    assert_eq!(j.state, JobState::Pending);
    e.start(&j.id);
    let done = wait(&e, &j.id).await;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.progress, 100);
    assert_eq!(done.warnings, vec!["careful"]);
    assert!(done
        .steps
        .iter()
        .all(|s| s.state == StepState::Done && s.ended_ms >= s.started_ms));
    assert_eq!(done.steps[1].detail, "working");
    assert_eq!(*script.ran.lock().unwrap(), vec!["ok", "data", "ok"]);
    assert!(updates.try_recv().is_ok(), "changes are broadcast");
    assert_eq!(store.get_job(&j.id).await.unwrap().unwrap(), done);

    let j = create(&e, &["ok", "fail", "ok"]).await;
    e.start(&j.id);
    let failed = wait(&e, &j.id).await;
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(failed.steps[1].state, StepState::Failed);
    assert_eq!(failed.steps[2].state, StepState::Pending);
    assert!(
        failed.error.contains("step 1 (fail)") && failed.error.contains("mt:mt1"),
        "{}",
        failed.error
    );
    assert!(failed.ended_ms > 0);
}

/// A job of `names` as a CS that died while running its second step left it.
async fn died_in_second_step(e: &JobEngine, store: &dyn Store, names: &[&str]) -> Job {
    let mut j = e
        .create("test", vec![], "", "{}".into(), steps(names))
        .await
        .unwrap();
    j.state = JobState::Running;
    j.steps[0].state = StepState::Done;
    j.steps[1].state = StepState::Running;
    store.put_job(&j).await.unwrap();
    j
}

#[tokio::test]
async fn restart_resumes_or_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cs.db");
    let (resumable, unsafe_id) = {
        let (e, _, store) = engine(&path).await;
        // Jobs as a CS that died mid-step left them.
        let a = died_in_second_step(&e, store.as_ref(), &["ok", "ok", "ok"]).await;
        let b = died_in_second_step(&e, store.as_ref(), &["ok", "unsafe", "ok"]).await;
        (a.id, b.id)
    };
    let (e, script, _) = engine(&path).await;
    assert_eq!(e.resume_all().await.unwrap(), 2);
    let a = wait(&e, &resumable).await;
    assert_eq!(a.state, JobState::Succeeded);
    let b = wait(&e, &unsafe_id).await;
    assert_eq!(b.state, JobState::Failed);
    assert!(
        b.error.contains("stopped while step 'step 1 (unsafe)'"),
        "{}",
        b.error
    );
    // The done step was not repeated; the unsafe step never ran again.
    let ran = script.ran.lock().unwrap().clone();
    assert_eq!(ran, vec!["ok", "ok"], "resumed job ran steps 1 and 2 only");
}

#[tokio::test]
async fn abort_all_stops_the_running_jobs_mid_step() {
    let dir = tempfile::tempdir().unwrap();
    let (e, s, store) = engine(&dir.path().join("cs.db")).await;
    let job = create(&e, &["hang", "ok"]).await;
    e.start(&job.id);
    // Running its first step.
    tokio::time::timeout(Duration::from_secs(10), async {
        while s.ran.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the job did not start");
    assert_eq!(e.abort_all(), 1);
    assert_eq!(e.abort_all(), 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // It stays running in the store (the next CS resumes it), and the
    // second step never ran.
    let stored = store.get_job(&job.id).await.unwrap().unwrap();
    assert_eq!(stored.state, JobState::Running);
    assert_eq!(*s.ran.lock().unwrap(), vec!["hang"]);
    // It can be started again here.
    e.start(&job.id);
    assert_eq!(e.abort_all(), 1);
}
