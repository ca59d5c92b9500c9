//! Trust model: no unauthenticated door to a disk through NBD.
//!
//! Another local user (`nobody`, through `setpriv`) can neither write the
//! machine's disk through the agent's default export (a unix socket of mode
//! 0600 in a state directory of mode 0700) nor read a recovery-point view
//! at the MT (plain NBD is refused with NBD_REP_ERR_TLS_REQD, TLS without a
//! client certificate fails its handshake). With the deployment's admin
//! certificate the views work with nbdcopy and qemu-img over TLS; an agent
//! certificate lists only its own machine's views, a PS certificate none.

use rebound_common::nbd::client::{ClientError, NbdClient};
use rebound_common::tls::TlsFiles;
use rebound_lab::clients::{nbd_tls_dir, nbds_uri, qemu_tls_args};
use rebound_lab::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

const APPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `tool args` as user `nobody` (group `nogroup`, no other groups).
fn as_nobody(tool: &str, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid",
            "nobody",
            "--regid",
            "nogroup",
            "--clear-groups",
            tool,
        ])
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run setpriv {tool}: {e} (apt-get install -y util-linux)")
        })
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Lets other users traverse `path` and its ancestors up to `/`, so that
/// what stops them is the mode the agent gave its own directory and socket.
fn traversable_up_to(path: &Path) {
    for dir in path.ancestors() {
        let m = mode(dir);
        if m & 0o001 == 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(m | 0o011)).unwrap();
        }
    }
}

fn started_lab_with_a_point() -> (Lab, String, String) {
    let mut lab = Lab::new(LabOptions::default()).expect("lab");
    lab.start_all().unwrap();
    let mut rng = Rng::new(19);
    let size = lab.opts.disks[0].1;
    qemu_io(&lab.agent_uri("disk0"), &random_writes(&mut rng, size, 30)).unwrap();
    let (id, seq, hash) = lab.tag_hash("crash").unwrap();
    lab.wait_applied(seq, APPLY_TIMEOUT).unwrap();
    (lab, id, hash)
}

#[test]
fn another_local_user_cannot_write_through_the_agents_default_export() {
    let (lab, _, _) = started_lab_with_a_point();
    let state = lab.agent_state_dir();
    let sock = state.join("nbd.sock");
    assert_eq!(
        mode(&sock),
        0o600,
        "the agent's NBD socket {}",
        sock.display()
    );
    assert_eq!(
        mode(&state),
        0o700,
        "the agent's state dir {}",
        state.display()
    );
    let before = lab.source_hash(0).unwrap();
    let uri = format!("nbd+unix:///disk0?socket={}", sock.display());
    let write = ["-f", "raw", "-c", "write -P 0x66 0 64k", uri.as_str()];

    // With the state directory opened up, the socket's own mode stops
    // `nobody`; with the directory as the agent made it, the directory does.
    traversable_up_to(&state);
    for (dir_mode, stopped_by) in [
        (0o711, "the socket's mode 0600"),
        (0o700, "the state dir's mode 0700"),
    ] {
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(dir_mode)).unwrap();
        let t = text(&as_nobody("qemu-io", &write));
        assert!(
            t.contains("Permission denied"),
            "nobody must be stopped by {stopped_by} at {}: {t}",
            sock.display()
        );
    }
    assert_eq!(lab.source_hash(0).unwrap(), before, "the disk changed");

    // The agent's own user still writes through the socket.
    qemu_io(
        &uri,
        &["write -P 0x5a 0 64k".into(), "read -P 0x5a 0 64k".into()],
    )
    .unwrap();
}

