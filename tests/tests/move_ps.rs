//! `rebound move`: a protected machine switches to another PS of its site
//! under writes, without losing a point and without a full resync.
//!
//! One site with two PSs protects m1 through the first; a writer cuts a
//! crash point after every write (its source hash taken with no write in
//! flight) before, during and after `rebound move m1 --ps <PS2>`. The MT
//! and then PS1 are paused (SIGSTOP) around the switch, so PS1 still holds
//! records it acknowledged when the agent reaches PS2: the agent must wait
//! for PS1 to forward them. Every
//! point's view at the MT must equal the source at that point, what the
//! agent sent from PS1's pause on (its `bytes_sent`, resync included) must
//! be bounded by what was written meanwhile plus framing, and the first PS
//! must have dropped the replication's cache. The steps wait on what the
//! agent and the CS report, not on sleeps.

use crate::lifecycle::{a, b, protect, source_hash, succeeded, wait_point_seq, JOB};
use crate::support::{lines_with, Paused};
use rebound_lab::wait::wait_for;
use rebound_lab::*;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

const BLOCK: u64 = 64 * 1024;
/// What framing may add to the bytes the agent sends: per cut (a frame's
/// header and records, the tag) and once (a frame in flight when PS1
/// paused, resent to PS2).
const FRAMING_PER_CUT: u64 = 4 << 10;
const FRAMING_ONCE: u64 = 256 << 10;
/// Points cut while the move runs, at most (the writer then stops).
const MAX_DURING: u32 = 40;
const WAIT: Duration = Duration::from_secs(60);
/// The burst written while the MT is paused: more than a PS sends to the
/// MT ahead of its answers (64 MiB), and incompressible, so PS1 holds
/// records it acknowledged and could not forward.
const BURST_WRITE: u64 = 4 << 20;
const BURST_WRITES: u64 = 24;

/// A point the writer cut: its id, seq, the source's hash at it and the
/// bytes written before it, whether the move job had started then and
/// whether PS1 was paused (or the move running) then.
struct Cut {
    id: String,
    seq: u64,
    hash: String,
    written: u64,
    in_move: bool,
    after_pause: bool,
}

/// What the writer thread and the test share.
#[derive(Default)]
struct Writer {
    /// The move job is running (stop once it has ended).
    moving: AtomicBool,
    /// PS1 is paused or was (what is written counts for the bytes sent).
    paused: AtomicBool,
    /// Points cut so far by the writer thread.
    cuts: AtomicU32,
    ended: AtomicBool,
    /// Write the burst next (set by the test), cleared when it is written.
    burst: AtomicBool,
}

/// Writes one block (round `n`), or the burst, through the agent, cuts a
/// crash point and hashes the source (no write is in flight meanwhile).
fn write_and_tag(s: &Sites, n: u32, w: &Writer) -> Cut {
    let mut written = BLOCK;
    if w.burst.load(Ordering::SeqCst) {
        let random = s.path("burst.bin");
        let mut buf = vec![0u8; BURST_WRITE as usize];
        Rng::new(u64::from(n)).fill(&mut buf);
        std::fs::write(&random, &buf).expect("write the burst's data");
        let uri = nbd_uri(s.agent_addr("m1", a()).expect("agent address"), "disk0");
        let cmds: Vec<String> = (0..BURST_WRITES)
            .map(|i| {
                format!(
                    "write -s {} {} {BURST_WRITE}",
                    random.display(),
                    (i % 3) * BURST_WRITE
                )
            })
            .collect();
        qemu_io(&uri, &cmds).expect("burst at the source");
        written = BURST_WRITE * BURST_WRITES;
        w.burst.store(false, Ordering::SeqCst);
    } else {
        let offset = (u64::from(n) * 3 * BLOCK) % (14 << 20);
        s.write("m1", a(), "disk0", offset, BLOCK, (n % 250 + 1) as u8)
            .expect("write at the source");
    }
    let in_move = w.moving.load(Ordering::SeqCst);
    let after_pause = w.paused.load(Ordering::SeqCst);
    let (id, seq) = s.tag("m1", a(), "crash").expect("crash tag");
    w.cuts.fetch_add(1, Ordering::SeqCst);
    Cut {
        id,
        seq,
        hash: source_hash(s, "m1"),
        written,
        in_move,
        after_pause,
    }
}

