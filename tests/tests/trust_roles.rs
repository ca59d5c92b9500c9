//! Trust model: roles. Every certificate names its role, and a client
//! checks the role of the server it reached: an enrolled certificate and a
//! network position are not enough to pose as another component.

use rebound_common::tls::{ClientAuth, Revocations, TlsFiles};
use rebound_lab::*;
use std::time::Duration;

/// How soon the refusal must be in the component's log.
const REFUSED_WITHIN: Duration = Duration::from_secs(30);

/// Waits until `c`'s log contains `want`; the log when it does not.
fn wait_log(lab: &Lab, c: Component, want: &str) {
    let seen = wait_until(
        &format!("{} to log {want:?}", c.name()),
        REFUSED_WITHIN,
        || lab.log(c).contains(want),
    );
    if let Some(line) = lab.log(c).lines().find(|l| l.contains(want)) {
        eprintln!("{}: {line}", c.name());
    }
    if let Err(e) = seen {
        panic!("{e}\n--- {} log ---\n{}", c.name(), lab.log_tail(c, 30));
    }
}

#[test]
fn an_agent_certificate_posing_as_a_ps_is_refused_by_the_agent() {
    let mut lab = Lab::new(LabOptions::default()).expect("lab");
    let machine = lab.opts.machine.clone();
    // A gRPC server at the PS's address that presents an agent's
    // certificate: what anyone with an enrolled agent and that address
    // could run.
    let impostor = TlsFiles::in_dir(&lab.certs, &format!("agent-{machine}"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ps_addr = lab.ps_addr;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(ps_addr)
            .await
            .expect("bind the PS address");
        let incoming = impostor
            .acceptor(ClientAuth::Required, &Revocations::new())
            .expect("acceptor")
            .incoming(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(tonic::service::Routes::default())
                .serve_with_incoming(incoming),
        );
    });

    lab.start(Component::Agent).expect("agent");
    wait_log(
        &lab,
        Component::Agent,
        &format!(
            "the server at {ps_addr} presented certificate agent:{machine}, but a ps \
             certificate is required here: check the address in the config"
        ),
    );
    let status = lab.agent_status().expect("agent status");
    assert_eq!(
        status["connected"], false,
        "the agent must not take the impostor for its PS: {status}"
    );
}

#[test]
fn a_ps_certificate_posing_as_the_cs_is_refused_by_a_component() {
    let mut lab = Lab::new(LabOptions::default()).expect("lab");
    // The real PS answers at the address the MT is told is its CS.
    lab.start(Component::Ps).expect("ps");
    let path = lab.config_path(Component::Mt);
    let text = std::fs::read_to_string(&path).expect("mt config");
    let at = format!("[cs]\naddr = \"{}\"", lab.ps_addr);
    let managed = text.replacen("[cs]\naddr = \"\"", &at, 1);
    assert!(managed.contains(&at), "no empty [cs] addr in {text}");
    std::fs::write(&path, managed).expect("write mt config");

    lab.start(Component::Mt).expect("mt");
    wait_log(
        &lab,
        Component::Mt,
        &format!("the server at {} presented certificate ps:", lab.ps_addr),
    );
    wait_log(
        &lab,
        Component::Mt,
        "but a cs certificate is required here: check the address in the config",
    );
}
