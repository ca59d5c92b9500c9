//! The lifecycle against a fake bus that answers like agents, PSs and MTs:
//! the whole §1 loop (protect, failover, change-point, commit, reprotect
//! waiting for the agent, failback), and the refusals (wrong direction, no
//! recovery point naming the machines, agent that never registers, planned
//! failover with the source down).

use super::*;
use crate::bus::{BusError, ConnInfo, Reply, SendFut};
use crate::store::{now_ms, Component, Disk, Group, JobState, Point, PointSummary, SqliteStore};
use rebound_proto::control as pb;
use rebound_proto::control::command::Cmd;
use rebound_proto::control::command_result::Detail;
use rebound_proto::control::point_choice::Choice;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

/// Answers commands like the components would, updating the store the way
/// their status reports would.
struct FakeBus {
    store: Arc<dyn Store>,
    conns: Mutex<HashMap<ComponentKey, String>>,
    log: Mutex<Vec<(String, &'static str)>>,
    /// Every command answered, with its fields.
    cmds: Mutex<Vec<Cmd>>,
    /// Machines whose initial sync never cuts a point.
    no_points: Mutex<HashSet<String>>,
}

impl FakeBus {
    fn connect(&self, key: ComponentKey, site: &str) {
        self.conns.lock().unwrap().insert(key, site.to_string());
    }
    fn disconnect(&self, key: &ComponentKey) {
        self.conns.lock().unwrap().remove(key);
    }
    fn sent(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(to, what)| format!("{what}>{to}"))
            .collect()
    }
    fn clear(&self) {
        self.log.lock().unwrap().clear();
    }

    async fn summary(&self, replication_id: &str) -> PointSummary {
        let sum = self.store.get_point_summary(replication_id).await;
        sum.unwrap().expect("the replication has a point summary")
    }

    async fn answer(&self, to: &ComponentKey, cmd: Cmd) -> Reply {
        let point = |id: &str, kind: &str, seq: u64, group: &str| Point {
            id: id.into(),
            kind: kind.into(),
            time_ms: seq,
            seq,
            group: group.into(),
        };
        let detail = match cmd {
            Cmd::StartReplication(s) => {
                if !self.no_points.lock().unwrap().contains(&to.id) {
                    let gp = vec![
                        point("g@5", "crash", 5, "g@5"),
                        point("g@8", "app", 8, "g@8"),
                    ];
                    let sum = PointSummary {
                        applied_seq: 10,
                        count: 3,
                        latest: Some(point("p10", "crash", 10, "")),
                        latest_app: Some(point("g@8", "app", 8, "g@8")),
                        group_points: gp,
                        ..Default::default()
                    };
                    self.store
                        .put_point_summary(&s.replication_id, &sum)
                        .await
                        .unwrap();
                }
                None
            }
            Cmd::Drain(_) => {
                // The agent drained up to seq 20, and the MT soon applies it.
                let r = self
                    .store
                    .current_replication(&to.id)
                    .await
                    .unwrap()
                    .unwrap();
                let mut sum = self.summary(&r.id).await;
                sum.applied_seq = 20;
                sum.latest = Some(point("shutdown", "shutdown", 20, ""));
                self.store.put_point_summary(&r.id, &sum).await.unwrap();
                Some(Detail::Drained(pb::Drained {
                    durable_seq: 20,
                    shutdown_tag_seq: 20,
                }))
            }
            Cmd::Rollback(rb) => {
                let p = match rb.point.and_then(|p| p.choice) {
                    Some(Choice::Id(id)) => point(&id, "crash", 3, ""),
                    Some(Choice::GroupTag(t)) => point(&t, "crash", 8, &t),
                    Some(Choice::LatestApp(_)) => point("g@8", "app", 8, "g@8"),
                    _ => self.summary(&rb.replication_id).await.latest.unwrap(),
                };
                Some(Detail::RolledBack(pb::RolledBack {
                    point: Some(crate::convert::point_to_proto(&p)),
                    blocks_restored: 1,
                }))
            }
            Cmd::StartTestFailover(t) => Some(Detail::TestCopy(pb::TestCopy {
                point: Some(crate::convert::point_to_proto(&point(
                    "p10", "crash", 10, "",
                ))),
                exports: vec![format!("{}/disk0@test", t.replication_id)],
                nbd_address: "mt1:10809".into(),
            })),
            Cmd::PowerOff(_) => Some(Detail::PoweredOff(pb::PoweredOff { blocks_restored: 7 })),
            Cmd::Verify(v) => Some(Detail::Verified(pb::Verified {
                point_id: v.tag_id,
                point_seq: 11,
                chunk_size: 1 << 20,
                chunks_compared: 4,
                differing: vec![
                    pb::ChunkRef { disk: 0, offset: 0 },
                    pb::ChunkRef {
                        disk: 0,
                        offset: 3 << 20,
                    },
                ],
                repaired: v.repair,
            })),
            _ => None,
        };
        Reply {
            warning: String::new(),
            detail,
        }
    }
}

