//! `rebound-mt`: the master target binary, a thin wrapper over the
//! `rebound_mt` library (DESIGN.md §2).

use anyhow::Result;
use clap::Parser;
use rebound_common::cli_args::{self, EnrollArgs, RunArgs};
use rebound_common::pki::Role;
use std::path::PathBuf;

/// Keeps a few freed large buffers for reuse (see `rebound_common::block_cache`).
#[global_allocator]
static ALLOCATOR: rebound_common::block_cache::BlockCache =
    rebound_common::block_cache::BlockCache::new();

#[derive(Parser)]
#[command(
    name = "rebound-mt",
    version,
    about = "Rebound master target: replicas, retention journal, recovery points, views, rollback"
)]
enum Cmd {
    /// Run the master target.
    Run(RunArgs),
    /// Enroll with the configuration server: generates this MT's key, gets
    /// its certificate (role mt) and writes ca.pem, mt.pem and mt.key.
    Enroll(EnrollArgs),
    /// List the recovery points of a replication from its files (offline).
    Points {
        /// The MT's data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// The replication id.
        #[arg(long)]
        replication: String,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    cli_args::exit_code("rebound-mt", real_main(Cmd::parse()).await)
}

async fn real_main(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Run(run) => {
            let cfg: rebound_mt::Config = run.start()?;
            let listener = cli_args::listen(&cfg.listen, "listen").await?;
            let nbd = cli_args::listen_std(&cfg.nbd_listen, "nbd_listen")?;
            rebound_mt::run(
                cfg,
                listener,
                nbd,
                rebound_common::signal::shutdown_signal(),
            )
            .await?;
            Ok(())
        }
        Cmd::Enroll(args) => {
            args.run(Role::Mt).await?;
            Ok(())
        }
        Cmd::Points {
            data_dir,
            replication,
            json,
        } => {
            let path = data_dir.join(&replication).join("points.log");
            if !data_dir.join(&replication).join("info.json").exists() {
                anyhow::bail!("{} holds no replication {replication}", data_dir.display());
            }
            let points = rebound_mt::catalog::load(&path, false)?;
            for p in points {
                if json {
                    println!("{}", serde_json::to_string(&p)?);
                } else {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        p.id, p.kind, p.time_ms, p.seq, p.group
                    );
                }
            }
            Ok(())
        }
    }
}
