//! The TLS-only NBD server (the MT's views) against its clients: Rebound's
//! own client, libnbd's nbdinfo/nbdcopy and qemu-img (GnuTLS), and raw
//! options sent before STARTTLS.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::client::{ClientError, NbdClient};
use super::proto::*;
use super::testutil::*;
use super::tls::write_client_dir;
use super::{serve_tcp_tls, BlockDevice, ExportRegistry, NbdError, NbdTls};
use crate::pki::{write_dev_bundle, PeerIdentity, Role};
use crate::tls::{Revocations, TlsFiles};

const MIB: usize = 1 << 20;

/// Two machines' views; an agent sees only its own machine's.
struct ByMachine(MapRegistry);

fn visible(client: Option<&PeerIdentity>, name: &str) -> bool {
    match client {
        Some(w) if w.role == Role::Admin => true,
        Some(w) if w.role == Role::Agent => name.starts_with(&format!("{}/", w.id)),
        _ => false,
    }
}

impl ExportRegistry for ByMachine {
    fn list(&self) -> Vec<String> {
        self.0.list()
    }
    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, NbdError> {
        self.0.open(name)
    }
    fn list_for(&self, client: Option<&PeerIdentity>) -> Vec<String> {
        let all = self.0.list().into_iter();
        all.filter(|n| visible(client, n)).collect()
    }
    fn open_for(
        &self,
        name: &str,
        client: Option<&PeerIdentity>,
    ) -> Result<Arc<dyn BlockDevice>, NbdError> {
        if !visible(client, name) {
            return Err(NbdError::eperm(format!("may not read {name}")));
        }
        self.0.open(name)
    }
}