impl Bus for FakeBus {
    fn send(&self, to: ComponentKey, cmd: Cmd, timeout: Duration) -> SendFut<'_> {
        Box::pin(async move {
            let what = crate::bus::cmd_name(&cmd);
            if !self.conns.lock().unwrap().contains_key(&to) {
                tokio::time::sleep(timeout).await;
                return Err(BusError::Timeout {
                    to,
                    what,
                    after: timeout,
                    connected: false,
                });
            }
            self.log.lock().unwrap().push((to.to_string(), what));
            self.cmds.lock().unwrap().push(cmd.clone());
            Ok(self.answer(&to, cmd).await)
        })
    }
    fn connection(&self, to: &ComponentKey) -> Option<ConnInfo> {
        self.conns.lock().unwrap().get(to).map(|site| ConnInfo {
            conn_id: 1,
            instance: "i".into(),
            site: site.clone(),
            writable: true,
            last_seen: Instant::now(),
        })
    }
}

struct World {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    bus: Arc<FakeBus>,
    jobs: Arc<JobEngine>,
    lc: Arc<Lifecycle>,
}

async fn component(store: &dyn Store, role: Role, id: &str, site: &str, addr: &str) {
    let mut c = Component::new(role, id);
    c.site = site.into();
    if !addr.is_empty() {
        c.addresses = vec![addr.into()];
    }
    store.put_component(&c).await.unwrap();
}

async fn machine(w: &World, id: &str) {
    component(w.store.as_ref(), Role::Agent, id, "onprem", "").await;
    w.store
        .put_machine(&Machine {
            id: id.into(),
            site: "onprem".into(),
            disks: vec![Disk {
                index: 0,
                name: "disk0".into(),
                size: 1 << 20,
                path: String::new(),
            }],
            policy: Policy::default(),
            group: String::new(),
            created_ms: now_ms(),
        })
        .await
        .unwrap();
    w.bus.connect(ComponentKey::agent(id), "onprem");
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("cs.db")).await.unwrap());
    let bus = Arc::new(FakeBus {
        store: store.clone(),
        conns: Mutex::new(HashMap::new()),
        log: Mutex::new(Vec::new()),
        cmds: Mutex::new(Vec::new()),
        no_points: Mutex::new(HashSet::new()),
    });
    let jobs = JobEngine::new(store.clone());
    let settings = Settings {
        command_timeout: Duration::from_millis(300),
        drain_timeout: Duration::from_secs(2),
        initial_sync_timeout: Duration::from_millis(500),
        wait_agent: Duration::from_secs(5),
        poll: Duration::from_millis(10),
        keep_source_copy: true,
        hook_timeout: Duration::from_secs(5),
        hook_dir: dir.path().join("hooks"),
    };
    std::fs::create_dir(dir.path().join("hooks")).unwrap();
    crate::hooks::tests::install(&dir.path().join("hooks"), "pre-failover", "true");
    let lc = Lifecycle::new(store.clone(), bus.clone(), jobs.clone(), settings);
    let s = store.as_ref();
    component(s, Role::Ps, "ps1", "onprem", "127.0.0.1:9443").await;
    component(s, Role::Mt, "mt1", "azure", "localhost:9444").await;
    component(s, Role::Ps, "ps2", "azure", "127.0.0.1:19443").await;
    component(s, Role::Mt, "mt2", "onprem", "127.0.0.1:19444").await;
    for k in [ComponentKey::ps("ps1"), ComponentKey::ps("ps2")] {
        bus.connect(k, "x");
    }
    bus.connect(ComponentKey::mt("mt1"), "azure");
    bus.connect(ComponentKey::mt("mt2"), "onprem");
    let w = World {
        _dir: dir,
        store,
        bus,
        jobs,
        lc,
    };
    machine(&w, "m1").await;
    w
}

