//! `rebound enroll --cs ADDR[,ADDR…] --id NAME --token-file F [--out DIR]`: an
//! operator's own admin certificate, from a one-time token another operator
//! created (`rebound token create --role admin --id NAME`), so each
//! operator holds a certificate of their own that can be revoked alone.
//! The files land where the CLI looks first (`~/.config/rebound`).

use super::CsArgs;
use anyhow::{Context, Result};
use rebound_common::enrollment::{enroll_with, Credential, EnrollOptions, TokenText};
use rebound_common::pki::Role;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct EnrollArgs {
    /// The configuration server, host:port (the host must be in its
    /// certificate); with a standby CS every address comma-separated,
    /// tried in turn [env REBOUND_CS].
    #[arg(long = "cs", value_name = "ADDR[,ADDR…]")]
    pub cs: Option<String>,
    /// This operator's name (the certificate is admin:NAME).
    #[arg(long)]
    pub id: String,
    /// The token `rebound token create --role admin --id NAME` printed.
    #[arg(
        long,
        required_unless_present = "token_file",
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// A file holding the token (keeps it out of the process list).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Where ca.pem, admin.pem and admin.key go [default ~/.config/rebound].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub async fn run(args: EnrollArgs) -> Result<()> {
    rebound_common::tls::install_crypto_provider();
    let cs = CsArgs {
        cs: args.cs.clone(),
        certs: None,
    };
    let text = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the token file {}", f.display()))?,
        (None, None) => anyhow::bail!("give --token or --token-file"),
    };
    let out = match args.out {
        Some(d) => d,
        None => cs.certs_candidates().remove(0),
    };
    let e = enroll_with(&EnrollOptions {
        cs_addr: cs.addr(),
        credential: Credential::Token(TokenText::parse(&text)?),
        role: Role::Admin,
        id: args.id.clone(),
        server_names: Vec::new(),
        out_dir: out,
    })
    .await?;
    println!(
        "enrolled as admin:{} with the configuration server at {}\nCA fingerprint (blake3): {}\n\
         certificate {}, key {}, CA {}",
        args.id,
        e.cs_addr,
        e.ca_fingerprint,
        e.cert.display(),
        e.key.display(),
        e.ca.display()
    );
    Ok(())
}