struct Lab {
    _dir: tempfile::TempDir,
    pki: PathBuf,
    addr: std::net::SocketAddr,
    view: Vec<u8>,
    shutdown: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A directory as libnbd and qemu want it, holding `name`'s certificate.
fn client_dir(pki: &Path, name: &str) -> PathBuf {
    let dir = pki.join(format!("client-{name}"));
    write_client_dir(&TlsFiles::in_dir(pki, name), &dir).unwrap();
    dir
}

fn start() -> Lab {
    crate::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    write_dev_bundle(&pki, &["m1".into(), "m2".into()]).unwrap();
    let m1 = MemDevice::new(4 * MIB, true);
    let view: Vec<u8> = (0..4 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    m1.fill(0, &view);
    let m2 = MemDevice::new(MIB, true);
    let registry = Arc::new(ByMachine(MapRegistry {
        exports: vec![
            ("m1/disk0@latest".into(), m1 as Arc<dyn BlockDevice>),
            ("m2/disk0@latest".into(), m2 as Arc<dyn BlockDevice>),
        ],
    }));
    let tls = NbdTls::new(&TlsFiles::in_dir(&pki, "mt"), Revocations::new()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = Arc::new(AtomicBool::new(false));
    let handle = serve_tcp_tls(listener, registry, Arc::new(tls), shutdown.clone());
    Lab {
        _dir: dir,
        pki,
        addr,
        view,
        shutdown,
        handle: Some(handle),
    }
}

impl Lab {
    fn uri(&self, export: &str, who: &str) -> String {
        let dir = client_dir(&self.pki, who);
        format!(
            "nbds://{}/{export}?tls-certificates={}",
            self.addr,
            dir.display()
        )
    }
}

fn output(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn own_client_reads_a_view_over_tls() {
    let lab = start();
    let mut c = NbdClient::connect_uri(&lab.uri("m1/disk0@latest", "admin")).unwrap();
    let mut buf = vec![0u8; 4 * MIB];
    c.read_at(0, &mut buf).unwrap();
    assert!(buf == lab.view);
    c.disconnect().unwrap();
}

#[test]
fn plain_nbd_is_refused_with_tls_required() {
    let lab = start();
    let uri = format!("nbd://{}/m1/disk0@latest", lab.addr);
    let err = NbdClient::connect_uri(&uri)
        .err()
        .expect("plain NBD must be refused");
    match &err {
        ClientError::Refused { kind, message, .. } => {
            assert_eq!(*kind, "NBD_REP_ERR_TLS_REQD", "{err}");
            assert!(message.contains("requires TLS"), "{err}");
            assert!(message.contains("STARTTLS"), "{err}");
        }
        other => panic!("unexpected error {other}"),
    }
    // LIST before STARTTLS is refused the same way, with its code.
    let mut raw = RawClient::greet(lab.addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    raw.send_option(OPT_LIST, &[]);
    let r = raw.opt_reply();
    assert_eq!(r.kind, REP_ERR_TLS_REQD);
    assert!(String::from_utf8_lossy(&r.data).contains("tls-certificates=DIR"));
    // EXPORT_NAME cannot carry an error: the server closes.
    raw.send_option(OPT_EXPORT_NAME, b"m1/disk0@latest");
    assert!(raw.closed_by_server());
}

#[test]
fn an_agent_certificate_sees_only_its_machine() {
    let lab = start();
    let mut own = NbdClient::connect_uri(&lab.uri("m1/disk0@latest", "agent-m1")).unwrap();
    let mut buf = vec![0u8; 4096];
    own.read_at(0, &mut buf).unwrap();
    assert_eq!(buf[..], lab.view[..4096]);
    let err = NbdClient::connect_uri(&lab.uri("m2/disk0@latest", "agent-m1"))
        .err()
        .expect("another machine's view must be refused");
    assert!(
        matches!(&err, ClientError::Refused { kind: "NBD_REP_ERR_POLICY", message, .. } if message.contains("may not read m2/disk0@latest")),
        "{err}"
    );
    // A PS certificate is from the CA too, but sees nothing.
    let err = NbdClient::connect_uri(&lab.uri("m1/disk0@latest", "ps"))
        .err()
        .expect("a PS certificate must see no view");
    assert!(matches!(err, ClientError::Refused { .. }), "{err}");
}

#[test]
fn nbdinfo_lists_by_certificate_over_tls() {
    let lab = start();
    let list = |who: &str| {
        let uri = lab.uri("", who);
        output(Command::new("nbdinfo").args(["--list", &uri]))
    };
    let (ok, text) = list("admin");
    assert!(ok, "{text}");
    assert!(
        text.contains("m1/disk0@latest") && text.contains("m2/disk0@latest"),
        "{text}"
    );
    let (ok, text) = list("agent-m2");
    assert!(ok, "{text}");
    assert!(
        text.contains("m2/disk0@latest") && !text.contains("m1/disk0"),
        "{text}"
    );
}

#[test]
fn nbdcopy_and_qemu_img_read_a_view_over_tls() {
    let lab = start();
    let out = lab.pki.join("copy.img");
    let (ok, text) = output(
        Command::new("nbdcopy").args([&lab.uri("m1/disk0@latest", "admin"), out.to_str().unwrap()]),
    );
    assert!(ok, "{text}");
    assert!(std::fs::read(&out).unwrap() == lab.view);

    let dir = client_dir(&lab.pki, "admin");
    let out = lab.pki.join("qemu.img");
    let (ok, text) = output(Command::new("qemu-img").args([
        "convert",
        "--object",
        &format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            dir.display()
        ),
        "--image-opts",
        &format!(
            "driver=nbd,host=127.0.0.1,port={},export=m1/disk0@latest,tls-creds=tls0",
            lab.addr.port()
        ),
        "-O",
        "raw",
        out.to_str().unwrap(),
    ]));
    assert!(ok, "{text}");
    assert!(std::fs::read(&out).unwrap() == lab.view);
}

#[test]
fn tls_without_a_client_certificate_is_refused() {
    let lab = start();
    // A directory with only the CA: libnbd starts TLS without a certificate.
    let dir = lab.pki.join("ca-only");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(lab.pki.join("ca.pem"), dir.join("ca-cert.pem")).unwrap();
    let uri = format!(
        "nbds://{}/m1/disk0@latest?tls-certificates={}",
        lab.addr,
        dir.display()
    );
    let (ok, text) = output(Command::new("nbdinfo").arg(&uri));
    assert!(
        !ok,
        "nbdinfo without a client certificate must fail:\n{text}"
    );
}
