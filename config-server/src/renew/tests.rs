//! Control.Renew against a running CS (in process): what it renews and
//! records, what it refuses and why, and the CS renewing its own
//! certificate (at two thirds of its life, or at once after a CA rotation).

use super::*;
use crate::store::SqliteStore;
use crate::tests::Cs;
use rebound_common::control::CsConfig;
use rebound_common::pki::{write_cert, Ca};
use rebound_common::tls::renewal::{csr, ControlIssuer};
use rebound_common::tls::TlsFiles;

/// The renewal of the component whose files are `tls`, asking the CS.
fn renewal(cs: &Cs, tls: &TlsFiles) -> Renewal {
    let state = tls.cert.parent().unwrap().join("state");
    let tls = tls.clone().with_renewed(&state);
    Renewal {
        renewed: renewed::path_in(&state),
        issuer: Arc::new(ControlIssuer {
            cs: CsConfig {
                addr: cs.addr.clone(),
                standby: Vec::new(),
                server_name: "localhost".into(),
            },
            tls: tls.clone(),
        }),
        tls,
    }
}

fn serial_of(pem: &str) -> String {
    serial_hex(&rebound_common::enrollment::first_cert_der(pem).unwrap()).unwrap()
}

/// Enrolls `agent:id`, then gives it a recorded certificate two hours into
/// a three-hour life, so it may renew.
async fn aged(cs: &Cs, store: &SqliteStore, id: &str) -> TlsFiles {
    let tls = cs.enrolled(Role::Agent, id).await;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("agent:{id}"));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_millis(now_ms());
    params.not_before = now - Duration::from_secs(7200);
    params.not_after = now + Duration::from_secs(3600);
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(cs.dir.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(cs.dir.join("ca.pem")).unwrap(),
        ca_key,
    )
    .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let ck = rebound_common::pki::CertKeyPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    };
    write_cert(tls.cert.parent().unwrap(), "agent", &ck).unwrap();
    let v = Validity::of_der(cert.der()).unwrap();
    store
        .put_issued_cert(&IssuedCert {
            serial: serial_hex(cert.der()).unwrap(),
            role: Role::Agent,
            id: id.into(),
            issued_ms: now_ms(),
            expiry_ms: v.not_after_ms,
            revoked_ms: None,
        })
        .await
        .unwrap();
    tls
}

/// Asks the CS to renew with `tls`'s own certificate (not a renewed one).
async fn renew_with(cs: &Cs, tls: &TlsFiles, id: &str) -> tonic::Status {
    let channel = tls.connect(&cs.addr, "localhost", Role::Cs).await.unwrap();
    let who = PeerIdentity {
        role: Role::Agent,
        id: id.into(),
    };
    let key = rcgen::KeyPair::generate().unwrap();
    let csr_pem = csr(&key, &who, &[]).unwrap();
    rebound_proto::control::control_client::ControlClient::new(channel)
        .renew(pb::RenewRequest { csr_pem })
        .await
        .unwrap_err()
}

#[tokio::test]
async fn a_component_renews_with_its_current_certificate_and_the_cs_records_it() {
    let cs = Cs::start().await;
    let store = cs.store().await;
    let tls = aged(&cs, &store, "m1").await;
    let r = renewal(&cs, &tls);
    let first = r.renew_once().await.unwrap();
    let serial1 = serial_of(&r.current().unwrap().cert_pem);
    let rec = store.get_issued_cert(&serial1).await.unwrap().unwrap();
    assert_eq!((rec.role, rec.id.as_str()), (Role::Agent, "m1"));
    assert_eq!(rec.expiry_ms, first.not_after_ms);
    let c = store
        .get_component(Role::Agent, "m1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (c.cert_serial.as_str(), c.cert_expiry_ms),
        (serial1.as_str(), first.not_after_ms)
    );
    // The renewed certificate is the one the CS knows m1 by: it is
    // authenticated and recorded as the newest, and refused only because
    // it is too new to renew yet.
    let e = r.renew_once().await.unwrap_err().to_string();
    assert!(
        e.contains(&serial1) && e.contains("is too new to renew") && e.contains("may renew from"),
        "{e}"
    );
    assert_eq!(serial_of(&r.current().unwrap().cert_pem), serial1);
    // The certificate it replaced may not renew any more.
    let e = renew_with(&cs, &tls, "m1").await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message()
            .contains("is not the newest one issued to agent:m1")
            && e.message().contains(&serial1)
            && e.message()
                .contains("rebound token create --role agent --id m1"),
        "{}",
        e.message()
    );
    cs.stop_with(store).await;
}

