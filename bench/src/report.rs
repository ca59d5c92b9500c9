//! The result table of `rebound-bench`: every figure beside its goal and a
//! verdict, printed on stdout and written as JSON.
//!
//! The rows are a fixed list ([`ROWS`]) so a run always prints every row,
//! even when a section failed (its rows then say `error`): operators compare
//! runs row by row, and the smoke test checks the list is complete.

use serde::Serialize;
use serde_json::{json, Value};
use std::fmt::Write as _;

/// The goal for the sustained text-like churn (its row, and the
/// sustained section's note).
pub const GOAL_TEXT_MB_S: f64 = 200.0;

/// What a figure is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Goal {
    /// No goal: the figure is context (machine limits, peers).
    None,
    AtLeast(f64),
    AtMost(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Meets,
    Below,
    /// A figure without a goal.
    Info,
    /// The section failed; the note says why.
    Error,
    /// The section was left out (`--only`).
    NotRun,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Meets => "meets",
            Verdict::Below => "below",
            Verdict::Info => "-",
            Verdict::Error => "error",
            Verdict::NotRun => "not run",
        }
    }
}

/// One row's fixed description.
pub struct RowSpec {
    pub id: &'static str,
    pub section: &'static str,
    pub figure: &'static str,
    pub unit: &'static str,
    pub goal: Goal,
}

const fn row(
    id: &'static str,
    section: &'static str,
    figure: &'static str,
    unit: &'static str,
    goal: Goal,
) -> RowSpec {
    RowSpec {
        id,
        section,
        figure,
        unit,
        goal,
    }
}

const LIM: &str = "1. Machine limits";
const COST: &str = "2. Cost of protection";
const SUS: &str = "3. Sustained replication";
const MEM: &str = "3. Memory (peak RSS)";
const RPO: &str = "4. RPO";
const RES: &str = "5. Resync";
const RTO: &str = "6. RTO";
const SCA: &str = "7. Scale";

