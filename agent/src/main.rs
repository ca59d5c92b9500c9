//! `rebound-agent`: thin command line over the `rebound_agent` library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rebound_common::telemetry::LogFormat;

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
    /// Get this agent's certificate from the configuration server, using the
    /// deployment passphrase (printed once by `rebound-cs init`).
    Enroll {
        /// The configuration server, host:port (host must be in its certificate).
        #[arg(long)]
        cs: String,
        /// File holding the deployment passphrase.
        #[arg(long)]
        passphrase_file: PathBuf,
        /// The machine id (the config's machine_id).
        #[arg(long)]
        id: String,
        /// Where ca.pem, agent.pem and agent.key go.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Enroll {
            cs,
            passphrase_file,
            id,
            out,
        } => {
            rebound_common::tls::install_crypto_provider();
            let out = std::path::absolute(&out).unwrap_or(out);
            let passphrase = std::fs::read_to_string(&passphrase_file).with_context(|| {
                format!(
                    "cannot read the passphrase file {}",
                    passphrase_file.display()
                )
            })?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let e = rt.block_on(rebound_common::enrollment::enroll(
                &cs,
                &passphrase,
                rebound_common::pki::Role::Agent,
                &id,
                &out,
            ))?;
            println!("enrolled agent:{id} with the configuration server at {cs}");
            println!("  CA certificate: {}", e.ca.display());
            println!("  certificate:    {}", e.cert.display());
            println!("  private key:    {}", e.key.display());
            println!("  CA fingerprint: {}", e.ca_fingerprint);
            println!("Put these in the agent config:");
            println!("  machine_id = {id:?}");
            println!("  [tls]");
            println!("  ca = {:?}", e.ca.display().to_string());
            println!("  cert = {:?}", e.cert.display().to_string());
            println!("  key = {:?}", e.key.display().to_string());
            println!("  [cs]");
            println!("  addr = {cs:?}");
            Ok(())
        }
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
