//! The enrollment rules against a running CS (in process): who the
//! passphrase enrolls, and what a token grants, each refusal with its
//! message and its event.

use crate::store::Store;
use crate::tests::Cs;
use rebound_common::enrollment::{enroll, enroll_token, EnrollError};
use rebound_common::pki::Role;

/// Asserts the enrollment was refused by the CS with a message containing
/// every `want`, and that nothing was written.
fn refused(
    r: Result<rebound_common::enrollment::Enrolled, EnrollError>,
    out: &std::path::Path,
    want: &[&str],
) {
    let e = r.expect_err("enrollment must be refused");
    let msg = e.to_string();
    for w in want {
        assert!(msg.contains(w), "{w:?} not in: {msg}");
    }
    assert!(
        !out.join("ca.pem").exists(),
        "nothing is written on a refusal"
    );
}

#[tokio::test]
async fn the_passphrase_enrolls_only_new_agents_and_tokens_only_their_identity() {
    let cs = Cs::start().await;
    let dir = cs.dir.parent().unwrap().to_path_buf();
    let pass = std::fs::read_to_string(cs.dir.join("passphrase")).unwrap();
    let out = |n: &str| dir.join(n);

    // The passphrase as a PS or an MT: refused by the CS, which names the
    // token to create (the client refuses first; the raw request is below).
    for (role, id) in [(Role::Ps, "ps1"), (Role::Mt, "mt1")] {
        let r = enroll(&cs.addr, &pass, role, id, &out("x")).await;
        refused(
            r,
            &out("x"),
            &[
                &format!("{role}:{id}"),
                &format!("rebound token create --role {role} --id {id}"),
            ],
        );
    }
    // An agent enrolls once with the passphrase; again, its id is held.
    cs.enrolled(Role::Agent, "m1").await;
    let r = enroll(&cs.addr, &pass, Role::Agent, "m1", &out("again")).await;
    refused(
        r,
        &out("again"),
        &[
            "agent:m1",
            "already has a live certificate",
            "rebound token create --role agent --id m1",
        ],
    );
    // With a token it re-enrolls.
    let t = cs.token(Role::Agent, "m1", 0).await;
    enroll_token(&cs.addr, &t, Role::Agent, "m1", &out("re"))
        .await
        .unwrap();
    // The token is used up.
    let r = enroll_token(&cs.addr, &t, Role::Agent, "m1", &out("reuse")).await;
    refused(
        r,
        &out("reuse"),
        &[
            "agent:m1",
            "already used",
            "rebound token create --role agent --id m1",
        ],
    );
    // A token for another identity.
    let t = cs.token(Role::Mt, "mt1", 0).await;
    let r = enroll_token(&cs.addr, &t, Role::Ps, "mt1", &out("other")).await;
    refused(
        r,
        &out("other"),
        &[
            "ps:mt1",
            "created for mt:mt1",
            "rebound token create --role ps --id mt1",
        ],
    );
    // ... which stays good for its own identity.
    enroll_token(&cs.addr, &t, Role::Mt, "mt1", &out("mt1"))
        .await
        .unwrap();
    // An expired token.
    let t = cs.token(Role::Ps, "ps1", 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = enroll_token(&cs.addr, &t, Role::Ps, "ps1", &out("late")).await;
    refused(
        r,
        &out("late"),
        &[
            "ps:ps1",
            "expired",
            "rebound token create --role ps --id ps1",
        ],
    );
    // A token of another deployment: the CA pin fails before the secret goes.
    let mut other =
        rebound_common::enrollment::TokenText::parse(&cs.token(Role::Ps, "ps1", 0).await).unwrap();
    other.ca_hash = "00".repeat(32);
    let r = enroll_token(&cs.addr, &other.to_string(), Role::Ps, "ps1", &out("pin")).await;
    refused(
        r,
        &out("pin"),
        &["not the one the token pins", "the token was not sent"],
    );
    // An admin enrolls with a token.
    let t = cs.token(Role::Admin, "ops1", 0).await;
    enroll_token(&cs.addr, &t, Role::Admin, "ops1", &out("ops1"))
        .await
        .unwrap();

    // Every issue is recorded; every refusal raised an event.
    let store = cs.store().await;
    for (role, id) in [
        (Role::Agent, "m1"),
        (Role::Mt, "mt1"),
        (Role::Admin, "ops1"),
    ] {
        assert!(
            store.latest_cert(role, id).await.unwrap().is_some(),
            "{role}:{id}"
        );
    }
    assert_eq!(
        store
            .live_certs(Role::Agent, "m1", rebound_common::time::now_ms())
            .await
            .unwrap()
            .len(),
        2
    );
    let events = store.recent_events(100).await.unwrap();
    let refusals = events
        .iter()
        .filter(|e| e.kind == "enrollment-refused")
        .count();
    assert!(refusals >= 4, "{events:?}");
    cs.stop_with(store).await;
}

/// The CS's own rule, whatever the client does: a valid passphrase proof
/// for a PS, an MT or an operator is still refused, naming the token.
#[tokio::test]
async fn a_valid_passphrase_proof_grants_no_server_or_operator() {
    use super::grant::by_passphrase;
    use rebound_common::enrollment::{
        client_proof, passphrase_key, PassphraseVerifier, ProofRequest,
    };
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::SqliteStore::open(&dir.path().join("cs.db"))
        .await
        .unwrap();
    let key = passphrase_key(b"salt", "the deployment passphrase");
    let v = PassphraseVerifier::from_key(&key);
    let fp = [7u8; 32];
    for (role, id) in [(Role::Ps, "ps1"), (Role::Mt, "mt1"), (Role::Admin, "ops")] {
        let req = ProofRequest {
            role: role.as_str(),
            id,
            csr_pem: "csr",
            client_nonce: &[1u8; 32],
            server_cert_fp: &fp,
        };
        let proof = client_proof(&key, &req);
        assert!(v.check_client_proof(&proof, &req));
        let Err(e) = by_passphrase(&store, &v, &proof, &req, role, 1).await else {
            panic!("{role}:{id} enrolled with the passphrase");
        };
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let m = e.message();
        assert!(
            m.contains(&format!("{role}:{id}"))
                && m.contains(&format!("rebound token create --role {role} --id {id}")),
            "{m}"
        );
    }
}

/// A PS certificate is from the deployment's CA and may name any host, so
/// a rogue PS can stand where the client dials the CS. The client sends the
/// token's secret only to a `cs` certificate: here the refusal names what
/// it met, and the token still works at the real CS afterwards (a server
/// that got the secret could have redeemed it: it holds the same store and
/// CA key).
#[tokio::test]
async fn a_token_goes_only_to_the_cs_not_to_a_ps_certificate_from_the_same_ca() {
    use rebound_common::pki::{write_cert, Ca};
    use rebound_common::tls::{ClientAuth, Revocations, TlsFiles};
    use rebound_proto::control::enrollment_server::EnrollmentServer;
    let cs = Cs::start().await;
    let ca_pem = std::fs::read_to_string(cs.dir.join("ca.pem")).unwrap();
    let ca_key = std::fs::read_to_string(cs.dir.join("ca.key")).unwrap();
    let rogue_dir = cs.dir.parent().unwrap().join("rogue");
    std::fs::create_dir_all(&rogue_dir).unwrap();
    std::fs::write(rogue_dir.join("ca.pem"), &ca_pem).unwrap();
    let ca = Ca::from_pem(&ca_pem, &ca_key).unwrap();
    let names = ["127.0.0.1".to_string(), "localhost".to_string()];
    let ps = ca.issue(Role::Ps, "rogue", &names).unwrap();
    write_cert(&rogue_dir, "ps", &ps).unwrap();
    let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(cs.store().await);
    let svc = super::EnrollmentService::new(store, ca_pem, ca_key, &ps.cert_pem).unwrap();
    let acceptor = TlsFiles::in_dir(&rogue_dir, "ps")
        .acceptor(ClientAuth::Optional, &Revocations::new())
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rogue_addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EnrollmentServer::new(svc))
            .serve_with_incoming(acceptor.incoming(listener)),
    );
    let token = cs.token(Role::Admin, "ops2", 0).await;
    let out = cs.dir.parent().unwrap().join("ops2");
    let r = enroll_token(&rogue_addr, &token, Role::Admin, "ops2", &out).await;
    refused(
        r,
        &out,
        &[
            "presented certificate ps:rogue",
            "only the configuration server (a cs certificate) enrolls",
            "the token was not sent",
        ],
    );
    server.abort();
    enroll_token(&cs.addr, &token, Role::Admin, "ops2", &out)
        .await
        .expect("the token was never sent, so it still works at the CS");
    let store = cs.store().await;
    cs.stop_with(store).await;
}