/// Every row of the table, in print order. Goals that depend on the run
/// (memory) are filled in by the section. Not formatted by rustfmt: one
/// line per row keeps the table readable.
#[rustfmt::skip]
pub const ROWS: &[RowSpec] = &[
    row("limits.blake3", LIM, "blake3, 1 core", "MB/s", Goal::None),
    row(
        "limits.zstd.zeros.compress",
        LIM,
        "zstd-1 compress, zeros",
        "MB/s",
        Goal::None,
    ),
    row(
        "limits.zstd.zeros.decompress",
        LIM,
        "zstd-1 decompress, zeros",
        "MB/s",
        Goal::None,
    ),
    row(
        "limits.zstd.text.compress",
        LIM,
        "zstd-1 compress, text-like",
        "MB/s",
        Goal::None,
    ),
    row(
        "limits.zstd.text.decompress",
        LIM,
        "zstd-1 decompress, text-like",
        "MB/s",
        Goal::None,
    ),
    row(
        "limits.zstd.random.compress",
        LIM,
        "zstd-1 compress, random",
        "MB/s",
        Goal::None,
    ),
    row(
        "limits.zstd.random.decompress",
        LIM,
        "zstd-1 decompress, random",
        "MB/s",
        Goal::None,
    ),
    row(
        "limits.disk.seq_write_fsync",
        LIM,
        "data dir: sequential write + fdatasync",
        "MB/s",
        Goal::None,
    ),
    row(
        "limits.disk.bulk_write_fsync",
        LIM,
        "data dir: bulk write, one fdatasync",
        "MB/s",
        Goal::None,
    ),
    row(
        "limits.disk.bulk_read",
        LIM,
        "data dir: bulk read, not cached",
        "MB/s",
        Goal::None,
    ),
    row(
        "limits.disk.fsync_p50",
        LIM,
        "data dir: 4 KiB write + fdatasync p50",
        "ms",
        Goal::None,
    ),
    row(
        "limits.disk.fsync_p99",
        LIM,
        "data dir: 4 KiB write + fdatasync p99",
        "ms",
        Goal::None,
    ),
    row(
        "limits.tls.seal",
        LIM,
        "TLS record encryption (rustls, ring), 1 core",
        "MB/s",
        Goal::None,
    ),
    row(
        "limits.tls.rustls",
        LIM,
        "loopback mTLS, rustls, 1 stream",
        "MB/s",
        Goal::None,
    ),
    row(
        "limits.tls.grpc",
        LIM,
        "loopback mTLS gRPC stream (tonic), 2 MiB msgs",
        "MB/s",
        Goal::None,
    ),
    row(
        "limits.cpu.durable_write",
        LIM,
        "CPU of a durable write, per 100 MB/s",
        "cores",
        Goal::None,
    ),
    row(
        "limits.cpu.grpc_hop",
        LIM,
        "CPU of a gRPC mTLS hop, per 100 MB/s",
        "cores",
        Goal::None,
    ),
    row(
        "cost.randwrite4k_qd1.agent",
        COST,
        "fio 4k randwrite QD1, agent (replicating)",
        "IOPS",
        Goal::None,
    ),
    row(
        "cost.randwrite4k_qd1.qemu",
        COST,
        "fio 4k randwrite QD1, qemu-nbd",
        "IOPS",
        Goal::None,
    ),
    row(
        "cost.randwrite4k_qd1.ratio",
        COST,
        "  ratio agent / qemu-nbd",
        "x",
        Goal::AtLeast(0.9),
    ),
    row(
        "cost.randwrite4k_qd32.agent",
        COST,
        "fio 4k randwrite QD32, agent (replicating)",
        "IOPS",
        Goal::None,
    ),
    row(
        "cost.randwrite4k_qd32.qemu",
        COST,
        "fio 4k randwrite QD32, qemu-nbd",
        "IOPS",
        Goal::None,
    ),
    row(
        "cost.randwrite4k_qd32.ratio",
        COST,
        "  ratio agent / qemu-nbd",
        "x",
        Goal::AtLeast(0.9),
    ),
    row(
        "cost.seqwrite1m.agent",
        COST,
        "fio 1M seq write, agent (replicating)",
        "MB/s",
        Goal::None,
    ),
    row(
        "cost.seqwrite1m.qemu",
        COST,
        "fio 1M seq write, qemu-nbd",
        "MB/s",
        Goal::None,
    ),
    row(
        "cost.seqwrite1m.ratio",
        COST,
        "  ratio agent / qemu-nbd",
        "x",
        Goal::AtLeast(0.9),
    ),
    row(
        "sustained.zeros",
        SUS,
        "highest churn kept up with, zeros",
        "MB/s",
        Goal::None,
    ),
    row(
        "sustained.text",
        SUS,
        "highest churn kept up with, text-like",
        "MB/s",
        Goal::AtLeast(GOAL_TEXT_MB_S),
    ),
    row(
        "sustained.text.ceiling",
        SUS,
        "  most the design's passes allow here",
        "MB/s",
        Goal::None,
    ),
    row(
        "sustained.random",
        SUS,
        "highest churn kept up with, random",
        "MB/s",
        Goal::None,
    ),
    row(
        "mem.agent",
        MEM,
        "rebound-agent peak RSS",
        "MiB",
        Goal::None,
    ),
    row(
        "mem.ps",
        MEM,
        "rebound-ps peak RSS",
        "MiB",
        Goal::AtMost(256.0),
    ),
    row("mem.mt", MEM, "rebound-mt peak RSS", "MiB", Goal::None),
    row(
        "rpo.20.p50",
        RPO,
        "write-to-applied lag at 20 MB/s, p50",
        "ms",
        Goal::None,
    ),
    row(
        "rpo.20.p99",
        RPO,
        "write-to-applied lag at 20 MB/s, p99",
        "ms",
        Goal::None,
    ),
    row(
        "rpo.20.max",
        RPO,
        "write-to-applied lag at 20 MB/s, max",
        "ms",
        Goal::None,
    ),
    row(
        "rpo.54.p50",
        RPO,
        "write-to-applied lag at 54 MB/s, p50",
        "ms",
        Goal::None,
    ),
    row(
        "rpo.54.p99",
        RPO,
        "write-to-applied lag at 54 MB/s, p99",
        "ms",
        Goal::AtMost(1000.0),
    ),
    row(
        "rpo.54.max",
        RPO,
        "write-to-applied lag at 54 MB/s, max",
        "ms",
        Goal::None,
    ),
    row(
        "rpo.150.p50",
        RPO,
        "write-to-applied lag at 150 MB/s, p50",
        "ms",
        Goal::None,
    ),
    row(
        "rpo.150.p99",
        RPO,
        "write-to-applied lag at 150 MB/s, p99",
        "ms",
        Goal::None,
    ),
    row(
        "rpo.150.max",
        RPO,
        "write-to-applied lag at 150 MB/s, max",
        "ms",
        Goal::None,
    ),
    row(
        "resync.diff.rebound.secs",
        RES,
        "differential resync (1% of chunks), rebound",
        "s",
        Goal::None,
    ),
    row(
        "resync.diff.rebound.bytes",
        RES,
        "  bytes sent by the agent",
        "MiB",
        Goal::None,
    ),
    row(
        "resync.diff.rsync.secs",
        RES,
        "rsync --inplace --no-whole-file, same pair",
        "s",
        Goal::None,
    ),
    row(
        "resync.diff.rsync.bytes",
        RES,
        "  bytes sent by rsync",
        "MiB",
        Goal::None,
    ),
    row(
        "resync.diff.speedup",
        RES,
        "  rsync time / rebound time",
        "x",
        Goal::AtLeast(3.0),
    ),
    row(
        "resync.full.rebound.secs",
        RES,
        "full initial sync into an empty replica",
        "s",
        Goal::None,
    ),
    row(
        "resync.full.rebound.bytes",
        RES,
        "  bytes sent by the agent",
        "MiB",
        Goal::None,
    ),
    row(
        "resync.full.cp.secs",
        RES,
        "cp --reflink=never + fsync, same file",
        "s",
        Goal::None,
    ),
    row(
        "resync.full.ratio",
        RES,
        "  rebound speed / cp speed",
        "x",
        Goal::AtLeast(0.5),
    ),
    row(
        "resync.full.ceiling",
        RES,
        "  most the design's passes allow / cp",
        "x",
        Goal::None,
    ),
    row(
        "rto.drain",
        RTO,
        "planned failover at latest: drain",
        "s",
        Goal::None,
    ),
    row(
        "rto.rollback_latest",
        RTO,
        "planned failover at latest: rollback",
        "s",
        Goal::None,
    ),
    row(
        "rto.handover",
        RTO,
        "planned failover at latest: hand-over",
        "s",
        Goal::None,
    ),
    row(
        "rto.failover_excl_drain",
        RTO,
        "planned failover excluding drain",
        "s",
        Goal::AtMost(5.0),
    ),
    row(
        "rto.rollback_old.secs",
        RTO,
        "rollback to an old point (after 50 MB/s churn)",
        "s",
        Goal::None,
    ),
    row(
        "rto.rollback_old.rate",
        RTO,
        "  undo applied by that rollback",
        "MB/s",
        Goal::AtLeast(500.0),
    ),
    row("scale.ingest.disks", SCA, "ingest: disks on one PS + MT", "disks", Goal::None),
    row("scale.ingest.churn_mb_s", SCA, "  aggregate churn achieved", "MB/s", Goal::None),
    row("scale.ingest.rpo_p50_ms", SCA, "  capture-to-applied lag p50 (RPO proxy), median machine", "ms", Goal::None),
    row("scale.ingest.rpo_p99_ms", SCA, "  capture-to-applied lag p99 (RPO proxy), worst machine", "ms", Goal::AtMost(5000.0)),
    row("scale.ingest.agent_rpo_p50_ms", SCA, "  capture-to-applied lag p50 (RPO proxy), agent process", "ms", Goal::None),
    row("scale.ingest.agent_rpo_p99_ms", SCA, "  capture-to-applied lag p99 (RPO proxy), agent process", "ms", Goal::None),
    row("scale.ingest.ps_rss_mib", SCA, "  PS peak RSS", "MiB", Goal::AtMost(1024.0)),
    row("scale.ingest.mt_rss_mib", SCA, "  MT peak RSS", "MiB", Goal::AtMost(1024.0)),
    row("scale.ingest.ps_fds", SCA, "  PS open files, peak", "fds", Goal::None),
    row("scale.ingest.mt_fds", SCA, "  MT open files, peak", "fds", Goal::None),
    row("scale.ingest.ps_threads", SCA, "  PS threads, peak", "threads", Goal::None),
    row("scale.ingest.mt_threads", SCA, "  MT threads, peak", "threads", Goal::None),
    row("scale.ingest.ps_cpu", SCA, "  PS CPU", "cores", Goal::None),
    row("scale.ingest.mt_cpu", SCA, "  MT CPU", "cores", Goal::None),
    row("scale.ingest.verified", SCA, "  replica disks = source", "disks", Goal::None),
    row("scale.control.machines", SCA, "control: agents on the CS", "machines", Goal::None),
    row("scale.control.machines_cli_ms", SCA, "  rebound machines p50", "ms", Goal::AtMost(1000.0)),
    row("scale.control.machines_cli_max_ms", SCA, "  rebound machines max", "ms", Goal::None),
    row("scale.control.status_cli_ms", SCA, "  rebound status p50", "ms", Goal::None),
    row("scale.control.status_cli_max_ms", SCA, "  rebound status max", "ms", Goal::None),
    row("scale.control.cs_rss_mib", SCA, "  CS peak RSS", "MiB", Goal::None),
];

