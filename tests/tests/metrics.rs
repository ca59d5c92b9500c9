//! Every daemon's `/metrics` and `/healthz` during replication, read as a
//! Prometheus server reads them (a real HTTP client and a Prometheus
//! text-format parser, `rebound_lab::metrics`): the counters move with the
//! bytes a real NBD client writes, and the data at the point is exact by
//! blake3. The metric names are docs/METRICS.md's.

use crate::lifecycle::{a, b, protect, source_hash, wait_point_seq, JOB};
use rebound_lab::metrics::{healthz, scrape, Scrape};
use rebound_lab::*;
use std::collections::BTreeMap;
use std::time::Duration;

const KIB: u64 = 1024;

/// Every daemon of the default sites lab with one machine, by the name
/// [`Sites::metrics_addr`] takes.
fn daemons(m: &str) -> Vec<String> {
    let mut who = vec!["cs".to_string()];
    for site in [a(), b()] {
        who.push(ps_id(site));
        who.push(mt_id(site));
    }
    who.push(format!("agent:{m}@{}", a()));
    who
}

fn scrape_all(s: &Sites, who: &[String]) -> BTreeMap<String, Scrape> {
    (who.iter())
        .map(|w| {
            let addr = s.metrics_addr(w).expect("metrics address");
            let sc = scrape(addr).unwrap_or_else(|e| panic!("scrape of {w} at {addr}: {e:#}"));
            (w.clone(), sc)
        })
        .collect()
}

/// A sample's value, 0 when the series does not exist yet (a labelled
/// counter may appear with its first event).
fn val(sc: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    sc.value(name, labels).unwrap_or(0.0)
}

/// Scrapes `who` until `done` holds for the scrape (or the time is up);
/// the last scrape.
fn scrape_until(s: &Sites, who: &str, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let addr = s.metrics_addr(who).expect("metrics address");
    let mut last = None;
    let res = wait_for(
        what,
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let sc = scrape(addr)?;
            let ok = done(&sc);
            last = Some(sc);
            Ok(ok)
        },
    );
    match (res, last) {
        (Ok(()), Some(last)) => last,
        (Err(e), Some(last)) => panic!("{e:#}\nlast scrape of {who}:\n{}", last.text()),
        (res, None) => panic!("no scrape of {who} at {addr}: {res:?}"),
    }
}

