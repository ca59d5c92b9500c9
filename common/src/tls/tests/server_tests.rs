//! The acceptor the gRPC servers share: revocation at the handshake and on
//! open streams, and renewed identities on both ends without a restart.

use super::*;
use crate::link_error::LinkCause;
use crate::pki::serial_hex;
use rebound_proto::control::control_client::ControlClient;
use rebound_proto::control::control_server::{Control, ControlServer};
use rebound_proto::control::{ComponentMessage, RenewRequest, RenewResponse, ServerMessage};
use std::pin::Pin;
use std::time::Duration;
use tonic::{Response, Streaming};

/// A Control service that holds every channel open and answers Renew with
/// the serial of the caller's certificate (as an error: it issues nothing).
struct Hold;

#[tonic::async_trait]
impl Control for Hold {
    type ChannelStream = Pin<Box<dyn futures::Stream<Item = Result<ServerMessage, Status>> + Send>>;

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        let certs = req.peer_certs().expect("a client certificate");
        let serial = serial_hex(certs[0].as_ref()).unwrap();
        Err(Status::unimplemented(format!("serial {serial}")))
    }

    async fn channel(
        &self,
        req: Request<Streaming<ComponentMessage>>,
    ) -> Result<Response<Self::ChannelStream>, Status> {
        require_role(&req, &[Role::Admin])?;
        Ok(Response::new(Box::pin(futures::stream::pending())))
    }
}

async fn serve_hold(tls: &TlsFiles, revocations: &Revocations) -> String {
    let routes = tonic::service::Routes::new(ControlServer::new(Hold));
    serve_routes(tls, revocations, routes).await
}

/// The serial of the first certificate in a PEM file.
fn serial_of(pem: &str) -> String {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    serial_hex(der.as_ref()).unwrap()
}

fn serial_in(path: &Path) -> String {
    serial_of(&std::fs::read_to_string(path).unwrap())
}

/// The serial the server saw on a Renew call (see [`Hold`]).
async fn serial_seen(client: &TlsFiles, addr: &str) -> Result<String, Status> {
    let ch = client
        .connect(addr, "", Role::Ps)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let e = ControlClient::new(ch)
        .renew(RenewRequest::default())
        .await
        .expect_err("Hold never renews");
    match e.message().strip_prefix("serial ") {
        Some(s) if e.code() == tonic::Code::Unimplemented => Ok(s.to_string()),
        _ => Err(e),
    }
}

/// The server certificate's serial, from a raw TLS handshake.
async fn server_serial(client: &TlsFiles, addr: &str) -> String {
    let config = client.client_config(addr, Role::Ps).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let certs = tls.get_ref().1.peer_certificates().unwrap();
    serial_hex(certs[0].as_ref()).unwrap()
}

#[tokio::test]
async fn a_revoked_client_certificate_is_refused_at_the_handshake() {
    let dir = pki();
    let admin = TlsFiles::in_dir(dir.path(), "admin");
    let revocations = Revocations::new();
    revocations.set([serial_in(&admin.cert)]);
    let addr = serve_hold(&TlsFiles::in_dir(dir.path(), "ps"), &revocations).await;

    let e = serial_seen(&admin, &addr).await.unwrap_err();
    let text = format!("{e:?}");
    assert!(text.contains("CertificateRevoked"), "{text}");
    // The client's link error says its own certificate is revoked.
    assert_eq!(
        LinkCause::from_text(&text),
        LinkCause::Revoked { ours: true },
        "{text}"
    );
    // Others still get in.
    let mt = TlsFiles::in_dir(dir.path(), "mt");
    assert_eq!(serial_seen(&mt, &addr).await.unwrap(), serial_in(&mt.cert));
}

#[tokio::test]
async fn a_revocation_ends_the_streams_already_open() {
    let dir = pki();
    let admin = TlsFiles::in_dir(dir.path(), "admin");
    let revocations = Revocations::new();
    let addr = serve_hold(&TlsFiles::in_dir(dir.path(), "ps"), &revocations).await;

    let ch = admin.connect(&addr, "", Role::Ps).await.unwrap();
    let mut client = ControlClient::new(ch);
    let mut down = client
        .channel(futures::stream::pending::<ComponentMessage>())
        .await
        .unwrap()
        .into_inner();
    let open = tokio::time::timeout(Duration::from_millis(300), down.message()).await;
    assert!(open.is_err(), "the stream stays open: {open:?}");

    assert_eq!(revocations.set([serial_in(&admin.cert)]), 1);
    let ended = tokio::time::timeout(Duration::from_secs(5), down.message())
        .await
        .expect("the stream ends within seconds of the revocation");
    let e = ended.expect_err("the stream ends with an error, not as finished");
    assert_ne!(e.code(), tonic::Code::Ok, "{e:?}");
    // And the certificate does not get back in.
    let again = serial_seen(&admin, &addr).await.unwrap_err();
    assert!(
        format!("{again:?}").contains("CertificateRevoked"),
        "{again:?}"
    );
}

