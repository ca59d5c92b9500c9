use super::report::{LinkReporter, REPEAT_EVERY};
use super::*;
use crate::pki::{write_cert, Ca};
use crate::tls::TlsFiles;
use std::time::Instant;

fn ps(addr: &str) -> Peer {
    Peer {
        role: Role::Ps,
        id: "ps-onprem".into(),
        addr: addr.into(),
    }
}

/// A TLS server on 127.0.0.1 whose PS certificate names only `names`, and
/// an agent's client files from the same CA.
async fn tls_server(names: &[&str]) -> (tempfile::TempDir, TlsFiles, String) {
    tls_server_as(Role::Ps, names).await
}

async fn tls_server_as(role: Role, names: &[&str]) -> (tempfile::TempDir, TlsFiles, String) {
    crate::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("test").unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    write_cert(dir.path(), "ps", &ca.issue(role, "x1", &names).unwrap()).unwrap();
    write_cert(
        dir.path(),
        "agent",
        &ca.issue(Role::Agent, "m1", &[]).unwrap(),
    )
    .unwrap();
    let addr = crate::tls::tests::serve(&TlsFiles::in_dir(dir.path(), "ps")).await;
    let client = TlsFiles::in_dir(dir.path(), "agent");
    (dir, client, addr)
}

/// How `client`'s connection to a PS at `addr` (checked by 127.0.0.1) fails.
async fn failure_of(client: &TlsFiles, addr: &str) -> LinkFailure {
    let err = client
        .connect(addr, "127.0.0.1", Role::Ps)
        .await
        .expect_err("the connection fails");
    LinkFailure::from_error(&err)
}

#[tokio::test]
async fn a_certificate_for_another_name_is_a_tls_name_failure_with_the_enroll_fix() {
    let (_dir, client, addr) = tls_server(&["wrong.invalid"]).await;
    let f = failure_of(&client, &addr).await;
    assert_eq!(
        f.cause,
        LinkCause::TlsName {
            expected: "127.0.0.1".into(),
            presented: "wrong.invalid".into(),
        },
        "{}",
        f.detail
    );
    assert_eq!(f.cause.kind(), "link-tls-name");
    let msg = f.message(&ps(&addr));
    assert!(
        msg.contains("TLS certificate not valid for name 127.0.0.1")
            && msg.contains("wrong.invalid")
            && msg.contains("rebound-ps enroll --name 127.0.0.1")
            && msg.contains(&format!("ps ps-onprem at {addr}")),
        "{msg}"
    );
}

#[tokio::test]
async fn a_matching_certificate_connects() {
    let (_dir, client, addr) = tls_server(&["127.0.0.1"]).await;
    client.connect(&addr, "127.0.0.1", Role::Ps).await.unwrap();
}

