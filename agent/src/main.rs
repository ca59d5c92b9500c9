//! `rebound-agent`: thin command line over the `rebound_agent` library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use rebound_common::cli_args::{self, EnrollArgs, LogArgs};
use rebound_common::pki::Role;

/// Keeps a few freed large buffers for reuse (see `rebound_common::block_cache`).
#[global_allocator]
static ALLOCATOR: rebound_common::block_cache::BlockCache =
    rebound_common::block_cache::BlockCache::new();

#[derive(Parser)]
#[command(
    name = "rebound-agent",
    version,
    about = "Rebound protected-machine agent"
)]
enum Cmd {
    /// Serve the disks over NBD and stream their changes to the process server.
    Run {
        /// The agent's TOML config (see agent/example-config.toml); default
        /// /etc/rebound/agent.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Get this agent's certificate from the configuration server, using the
    /// deployment passphrase (printed once by `rebound-cs init`).
    Enroll(EnrollArgs),
}

fn main() -> ExitCode {
    cli_args::exit_code("rebound-agent", real_main(Cmd::parse()))
}

/// The runtime is built here rather than with `#[tokio::main]` so that
/// enrollment runs on one thread and the agent on the multi-threaded one.
fn real_main(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Enroll(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(args.run(Role::Agent))?;
            Ok(())
        }
        Cmd::Run { config, log } => {
            log.start();
            rebound_agent::pressure::serve_under_memory_pressure();
            let cfg: rebound_agent::Config = cli_args::load_config(config.as_deref())?;
            let listener = match cfg.nbd_listen.trim() {
                "" => None,
                addr => Some(cli_args::listen_std(addr, "nbd_listen")?),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(rebound_agent::run(
                cfg,
                listener,
                rebound_common::signal::shutdown_signal(),
            ))
            .context("rebound-agent failed")?;
            Ok(())
        }
    }
}
