//! `rebound-ps`: the process server binary, a thin shell over the library.

use clap::{Parser, Subcommand};
use rebound_common::cli_args::{self, EnrollArgs, LogArgs};
use rebound_common::pki::Role;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "rebound-ps",
    version,
    about = "Rebound process server: durable frame cache and forwarding to the master target"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the process server until SIGTERM or ctrl-c.
    Run {
        /// TOML config file (see process-server/example-config.toml);
        /// without it every key has its default.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Enrolls with the configuration server: generates this PS's key, gets
    /// its certificate (role ps) and writes ca.pem, ps.pem and ps.key.
    Enroll(EnrollArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    cli_args::exit_code("rebound-ps", real_main(Cli::parse()).await)
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Run { config, log } => {
            log.start();
            let cfg: rebound_ps::Config = rebound_common::config::load(config.as_deref())?;
            let listener = cli_args::listen(&cfg.listen, "listen").await?;
            rebound_ps::run(cfg, listener, rebound_common::signal::shutdown_signal()).await?;
        }
        Cmd::Enroll(args) => {
            args.run(Role::Ps).await?;
        }
    }
    Ok(())
}
