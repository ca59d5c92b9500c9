//! `rebound-mt`: the master target binary, a thin wrapper over the
//! `rebound_mt` library (DESIGN.md §2).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use rebound_common::telemetry::{self, LogFormat};
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
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the master target.
    Run {
        /// Config file (TOML); see example-config.toml. Without it, defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Log format: text or json.
        #[arg(long, default_value = "text")]
        log_format: LogFormat,
    },
    /// Enroll with the configuration server: generates this MT's key, gets
    /// its certificate (role mt) and writes ca.pem, mt.pem and mt.key.
    Enroll {
        /// The configuration server, host:port.
        #[arg(long)]
        cs: String,
        /// File holding the deployment passphrase (`rebound-cs init` printed it).
        #[arg(long)]
        passphrase_file: PathBuf,
        /// This MT's id (the CS and operators name it by this).
        #[arg(long)]
        id: String,
        /// Where to write the files (point [tls] at them).
        #[arg(long, default_value = "/etc/rebound/mt")]
        out: PathBuf,
    },
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
    match real_main(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rebound-mt: error: {}", error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause once (many messages already embed
/// their cause).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

async fn real_main(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run { config, log_format } => {
            rebound_common::tls::install_crypto_provider();
            telemetry::init(log_format);
            let cfg: rebound_mt::Config = rebound_common::config::load(config.as_deref())?;
            let listener = tokio::net::TcpListener::bind(&cfg.listen)
                .await
                .with_context(|| format!("cannot listen on {} (config key listen)", cfg.listen))?;
            let nbd = std::net::TcpListener::bind(&cfg.nbd_listen).with_context(|| {
                format!(
                    "cannot listen on {} (config key nbd_listen)",
                    cfg.nbd_listen
                )
            })?;
            rebound_mt::run(
                cfg,
                listener,
                nbd,
                rebound_common::signal::shutdown_signal(),
            )
            .await?;
            Ok(())
        }
        Cmd::Enroll {
            cs,
            passphrase_file,
            id,
            out,
        } => {
            rebound_common::tls::install_crypto_provider();
            let pass = std::fs::read_to_string(&passphrase_file).with_context(|| {
                format!(
                    "cannot read the passphrase file {}",
                    passphrase_file.display()
                )
            })?;
            let e = rebound_common::enrollment::enroll(
                &cs,
                pass.trim(),
                rebound_common::pki::Role::Mt,
                &id,
                &out,
            )
            .await?;
            println!("enrolled as mt:{id} with the configuration server at {cs}");
            println!("CA fingerprint (blake3): {}", e.ca_fingerprint);
            println!(
                "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}",
                e.ca, e.cert, e.key
            );
            println!("[cs]\naddr = {cs:?}");
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
