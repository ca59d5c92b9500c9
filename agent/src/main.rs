//! `rebound-agent`: thin command line over the `rebound_agent` library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rebound_common::telemetry::LogFormat;

#[derive(Parser)]
#[command(
    name = "rebound-agent",
    version,
    about = "Rebound protected-machine agent"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the disks over NBD and stream their changes to the process server.
    Run {
        /// The agent's TOML config (see agent/example-config.toml).
        #[arg(long)]
        config: PathBuf,
        /// Log format: text or json.
        #[arg(long, default_value = "text")]
        log_format: LogFormat,
    },
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run { config, log_format } => {
            rebound_common::telemetry::init(log_format);
            rebound_common::tls::install_crypto_provider();
            let cfg: rebound_agent::Config =
                rebound_common::config::load(Some(&config)).context("loading the agent config")?;
            let listener = std::net::TcpListener::bind(&cfg.nbd_listen)
                .with_context(|| format!("cannot listen for NBD on {}", cfg.nbd_listen))?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(rebound_agent::run(cfg, listener, shutdown_signal()))
                .context("rebound-agent failed")?;
            Ok(())
        }
    }
}
