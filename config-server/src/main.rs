//! `rebound-cs`: the configuration server binary, a thin wrapper over the
//! `rebound_cs` library (DESIGN.md §2).

use anyhow::{Context, Result};
use clap::Parser;
use rebound_common::cli_args::{self, RunArgs};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "rebound-cs",
    version,
    about = "Rebound configuration server: enrollment, control channel, jobs and the DR lifecycle"
)]
enum Cmd {
    /// Create a deployment: CA, CS server certificate, admin certificate for
    /// the CLI, enrollment passphrase, database and config. Installed layout
    /// by default: /etc/rebound/cs.toml, /etc/rebound/tls/ (ca, cs, admin),
    /// /etc/rebound/passphrase (mode 0600), database in /var/lib/rebound/cs.
    /// The passphrase is printed once.
    Init {
        /// Put every file in DIR instead (DIR/config.toml, DIR/passphrase,
        /// the certificates and the database), as labs and tests do.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// DNS name or IP address components reach the CS by, put in its
        /// certificate (repeatable). Default: the host name. The listen host
        /// is always added, and localhost/127.0.0.1 when listening on
        /// 127.0.0.1.
        #[arg(long = "name")]
        names: Vec<String>,
        /// Listen address written to the config (default 127.0.0.1:7443).
        #[arg(long)]
        listen: Option<String>,
        /// How long the certificates the CA signs stay valid ("90d",
        /// "12h"), written to the config as cert_lifetime; the CS's and
        /// admin's certificates get it too. Default 90 days.
        #[arg(long, value_parser = rebound_common::pki::lifetime::parse)]
        cert_lifetime: Option<std::time::Duration>,
        /// Keep the state in this PostgreSQL database
        /// (postgres://USER@HOST:PORT/DB) instead of SQLite: the first CS
        /// of the deployment keeps the CA in it (its key sealed with a new
        /// key written to store.key beside the certificates).
        #[arg(long, value_name = "URL")]
        store_url: Option<String>,
        /// With --store-url: add this CS (a standby) to the deployment
        /// already in that database, instead of making one: its own server
        /// certificate from the stored CA, no new CA or passphrase.
        #[arg(long, requires = "store_url", requires = "secret_key_file")]
        join: bool,
        /// With --join: a copy of the store.key of the deployment's first
        /// CS (copied into this CS's directory).
        #[arg(long, value_name = "FILE", requires = "join")]
        secret_key_file: Option<PathBuf>,
    },
    /// Run the configuration server.
    Run(RunArgs),
    /// Sign a new admin certificate for the CLI with the CA (on the CS host,
    /// as root, like init): admin certificates expire after cert_lifetime
    /// and are not renewed. Writes admin.key (mode 0600) and admin.pem.
    AdminCert {
        /// Config file of the CS; default /etc/rebound/cs.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The operator's name: the certificate is admin:NAME.
        #[arg(long, default_value = rebound_cs::admin_cert::DEFAULT_ID)]
        id: String,
        /// Directory to write admin.pem and admin.key into; default the
        /// directory of the CS certificate ([tls] cert, /etc/rebound/tls).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Copy the SQLite database to FILE, consistent, while the CS runs
    /// (a PostgreSQL deployment is backed up with pg_dump or the server's
    /// own backups).
    Backup {
        /// Config file of the CS; default /etc/rebound/cs.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where to write the copy (must not exist).
        #[arg(long)]
        to: PathBuf,
    },
    /// Put a copy `backup` made in place of the SQLite database. The CS
    /// must be stopped; the database it replaces is kept beside it.
    Restore {
        /// Config file of the CS; default /etc/rebound/cs.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The copy to restore.
        #[arg(long)]
        from: PathBuf,
    },
    /// Replace the enrollment passphrase (enrolled components stay valid).
    /// Prints the new one and writes it to FILE (mode 0600).
    RotatePassphrase {
        /// Config file of the CS (for the database path); default
        /// /etc/rebound/cs.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where to write the new passphrase.
        #[arg(long)]
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    cli_args::exit_code("rebound-cs", real_main(Cmd::parse()).await)
}

async fn real_main(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Init {
            dir,
            names,
            listen,
            cert_lifetime,
            store_url,
            join,
            secret_key_file,
        } => {
            let mut layout = match &dir {
                Some(dir) => rebound_cs::init::Layout::in_dir(dir),
                None => rebound_cs::init::Layout::installed(std::path::Path::new("/")),
            };
            if let Some(lifetime) = cert_lifetime {
                layout.config.cert_lifetime = lifetime;
            }
            let out = match (&store_url, secret_key_file.filter(|_| join)) {
                (Some(url), Some(key)) => {
                    let j = rebound_cs::init::join(&layout, &names, listen.as_deref(), url, &key)
                        .await?;
                    print_joined(&j, dir.is_some());
                    if rebound_cs::init::url_holds_password(url) {
                        println!("{}", rebound_cs::init::password_note(&j.config_file));
                    }
                    return Ok(());
                }
                (Some(url), None) => {
                    rebound_cs::init::init_first(&layout, &names, listen.as_deref(), url).await?
                }
                (None, _) => {
                    rebound_cs::init::init_layout(&layout, &names, listen.as_deref()).await?
                }
            };
            println!(
                "Deployment created: config {}, certificates in {}.",
                out.config_file.display(),
                out.dir.display()
            );
            println!(
                "CS certificate names: {} (components must dial one of them)",
                out.server_names.join(", ")
            );
            println!();
            println!(
                "Enrollment passphrase (shown once; also in {}):",
                out.passphrase_file.display()
            );
            println!();
            println!("    {}", out.passphrase);
            println!();
            if dir.is_some() {
                println!(
                    "Start the server:   rebound-cs run --config {}",
                    out.config_file.display()
                );
            } else {
                println!(
                    "Start the server:   systemctl enable --now rebound-cs (or rebound-cs run)"
                );
            }
            println!(
                "Enroll agents:      rebound-agent enroll --cs {} --passphrase-file {} --id MACHINE",
                out.listen,
                out.passphrase_file.display()
            );
            println!(
                "Enroll a PS or MT:  rebound token create --role ps --id ID (with the CLI \
                 certificate below), then on its host: rebound-ps enroll --cs {} --token TOKEN \
                 --id ID --name ADDRESS",
                out.listen
            );
            println!(
                "CLI certificate:    {} / {} (CA {}); the CLI finds them in ~/.config/rebound \
                 or /etc/rebound/tls",
                out.admin_cert.display(),
                out.admin_key.display(),
                out.ca_cert.display()
            );
            if store_url.is_some() {
                println!(
                    "Add a standby CS:   copy {} to its host (mode 0600), then there: \
                     rebound-cs init --listen ADDRESS --store-url URL --join --secret-key-file \
                     store.key",
                    out.dir.join("store.key").display()
                );
            }
            if store_url
                .as_deref()
                .is_some_and(rebound_cs::init::url_holds_password)
            {
                println!("{}", rebound_cs::init::password_note(&out.config_file));
            }
            Ok(())
        }
        Cmd::Run(run) => {
            let cfg: rebound_cs::Config = run.start()?;
            if cfg.store.is_postgres() {
                // Waits as a standby until it holds the store lease.
                rebound_cs::run_with_lease(cfg, rebound_common::signal::shutdown_signal()).await?;
            } else {
                let listener = cli_args::listen(&cfg.listen, "listen").await?;
                rebound_cs::run(cfg, listener, rebound_common::signal::shutdown_signal()).await?;
            }
            Ok(())
        }
        Cmd::AdminCert { config, id, out } => {
            let cfg: rebound_cs::Config = cli_args::load_config(config.as_deref())?;
            let a = rebound_cs::admin_cert::issue(&cfg, &id, out.as_deref()).await?;
            let expiry = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(a.expiry_ms),
            );
            println!(
                "Admin certificate {} (serial {}) written: {} and key {} (mode 0600); it \
                 expires {expiry}. Run this again before then.",
                a.who,
                a.serial,
                a.cert.display(),
                a.key.display()
            );
            Ok(())
        }
        Cmd::Backup { config, to } => {
            let cfg: rebound_cs::Config = cli_args::load_config(config.as_deref())?;
            println!("{}", rebound_cs::backup::backup(&cfg, &to).await?);
            Ok(())
        }
        Cmd::Restore { config, from } => {
            let cfg: rebound_cs::Config = cli_args::load_config(config.as_deref())?;
            println!("{}", rebound_cs::backup::restore(&cfg, &from).await?);
            Ok(())
        }
        Cmd::RotatePassphrase { config, out } => {
            let cfg: rebound_cs::Config = cli_args::load_config(config.as_deref())?;
            let store = rebound_cs::store::open(&cfg.store, &cfg.db).await?;
            let pass = rebound_cs::enrollment::new_passphrase();
            let set = rebound_cs::enrollment::set_passphrase(store.as_ref(), &pass).await;
            store.close().await;
            set?;
            write_private(&out, &format!("{pass}\n"))
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "New enrollment passphrase (also in {}):\n\n    {pass}\n",
                out.display()
            );
            Ok(())
        }
    }
}

/// What `init --join` prints.
fn print_joined(j: &rebound_cs::init::Joined, in_dir: bool) {
    println!(
        "CS added to the deployment: config {}, certificates in {}, store key {}.",
        j.config_file.display(),
        j.dir.display(),
        j.key_file.display()
    );
    println!(
        "CS certificate names: {} (components must dial one of them)",
        j.server_names.join(", ")
    );
    if in_dir {
        println!(
            "Start it:           rebound-cs run --config {} (it waits as a standby while \
             another CS serves)",
            j.config_file.display()
        );
    } else {
        println!("Start it:           systemctl enable --now rebound-cs");
    }
    println!(
        "Components and the CLI: give every CS, e.g. --cs FIRST,{}",
        j.listen
    );
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}