/// A filled row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub id: &'static str,
    pub section: &'static str,
    pub figure: &'static str,
    pub value: Option<f64>,
    pub unit: &'static str,
    pub goal: Goal,
    pub verdict: Verdict,
    pub note: String,
}

impl Row {
    fn display_value(&self) -> String {
        match self.value {
            None => "-".into(),
            Some(v) => format!("{} {}", fmt_num(v, self.unit), self.unit),
        }
    }

    fn display_goal(&self) -> String {
        match self.goal {
            Goal::None => String::new(),
            Goal::AtLeast(g) => format!(">= {} {}", fmt_num(g, self.unit), self.unit),
            Goal::AtMost(g) => format!("<= {} {}", fmt_num(g, self.unit), self.unit),
        }
    }
}

fn fmt_num(v: f64, unit: &str) -> String {
    match unit {
        "IOPS" | "fds" | "threads" | "disks" | "machines" => format!("{v:.0}"),
        "ms" if v < 10.0 => format!("{v:.2}"),
        "ms" => format!("{v:.0}"),
        "x" => format!("{v:.2}"),
        "cores" => format!("{v:.3}"),
        "s" => format!("{v:.2}"),
        _ if v.abs() >= 100.0 => format!("{v:.0}"),
        _ => format!("{v:.1}"),
    }
}