#[test]
fn another_local_user_cannot_read_an_mt_view() {
    let (lab, id, _) = started_lab_with_a_point();
    let export = format!("{}/disk0@{id}", lab.opts.machine);

    // Plain NBD: refused before anything is listed or opened.
    let plain = nbd_uri(lab.mt_nbd, &export);
    let out = as_nobody("nbdinfo", &[&plain]);
    let t = text(&out);
    assert!(!out.status.success(), "plain NBD read a view: {t}");
    assert!(
        t.contains("server replied with error"),
        "libnbd reports the server's refusal: {t}"
    );
    let out = as_nobody("nbdinfo", &["--list", &nbd_uri(lab.mt_nbd, "")]);
    let t = text(&out);
    assert!(
        !out.status.success() && !t.contains(&export),
        "plain NBD listed views: {t}"
    );
    // The server's own message says what to do.
    match NbdClient::connect_uri(&plain) {
        Err(ClientError::Refused { kind, message, .. }) => {
            assert_eq!(kind, "NBD_REP_ERR_TLS_REQD");
            assert!(message.contains("requires TLS"), "{message}");
            assert!(message.contains("NBD_OPT_STARTTLS"), "{message}");
            assert!(message.contains("tls-certificates=DIR"), "{message}");
        }
        Err(e) => panic!("plain NBD refused with the wrong error: {e}"),
        Ok(_) => panic!("plain NBD opened view {export}"),
    }

    // TLS with the CA but no client certificate: the handshake fails.
    let no_cert = tempfile::Builder::new()
        .prefix("nbd-ca-only-")
        .tempdir()
        .unwrap();
    std::fs::copy(lab.certs.join("ca.pem"), no_cert.path().join("ca-cert.pem")).unwrap();
    traversable_up_to(no_cert.path());
    std::fs::set_permissions(
        no_cert.path().join("ca-cert.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let uri = nbds_uri(lab.mt_nbd, &export, no_cert.path());
    let out = as_nobody("nbdinfo", &[&uri]);
    let t = text(&out);
    assert!(
        !out.status.success(),
        "TLS without a client certificate read a view: {t}"
    );
    // TLS 1.3: the client's handshake completes, then the server answers
    // its missing certificate with a fatal alert (certificate_required),
    // which GnuTLS reports on its first read; the MT says why.
    assert!(
        t.contains("gnutls_record_recv: A TLS fatal alert has been received"),
        "nbdinfo reports the server's fatal alert: {t}"
    );
    let log = lab.log(Component::Mt);
    let refusal = log
        .lines()
        .find(|l| l.contains("NBD TLS handshake refused"))
        .unwrap_or_else(|| panic!("the MT logs the refused handshake: {log}"));
    assert!(
        refusal.contains("peer sent no certificates"),
        "the MT refused for the missing client certificate: {refusal}"
    );
}

#[test]
fn views_work_over_tls_with_the_admin_certificate_and_by_certificate() {
    let (lab, id, want) = started_lab_with_a_point();
    let export = format!("{}/disk0@{id}", lab.opts.machine);

    // nbdcopy (libnbd, GnuTLS) through the lab's helper.
    assert_eq!(
        lab.point_hash("disk0", &id).unwrap(),
        want,
        "nbdcopy over TLS"
    );

    // qemu-img over TLS.
    let admin = nbd_tls_dir(
        &TlsFiles::in_dir(&lab.certs, "admin"),
        &lab.path("nbd-admin"),
    )
    .unwrap();
    let out = lab.path("qemu-view.img");
    let mut args: Vec<String> = vec!["convert".into()];
    args.extend(qemu_tls_args(lab.mt_nbd, &export, &admin));
    args.extend(["-O".into(), "raw".into(), out.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_tool("qemu-img", &args).unwrap();
    assert_eq!(blake3_file(&out).unwrap(), want, "qemu-img over TLS");

    // NBD_OPT_LIST by certificate: the machine's own agent sees its views,
    // a PS certificate none.
    let list = |name: &str| {
        let dir = nbd_tls_dir(
            &TlsFiles::in_dir(&lab.certs, name),
            &lab.path(&format!("nbd-{name}")),
        )
        .unwrap();
        let out = run_tool("nbdinfo", &["--list", &nbds_uri(lab.mt_nbd, "", &dir)]);
        out.map(|o| text(&o)).unwrap_or_else(|e| e.to_string())
    };
    let agent = list(&format!("agent-{}", lab.opts.machine));
    assert!(
        agent.contains(&export),
        "the agent's own view is listed: {agent}"
    );
    let ps = list("ps");
    assert!(
        !ps.contains(&export),
        "a PS certificate listed a view: {ps}"
    );
    let dir = nbd_tls_dir(&TlsFiles::in_dir(&lab.certs, "ps"), &lab.path("nbd-ps")).unwrap();
    match NbdClient::connect_uri(&nbds_uri(lab.mt_nbd, &export, &dir)) {
        Err(ClientError::Refused { kind, message, .. }) => {
            assert_eq!(kind, "NBD_REP_ERR_POLICY");
            assert!(message.contains("certificate ps:"), "{message}");
            assert!(message.contains("admin certificate"), "{message}");
        }
        Err(e) => panic!("a PS certificate refused with the wrong error: {e}"),
        Ok(_) => panic!("a PS certificate opened view {export}"),
    }
}