async fn finish(w: &World, job: Job) -> Job {
    tokio::time::timeout(Duration::from_secs(20), w.jobs.wait(&job.id))
        .await
        .expect("job finished in time")
        .unwrap()
}

async fn ok(w: &World, job: Result<Job, CsError>) -> Job {
    let j = finish(w, job.expect("request accepted")).await;
    assert_eq!(
        j.state,
        JobState::Succeeded,
        "{} failed: {}",
        j.kind,
        j.error
    );
    j
}

async fn state(w: &World, m: &str) -> (ReplState, Replication) {
    let r = w.store.current_replication(m).await.unwrap().unwrap();
    (r.state, r)
}

/// Asserts that job `j` carries a warning containing `text`.
fn warned(j: &Job, text: &str) {
    assert!(
        j.warnings.iter().any(|x| x.contains(text)),
        "no warning with {text:?}: {:?}",
        j.warnings
    );
}

fn one(m: &str) -> Targets {
    Targets {
        machines: vec![m.into()],
        plan: String::new(),
    }
}

/// Protects `m` onprem -> azure through ps1 and mt1, in consistency group
/// `group` (empty for none), and waits for the job to succeed.
async fn protected(w: &World, m: &str, group: &str) -> Job {
    ok(
        w,
        w.lc.protect(m, "azure", "ps1", "mt1", group, Policy::default())
            .await,
    )
    .await
}

/// Fails `targets` over onprem -> azure at `point` and waits for the job to
/// succeed.
async fn failed_over(w: &World, targets: &Targets, point: PointSpec, multi: bool) -> Job {
    ok(
        w,
        w.lc.failover(targets, "onprem", "azure", point, multi)
            .await,
    )
    .await
}

/// Adds machine m2, puts m1 and m2 in consistency group "g" and protects
/// both.
async fn two_in_group(w: &World) {
    machine(w, "m2").await;
    w.store
        .put_group(&Group {
            name: "g".into(),
            machines: vec!["m1".into(), "m2".into()],
            hold_ms: 100,
            interval_secs: 0,
            app: false,
        })
        .await
        .unwrap();
    for m in ["m1", "m2"] {
        protected(w, m, "g").await;
    }
}

/// Stores a component's status report, as its control stream would.
async fn put_status(w: &World, role: Role, id: &str, status: pb::status::Status) {
    let st = pb::Status {
        status: Some(status),
    };
    let bytes = prost::Message::encode_to_vec(&st);
    w.store
        .set_status(role, id, &bytes, now_ms())
        .await
        .unwrap();
}

/// Stores plan "p" with `groups` and names it as the failover's targets.
async fn plan(w: &World, groups: Vec<crate::store::PlanGroup>) -> Targets {
    w.store
        .put_plan(&Plan {
            name: "p".into(),
            groups,
            consistency_group: String::new(),
        })
        .await
        .unwrap();
    Targets {
        machines: vec![],
        plan: "p".into(),
    }
}

