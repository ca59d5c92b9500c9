//! Revocation at the CS in-process: `Admin.Revoke` pushes the list to every
//! connected PS and MT and to each one that connects later, cuts the
//! revoked component's open control stream, and refuses it from then on.

use super::{connect, hello, up, Cs};
use rebound_common::pki::Role;
use rebound_proto::control as pb;
use rebound_proto::control::{component_message, server_message, ServerMessage};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::Streaming;

/// Reads the next command on a control stream and answers it ok.
async fn answer_next(
    tx: &mpsc::Sender<pb::ComponentMessage>,
    down: &mut Streaming<ServerMessage>,
) -> pb::Command {
    let cmd = match tokio::time::timeout(Duration::from_secs(5), down.message()).await {
        Ok(Ok(Some(ServerMessage {
            msg: Some(server_message::Msg::Command(c)),
        }))) => c,
        other => panic!("expected a command, got {other:?}"),
    };
    tx.send(up(component_message::Msg::Result(pb::CommandResult {
        id: cmd.id.clone(),
        ok: true,
        ..Default::default()
    })))
    .await
    .unwrap();
    cmd
}

/// A `Revoke` the CS must refuse.
async fn refused(
    admin: &mut rebound_proto::control::admin_client::AdminClient<tonic::transport::Channel>,
    role: &str,
    id: &str,
) -> tonic::Status {
    admin
        .revoke(pb::RevokeRequest {
            role: role.into(),
            id: id.into(),
        })
        .await
        .unwrap_err()
}

fn serials_of(cmd: &pb::Command) -> Vec<String> {
    match &cmd.cmd {
        Some(pb::command::Cmd::SetRevoked(s)) => s.serials.clone(),
        other => panic!("expected SetRevoked, got {other:?}"),
    }
}

#[tokio::test]
async fn a_revoked_agent_is_cut_refused_and_every_ps_and_mt_told() {
    let cs = Cs::start().await;
    let ps = cs.enrolled(Role::Ps, "ps1").await;
    let mt = cs.enrolled(Role::Mt, "mt1").await;
    let agent = cs.enrolled(Role::Agent, "m1").await;
    let (ps_tx, mut ps_down) = connect(cs.channel(&ps).await, hello("ps", "ps1", "onprem", "a"))
        .await
        .unwrap();
    let (_agent_tx, mut agent_down) = connect(
        cs.channel(&agent).await,
        hello("agent", "m1", "onprem", "a"),
    )
    .await
    .unwrap();

    let mut admin = cs.admin().await;
    let ask = tokio::spawn(async move {
        admin
            .revoke(pb::RevokeRequest {
                role: "agent".into(),
                id: "m1".into(),
            })
            .await
    });
    // The connected PS takes the list before Revoke answers; the MT, not
    // connected, is pending.
    let pushed = serials_of(&answer_next(&ps_tx, &mut ps_down).await);
    let r = ask.await.unwrap().unwrap().into_inner();
    assert!(!r.serials.is_empty());
    assert_eq!(pushed, r.serials);
    assert_eq!(r.pending.len(), 1, "{:?}", r.pending);
    assert!(
        r.pending[0].starts_with("mt:mt1: not connected"),
        "{:?}",
        r.pending
    );

    // The agent's open control stream ends, and it is refused from then on.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match agent_down.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the revoked agent's stream ends within seconds");
    assert!(!matches!(end, Ok(Some(_))));
    let again = async {
        let ch = agent.connect(&cs.addr, "localhost", Role::Cs).await;
        match ch {
            Ok(ch) => connect(ch, hello("agent", "m1", "onprem", "b"))
                .await
                .err()
                .map(|e| e.to_string()),
            Err(e) => Some(e.to_string()),
        }
    };
    let msg = again.await.expect("the revoked agent is refused");
    assert!(msg.to_lowercase().contains("revoked"), "{msg}");

    // The MT connecting later gets the list right after its welcome.
    let (mt_tx, mut mt_down) = connect(cs.channel(&mt).await, hello("mt", "mt1", "azure", "a"))
        .await
        .unwrap();
    assert_eq!(
        serials_of(&answer_next(&mt_tx, &mut mt_down).await),
        r.serials
    );

    // `rebound components` shows it revoked; an unknown component is named.
    let mut admin = cs.admin().await;
    let list = admin
        .components(pb::ComponentsRequest {})
        .await
        .unwrap()
        .into_inner();
    let m1 = list.components.iter().find(|c| c.id == "m1").unwrap();
    assert_eq!(m1.health, "revoked");
    let e = refused(&mut admin, "ps", "nope").await;
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(
        e.message().contains("no certificate was issued to ps:nope"),
        "{e}"
    );
    let e = refused(&mut admin, "cs", "cs").await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
}
