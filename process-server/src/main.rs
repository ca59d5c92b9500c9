//! `rebound-ps`: the process server binary, a thin shell over the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use rebound_common::telemetry::{self, LogFormat};
use rebound_common::{config, tls};
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
        /// Log as `text` or `json` lines.
        #[arg(long, default_value = "text")]
        log_format: LogFormat,
    },
    /// Enrolls with the configuration server: generates this PS's key, gets
    /// its certificate (role ps) and writes ca.pem, ps.pem and ps.key.
    Enroll {
        /// The configuration server, host:port.
        #[arg(long)]
        cs: String,
        /// File holding the deployment passphrase (`rebound-cs init` printed it).
        #[arg(long)]
        passphrase_file: PathBuf,
        /// This PS's id (the CS and operators name it by this).
        #[arg(long)]
        id: String,
        /// Where to write the files (point [tls] at them).
        #[arg(long, default_value = "/etc/rebound/ps")]
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run { config, log_format } => {
            telemetry::init(log_format);
            tls::install_crypto_provider();
            let cfg: rebound_ps::Config = config::load(config.as_deref())?;
            let listener = tokio::net::TcpListener::bind(&cfg.listen)
                .await
                .with_context(|| format!("cannot listen on {} (the `listen` key)", cfg.listen))?;
            rebound_ps::run(cfg, listener, rebound_common::signal::shutdown_signal()).await?;
        }
        Cmd::Enroll {
            cs,
            passphrase_file,
            id,
            out,
        } => {
            tls::install_crypto_provider();
            let pass = std::fs::read_to_string(&passphrase_file).with_context(|| {
                format!(
                    "cannot read the passphrase file {}",
                    passphrase_file.display()
                )
            })?;
            let e = rebound_common::enrollment::enroll(
                &cs,
                pass.trim(),
                rebound_common::pki::Role::Ps,
                &id,
                &out,
            )
            .await?;
            println!("enrolled as ps:{id} with the configuration server at {cs}");
            println!("CA fingerprint (blake3): {}", e.ca_fingerprint);
            println!(
                "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}",
                e.ca, e.cert, e.key
            );
            println!("[cs]\naddr = {cs:?}");
        }
    }
    Ok(())
}