/// The table being filled while the sections run.
pub struct Report {
    rows: Vec<Row>,
}

impl Default for Report {
    fn default() -> Self {
        Report {
            rows: ROWS
                .iter()
                .map(|s| Row {
                    id: s.id,
                    section: s.section,
                    figure: s.figure,
                    value: None,
                    unit: s.unit,
                    goal: s.goal,
                    verdict: Verdict::Error,
                    note: "not measured (an earlier step failed)".into(),
                })
                .collect(),
        }
    }
}

impl Report {
    fn row_mut(&mut self, id: &str) -> &mut Row {
        self.rows
            .iter_mut()
            .find(|r| r.id == id)
            .unwrap_or_else(|| panic!("bench row {id} is not in report::ROWS"))
    }

    /// Sets a measured value; the verdict follows from the row's goal.
    pub fn set(&mut self, id: &str, value: f64, note: impl Into<String>) {
        let r = self.row_mut(id);
        r.value = Some(value);
        r.verdict = match r.goal {
            Goal::None => Verdict::Info,
            Goal::AtLeast(g) if value >= g => Verdict::Meets,
            Goal::AtMost(g) if value <= g => Verdict::Meets,
            _ => Verdict::Below,
        };
        r.note = note.into();
    }

    /// Marks a measured row as not meeting its goal whatever its value,
    /// because the figure leaves out something that would count against
    /// it; `why` is added to the note.
    pub fn mark_below(&mut self, id: &str, why: &str) {
        let r = self.row_mut(id);
        if r.value.is_some() {
            r.verdict = Verdict::Below;
            r.note = format!("{why}; {}", r.note);
        }
    }

    /// Sets the goal of a row whose goal depends on the run (memory).
    pub fn set_goal(&mut self, id: &str, goal: Goal) {
        self.row_mut(id).goal = goal;
    }

