//! The first CS and a joining one on a real PostgreSQL (scratch database).

use super::*;
use crate::store::scratch::ScratchDb;

fn der(path: &Path) -> Vec<u8> {
    let pem = std::fs::read_to_string(path).unwrap();
    rebound_common::enrollment::first_cert_der(&pem).unwrap()
}

/// Whether the certificate at `cert` is signed by the CA at `ca`.
fn signed_by(cert: &Path, ca: &Path) -> bool {
    let (c, a) = (der(cert), der(ca));
    let (_, c) = x509_parser::parse_x509_certificate(&c).unwrap();
    let (_, a) = x509_parser::parse_x509_certificate(&a).unwrap();
    use x509_parser::extensions::ParsedExtension;
    let aki = c
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(k) => {
                k.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        });
    let ski = a
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        });
    c.issuer() == a.subject() && aki.is_some() && aki == ski
}

#[tokio::test]
async fn a_first_cs_and_a_joining_one_share_the_ca_through_the_store() {
    let db = ScratchDb::create().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));

    // Joining a database without a deployment is refused.
    let stray = tmp.path().join("stray.key");
    let k = SealKey::generate(&stray).unwrap();
    std::fs::write(&stray, k.to_file_text()).unwrap();
    let e = join(
        &Layout::in_dir(&tmp.path().join("x")),
        &[],
        Some("127.0.0.3:7443"),
        &db.url,
        &stray,
    )
    .await
    .map_or_else(|e| e.to_string(), |_| panic!("not refused"));
    assert!(e.contains("holds no Rebound deployment"), "{e}");

    let first = init_first(&Layout::in_dir(&a), &[], Some("127.0.0.1:7443"), &db.url)
        .await
        .unwrap();
    assert!(
        !a.join("ca.key").exists(),
        "the CA key is only in the store"
    );
    let cfg: Config = rebound_common::config::load(Some(&first.config_file)).unwrap();
    assert_eq!(cfg.store.url, db.url);
    assert_eq!(cfg.store.secret_key_file, a.join(KEY_FILE));
    assert_eq!(cfg.metrics_listen, "127.0.0.1:9474");
    assert!(signed_by(&a.join("cs.pem"), &a.join("ca.pem")));
    assert!(signed_by(&a.join("admin.pem"), &a.join("ca.pem")));

    // A second first CS on the same database is refused.
    let e = init_first(&Layout::in_dir(&tmp.path().join("c")), &[], None, &db.url)
        .await
        .map_or_else(|e| e.to_string(), |_| panic!("not refused"));
    assert!(
        e.contains("already holds a Rebound deployment") && e.contains("--join"),
        "{e}"
    );

    // A wrong key does not open the CA.
    let e = join(
        &Layout::in_dir(&tmp.path().join("y")),
        &[],
        Some("127.0.0.4:7443"),
        &db.url,
        &stray,
    )
    .await
    .map_or_else(|e| e.to_string(), |_| panic!("not refused"));
    assert!(
        e.contains("does not open with") && e.contains("stray.key"),
        "{e}"
    );

    let joined = join(
        &Layout::in_dir(&b),
        &[],
        Some("127.0.0.2:7443"),
        &db.url,
        &a.join(KEY_FILE),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(b.join("ca.pem")).unwrap(),
        std::fs::read(a.join("ca.pem")).unwrap()
    );
    assert!(signed_by(&b.join("cs.pem"), &a.join("ca.pem")));
    assert!(!b.join("passphrase").exists() && !b.join("admin.pem").exists());
    assert!(joined.server_names.contains(&"127.0.0.2".to_string()));
    let cfg2: Config = rebound_common::config::load(Some(&joined.config_file)).unwrap();
    assert_eq!(cfg2.listen, "127.0.0.2:7443");
    assert_eq!(cfg2.metrics_listen, "127.0.0.2:9474");
    assert_eq!(cfg2.store.secret_key_file, b.join(KEY_FILE));
    assert_eq!(
        std::fs::read(b.join(KEY_FILE)).unwrap(),
        std::fs::read(a.join(KEY_FILE)).unwrap()
    );

    // Both sealed keys open, to the same CA key; the joiner's certificate
    // is recorded as issued; the passphrase is the first CS's.
    let store = crate::store::open(&cfg2.store, &cfg2.db).await.unwrap();
    let key = ca_seal::ca_key_pem(&cfg2, store.as_ref()).await.unwrap();
    assert_eq!(
        key,
        ca_seal::ca_key_pem(&cfg, store.as_ref()).await.unwrap()
    );
    let serial = rebound_common::pki::serial_hex(&der(&b.join("cs.pem"))).unwrap();
    let rec = store.get_issued_cert(&serial).await.unwrap().unwrap();
    assert_eq!((rec.role, rec.id.as_str()), (Role::Cs, "cs-127.0.0.2"));
    assert!(crate::enrollment::load_verifier(store.as_ref())
        .await
        .unwrap()
        .is_some());
    store.close().await;
}
