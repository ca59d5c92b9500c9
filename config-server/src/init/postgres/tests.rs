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

/// The password the tests put into a URL without one (a test server that
/// trusts its clients ignores it).
const PASSWORD: &str = "s3cret-pw";

/// `url` with [`PASSWORD`] when it names a user without a password.
fn with_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((user, host)) if !user.contains(':') => format!("{scheme}://{user}:{PASSWORD}@{host}"),
        _ => url.to_string(),
    }
}

/// `message` names the database of `url` without its password.
fn assert_no_password(message: &str, url: &str) {
    let auth = url.split("://").nth(1).and_then(|r| r.split_once('@'));
    let (_, pw) = auth
        .and_then(|(user, _)| user.split_once(':'))
        .expect("a URL with a password");
    assert!(!message.contains(pw), "{message}");
    assert!(
        message.contains(&crate::store::postgres::redact_url(url)),
        "{message}"
    );
}

/// The message of a `join` in `dir` that must be refused.
async fn refused_join(dir: &Path, listen: &str, url: &str, key: &Path) -> String {
    join(&Layout::in_dir(dir), &[], Some(listen), url, key)
        .await
        .map_or_else(|e| e.to_string(), |_| panic!("not refused"))
}

#[tokio::test]
async fn a_first_cs_and_a_joining_one_share_the_ca_through_the_store() {
    let db = ScratchDb::create().await.unwrap();
    let url = with_password(&db.url);
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));

    // Joining a database without a deployment is refused.
    let stray = tmp.path().join("stray.key");
    let k = SealKey::generate(&stray).unwrap();
    std::fs::write(&stray, k.to_file_text()).unwrap();
    let e = refused_join(&tmp.path().join("x"), "127.0.0.3:7443", &url, &stray).await;
    assert!(e.contains("holds no Rebound deployment"), "{e}");
    assert_no_password(&e, &url);

    let first = init_first(&Layout::in_dir(&a), &[], Some("127.0.0.1:7443"), &url)
        .await
        .unwrap();
    assert!(
        !a.join("ca.key").exists(),
        "the CA key is only in the store"
    );
    let cfg: Config = rebound_common::config::load(Some(&first.config_file)).unwrap();
    assert_eq!(cfg.store.url, url);
    // The test URL carries a password, so the config is not world-readable.
    assert!(crate::init::config_holds_password(&cfg));
    let mode = std::fs::metadata(&first.config_file).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o640
    );
    assert_eq!(cfg.store.secret_key_file, a.join(KEY_FILE));
    assert_eq!(cfg.metrics_listen, "127.0.0.1:9474");
    assert!(signed_by(&a.join("cs.pem"), &a.join("ca.pem")));
    assert!(signed_by(&a.join("admin.pem"), &a.join("ca.pem")));

    // A second first CS on the same database is refused.
    let e = init_first(&Layout::in_dir(&tmp.path().join("c")), &[], None, &url)
        .await
        .map_or_else(|e| e.to_string(), |_| panic!("not refused"));
    assert!(
        e.contains("already holds a Rebound deployment") && e.contains("--join"),
        "{e}"
    );
    assert_no_password(&e, &url);

    // A wrong key does not open the CA.
    let e = refused_join(&tmp.path().join("y"), "127.0.0.4:7443", &url, &stray).await;
    assert!(
        e.contains("does not open with") && e.contains("stray.key"),
        "{e}"
    );

    let joined = join(
        &Layout::in_dir(&b),
        &[],
        Some("127.0.0.2:7443"),
        &url,
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

/// A failing init leaves neither files nor a CA behind, so it can be run
/// again; of two inits racing on one database exactly one wins.
#[tokio::test]
async fn a_failed_init_cleans_up_and_racing_inits_have_one_winner() {
    let db = ScratchDb::create().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    // A directory where the CS key goes makes writing it fail after the
    // seal key and ca.pem are written.
    std::fs::create_dir_all(a.join("cs.key")).unwrap();
    let layout = Layout::in_dir(&a);
    init_first(&layout, &[], Some("127.0.0.1:7443"), &db.url)
        .await
        .map(|_| panic!("not refused"))
        .unwrap_err();
    for f in [
        KEY_FILE,
        "ca.pem",
        "cs.pem",
        "admin.pem",
        "passphrase",
        "config.toml",
    ] {
        assert!(!a.join(f).exists(), "{f} left behind");
    }
    let store = PgStore::open(&db.url).await.unwrap();
    assert!(!ca_seal::has_ca(&store).await.unwrap());
    store.close().await;
    std::fs::remove_dir(a.join("cs.key")).unwrap();
    init_first(&layout, &[], Some("127.0.0.1:7443"), &db.url)
        .await
        .unwrap();

    let db2 = ScratchDb::create().await.unwrap();
    let (b, c) = (
        Layout::in_dir(&tmp.path().join("b")),
        Layout::in_dir(&tmp.path().join("c")),
    );
    let (rb, rc) = tokio::join!(
        init_first(&b, &[], Some("127.0.0.2:7443"), &db2.url),
        init_first(&c, &[], Some("127.0.0.3:7443"), &db2.url),
    );
    assert!(
        rb.is_ok() != rc.is_ok(),
        "exactly one of two racing inits wins"
    );
    let (lost, e) = match (rb, rc) {
        (Err(e), _) => (&b, e),
        (_, Err(e)) => (&c, e),
        _ => unreachable!(),
    };
    assert!(e.to_string().contains("already holds"), "{e}");
    assert!(!lost.tls_dir.join(KEY_FILE).exists());
    assert!(!lost.config_file.exists());
}