    /// Marks every row of `prefix` not yet measured as failed with `err`.
    pub fn fail(&mut self, prefix: &str, err: &str) {
        for r in self.rows.iter_mut().filter(|r| r.id.starts_with(prefix)) {
            if r.value.is_none() && r.verdict == Verdict::Error {
                r.note = format!("failed: {err}");
            }
        }
    }

    /// Puts every row of `prefix` back as it was before the run (to be
    /// measured again).
    pub fn reset(&mut self, prefix: &str) {
        let fresh = Report::default();
        for (r, f) in self.rows.iter_mut().zip(fresh.rows) {
            if r.id.starts_with(prefix) {
                *r = f;
            }
        }
    }

    /// Marks one row as not measured in this run, saying why.
    pub fn not_run(&mut self, id: &str, why: &str) {
        let r = self.row_mut(id);
        r.verdict = Verdict::NotRun;
        r.note = format!("not run: {why}");
    }

    /// Marks every row of `prefix` as left out of this run.
    pub fn skip(&mut self, prefix: &str) {
        for r in self.rows.iter_mut().filter(|r| r.id.starts_with(prefix)) {
            r.verdict = Verdict::NotRun;
            r.note = "not run (--only)".into();
        }
    }

    pub fn errors(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.verdict == Verdict::Error)
            .count()
    }

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    /// The table as text: section headers, then figure, value, goal, verdict, note.
    pub fn table(&self) -> String {
        let fw = self.rows.iter().map(|r| r.figure.len()).max().unwrap_or(10);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<fw$}  {:>14}  {:>14}  {:<7}  NOTE",
            "FIGURE", "VALUE", "GOAL", "VERDICT"
        );
        let mut section = "";
        for r in &self.rows {
            if r.section != section {
                section = r.section;
                let _ = writeln!(out, "{section}");
            }
            let _ = writeln!(
                out,
                "{:<fw$}  {:>14}  {:>14}  {:<7}  {}",
                r.figure,
                r.display_value(),
                r.display_goal(),
                r.verdict.as_str(),
                r.note
            );
        }
        out
    }

    /// The JSON document: the rows plus the run's context (`meta`).
    pub fn json(&self, meta: Value) -> Value {
        json!({
            "rows": self.rows,
            "meta": meta,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique() {
        let mut ids: Vec<&str> = ROWS.iter().map(|r| r.id).collect();
        ids.sort_unstable();
        let n = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), n);
    }

    #[test]
    fn verdicts_follow_goals() {
        let mut r = Report::default();
        r.set("cost.randwrite4k_qd1.ratio", 0.95, "");
        r.set("rpo.54.p99", 1200.0, "");
        r.set("limits.blake3", 1000.0, "");
        r.fail("rto.", "no lab");
        let v = |id: &str| r.rows().iter().find(|x| x.id == id).unwrap().verdict;
        assert_eq!(v("cost.randwrite4k_qd1.ratio"), Verdict::Meets);
        assert_eq!(v("rpo.54.p99"), Verdict::Below);
        assert_eq!(v("limits.blake3"), Verdict::Info);
        assert_eq!(v("rto.handover"), Verdict::Error);
        assert_eq!(r.errors(), ROWS.len() - 3);
        let t = r.table();
        assert!(t.contains("failed: no lab"));
        assert!(t.contains(">= 0.90 x"));
    }

    #[test]
    fn a_row_marked_below_does_not_meet_whatever_its_value() {
        let mut r = Report::default();
        let id = "scale.ingest.rpo_p99_ms";
        r.mark_below(id, "not measured yet");
        let row = |r: &Report| {
            let x = r.rows().iter().find(|x| x.id == id).unwrap();
            (x.verdict, x.note.clone())
        };
        assert_eq!(row(&r).0, Verdict::Error);
        r.set(id, 100.0, "sim-000");
        assert_eq!(row(&r).0, Verdict::Meets);
        r.mark_below(id, "2 of 8 machines overflowed");
        let (v, note) = row(&r);
        assert_eq!(v, Verdict::Below);
        assert!(
            note.starts_with("2 of 8 machines overflowed; sim-000"),
            "{note}"
        );
    }
}