#[tokio::test]
async fn the_whole_loop() {
    let w = world().await;
    let lc = &w.lc;

    // Protect onprem -> azure.
    ok(
        &w,
        lc.protect("m1", "azure", "ps1", "", "", Policy::default())
            .await,
    )
    .await;
    let (st, r) = state(&w, "m1").await;
    assert_eq!(st, ReplState::Protected);
    assert_eq!(
        (
            r.id.as_str(),
            r.from_site.as_str(),
            r.to_site.as_str(),
            r.mt.as_str()
        ),
        ("m1", "onprem", "azure", "mt1")
    );
    assert_eq!(
        w.bus.sent(),
        vec![
            "add-replication>ps:ps1",
            "prepare-replication>mt:mt1",
            "start-replication>agent:m1"
        ]
    );

    // Wrong direction is refused at once, naming the right one.
    let e = lc
        .failover(&one("m1"), "azure", "onprem", PointSpec::Latest, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("--from onprem --to azure"), "{e}");
    // Commit before failover is refused by the state machine.
    let e = lc.commit(&one("m1"), None).await.unwrap_err().to_string();
    assert!(
        e.contains("m1") && e.contains("Protected") && e.contains("fail it over"),
        "{e}"
    );

    // Planned failover at latest: fence, drain, catch up, roll back, hand over.
    w.bus.clear();
    failed_over(&w, &one("m1"), PointSpec::Latest, false).await;
    assert_eq!(
        w.bus.sent(),
        vec![
            "fence>agent:m1",
            "drain>agent:m1",
            "rollback>mt:mt1",
            "hand-over>mt:mt1"
        ]
    );
    let (st, r) = state(&w, "m1").await;
    assert_eq!(st, ReplState::FailedOver);
    assert_eq!(
        r.failover_point.unwrap().id,
        "shutdown",
        "latest after drain = the shutdown point"
    );
    assert_eq!(
        w.store.get_machine("m1").await.unwrap().unwrap().site,
        "azure"
    );

    // Change the point before commit, then change it back: the machine is
    // powered off (its writes undone) before the rollback is undone.
    w.bus.clear();
    ok(&w, lc.change_point("m1", PointSpec::Id("p3".into())).await).await;
    assert_eq!(
        w.bus.sent(),
        vec![
            "power-off>mt:mt1",
            "restore-pre-images>mt:mt1",
            "rollback>mt:mt1",
            "hand-over>mt:mt1"
        ]
    );
    assert_eq!(state(&w, "m1").await.1.failover_point.unwrap().id, "p3");
    ok(&w, lc.change_point("m1", PointSpec::Latest).await).await;
    assert_eq!(
        state(&w, "m1").await.1.failover_point.unwrap().id,
        "shutdown"
    );

    // The source agent went away with the hand-over; commit.
    w.bus.disconnect(&ComponentKey::agent("m1"));
    w.bus.clear();
    ok(&w, lc.commit(&one("m1"), None).await).await;
    assert_eq!(
        w.bus.sent(),
        vec!["end-replication>mt:mt1", "remove-replication>ps:ps1"]
    );
    assert_eq!(state(&w, "m1").await.0, ReplState::Committed);

    // Reprotect azure -> onprem: waits for the agent at azure.
    let job = lc
        .reprotect(&one("m1"), "ps2", "", Some(Duration::from_secs(10)), None)
        .await
        .unwrap();
    let t0 = Instant::now();
    loop {
        let j = w.store.get_job(&job.id).await.unwrap().unwrap();
        if j.status.contains("waiting for agent on m1 to register") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "status: {}",
            j.status
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(state(&w, "m1").await.0, ReplState::WaitingForAgent);
    // An agent at the old site does not count.
    w.bus.connect(ComponentKey::agent("m1"), "onprem");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(state(&w, "m1").await.0, ReplState::WaitingForAgent);
    w.bus.connect(ComponentKey::agent("m1"), "azure");
    let j = finish(&w, job).await;
    assert_eq!(j.state, JobState::Succeeded, "{}", j.error);
    let (st, r) = state(&w, "m1").await;
    assert_eq!(st, ReplState::Protected);
    assert_eq!(
        (r.id.as_str(), r.from_site.as_str(), r.to_site.as_str()),
        ("m1-2", "azure", "onprem")
    );
    assert_eq!(
        (r.ps.as_str(), r.mt.as_str(), r.previous.as_str()),
        ("ps2", "mt2", "m1")
    );

    // Failback azure -> onprem, commit, reprotect onprem -> azure again.
    ok(
        &w,
        lc.failover(&one("m1"), "azure", "onprem", PointSpec::Latest, false)
            .await,
    )
    .await;
    assert_eq!(
        w.store.get_machine("m1").await.unwrap().unwrap().site,
        "onprem"
    );
    ok(&w, lc.commit(&one("m1"), None).await).await;
    w.bus.connect(ComponentKey::agent("m1"), "onprem");
    ok(&w, lc.reprotect(&one("m1"), "ps1", "mt1", None, None).await).await;
    let (st, r) = state(&w, "m1").await;
    assert_eq!(
        (st, r.id.as_str(), r.to_site.as_str()),
        (ReplState::Protected, "m1-3", "azure")
    );
}

#[tokio::test]
async fn failover_needs_a_point_on_every_machine_and_names_those_without() {
    let w = world().await;
    for m in ["m2", "m3"] {
        machine(&w, m).await;
        w.bus.no_points.lock().unwrap().insert(m.into());
    }
    for m in ["m1", "m2", "m3"] {
        let j = finish(
            &w,
            w.lc.protect(m, "azure", "ps1", "mt1", "", Policy::default())
                .await
                .unwrap(),
        )
        .await;
        if m == "m1" {
            assert_eq!(j.state, JobState::Succeeded);
        } else {
            assert_eq!(j.state, JobState::Failed);
            assert!(
                j.error.contains(&format!("{m} has no recovery point")),
                "{}",
                j.error
            );
        }
    }
    let plan = plan(
        &w,
        vec![crate::store::PlanGroup {
            machines: vec!["m1".into(), "m2".into(), "m3".into()],
            ..Default::default()
        }],
    )
    .await;
    let e =
        w.lc.failover(&plan, "onprem", "azure", PointSpec::Latest, false)
            .await
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("no recovery point yet for m2, m3 in plan p"),
        "{e}"
    );
    let e =
        w.lc.failover(&one("m2"), "onprem", "azure", PointSpec::Latest, false)
            .await
            .unwrap_err()
            .to_string();
    assert!(e.contains("no recovery point yet for m2"), "{e}");
    // Nothing was started.
    assert_eq!(state(&w, "m1").await.0, ReplState::Protected);
}

