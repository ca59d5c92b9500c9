//! `rebound revoke ROLE:ID`: the CS revokes every unexpired certificate of
//! a component, ends its control stream and pushes the revocation list to
//! every PS and MT, which close the component's open streams.

use super::fleet::component_name;
use super::CsArgs;
use anyhow::Result;
use rebound_proto::control as pb;

/// Revoke a component's certificates: `rebound revoke ps:ps-onprem` or
/// `rebound revoke agent m1`. The CS, every PS and MT refuse it within
/// seconds, also on streams already open. To let it back, create a token
/// and enroll it again.
#[derive(clap::Args, Debug)]
pub struct RevokeArgs {
    /// ROLE:ID, or ROLE followed by ID (role: agent, ps, mt or admin).
    pub component: String,
    /// The id, when the role is given alone.
    pub id: Option<String>,
    #[command(flatten)]
    pub cs: CsArgs,
}

/// The role and id named, admin included (an operator certificate can be
/// revoked too).
fn revoked_name(component: &str, id: Option<&str>) -> Result<(String, String)> {
    let admin = match (component.split_once(':'), id) {
        (Some(("admin", i)), None) => Some(i),
        (None, Some(i)) if component == "admin" => Some(i),
        _ => None,
    };
    match admin {
        Some("") => anyhow::bail!("{component:?}: the id is not empty, e.g. admin:alice"),
        Some(i) => Ok(("admin".to_string(), i.to_string())),
        None => component_name(component, id),
    }
}

pub async fn run(args: RevokeArgs) -> Result<()> {
    let (role, id) = revoked_name(&args.component, args.id.as_deref())?;
    let mut c = super::connect(&args.cs).await?;
    let r = args.cs.answer(
        c.revoke(pb::RevokeRequest {
            role: role.clone(),
            id: id.clone(),
        })
        .await,
        &format!("revoking {role}:{id}"),
    )?;
    if r.serials.is_empty() {
        println!("{role}:{id} revoked (it had no unexpired certificate)");
    } else {
        println!(
            "{role}:{id} revoked: certificate(s) {}",
            r.serials.join(", ")
        );
    }
    for p in &r.pending {
        println!("  not told yet: {p}");
    }
    println!("to let it back: rebound token create --role {role} --id {id}, then enroll it again");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_a_component_or_an_admin() {
        let ok = |c: &str, id: Option<&str>| revoked_name(c, id).unwrap();
        assert_eq!(ok("ps:ps1", None), ("ps".into(), "ps1".into()));
        assert_eq!(ok("agent", Some("m1")), ("agent".into(), "m1".into()));
        assert_eq!(ok("admin:alice", None), ("admin".into(), "alice".into()));
        assert_eq!(ok("admin", Some("alice")), ("admin".into(), "alice".into()));
        for (c, id) in [("admin:", None), ("cs:x", None), ("ps", None)] {
            assert!(revoked_name(c, id).is_err(), "{c} {id:?}");
        }
    }
}
