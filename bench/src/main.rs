//! `rebound-bench`: thin main over `rebound_bench` (see its docs for what a
//! run measures). `rebound bench ARGS` runs this binary with the same ARGS;
//! `rebound soak ARGS` runs `rebound-bench soak ARGS`.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Measure replication cost, throughput, RPO, resync and RTO on this
/// machine beside its own limits and peer tools; print one table.
#[derive(Parser)]
#[command(
    name = "rebound-bench",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Smaller sizes and durations (under 2 minutes): same rows, rougher figures.
    #[arg(long)]
    quick: bool,
    /// Also write the table as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Work in this directory (kept) instead of a temporary one.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run only these parts (comma-separated): `limits` (section 1),
    /// `main` (sections 2, 3, 4, 6 and memory), `resync` (section 5),
    /// `scale` (section 7); the other rows say "not run". For working on
    /// one figure.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<rebound_bench::Part>,
    /// The daemons serve /metrics, scraped once a second (`on`, as
    /// deployed), serve none (`off`), or `both`: sections 2 and 3 also on a
    /// lab without metrics, printed side by side.
    #[arg(long, value_enum, default_value = "on")]
    metrics: rebound_bench::MetricsMode,
    /// The store of the CS whose 1,000 machines the scale section lists:
    /// `sqlite` (as `rebound-cs init` makes it) or `postgres` (a database
    /// of its own on the server PG_SCRATCH_URL names).
    #[arg(long, value_enum, default_value = "sqlite")]
    cs_store: rebound_bench::CsStore,
}

#[derive(Subcommand)]
enum Mode {
    /// Endurance run: fio with crc32c verify on two disks, a recovery
    /// point every second, random kill -9 of the agent, PS and MT and
    /// network faults on both links, then every retained point compared by
    /// blake3; exits non-zero on any difference (docs/RELIABILITY.md).
    Soak {
        /// How long the faults go on (the final check comes after).
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Seed of the schedule: the same seed gives the same kills and faults.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Size of each of the two protected disks, MiB.
        #[arg(long, default_value_t = 32)]
        disk_mib: u64,
        /// Work in this directory (kept) instead of a temporary one (kept
        /// only when the soak fails).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    rebound_common::tls::install_crypto_provider();
    let cli = Cli::parse();
    if let Some(Mode::Soak {
        minutes,
        seed,
        disk_mib,
        dir,
    }) = cli.mode
    {
        let summary = rebound_bench::soak::run(&rebound_bench::soak::SoakOptions {
            minutes,
            seed,
            disk_mib,
            dir,
        })?;
        println!("{summary}");
        std::process::exit(if summary.passed() { 0 } else { 1 });
    }
    tokio::runtime::Runtime::new()?.block_on(rebound_bench::run(rebound_bench::BenchOptions {
        quick: cli.quick,
        json: cli.json,
        dir: cli.dir,
        only: cli.only,
        metrics: cli.metrics,
        cs_store: cli.cs_store,
    }))
}
