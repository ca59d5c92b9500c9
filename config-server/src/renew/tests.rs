use super::*;
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

#[tokio::test]
async fn a_component_renews_with_its_current_certificate_and_the_cs_records_it() {
    let cs = Cs::start().await;
    let store = cs.store().await;
    let tls = cs.enrolled(Role::Agent, "m1").await;
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
    // The second renewal is authenticated by the renewed certificate.
    r.renew_once().await.unwrap();
    let serial2 = serial_of(&r.current().unwrap().cert_pem);
    assert_ne!(serial1, serial2);
    assert!(store.get_issued_cert(&serial2).await.unwrap().is_some());
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
