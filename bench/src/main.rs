//! `rebound-bench`: thin main over `rebound_bench` (see its docs for what a
//! run measures). `rebound bench ARGS` runs this binary with the same ARGS.

use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;

/// Measure replication cost, throughput, RPO, resync and RTO on this
/// machine beside its own limits and peer tools; print one table.
#[derive(Parser)]
#[command(name = "rebound-bench", version)]
struct Cli {
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
    /// `main` (sections 2, 3, 4, 6 and memory), `resync` (section 5);
    /// the other rows say "not run". For working on one figure.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<rebound_bench::Part>,
}

#[tokio::main]
async fn main() -> Result<()> {
    rebound_common::tls::install_crypto_provider();
    let cli = Cli::parse();
    rebound_bench::run(rebound_bench::BenchOptions {
        quick: cli.quick,
        json: cli.json,
        dir: cli.dir,
        only: cli.only,
    })
    .await
}
