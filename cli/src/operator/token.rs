//! `rebound token create --role ROLE --id ID [--ttl 1h]`: a one-time
//! enrollment token for exactly one component, what a PS, an MT, an
//! operator or a re-enrolling agent needs (the passphrase enrolls only new
//! agents). The text is shown once; the CS keeps only a verifier.

use super::{parse_duration, CsArgs};
use anyhow::Result;
use rebound_proto::control as pb;
use std::time::{Duration, UNIX_EPOCH};

/// Enrollment tokens.
#[derive(clap::Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a one-time token for ROLE:ID and print it (once).
    Create(CreateArgs),
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// agent, ps, mt or admin.
    #[arg(long)]
    pub role: String,
    /// The component's id (an agent's machine id).
    #[arg(long)]
    pub id: String,
    /// How long the token may be used (e.g. 30m, 1h, 2d; at most 7d).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Print only the token (for scripts).
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub cs: CsArgs,
}

/// The enroll command a component runs with the token.
fn enroll_command(role: &str, id: &str, cs: &str) -> String {
    let bin = match role {
        "agent" => "rebound-agent enroll",
        "ps" => "rebound-ps enroll",
        "mt" => "rebound-mt enroll",
        _ => "rebound enroll",
    };
    format!("{bin} --cs {cs} --id {id} --token-file FILE")
}

pub async fn run(cmd: TokenCmd) -> Result<()> {
    let TokenCmd::Create(args) = cmd;
    let mut c = super::connect(&args.cs).await?;
    let r = args.cs.answer(
        c.create_token(pb::CreateTokenRequest {
            role: args.role.clone(),
            id: args.id.clone(),
            ttl_secs: args.ttl.as_secs().max(1),
        })
        .await,
        &format!("creating a token for {}:{}", args.role, args.id),
    )?;
    if args.quiet {
        println!("{}", r.token);
        return Ok(());
    }
    let until = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(r.expires_ms));
    println!(
        "enrollment token for {}:{} (single use, valid until {until}; shown once):\n\n    {}\n\n\
         On that host, save it to a file (mode 0600) and run:\n    {}",
        args.role,
        args.id,
        r.token,
        enroll_command(&args.role, &args.id, &args.cs.addr())
    );
    Ok(())
}
