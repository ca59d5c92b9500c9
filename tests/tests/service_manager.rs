//! The daemons under a service manager: readiness (`READY=1`) only once a
//! daemon answers on its port, `STOPPING=1` and a clean stop on SIGTERM,
//! over a `NOTIFY_SOCKET` the test listens on.

use rebound_lab::notify::{run_notified, NotifySocket};
use rebound_lab::{config, Bins, Component, Lab, LabOptions};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const READY_WITHIN: Duration = Duration::from_secs(60);
/// Asked-for watchdog interval: the daemon pings every half of it.
const WATCHDOG: Duration = Duration::from_millis(400);

/// Starts `bin` as a notify unit, waits for `READY=1`, runs `answers` at
/// that moment (no retry: it must already answer), checks the watchdog is
/// fed, then SIGTERM: `STOPPING=1` and exit code 0.
fn notify_cycle(name: &str, bin: &Path, config: &Path, log: &Path, answers: impl FnOnce()) {
    let sock = NotifySocket::bind().unwrap();
    let p = run_notified(name, bin, config, log, &sock, WATCHDOG).unwrap();
    let before = sock
        .wait_for("READY=1", READY_WITHIN)
        .unwrap_or_else(|e| panic!("{name}: {e}\nlog:\n{}", p.log_tail(30)));
    let ready = before.last().unwrap();
    assert!(
        ready.lines().any(|l| l.starts_with("STATUS=")),
        "{name}: READY=1 without a STATUS= line: {ready:?}"
    );
    assert!(
        !before[..before.len() - 1]
            .iter()
            .any(|m| m.contains("WATCHDOG=1")),
        "{name}: watchdog pings before READY=1: {before:?}"
    );
    answers();
    sock.wait_for("WATCHDOG=1", WATCHDOG * 5)
        .unwrap_or_else(|e| panic!("{name}: the watchdog is not fed: {e}"));
    // SIGTERM: STOPPING=1, then a clean exit.
    let pid = p.pid();
    let log = p.log.clone();
    let (status, _) = p.stop().unwrap();
    let tail = || rebound_lab::process::log_tail(&log, 30);
    sock.wait_for("STOPPING=1", Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("{name} (pid {pid}): {e}\nlog:\n{}", tail()));
    assert_eq!(
        status.code(),
        Some(0),
        "{name} did not stop cleanly on SIGTERM ({status}); log:\n{}",
        tail()
    );
}

fn connects(name: &str, addr: SocketAddr) {
    TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("{name} sent READY=1 but does not answer on {addr}: {e}"));
}

/// [`notify_cycle`] for a component of a lab (nothing else started).
fn lab_cycle(lab: &Lab, c: Component, answers: impl FnOnce()) {
    let bin = lab.bins.path(c.binary()).unwrap();
    let log = lab.path(&format!("{}-notify.log", c.name()));
    notify_cycle(c.name(), &bin, &lab.config_path(c), &log, answers);
}

#[test]
fn master_target_is_ready_once_it_answers() {
    let lab = Lab::new(LabOptions::default()).unwrap();
    lab_cycle(&lab, Component::Mt, || {
        connects("mt", lab.mt_addr);
        // A full TLS handshake with the MT's gRPC server.
        lab.mt_client()
            .unwrap_or_else(|e| panic!("the MT sent READY=1 but its gRPC server fails: {e:#}"));
    });
}

#[test]
fn process_server_is_ready_once_it_answers() {
    let lab = Lab::new(LabOptions::default()).unwrap();
    lab_cycle(&lab, Component::Ps, || connects("ps", lab.ps_addr));
}

#[test]
fn agent_is_ready_once_it_answers() {
    // No PS runs: the agent must still come up (it streams once the PS is
    // back), and its stop drains for at most a second.
    let lab = Lab::new(LabOptions {
        shutdown_drain_secs: 1,
        ..LabOptions::default()
    })
    .unwrap();
    let bin = lab.bins.path("rebound-agent").unwrap();
    let log = lab.path("agent-notify.log");
    notify_cycle(
        "agent",
        &bin,
        &lab.config_path(Component::Agent),
        &log,
        || {
            connects("agent", lab.agent_nbd);
            let st = lab.agent_status().unwrap_or_else(|e| {
                panic!("the agent sent READY=1 but its admin socket fails: {e:#}")
            });
            assert!(st.is_object(), "{st}");
        },
    );
}

#[test]
fn configuration_server_is_ready_once_it_answers() {
    let dir = tempfile::Builder::new()
        .prefix("rebound-cs-notify-")
        .tempdir()
        .unwrap();
    let bins = Bins::locate().unwrap();
    let bin = bins.path("rebound-cs").unwrap();
    let host = rebound_lab::Host::next();
    let addr = host.addr();
    let cs_dir = dir.path().join("cs");
    let out = Command::new(&bin)
        .args(["init", "--dir"])
        .arg(&cs_dir)
        .args([
            "--listen",
            &addr.to_string(),
            "--name",
            &addr.ip().to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rebound-cs init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Its own metrics port: the default would collide with parallel tests.
    let cfg = cs_dir.join("config.toml");
    config::set_metrics_listen(&cfg, &config::metrics_listen(addr.ip(), true)).unwrap();
    let log = dir.path().join("cs.log");
    notify_cycle("cs", &bin, &cfg, &log, || connects("cs", addr));
}
