//! `rebound`: the operator CLI (thin main over `rebound_cli`).

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "rebound",
    version,
    about = "Rebound disaster-recovery replication: operator CLI"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Operator commands over the configuration server.
    #[command(flatten)]
    Operator(rebound_cli::operator::OperatorCmd),
    /// Run the whole DR story on loopback with no setup (a CS, a PS and an MT
    /// per site, a demo machine written through NBD): protect, fail over,
    /// commit, reprotect, fail back, commit, reprotect again, checking every
    /// step by blake3; print a summary with the measured RPO and RTO.
    Demo {
        /// Keep the throw-away directory and print where it is.
        #[arg(long)]
        keep: bool,
        /// Size of the demo disk in MiB.
        #[arg(long, default_value_t = 16)]
        disk_mib: u64,
        /// Number of recovery points to cut and verify while protected
        /// onprem → azure (one more after each reprotect).
        #[arg(long, default_value_t = 5)]
        points: usize,
    },
    /// Measure replication cost, throughput, RPO, resync and RTO on this
    /// machine beside its own limits and peer tools; print one table. Runs
    /// the `rebound-bench` binary beside this one with the same arguments
    /// (`rebound bench --help` lists them: --quick, --json FILE, --dir DIR,
    /// --only PARTS).
    #[command(disable_help_flag = true)]
    Bench {
        /// The arguments of `rebound-bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Endurance run: fio with crc32c verify through the agent on two
    /// disks, a recovery point every second, random kill -9 of the agent,
    /// PS and MT and network faults, then every retained point compared by
    /// blake3; exits non-zero on any difference. Runs `rebound-bench soak`
    /// with the same arguments (--minutes N, --seed S, --disk-mib M,
    /// --dir DIR).
    #[command(disable_help_flag = true)]
    Soak {
        /// The arguments of `rebound-bench soak`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Write a lab PKI (CA, PS, MT, admin and agent certificates) into a directory.
    Certs {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Machine ids to issue agent certificates for.
        #[arg(long = "machine", default_value = "m1")]
        machines: Vec<String>,
        /// How long the certificates stay valid ("90d", "12h"; the CA's
        /// is 10 years).
        #[arg(long, default_value = "90d", value_parser = rebound_common::pki::lifetime::parse)]
        lifetime: std::time::Duration,
    },
    /// List the recovery points of a machine: from the configuration server
    /// when --cs (or REBOUND_CS) is given, else straight from a master target
    /// (--mt, default 127.0.0.1:9444, with --certs holding admin.pem).
    Points {
        /// Machine id (at a master target: the replication id, by default
        /// the machine id).
        replication: String,
        /// Ask this configuration server [env REBOUND_CS].
        #[arg(long = "cs", value_name = "ADDR", conflicts_with = "mt")]
        cs: Option<String>,
        /// Ask this master target directly.
        #[arg(long, value_name = "ADDR")]
        mt: Option<String>,
        /// Directory with ca.pem, admin.pem and admin.key [CS: env
        /// REBOUND_CERTS or ~/.config/rebound; MT: /etc/rebound/tls].
        #[arg(long, value_name = "DIR")]
        certs: Option<PathBuf>,
        /// Output format: table or json.
        #[arg(long, default_value = "table")]
        output: String,
    },
    /// Roll a replica back to a recovery point (saves pre-images first).
    Rollback {
        replication: String,
        /// The point id.
        #[arg(long)]
        point: String,
        #[command(flatten)]
        mt: MtArgs,
    },
    /// Undo a rollback: write the pre-images back, returning the replica to latest.
    RestorePreImages {
        replication: String,
        #[command(flatten)]
        mt: MtArgs,
    },
}

#[derive(clap::Args)]
struct MtArgs {
    /// Master target address (host:port).
    #[arg(long, default_value = "127.0.0.1:9444")]
    mt: String,
    /// Directory with ca.pem, admin.pem and admin.key (the MT checks by the
    /// host of --mt).
    #[arg(long, default_value = "/etc/rebound/tls")]
    certs: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    rebound_common::tls::install_crypto_provider();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Operator(cmd) => rebound_cli::operator::run(cmd).await,
        Cmd::Demo {
            keep,
            disk_mib,
            points,
        } => {
            if std::env::var_os("RUST_LOG").is_some() {
                rebound_common::telemetry::init(Default::default());
            }
            rebound_cli::demo::run(rebound_cli::demo::DemoOptions {
                keep,
                disk_mib,
                points,
            })
            .await
        }
        Cmd::Bench { args } => std::process::exit(rebound_cli::bench::run(&args)?),
        Cmd::Soak { args } => std::process::exit(rebound_cli::bench::soak(&args)?),
        Cmd::Certs {
            out,
            machines,
            lifetime,
        } => rebound_cli::certs::write(&out, &machines, lifetime),
        Cmd::Points {
            replication,
            cs,
            mt,
            certs,
            output,
        } => {
            let cs = rebound_cli::operator::CsArgs { cs, certs };
            if mt.is_none() && cs.given() {
                let out = if output == "json" {
                    rebound_cli::operator::Output::Json
                } else {
                    rebound_cli::operator::Output::Table
                };
                return rebound_cli::operator::points_via_cs(&replication, &cs, out).await;
            }
            let mt = MtArgs {
                mt: mt.unwrap_or_else(|| "127.0.0.1:9444".into()),
                certs: cs.certs.unwrap_or_else(|| "/etc/rebound/tls".into()),
            };
            let mut c = rebound_cli::mt_admin::connect(&mt.mt, &mt.certs).await?;
            let r = rebound_cli::mt_admin::points(&mut c, &replication).await?;
            rebound_cli::mt_admin::print_points(&r, output == "json");
            Ok(())
        }
        Cmd::Rollback {
            replication,
            point,
            mt,
        } => {
            let mut c = rebound_cli::mt_admin::connect(&mt.mt, &mt.certs).await?;
            let r = rebound_cli::mt_admin::rollback(&mut c, &replication, &point).await?;
            println!(
                "{replication} rolled back to {point}: {} blocks restored ({} bytes of undo)",
                r.blocks_restored, r.undo_bytes
            );
            Ok(())
        }
        Cmd::RestorePreImages { replication, mt } => {
            let mut c = rebound_cli::mt_admin::connect(&mt.mt, &mt.certs).await?;
            let n = rebound_cli::mt_admin::restore_pre_images(&mut c, &replication).await?;
            println!(
                "{replication}: {n} blocks restored from pre-images; the replica is at latest"
            );
            Ok(())
        }
    }
}