#[tokio::test]
async fn renewal_is_refused_before_half_the_life_and_for_a_revoked_component() {
    let cs = Cs::start().await;
    let store = cs.store().await;
    let tls = cs.enrolled(Role::Agent, "m4").await;
    let e = renew_with(&cs, &tls, "m4").await;
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("agent:m4")
            && e.message()
                .contains("is too new to renew: it may renew from"),
        "{}",
        e.message()
    );
    // The component is marked revoked though its certificate is not.
    let tls = aged(&cs, &store, "m5").await;
    let mut c = store
        .get_component(Role::Agent, "m5")
        .await
        .unwrap()
        .unwrap();
    c.revoked = true;
    store.put_component(&c).await.unwrap();
    let e = renew_with(&cs, &tls, "m5").await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message().contains("agent:m5 is revoked, so certificate")
            && e.message()
                .contains("rebound token create --role agent --id m5"),
        "{}",
        e.message()
    );
    cs.stop_with(store).await;
}

/// A revocation that lands while a renewal signs revokes the renewed
/// certificate too.
#[tokio::test]
async fn a_revocation_during_renewal_revokes_the_renewed_certificate() {
    let cs = Cs::start().await;
    let store = cs.store().await;
    let tls = cs.enrolled(Role::Agent, "m6").await;
    let old = serial_of(&std::fs::read_to_string(&tls.cert).unwrap());
    store
        .revoke_certs(Role::Agent, "m6", now_ms())
        .await
        .unwrap();
    let renewed = "7a7a7a";
    store
        .put_issued_cert(&IssuedCert {
            serial: renewed.into(),
            role: Role::Agent,
            id: "m6".into(),
            issued_ms: now_ms(),
            expiry_ms: now_ms() + 3_600_000,
            revoked_ms: None,
        })
        .await
        .unwrap();
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    let svc = ControlService::new(
        shared,
        Arc::new(crate::bus::CommandBus::new()),
        Duration::from_secs(1),
    );
    let who = PeerIdentity {
        role: Role::Agent,
        id: "m6".into(),
    };
    let e = revoke_if_revoked_meanwhile(&svc, &who, &old, renewed)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message().contains("was revoked while it renewed")
            && e.message()
                .contains(&format!("(serial {renewed}) is revoked too")),
        "{}",
        e.message()
    );
    let rec = store.get_issued_cert(renewed).await.unwrap().unwrap();
    assert!(rec.revoked_ms.is_some());
    assert!(svc.revocations.is_revoked(renewed));
    let c = store
        .get_component(Role::Agent, "m6")
        .await
        .unwrap()
        .unwrap();
    assert!(c.revoked);
    // Not revoked: nothing happens.
    let good = PeerIdentity {
        role: Role::Agent,
        id: "m7".into(),
    };
    let tls7 = cs.enrolled(Role::Agent, "m7").await;
    let serial7 = serial_of(&std::fs::read_to_string(&tls7.cert).unwrap());
    revoke_if_revoked_meanwhile(&svc, &good, &serial7, "7b")
        .await
        .unwrap();
    cs.stop_with(store).await;
}

#[tokio::test]
async fn renewal_is_refused_for_a_revoked_or_unrecorded_certificate_and_new_names() {
    let cs = Cs::start().await;
    let store = cs.store().await;

    // A certificate the CA signed but the CS never issued (a copied CA key).
    let ca = Ca::from_pem(
        &std::fs::read_to_string(cs.dir.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(cs.dir.join("ca.key")).unwrap(),
    )
    .unwrap();
    let forged_dir = cs.dir.parent().unwrap().join("forged");
    std::fs::create_dir_all(&forged_dir).unwrap();
    ca.write(&forged_dir).unwrap();
    let forged = ca.issue(Role::Agent, "m9", &[]).unwrap();
    write_cert(&forged_dir, "agent", &forged).unwrap();
    let r = renewal(&cs, &TlsFiles::in_dir(&forged_dir, "agent"));
    let e = r.renew_once().await.unwrap_err().to_string();
    assert!(
        e.contains("refused to renew agent:m9")
            && e.contains("was not issued by this configuration server")
            && e.contains("rebound token create --role agent --id m9"),
        "{e}"
    );
    assert!(!r.renewed.exists());

    // A request for other server names than the certificate has.
    let tls = cs.enrolled(Role::Agent, "m2").await;
    let channel = tls.connect(&cs.addr, "localhost", Role::Cs).await.unwrap();
    let who = PeerIdentity {
        role: Role::Agent,
        id: "m2".into(),
    };
    let key = rcgen::KeyPair::generate().unwrap();
    let wider = csr(&key, &who, &["evil.example.net".into()]).unwrap();
    let e = rebound_proto::control::control_client::ControlClient::new(channel)
        .renew(pb::RenewRequest { csr_pem: wider })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("agent:m2") && e.message().contains("[evil.example.net]"),
        "{}",
        e.message()
    );

    // A revoked certificate.
    let revoked = store
        .revoke_certs(Role::Agent, "m2", now_ms())
        .await
        .unwrap();
    assert_eq!(revoked.len(), 1);
    let e = renewal(&cs, &tls)
        .renew_once()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("agent:m2") && e.contains("is revoked"), "{e}");
    cs.stop_with(store).await;
}