#[tokio::test]
async fn the_server_presents_its_renewed_certificate_without_a_restart() {
    let (dir, ca) = pki_and_ca();
    let state = dir.path().join("state");
    let ps = TlsFiles::in_dir(dir.path(), "ps").with_renewed(&state);
    let addr = serve_hold(&ps, &Revocations::new()).await;
    let admin = TlsFiles::in_dir(dir.path(), "admin");
    assert_eq!(server_serial(&admin, &addr).await, serial_in(&ps.cert));

    let names = ["127.0.0.1".to_string()];
    let first = ca.issue(Role::Ps, "ps1", &names).unwrap();
    renewed::save(&renewed::path_in(&state), &first).unwrap();
    assert_eq!(
        server_serial(&admin, &addr).await,
        serial_of(&first.cert_pem)
    );
    // A second renewal replaces the first.
    let second = ca.issue(Role::Ps, "ps1", &names).unwrap();
    renewed::save(&renewed::path_in(&state), &second).unwrap();
    assert_eq!(
        server_serial(&admin, &addr).await,
        serial_of(&second.cert_pem)
    );
}

#[tokio::test]
async fn a_client_connects_with_its_renewed_certificate() {
    let (dir, ca) = pki_and_ca();
    let state = dir.path().join("state");
    let admin = TlsFiles::in_dir(dir.path(), "admin").with_renewed(&state);
    // The enrolled certificate is revoked; the renewed one is not.
    let revocations = Revocations::new();
    revocations.set([serial_in(&admin.cert)]);
    let addr = serve_hold(&TlsFiles::in_dir(dir.path(), "ps"), &revocations).await;
    assert!(serial_seen(&admin, &addr).await.is_err());

    let renewed_ck = ca.issue(Role::Admin, "admin", &[]).unwrap();
    renewed::save(&renewed::path_in(&state), &renewed_ck).unwrap();
    assert_eq!(
        serial_seen(&admin, &addr).await.unwrap(),
        serial_of(&renewed_ck.cert_pem)
    );
}

#[tokio::test]
async fn a_renewed_identity_that_does_not_load_keeps_the_current_one() {
    let dir = pki();
    let state = dir.path().join("state");
    let ps = TlsFiles::in_dir(dir.path(), "ps").with_renewed(&state);
    let addr = serve_hold(&ps, &Revocations::new()).await;
    let path = renewed::path_in(&state);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "not a certificate").unwrap();
    let admin = TlsFiles::in_dir(dir.path(), "admin");
    assert_eq!(server_serial(&admin, &addr).await, serial_in(&ps.cert));
}

#[tokio::test]
async fn a_silent_client_does_not_hold_up_the_others() {
    let dir = pki();
    let addr = serve_hold(&TlsFiles::in_dir(dir.path(), "ps"), &Revocations::new()).await;
    // Connected, never says hello.
    let _silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mt = TlsFiles::in_dir(dir.path(), "mt");
    let seen = tokio::time::timeout(Duration::from_secs(3), serial_seen(&mt, &addr)).await;
    assert_eq!(seen.unwrap().unwrap(), serial_in(&mt.cert));
}

#[tokio::test]
async fn an_enrollment_newer_than_the_renewal_is_used() {
    let (dir, ca) = pki_and_ca();
    let state = dir.path().join("state");
    let admin = TlsFiles::in_dir(dir.path(), "admin").with_renewed(&state);
    let addr = serve_hold(&TlsFiles::in_dir(dir.path(), "ps"), &Revocations::new()).await;
    let renewed_ck = ca.issue(Role::Admin, "admin", &[]).unwrap();
    renewed::save(&renewed::path_in(&state), &renewed_ck).unwrap();
    assert_eq!(
        serial_seen(&admin, &addr).await.unwrap(),
        serial_of(&renewed_ck.cert_pem)
    );
    // Enrolled again (certificate times have whole seconds).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let enrolled = ca.issue(Role::Admin, "admin", &[]).unwrap();
    write_cert(dir.path(), "admin", &enrolled).unwrap();
    assert_eq!(
        serial_seen(&admin, &addr).await.unwrap(),
        serial_of(&enrolled.cert_pem)
    );
}

#[tokio::test]
async fn closed_connections_leave_the_revocation_registry() {
    use futures::StreamExt;
    let dir = pki();
    let revocations = Revocations::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut incoming = TlsFiles::in_dir(dir.path(), "ps")
        .acceptor(ClientAuth::Required, &revocations)
        .unwrap()
        .incoming(listener);
    let admin = TlsFiles::in_dir(dir.path(), "admin");
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(admin.client_config(&addr, Role::Ps).unwrap()));
    for _ in 0..8 {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let client = connector
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .unwrap();
        let conn = incoming.next().await.unwrap().unwrap();
        assert_eq!(revocations.open_connections(), 1);
        drop(conn);
        drop(client);
    }
    assert_eq!(
        revocations.open_connections(),
        0,
        "no dropped connection stays registered"
    );
}

#[tokio::test]
async fn a_certificate_written_before_its_key_is_served_once_the_key_is() {
    let (dir, ca) = pki_and_ca();
    let ps = TlsFiles::in_dir(dir.path(), "ps");
    let addr = serve_hold(&ps, &Revocations::new()).await;
    let admin = TlsFiles::in_dir(dir.path(), "admin");
    let old = serial_in(&ps.cert);
    let new = ca
        .issue(Role::Ps, "ps1", &["127.0.0.1".to_string()])
        .unwrap();
    // The new certificate with the old key does not load: the old pair stays.
    std::fs::write(&ps.cert, &new.cert_pem).unwrap();
    assert_eq!(server_serial(&admin, &addr).await, old);
    // The key arrives: the next handshake loads the pair.
    std::fs::write(&ps.key, &new.key_pem).unwrap();
    assert_eq!(server_serial(&admin, &addr).await, serial_of(&new.cert_pem));
}
