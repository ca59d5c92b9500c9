//! `rebound-ps`: the process server binary, a thin shell over the library.

use clap::Parser;
use rebound_common::cli_args::{self, EnrollArgs, RunArgs};
use rebound_common::pki::Role;

#[derive(Debug, Parser)]
#[command(
    name = "rebound-ps",
    version,
    about = "Rebound process server: durable frame cache and forwarding to the master target"
)]
enum Cmd {
    /// Runs the process server until SIGTERM or ctrl-c.
    Run(RunArgs),
    /// Enrolls with the configuration server: generates this PS's key, gets
    /// its certificate (role ps) and writes ca.pem, ps.pem and ps.key.
    Enroll(EnrollArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    cli_args::exit_code("rebound-ps", real_main(Cmd::parse()).await)
}

async fn real_main(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run(run) => {
            let cfg: rebound_ps::Config = run.start()?;
            let listener = cli_args::listen(&cfg.listen, "listen").await?;
            rebound_ps::run(cfg, listener, rebound_common::signal::shutdown_signal()).await?;
        }
        Cmd::Enroll(args) => {
            args.run(Role::Ps).await?;
        }
    }
    Ok(())
}
