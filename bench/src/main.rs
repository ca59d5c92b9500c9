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
    #[command(subcommand)]
    hidden: Option<Hidden>,
}

#[derive(clap::Subcommand)]
enum Hidden {
    /// The failover lab's machine agent: the lab's power_on hook boots the
    /// machine at the target by running its own executable (this one) with
    /// `__demo-agent`, as `rebound demo` does with `rebound`.
    #[command(name = "__demo-agent", hide = true)]
    DemoAgent {
        #[arg(long)]
        config: PathBuf,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    rebound_common::tls::install_crypto_provider();
    let cli = Cli::parse();
    if let Some(Hidden::DemoAgent { config }) = cli.hidden {
        rebound_common::telemetry::init(Default::default());
        return rebound_cli::demo::agent_main(&config).await;
    }
    rebound_bench::run(rebound_bench::BenchOptions {
        quick: cli.quick,
        json: cli.json,
        dir: cli.dir,
        only: cli.only,
    })
    .await
}
