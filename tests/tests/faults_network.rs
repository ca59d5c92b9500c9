//! A seeded fault proxy between agent and PS and between PS and MT cuts,
//! stalls, delays and truncates the links under load: replication resumes by
//! itself and every point stays exact.

use rebound_lab::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The fault schedule and the pacing come from it: a failure replays.
const SEED: u64 = 0x20_5eed;
/// Cuts and stalls each link must take.
const CUTS_AND_STALLS: u64 = 20;
/// Delays and truncations each link must take.
const DELAYS_AND_TRUNCATIONS: u64 = 3;
/// The fault phase must be over by then.
const FAULTS_WITHIN: Duration = Duration::from_secs(300);
/// Replication must catch up by itself within this once the faults stop.
const CATCH_UP_WITHIN: Duration = Duration::from_secs(180);
const DISK_SIZE: u64 = 32 << 20;
/// The largest write of random bytes.
const NOISE: usize = 256 << 10;

/// A recovery point and the blake3 of the source disk at its tag.
struct Tagged {
    id: String,
    seq: u64,
    hash: String,
}

/// Rounds of random writes (patterns and random bytes) through the agent's
/// export, each ended by a tag cut with no write in flight (so the source
/// at the tag is known), paced so the points stay few enough to check one
/// by one.
struct Writer {
    stop: Arc<AtomicBool>,
    tagged: Arc<Mutex<Vec<Tagged>>>,
    thread: JoinHandle<()>,
}

impl Writer {
    fn start(lab: &Lab, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let tagged = Arc::new(Mutex::new(Vec::new()));
        let uri = lab.agent_uri("disk0");
        let sock = lab.agent_state_dir().join("admin.sock");
        let src = lab.source_disk(0);
        let noise = lab.path("noise.bin");
        let (stop2, tagged2) = (stop.clone(), tagged.clone());
        let thread = std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let mut buf = vec![0u8; NOISE];
            while !stop2.load(Ordering::SeqCst) {
                let mut cmds = random_writes(&mut rng, DISK_SIZE, 32);
                // Random bytes too, which the PS cannot compress: frames
                // stay large on the PS → MT link as well.
                rng.fill(&mut buf);
                std::fs::write(&noise, &buf).expect("write the noise file");
                for _ in 0..8 {
                    let len = (1 + rng.below(NOISE as u64 / 512)) * 512;
                    let off = rng.below((DISK_SIZE - len) / 512) * 512;
                    cmds.push(format!("write -s {} {off} {len}", noise.display()));
                }
                qemu_io(&uri, &cmds).expect("writes through the agent's export");
                let (id, seq) = AgentAdmin::connect(&sock)
                    .and_then(|mut a| a.tag("crash"))
                    .expect("a tag on the agent's admin socket");
                let hash = blake3_file(&src).expect("blake3 of the source disk");
                tagged2.lock().unwrap().push(Tagged { id, seq, hash });
                std::thread::sleep(Duration::from_millis(300 + rng.below(700)));
            }
        });
        Writer {
            stop,
            tagged,
            thread,
        }
    }

    /// Stops after the current round; the points it tagged.
    fn finish(self) -> Vec<Tagged> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the writer thread");
        std::mem::take(&mut *self.tagged.lock().unwrap())
    }
}

fn enough(s: &ProxyStats) -> bool {
    s.cuts >= CUTS_AND_STALLS
        && s.stalls >= CUTS_AND_STALLS
        && s.delays >= DELAYS_AND_TRUNCATIONS
        && s.truncations >= DELAYS_AND_TRUNCATIONS
}

/// Injects faults from the seeded schedule on a link chosen at random
/// among those that have not taken their share yet, every 0.1–0.5 s once
/// the link has a connection open (a stall may still hold a link when the
/// next fault hits it), until both have; the time it took.
fn fault_both_links(lab: &Lab) -> Duration {
    let (agent_ps, ps_mt) = lab.proxies().expect("a lab with fault proxies");
    let mut schedule = FaultSchedule::new(SEED);
    let mut pace = Rng::new(SEED);
    let started = Instant::now();
    loop {
        let todo: Vec<&FaultProxy> = [agent_ps, ps_mt]
            .into_iter()
            .filter(|p| !enough(&p.stats()))
            .collect();
        if todo.is_empty() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < FAULTS_WITHIN,
            "the links did not take their faults within {FAULTS_WITHIN:?}: \
             agent-ps {:?}, ps-mt {:?}",
            agent_ps.stats(),
            ps_mt.stats()
        );
        let link = todo[pace.below(todo.len() as u64) as usize];
        // A fault on a link with no connection open would hit nothing: let
        // the client reconnect first (its backoff is at most 5 s).
        let _ = wait_until("a connection open", Duration::from_secs(6), || {
            link.open_connections() > 0
        });
        link.inject(schedule.next_fault());
        std::thread::sleep(Duration::from_millis(100 + pace.below(400)));
    }
}

#[test]
fn cuts_stalls_delays_and_truncations_on_both_links_keep_every_point_exact() {
    let mut lab = Lab::started(LabOptions {
        fault_proxies: true,
        ..LabOptions::disk_size(DISK_SIZE)
    })
    .unwrap();
    let (_, seq) = lab.tag("crash").unwrap();
    lab.wait_applied(seq, Duration::from_secs(120)).unwrap();
    let (_, applied_before) = lab.points().unwrap();

    let writer = Writer::start(&lab, SEED);
    let took = fault_both_links(&lab);
    let tagged = writer.finish();
    let (_, applied_during) = lab.points().unwrap();

    for c in [Component::Agent, Component::Ps, Component::Mt] {
        lab.check_alive(c).unwrap();
    }
    let (agent_ps, ps_mt) = lab.proxies().unwrap();
    eprintln!(
        "faults for {took:?}: agent-ps {:?}\nps-mt {:?}\n{} points tagged; \
         applied seq {applied_before} before, {applied_during} when the faults stopped",
        agent_ps.stats(),
        ps_mt.stats(),
        tagged.len()
    );
    assert!(
        tagged.len() >= 3,
        "the writer tagged only {} points",
        tagged.len()
    );

    // Replication resumes by itself: everything tagged gets applied.
    let last = tagged.iter().map(|t| t.seq).max().unwrap();
    lab.wait_applied(last, CATCH_UP_WITHIN).unwrap();
    let (points, _) = lab.points().unwrap();
    for t in &tagged {
        let p = points
            .iter()
            .find(|p| p.id == t.id)
            .unwrap_or_else(|| panic!("point {} (seq {}) is lost", t.id, t.seq));
        assert_eq!(p.seq, t.seq, "point {} has another seq", t.id);
        assert_eq!(
            lab.point_hash("disk0", &t.id).unwrap(),
            t.hash,
            "point {} (seq {}) differs from the source at its tag",
            t.id,
            t.seq
        );
    }
    assert_eq!(
        lab.point_hash("disk0", "latest").unwrap(),
        lab.source_hash(0).unwrap(),
        "the latest view differs from the source"
    );
    eprintln!("{} points exact by blake3", tagged.len());
}
