//! Smoke test of `rebound bench --quick`: the command runs the real
//! binaries end to end and prints a complete table and JSON document — every
//! row present, every figure a number. Benchmarks are figures, never timed
//! assertions (DESIGN.md §10), so no value is compared with its goal here.
//! A missing peer tool (fio, qemu-nbd, rsync) fails the bench with the
//! apt-get command, which this test shows.

use rebound_lab::cli;
use serde_json::Value;

/// Every row of the table, in order (bench/src/report.rs `ROWS`).
const ROWS: &[&str] = &[
    "limits.blake3",
    "limits.zstd.zeros.compress",
    "limits.zstd.zeros.decompress",
    "limits.zstd.text.compress",
    "limits.zstd.text.decompress",
    "limits.zstd.random.compress",
    "limits.zstd.random.decompress",
    "limits.disk.seq_write_fsync",
    "limits.disk.bulk_write_fsync",
    "limits.disk.bulk_read",
    "limits.disk.fsync_p50",
    "limits.disk.fsync_p99",
    "limits.tls.seal",
    "limits.tls.rustls",
    "limits.tls.grpc",
    "limits.cpu.durable_write",
    "limits.cpu.grpc_hop",
    "cost.randwrite4k_qd1.agent",
    "cost.randwrite4k_qd1.qemu",
    "cost.randwrite4k_qd1.ratio",
    "cost.randwrite4k_qd32.agent",
    "cost.randwrite4k_qd32.qemu",
    "cost.randwrite4k_qd32.ratio",
    "cost.seqwrite1m.agent",
    "cost.seqwrite1m.qemu",
    "cost.seqwrite1m.ratio",
    "sustained.zeros",
    "sustained.text",
    "sustained.text.ceiling",
    "sustained.random",
    "mem.agent",
    "mem.ps",
    "mem.mt",
    "rpo.20.p50",
    "rpo.20.p99",
    "rpo.20.max",
    "rpo.54.p50",
    "rpo.54.p99",
    "rpo.54.max",
    "rpo.150.p50",
    "rpo.150.p99",
    "rpo.150.max",
    "resync.diff.rebound.secs",
    "resync.diff.rebound.bytes",
    "resync.diff.rsync.secs",
    "resync.diff.rsync.bytes",
    "resync.diff.speedup",
    "resync.full.rebound.secs",
    "resync.full.rebound.bytes",
    "resync.full.cp.secs",
    "resync.full.ratio",
    "resync.full.ceiling",
    "rto.drain",
    "rto.rollback_latest",
    "rto.handover",
    "rto.failover_excl_drain",
    "rto.rollback_old.secs",
    "rto.rollback_old.rate",
    "scale.ingest.disks",
    "scale.ingest.churn_mb_s",
    "scale.ingest.rpo_p50_ms",
    "scale.ingest.rpo_p99_ms",
    "scale.ingest.agent_rpo_p50_ms",
    "scale.ingest.agent_rpo_p99_ms",
    "scale.ingest.ps_rss_mib",
    "scale.ingest.mt_rss_mib",
    "scale.ingest.ps_fds",
    "scale.ingest.mt_fds",
    "scale.ingest.ps_threads",
    "scale.ingest.mt_threads",
    "scale.ingest.ps_cpu",
    "scale.ingest.mt_cpu",
    "scale.ingest.verified",
    "scale.control.machines",
    "scale.control.machines_cli_ms",
    "scale.control.machines_cli_max_ms",
    "scale.control.status_cli_ms",
    "scale.control.status_cli_max_ms",
    "scale.control.cs_rss_mib",
];

#[test]
fn bench_quick_prints_a_complete_table_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("bench.json");
    let work = dir.path().join("work");
    let r = cli::rebound(&[
        "bench".as_ref(),
        "--quick".as_ref(),
        "--json".as_ref(),
        json_path.as_os_str(),
        "--dir".as_ref(),
        work.as_os_str(),
    ])
    .unwrap();
    assert!(r.ok, "rebound bench --quick failed:\n{}", r.text());
    let stdout = &r.stdout;

    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap())
        .expect("--json wrote invalid JSON");
    let rows = doc["rows"].as_array().expect("no rows array");
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ROWS, "the JSON rows differ from the expected list");

    for r in rows {
        let id = r["id"].as_str().unwrap();
        let verdict = r["verdict"].as_str().unwrap();
        assert!(
            ["meets", "below", "info"].contains(&verdict),
            "{id}: verdict {verdict:?} (note: {})",
            r["note"]
        );
        // Every row has a number, the RTO hand-over included (it comes from
        // the failover job now).
        let v = r["value"]
            .as_f64()
            .unwrap_or_else(|| panic!("{id} has no value: {r}"));
        assert!(v.is_finite() && v >= 0.0, "{id}: value {v}");
        match r["goal"]["kind"].as_str() {
            Some("none") => assert_eq!(verdict, "info", "{id}: {r}"),
            Some("at_least") | Some("at_most") => {
                assert!(r["goal"]["value"].is_number(), "{id}: goal {r}")
            }
            other => panic!("{id}: goal kind {other:?}"),
        }
        // The printed table has the row, with its number.
        let figure = r["figure"].as_str().unwrap();
        let line = stdout
            .lines()
            .find(|l| l.starts_with(figure) && l[figure.len()..].starts_with("  "))
            .unwrap_or_else(|| panic!("the table has no row {figure:?}:\n{stdout}"));
        let value_text = line[figure.len()..].split_whitespace().next().unwrap();
        value_text
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("{id}: printed value {value_text:?} is not a number"));
    }
    assert!(doc["meta"]["plan"]["quick"].as_bool().unwrap());
}
