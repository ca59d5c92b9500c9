//! Renewal against a test issuer: when a component renews, that it keeps
//! its identity and names with a new key, and that an answer for another
//! identity or from another CA is never saved.

use super::*;
use crate::pki::{write_cert, Ca};
use rcgen::{CertificateSigningRequestParams, Issuer as RcgenIssuer};

/// Signs like the CS does, for `as_id` (normally the requester's id) and
/// by `ca`.
struct TestIssuer {
    ca: Ca,
    as_id: Option<String>,
    lifetime: Duration,
}

impl TestIssuer {
    /// Signs for the requester by `ca`, valid for `secs`.
    fn by(ca: &Ca, secs: u64) -> TestIssuer {
        TestIssuer {
            ca: Ca::from_pem(ca.cert_pem(), ca.key_pem()).unwrap(),
            as_id: None,
            lifetime: Duration::from_secs(secs),
        }
    }
}

impl Issuer for TestIssuer {
    fn issue<'a>(&'a self, who: &'a PeerIdentity, csr_pem: String) -> IssueFuture<'a> {
        Box::pin(async move {
            let mut csr = CertificateSigningRequestParams::from_pem(&csr_pem).unwrap();
            let id = self.as_id.clone().unwrap_or_else(|| who.id.clone());
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, format!("{}:{id}", who.role));
            csr.params.distinguished_name = dn;
            crate::pki::lifetime::set_validity(&mut csr.params, self.lifetime);
            let key = KeyPair::from_pem(self.ca.key_pem()).unwrap();
            let issuer = RcgenIssuer::from_ca_cert_pem(self.ca.cert_pem(), key).unwrap();
            Ok(csr.signed_by(&issuer).unwrap().pem())
        })
    }
}

/// A PS enrolled by `ca` in `dir`, renewing through `issuer`.
fn renewal(dir: &Path, ca: &Ca, issuer: TestIssuer) -> Renewal {
    let names = vec!["ps1.example.net".to_string(), "10.0.0.3".to_string()];
    ca.write(dir).unwrap();
    write_cert(dir, "ps", &ca.issue(Role::Ps, "ps1", &names).unwrap()).unwrap();
    Renewal {
        tls: TlsFiles::in_dir(dir, "ps"),
        renewed: renewed::path_in(&dir.join("state")),
        issuer: Arc::new(issuer),
    }
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn a_renewed_certificate_keeps_identity_and_names_with_a_new_key_and_life() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("t").unwrap();
    let r = renewal(dir.path(), &ca, TestIssuer::by(&ca, 3600));
    let before = r.current().unwrap();
    let v = r.renew_once().await.unwrap();
    let after = r.current().unwrap();
    assert_ne!(after.key_pem, before.key_pem, "a new key");
    let der = der_of(&after.cert_pem);
    assert_eq!(peer_identity(&der).unwrap().to_string(), "ps:ps1");
    assert_eq!(
        server_names(&der).unwrap(),
        server_names(&der_of(&before.cert_pem)).unwrap()
    );
    assert_eq!(server_names(&der).unwrap(), ["ps1.example.net", "10.0.0.3"]);
    let life = v.not_after_ms - crate::time::now_ms();
    assert!((3_590_000..=3_600_000).contains(&life), "{life}");
}

#[tokio::test]
async fn an_answer_for_another_identity_or_from_another_ca_is_not_saved() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("t").unwrap();
    let other = TestIssuer {
        as_id: Some("ps2".into()),
        ..TestIssuer::by(&ca, 3600)
    };
    let r = renewal(dir.path(), &ca, other);
    let e = r.renew_once().await.unwrap_err().to_string();
    assert!(
        e.contains("ps:ps1")
            && e.contains("issued for ps:ps2")
            && e.contains("nothing was written"),
        "{e}"
    );
    assert!(!r.renewed.exists());

    let dir = tempfile::tempdir().unwrap();
    let stranger = TestIssuer::by(&Ca::generate("stranger").unwrap(), 3600);
    let r = renewal(dir.path(), &ca, stranger);
    let e = r.renew_once().await.unwrap_err().to_string();
    assert!(e.contains("does not chain to the CA"), "{e}");
    assert!(!r.renewed.exists());
}

#[tokio::test]
async fn the_task_renews_when_due_and_again_with_the_renewed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("t").unwrap();
    let r = renewal(dir.path(), &ca, TestIssuer::by(&ca, 12));
    // The enrolled certificate is valid for 12 s: due at 8 s.
    let short = ca
        .issue_for(Role::Ps, "ps1", &[], Duration::from_secs(12))
        .unwrap();
    write_cert(dir.path(), "ps", &short).unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(r.clone().run(stop_rx));
    let mut serials = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while serials.len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(Some(ck)) = renewed::load(&r.renewed) {
            let s = crate::pki::serial_hex(&der_of(&ck.cert_pem)).unwrap();
            if serials.last() != Some(&s) {
                serials.push(s);
            }
        }
    }
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the task stops at shutdown")
        .unwrap();
    assert_eq!(serials.len(), 2, "renewed twice in 30 s: {serials:?}");
}