#[tokio::test]
async fn a_server_of_another_role_is_a_wrong_role_failure() {
    let (_dir, client, addr) = tls_server_as(Role::Mt, &["127.0.0.1"]).await;
    let f = failure_of(&client, &addr).await;
    assert_eq!(f.cause, LinkCause::WrongRole, "{}", f.detail);
    assert_eq!(f.cause.kind(), "link-wrong-role");
    let msg = f.message(&ps(&addr));
    assert!(
        msg.contains("not a ps certificate") && msg.contains("address"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_untrusted() {
    let (_dir, client, addr) = tls_server(&["127.0.0.1"]).await;
    // The client trusts a different CA.
    let other = tempfile::tempdir().unwrap();
    let ca = Ca::generate("other").unwrap();
    std::fs::write(other.path().join("ca.pem"), ca.cert_pem()).unwrap();
    let foreign = TlsFiles {
        ca: other.path().join("ca.pem"),
        ..client
    };
    let f = failure_of(&foreign, &addr).await;
    assert_eq!(
        f.cause,
        LinkCause::Untrusted { ours: false },
        "{}",
        f.detail
    );
    assert!(f.fix(&ps(&addr)).contains("rebound-ps enroll"));
}

#[tokio::test]
async fn a_closed_port_is_refused_with_the_service_to_check() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    // Typed: the io error from the socket.
    let io = tokio::net::TcpStream::connect(&addr).await.unwrap_err();
    assert_eq!(LinkCause::classify(&io), LinkCause::Refused);
    // Text: tonic's transport error, flattened by TlsFiles::connect.
    let (_dir, client, _) = tls_server(&["127.0.0.1"]).await;
    let f = failure_of(&client, &addr).await;
    assert_eq!(f.cause, LinkCause::Refused, "{}", f.detail);
    assert_eq!(f.cause.kind(), "link-refused");
    let fix = f.fix(&ps(&addr));
    assert!(
        fix.contains("rebound-ps runs on 127.0.0.1") && fix.contains("firewall"),
        "{fix}"
    );
}

#[test]
fn certificate_errors_and_alerts_tell_whose_certificate_is_wrong() {
    use AlertDescription as A;
    use CertificateError as C;
    use LinkCause::{Expired, NotYetValid, Revoked, Untrusted};
    let theirs = rustls::Error::InvalidCertificate;
    let alert = rustls::Error::AlertReceived;
    let cases = [
        (theirs(C::Expired), Expired { ours: false }),
        (theirs(C::NotValidYet), NotYetValid),
        (theirs(C::Revoked), Revoked { ours: false }),
        (theirs(C::UnknownIssuer), Untrusted { ours: false }),
        (alert(A::CertificateExpired), Expired { ours: true }),
        (alert(A::CertificateRevoked), Revoked { ours: true }),
        (alert(A::UnknownCA), Untrusted { ours: true }),
    ];
    for (err, want) in cases {
        // Typed, typed inside an io error (as tokio-rustls hands it), and
        // as text only.
        assert_eq!(LinkCause::classify(&err), want, "{err}");
        let io = io::Error::new(io::ErrorKind::InvalidData, err.clone());
        assert_eq!(LinkCause::classify(&io), want, "{err}");
        let text = format!("transport error: {io}");
        assert_eq!(LinkCause::from_text(&text), want, "{text}");
    }
}

#[test]
fn unreachable_and_unknown_errors() {
    let t = io::Error::from(io::ErrorKind::TimedOut);
    assert_eq!(LinkCause::classify(&t), LinkCause::Unreachable);
    assert_eq!(
        LinkCause::from_text("tcp connect error: No route to host (os error 113)"),
        LinkCause::Unreachable
    );
    let f = LinkFailure::from_text("Ingest stream: permission denied: not a machine of this PS");
    assert_eq!(f.cause, LinkCause::Other);
    assert_eq!(f.cause.kind(), "link-error");
    assert!(f
        .message(&ps("10.0.0.3:7000"))
        .contains("permission denied: not a machine of this PS"));
    assert!(LinkFailure::from_text("x")
        .fix(&Peer {
            role: Role::Mt,
            id: String::new(),
            addr: "10.0.0.4:7001".into()
        })
        .contains("MT's log"));
}

#[test]
fn reports_once_per_cause_then_every_minute_then_restored() {
    let r = LinkReporter::default();
    let peer = ps("10.0.0.3:7000");
    let refused = LinkFailure::from_text("Connection refused (os error 111)");
    let name = LinkFailure::from_text(
        "invalid peer certificate: certificate not valid for name \"10.0.0.3\"; certificate is only valid for DnsName(\"x\")",
    );
    let t0 = Instant::now();
    let ev = r.failed(&peer, "m1-r1", &refused, t0).unwrap();
    assert_eq!(
        (
            ev.severity.as_str(),
            ev.kind.as_str(),
            ev.replication_id.as_str()
        ),
        ("error", "link-refused", "m1-r1")
    );
    assert!(ev
        .message
        .starts_with("cannot reach ps ps-onprem at 10.0.0.3:7000: connection refused; "));
    assert!(r
        .failed(&peer, "m1-r1", &refused, t0 + REPEAT_EVERY / 2)
        .is_none());
    // A new cause goes out at once.
    let ev = r
        .failed(&peer, "m1-r1", &name, t0 + REPEAT_EVERY / 2)
        .unwrap();
    assert_eq!(ev.kind, "link-tls-name");
    assert!(r.failed(&peer, "m1-r1", &name, t0 + REPEAT_EVERY).is_none());
    assert!(r
        .failed(&peer, "m1-r1", &name, t0 + REPEAT_EVERY * 2)
        .is_some());
    let ok = r.restored(&peer, "m1-r1").unwrap();
    assert_eq!(
        (ok.severity.as_str(), ok.kind.as_str()),
        ("info", RESTORED_KIND)
    );
    assert!(r.restored(&peer, "m1-r1").is_none(), "restored once");
    assert!(r
        .failed(&peer, "m1-r1", &name, t0 + REPEAT_EVERY * 2)
        .is_some());
}