#[test]
fn every_daemon_counts_the_bytes_written_and_answers_health() {
    let s = Sites::start(SitesOptions::default()).expect("sites");
    let m = "m1";
    protect(&s, m, a(), b());
    let repl = s.machine(m).expect("machine")["replication_id"]
        .as_str()
        .expect("a replication id")
        .to_string();
    let who = daemons(m);
    let agent = format!("agent:{m}@{}", a());
    let (ps, mt) = (ps_id(a()), mt_id(b()));
    let disk = [("machine", m), ("disk", "disk0")];
    let machine = [("machine", m)];
    let replication = [("replication", repl.as_str())];

    // The initial copy is applied: a point cut now reaches the MT after it.
    let (_, seq0) = s.tag(m, a(), "crash").expect("tag");
    wait_point_seq(&s, m, seq0);
    scrape_until(
        &s,
        &mt,
        "the MT's applied seq to reach the first point",
        |sc| val(sc, "rebound_mt_applied_seq", &machine) >= seq0 as f64,
    );
    let before = scrape_all(&s, &who);

    // Writes through the agent's NBD export with qemu-io: random data
    // (incompressible, so the PS's compression cannot hide it), a pattern,
    // and write-zeroes.
    let mut rng = Rng::new(22);
    let random_file = s.path("random.bin");
    let mut random = vec![0u8; (1024 + 256) as usize * KIB as usize];
    rng.fill(&mut random);
    std::fs::write(&random_file, &random).expect("write the random source");
    let f = random_file.display();
    let cmds = [
        format!("write -s {f} 0 {}", 1024 * KIB),
        format!("write -s {f} {} {}", 4096 * KIB, 256 * KIB),
        format!("write -P 0x42 {} {}", 6144 * KIB, 64 * KIB),
        format!("write -z {} {}", 8192 * KIB, 128 * KIB),
    ];
    let random_bytes = (1024 + 256) * KIB;
    let data_bytes = random_bytes + 64 * KIB;
    let written = data_bytes + 128 * KIB;
    qemu_io(&nbd_uri(s.agent_addr(m, a()).unwrap(), "disk0"), &cmds).expect("qemu-io writes");

    // A point after the writes, applied at the MT, exact by blake3.
    let (point, seq) = s.tag(m, a(), "crash").expect("tag");
    let want = source_hash(&s, m);
    wait_point_seq(&s, m, seq);
    s.wait_view_hash(b(), m, "disk0", &point, &want, JOB)
        .unwrap_or_else(|e| panic!("the view of {point} at {} differs: {e:#}", b()));

    let delta = |after: &Scrape, who: &str, name: &str, labels: &[(&str, &str)]| {
        val(after, name, labels) - val(&before[who], name, labels)
    };

    // The agent counted every byte the NBD client wrote (one counter per
    // request, no frame to round to).
    let agent_after = scrape(s.metrics_addr(&agent).unwrap()).expect("agent scrape");
    let agent_written = delta(
        &agent_after,
        &agent,
        "rebound_agent_written_bytes_total",
        &disk,
    );
    let agent_writes = delta(&agent_after, &agent, "rebound_agent_writes_total", &disk);
    let agent_sent = delta(
        &agent_after,
        &agent,
        "rebound_agent_sent_bytes_total",
        &machine,
    );
    eprintln!(
        "written {written} B in {} requests; agent counted {agent_written} B in {agent_writes} \
         writes and sent {agent_sent} B",
        cmds.len()
    );
    assert_eq!(
        agent_written,
        written as f64,
        "the agent's captured bytes\n{}",
        agent_after.text()
    );
    assert!(agent_writes >= cmds.len() as f64, "{}", agent_after.text());
    assert!(
        agent_sent >= data_bytes as f64,
        "sent {agent_sent} < {data_bytes}"
    );
    assert_eq!(
        val(
            &agent_after,
            "rebound_agent_mode",
            &[("machine", m), ("mode", "data")]
        ),
        1.0,
        "{}",
        agent_after.text()
    );

    // The MT applied all of it once the point after it is applied.
    let mt_after = scrape_until(&s, &mt, "the MT's applied bytes", |sc| {
        delta(sc, &mt, "rebound_mt_applied_bytes_total", &machine) >= written as f64
            && val(sc, "rebound_mt_applied_seq", &machine) >= seq as f64
    });
    let mt_applied = delta(&mt_after, &mt, "rebound_mt_applied_bytes_total", &machine);
    eprintln!("the MT applied {mt_applied} B (written {written} B)");
    assert_eq!(
        mt_applied,
        written as f64,
        "the MT's applied bytes\n{}",
        mt_after.text()
    );
    for name in [
        "rebound_mt_retention_bytes",
        "rebound_mt_oldest_point_age_seconds",
        "rebound_mt_points",
        "rebound_mt_fsync_seconds_count",
    ] {
        assert!(
            mt_after.names().contains(name),
            "{name} missing\n{}",
            mt_after.text()
        );
    }

    // The PS received exactly the bytes the agent sent over their one link:
    // the agent counts a frame when it hands it to the stream, the PS when
    // it reads it, so they differ only while frames are in flight or when a
    // stream broke with frames handed to it (none does here). Polled, as
    // the agent may still be sending when it is scraped.
    let mut last = (0.0, 0.0);
    wait_for(
        "the PS to have received what the agent sent",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let sent = delta(
                &scrape(s.metrics_addr(&agent)?)?,
                &agent,
                "rebound_agent_sent_bytes_total",
                &machine,
            );
            let received = delta(
                &scrape(s.metrics_addr(&ps)?)?,
                &ps,
                "rebound_ps_received_bytes_total",
                &replication,
            );
            last = (sent, received);
            Ok(sent == received)
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: the agent sent {} B, the PS received {} B",
            last.0, last.1
        )
    });

    // The PS forwarded at least the incompressible bytes.
    let ps_after = scrape_until(&s, &ps, "the PS's forwarded bytes", |sc| {
        delta(sc, &ps, "rebound_ps_forwarded_bytes_total", &replication) >= random_bytes as f64
    });
    let ps_received = delta(
        &ps_after,
        &ps,
        "rebound_ps_received_bytes_total",
        &replication,
    );
    let ps_forwarded = delta(
        &ps_after,
        &ps,
        "rebound_ps_forwarded_bytes_total",
        &replication,
    );
    eprintln!("the PS received {ps_received} B and forwarded {ps_forwarded} B");
    assert!(ps_forwarded >= random_bytes as f64, "{}", ps_after.text());
    // A frame is forwarded as stored, compressed only when that shrinks
    // it, and once while the MT stream does not reconnect: never more than
    // was received.
    assert_eq!(
        delta(
            &ps_after,
            &ps,
            "rebound_ps_forward_errors_total",
            &replication
        ),
        0.0,
        "the PS's MT stream reconnected\n{}",
        ps_after.text()
    );
    assert!(
        ps_forwarded <= ps_received,
        "the PS forwarded {ps_forwarded} > received {ps_received}\n{}",
        ps_after.text()
    );
    assert!(
        ps_received >= data_bytes as f64,
        "the PS received {ps_received} < {data_bytes}\n{}",
        ps_after.text()
    );
    assert!(
        ps_after
            .value("rebound_ps_cache_capacity_bytes", &[])
            .is_some_and(|v| v > 0.0),
        "{}",
        ps_after.text()
    );

    // Once the point is applied nothing is held back: the agent's buffer
    // and lag, and the PS's backlog, come back to 0.
    scrape_until(&s, &agent, "the agent's buffer and lag to drain", |sc| {
        val(sc, "rebound_agent_buffer_bytes", &machine) == 0.0
            && val(sc, "rebound_agent_lag_seconds", &machine) == 0.0
    });
    scrape_until(&s, &ps, "the PS's backlog to drain", |sc| {
        val(sc, "rebound_ps_backlog_bytes", &replication) == 0.0
            && val(sc, "rebound_ps_backlog_seconds", &replication) == 0.0
    });

    // The CS: the machine's RPO, finite and under the default 60 s
    // threshold once nothing is held back, and every component up.
    let cs_after = scrape_until(&s, "cs", "the CS's RPO and components", |sc| {
        sc.value("rebound_cs_rpo_seconds", &machine)
            .is_some_and(|r| r.is_finite() && (0.0..60.0).contains(&r))
            && sc.value("rebound_cs_component_up", &[]).is_some()
    });
    let rpo = cs_after.value("rebound_cs_rpo_seconds", &machine);
    eprintln!("the CS reports RPO {rpo:?} s for {m}");
    for id in [m, ps.as_str(), mt.as_str()] {
        assert_eq!(
            cs_after.value("rebound_cs_component_up", &[("component", id)]),
            Some(1.0),
            "{id} is not up at the CS\n{}",
            cs_after.text()
        );
    }

    // Every daemon is ready.
    for w in &who {
        let addr = s.metrics_addr(w).unwrap();
        let (status, body) = healthz(addr).unwrap_or_else(|e| panic!("healthz of {w}: {e:#}"));
        assert_eq!(status, 200, "/healthz of {w} at {addr}: {body}");
    }
}
