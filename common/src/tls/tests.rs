use super::*;
use crate::pki::{write_cert, Ca};

mod server_tests;

/// A CA and certificates in a temp dir: `ps`, `mt` (servers for
/// 127.0.0.1), `agent` and `admin` (clients only).
fn pki() -> tempfile::TempDir {
    pki_and_ca().0
}

/// [`pki`], and its CA to issue more.
fn pki_and_ca() -> (tempfile::TempDir, Ca) {
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("t").unwrap();
    ca.write(dir.path()).unwrap();
    let names = ["127.0.0.1".to_string()];
    let issue = |name, role, id, names: &[String]| {
        write_cert(dir.path(), name, &ca.issue(role, id, names).unwrap()).unwrap()
    };
    issue("ps", Role::Ps, "ps1", &names);
    issue("mt", Role::Mt, "mt1", &names);
    issue("agent", Role::Agent, "m1", &[]);
    issue("admin", Role::Admin, "admin", &[]);
    (dir, ca)
}

/// A server with no services on 127.0.0.1 with `tls`, its address: for
/// tests of the handshake.
pub(crate) async fn serve(tls: &TlsFiles) -> String {
    serve_routes(tls, &Revocations::new(), tonic::service::Routes::default()).await
}

/// A server of `routes` on 127.0.0.1 through the acceptor the daemons use,
/// enforcing `revocations`; its address.
pub(crate) async fn serve_routes(
    tls: &TlsFiles,
    revocations: &Revocations,
    routes: tonic::service::Routes,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let incoming = tls
        .acceptor(ClientAuth::Required, revocations)
        .unwrap()
        .incoming(listener);
    let server = tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming(incoming);
    tokio::spawn(server);
    addr
}

/// Why `client` cannot connect to the `role` server at `addr`.
async fn refusal(client: &TlsFiles, addr: &str, name: &str, role: Role) -> String {
    match client.connect(addr, name, role).await {
        Ok(_) => panic!("{addr} was accepted as {role} by name {name:?}"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn server_of_the_expected_role_is_accepted() {
    let dir = pki();
    let addr = serve(&TlsFiles::in_dir(dir.path(), "ps")).await;
    let admin = TlsFiles::in_dir(dir.path(), "admin");
    admin.connect(&addr, "127.0.0.1", Role::Ps).await.unwrap();
    // No server name: the host of the address is checked.
    admin.connect(&addr, "", Role::Ps).await.unwrap();
}

#[tokio::test]
async fn ps_certificate_cannot_serve_as_mt_or_cs() {
    let dir = pki();
    let addr = serve(&TlsFiles::in_dir(dir.path(), "ps")).await;
    let admin = TlsFiles::in_dir(dir.path(), "admin");
    for role in [Role::Mt, Role::Cs] {
        let e = refusal(&admin, &addr, "", role).await;
        let want = format!(
            "the server at {addr} presented certificate ps:ps1, but a {role} certificate is \
             required here: check the address in the config"
        );
        assert!(e.contains(&want), "{e}");
    }
}

#[tokio::test]
async fn agent_and_admin_certificates_cannot_serve() {
    let dir = pki();
    let client = TlsFiles::in_dir(dir.path(), "mt");
    for (name, who) in [("agent", "agent:m1"), ("admin", "admin:admin")] {
        let addr = serve(&TlsFiles::in_dir(dir.path(), name)).await;
        let e = refusal(&client, &addr, "127.0.0.1", Role::Ps).await;
        assert!(
            e.contains(&format!(
                "presented certificate {who}, but a ps certificate"
            )),
            "{e}"
        );
    }
}

#[tokio::test]
async fn name_not_in_the_certificate_is_refused_with_the_name() {
    let dir = pki();
    let addr = serve(&TlsFiles::in_dir(dir.path(), "mt")).await;
    let admin = TlsFiles::in_dir(dir.path(), "admin");
    let e = refusal(&admin, &addr, "mt.example.net", Role::Mt).await;
    assert!(
        e.contains("certificate not valid for name \"mt.example.net\""),
        "{e}"
    );
    assert!(e.contains("127.0.0.1"), "{e}");
}

#[test]
fn server_name_defaults_to_the_host_dialled() {
    assert_eq!(server_name_for("", "10.0.0.3:7000"), "10.0.0.3");
    assert_eq!(server_name_for("  ", "ps.example:7000"), "ps.example");
    assert_eq!(server_name_for("", "[::1]:7000"), "::1");
    assert_eq!(server_name_for("name", "10.0.0.3:7000"), "name");
    assert_eq!(host_of("host"), "host");
}