#[tokio::test]
async fn the_cs_renews_its_own_certificate_locally_with_the_same_names() {
    let cs = Cs::start().await;
    let store = cs.store().await;
    let ca_pem = std::fs::read_to_string(cs.dir.join("ca.pem")).unwrap();
    let signer = Arc::new(Signer {
        ca_key_pem: std::fs::read_to_string(cs.dir.join("ca.key")).unwrap(),
        ca_cert_pem: ca_pem,
        lifetime: Duration::from_secs(3600),
    });
    let tls = TlsFiles::in_dir(&cs.dir, "cs");
    let r = Renewal {
        renewed: renewed::path_in(&cs.dir.join("state")),
        issuer: Arc::new(LocalIssuer {
            signer,
            store: Arc::new(cs.store().await),
        }),
        tls: tls.clone(),
    };
    let v = r.renew_once().await.unwrap();
    let left = v.not_after_ms - now_ms();
    assert!((3_590_000..=3_600_000).contains(&left), "{left}");
    let new = r.current().unwrap();
    let old_der =
        rebound_common::enrollment::first_cert_der(&std::fs::read_to_string(&tls.cert).unwrap())
            .unwrap();
    let new_der = rebound_common::enrollment::first_cert_der(&new.cert_pem).unwrap();
    assert_eq!(
        server_names(&new_der).unwrap(),
        server_names(&old_der).unwrap()
    );
    let rec = store
        .get_issued_cert(&serial_of(&new.cert_pem))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((rec.role, rec.id.as_str()), (Role::Cs, "cs"));
    cs.stop_with(store).await;
}

/// CA rotation: once the CS signs with a new CA (first in its ca.pem), its
/// own certificate, still from the old CA, is renewed at once, not at two
/// thirds of its life, and the new one is from the new CA.
#[tokio::test]
async fn after_a_ca_rotation_the_cs_renews_its_own_certificate_at_once() {
    let cs = Cs::start().await;
    let old_ca = std::fs::read_to_string(cs.dir.join("ca.pem")).unwrap();
    let new_ca = Ca::generate("rotated").unwrap();
    let bundle = format!("{}{}", new_ca.cert_pem(), old_ca);
    let rotated = cs.dir.join("rotated");
    std::fs::create_dir_all(&rotated).unwrap();
    std::fs::write(rotated.join("ca.pem"), &bundle).unwrap();
    let tls = TlsFiles {
        ca: rotated.join("ca.pem"),
        ..TlsFiles::in_dir(&cs.dir, "cs")
    };
    let signer = Arc::new(Signer {
        ca_key_pem: new_ca.key_pem().to_string(),
        ca_cert_pem: bundle,
        lifetime: Duration::from_secs(3600),
    });
    let renewed_at = renewed::path_in(&rotated.join("state"));
    let r = Renewal {
        renewed: renewed_at.clone(),
        issuer: Arc::new(LocalIssuer {
            signer,
            store: Arc::new(cs.store().await),
        }),
        tls,
    };
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(r.run(stop));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let renewed = loop {
        if let Some(ck) = renewed::load(&renewed_at).unwrap() {
            break ck;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the CS did not renew its certificate from the old CA"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop_tx.send_replace(true);
    task.await.unwrap();
    let der = rebound_common::enrollment::first_cert_der(&renewed.cert_pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(cert.issuer().to_string(), "CN=Rebound CA rotated");
    let store = cs.store().await;
    cs.stop_with(store).await;
}