#[tokio::test]
async fn reprotect_whose_agent_never_comes_times_out_with_what_to_check() {
    let w = world().await;
    protected(&w, "m1", "").await;
    failed_over(&w, &one("m1"), PointSpec::LatestProcessed, false).await;
    ok(&w, w.lc.commit(&one("m1"), Some(false)).await).await;
    w.bus.disconnect(&ComponentKey::agent("m1"));
    let j = finish(
        &w,
        w.lc.reprotect(&one("m1"), "ps2", "mt2", Some(Duration::from_secs(1)), None)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(j.state, JobState::Failed);
    assert!(
        j.error
            .contains("the agent on m1 did not register within 1s"),
        "{}",
        j.error
    );
    assert!(
        j.error.contains("rebound-agent") && j.error.contains("site = \"azure\""),
        "{}",
        j.error
    );
    assert_eq!(state(&w, "m1").await.0, ReplState::WaitingForAgent);
    // Re-running waits again and succeeds once the agent is there.
    w.bus.connect(ComponentKey::agent("m1"), "azure");
    ok(
        &w,
        w.lc.reprotect(&one("m1"), "ps2", "mt2", None, None).await,
    )
    .await;
    assert_eq!(state(&w, "m1").await.0, ReplState::Protected);
}

#[tokio::test]
async fn planned_failover_with_the_source_down_says_use_unplanned() {
    let w = world().await;
    protected(&w, "m1", "").await;
    w.bus.disconnect(&ComponentKey::agent("m1"));
    let j = finish(
        &w,
        w.lc.failover(&one("m1"), "onprem", "azure", PointSpec::Latest, false)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(j.state, JobState::Failed);
    assert!(
        j.error.contains("agent:m1") && j.error.contains("--unplanned"),
        "{}",
        j.error
    );
    assert_eq!(state(&w, "m1").await.0, ReplState::FailingOver);
    // Unplanned, with the PS gone too: no fence, no drain, a warning, done.
    w.bus.disconnect(&ComponentKey::ps("ps1"));
    w.bus.clear();
    let j = failed_over(&w, &one("m1"), PointSpec::Latest, true).await;
    assert_eq!(w.bus.sent(), vec!["rollback>mt:mt1", "hand-over>mt:mt1"]);
    warned(&j, "PS ps1 is offline");
    assert_eq!(state(&w, "m1").await.0, ReplState::FailedOver);
}

#[tokio::test]
async fn latest_multi_gives_every_plan_machine_the_same_group_point() {
    let w = world().await;
    two_in_group(&w).await;
    let plan = plan(
        &w,
        vec![
            crate::store::PlanGroup {
                machines: vec!["m1".into()],
                pre_hook: "pre-failover".into(),
                post_hook: String::new(),
            },
            crate::store::PlanGroup {
                machines: vec!["m2".into()],
                ..Default::default()
            },
        ],
    )
    .await;
    let j = failed_over(&w, &plan, PointSpec::LatestMulti, true).await;
    assert!(j
        .steps
        .iter()
        .any(|s| s.name == "run pre-hook of plan group 1"));
    for m in ["m1", "m2"] {
        let p = state(&w, m).await.1.failover_point.unwrap();
        assert_eq!(p.group, "g@8", "{m}");
    }
    // latest-app warns that later writes are lost.
    let w2 = world().await;
    protected(&w2, "m1", "").await;
    let j = failed_over(&w2, &one("m1"), PointSpec::LatestApp, true).await;
    assert!(
        j.warnings
            .iter()
            .any(|x| x.contains("app-consistent point g@8") && x.contains("not in")),
        "{:?}",
        j.warnings
    );
}

#[tokio::test]
async fn a_stored_plan_whose_hook_is_a_command_line_fails_at_the_hook_without_running_it() {
    let w = world().await;
    protected(&w, "m1", "").await;
    let marker = w._dir.path().join("ran");
    let plan = plan(
        &w,
        vec![crate::store::PlanGroup {
            machines: vec!["m1".into()],
            pre_hook: format!("touch {}", marker.display()),
            post_hook: String::new(),
        }],
    )
    .await;
    let j = finish(
        &w,
        w.lc.failover(&plan, "onprem", "azure", PointSpec::Latest, true)
            .await
            .expect("request accepted"),
    )
    .await;
    assert_eq!(j.state, JobState::Failed);
    assert!(
        j.error.contains("is not a hook name") && j.error.contains("never a command line"),
        "{}",
        j.error
    );
    assert!(!marker.exists(), "the command line ran");
}

#[tokio::test]
async fn busy_machines_and_bad_requests_are_refused() {
    let w = world().await;
    w.bus.no_points.lock().unwrap().insert("m1".into());
    let slow =
        w.lc.protect("m1", "azure", "ps1", "mt1", "", Policy::default())
            .await
            .unwrap();
    let e =
        w.lc.protect("m1", "azure", "ps1", "mt1", "", Policy::default())
            .await
            .unwrap_err()
            .to_string();
    assert!(e.contains("busy with job") && e.contains(&slow.id), "{e}");
    finish(&w, slow).await;
    // (machine, site, PS, MT) → what the refusal names.
    let refused = [
        (("m9", "azure", "ps1", "mt1"), "machine m9 is unknown"),
        (("m1", "onprem", "ps1", "mt1"), "runs at site onprem"),
        (("m1", "azure", "ps2", "mt1"), "PS ps2 is at site \"azure\""),
        (
            ("m1", "azure", "ps1", "mt2"),
            "MT mt2 is at site \"onprem\"",
        ),
    ];
    for ((machine, site, ps, mt), want) in refused {
        let e =
            w.lc.protect(machine, site, ps, mt, "", Policy::default())
                .await
                .unwrap_err()
                .to_string();
        assert!(e.contains(want), "{machine} {site} {ps} {mt}: {e}");
    }
    let e =
        w.lc.failover(
            &Targets::default(),
            "onprem",
            "azure",
            PointSpec::Latest,
            false,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("name the machines or a plan"), "{e}");
}

mod fleet;
mod jobs;
mod placement;