/// Waits until the writer has written the burst.
fn wait_burst(w: &Writer) {
    let t0 = std::time::Instant::now();
    while w.burst.load(Ordering::SeqCst) {
        assert!(
            t0.elapsed() < WAIT,
            "the burst was not written within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A counter of the agent's status (`resync_bytes_sent`, `bytes_sent`,
/// `seq`, `durable_seq`).
fn agent_stat(s: &Sites, key: &str) -> u64 {
    let st = s
        .agent_admin("m1", a(), serde_json::json!({"cmd": "status"}))
        .expect("agent status");
    st[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in the agent's status: {st}"))
}

/// Waits (bounded) until `cond` holds, polling every 50 ms.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(what, WAIT, Duration::from_millis(50), || Ok(cond()))
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[test]
fn a_machine_moves_to_another_ps_under_writes_with_every_point_exact() {
    let s = Sites::start(SitesOptions {
        ps_per_site: 2,
        ..SitesOptions::default()
    })
    .expect("sites");
    let (ps1, ps2) = {
        let ps = &s.sites[a()].ps;
        (ps[0].0.clone(), ps[1].0.clone())
    };
    protect(&s, "m1", a(), b());
    let rid = s.machine("m1").expect("machine")["replication_id"]
        .as_str()
        .expect("replication id")
        .to_string();
    let w = Writer::default();
    let mut cuts: Vec<Cut> = (0..3).map(|n| write_and_tag(&s, n, &w)).collect();
    wait_point_seq(&s, "m1", cuts[2].seq);
    let resync_before = agent_stat(&s, "resync_bytes_sent");

    // The MT pauses while PS1 acknowledges a burst of writes, then PS1
    // pauses before the MT resumes: when the agent reaches PS2, PS1 holds
    // records it acknowledged and the MT has not applied, so the agent must
    // wait for PS1 to forward them instead of resyncing.
    let mt = s.pid(&mt_id(b())).expect("MT pid");
    let ps1_pid = s.pid(&ps1).expect("PS1 pid");
    let (job, during, sent_before, sent_after) = std::thread::scope(|sc| {
        let writer = sc.spawn(|| {
            let mut during = Vec::new();
            let mut n = 3;
            while !w.ended.load(Ordering::SeqCst) && n < 3 + MAX_DURING {
                during.push(write_and_tag(&s, n, &w));
                n += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            during
        });
        wait_until("the writer's first point", || {
            w.cuts.load(Ordering::SeqCst) > 3
        });
        let mt_paused = Paused::new(mt);
        w.burst.store(true, Ordering::SeqCst);
        wait_burst(&w);
        // PS1 acknowledges the burst (it caches what the paused MT cannot
        // take yet).
        let burst_seq = agent_stat(&s, "seq");
        wait_until("PS1 acknowledging the burst", || {
            agent_stat(&s, "durable_seq") >= burst_seq
        });
        w.paused.store(true, Ordering::SeqCst);
        let sent_before = agent_stat(&s, "bytes_sent");
        // PS1 pauses while the MT resumes: the records PS1 acknowledged
        // stay unapplied until PS1 continues. A PS away for longer than
        // the CS's heartbeats is waited for by the move job as well.
        let ps1_paused = Paused::new(ps1_pid);
        drop(mt_paused);
        w.moving.store(true, Ordering::SeqCst);
        let job = sc.spawn(|| s.job(&["move", "m1", "--ps", &ps2]));
        // The agent reached PS2 and waits for what PS1 acknowledged.
        let agent_log = format!("agent-m1@{}", a());
        wait_until("the agent waiting at PS2 for PS1's records", || {
            lines_with(
                &s.log_tail(&agent_log, 2000),
                "moving to this process server",
            ) > 0
        });
        drop(ps1_paused);
        let job = job.join().expect("move job thread");
        w.ended.store(true, Ordering::SeqCst);
        let during = writer.join().expect("writer");
        (job, during, sent_before, agent_stat(&s, "bytes_sent"))
    });
    let job = job.unwrap_or_else(|e| panic!("rebound move m1 --ps {ps2}: {e:#}"));
    succeeded(&job);
    let written_during: u64 = during.iter().filter(|c| c.in_move).map(|c| c.written).sum();
    let cuts_after = during.iter().filter(|c| c.after_pause).count() as u64;
    let written_after: u64 = during
        .iter()
        .filter(|c| c.after_pause)
        .map(|c| c.written)
        .sum();
    assert!(
        during.iter().any(|c| c.in_move),
        "no write ran during the move"
    );
    let n_during = during.len();
    cuts.extend(during);
    let n = cuts.len() as u32;
    cuts.extend((n..n + 3).map(|n| write_and_tag(&s, n, &w)));
    let last = cuts.last().map(|c| c.seq).unwrap_or(0);
    wait_point_seq(&s, "m1", last);

    // Every point before, during and after the move is exact.
    for c in &cuts {
        s.wait_view_hash(b(), "m1", "disk0", &c.id, &c.hash, WAIT)
            .unwrap_or_else(|e| panic!("point {} (seq {}): {e:#}", c.id, c.seq));
    }
    // No full resync: what the resync sent is bounded by the writes of the move.
    let resync = agent_stat(&s, "resync_bytes_sent") - resync_before;
    assert!(
        resync <= written_during,
        "the agent resynced {resync} bytes during a move that wrote {written_during}"
    );
    // What the agent sent from PS1's pause to the move's end is what was
    // written meanwhile (plus framing): nothing PS1 held was sent again.
    let sent = sent_after - sent_before;
    let framing = FRAMING_ONCE + FRAMING_PER_CUT * cuts_after;
    assert!(
        sent <= written_after + framing,
        "the agent sent {sent} bytes while PS1 was paused and the move ran, but only \
         {written_after} were written then (framing allowance {framing})"
    );
    let log = s.log_tail(&format!("agent-m1@{}", a()), 5000);
    eprintln!(
        "move: {} points during the move, {written_during} bytes written, {resync} resync bytes, \
         {sent} bytes sent for {written_after} written since PS1 paused; agent: {} connects, \
         {} waits for the old PS",
        n_during,
        lines_with(&log, "connected to the process server"),
        lines_with(&log, "moving to this process server"),
    );
    assert!(
        lines_with(&log, "moving to this process server") > 0,
        "the agent never waited for PS1 to forward what it acknowledged: {log}"
    );
    assert_eq!(
        lines_with(&log, "resyncing every disk") + lines_with(&log, "running a full resync"),
        0,
        "the agent resynced every disk: {log}"
    );
    // The CS names the new PS and the old one dropped its cache.
    let m = s.machine("m1").expect("machine");
    assert_eq!(m["replication_id"], rid.as_str(), "{m}");
    assert!(m.to_string().contains(&ps2), "{m}");
    let old_cache = s.path(&format!("{}/{ps1}/cache/{rid}", a()));
    wait_for(
        &format!("{} gone", old_cache.display()),
        JOB,
        Duration::from_millis(200),
        || Ok(!old_cache.exists()),
    )
    .expect("the old PS dropped the replication's cache");
}
