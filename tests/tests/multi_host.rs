//! Every component on a host of its own (its own loopback address), each
//! enrolled with its own names, driven only through the `rebound` CLI and
//! the commands docs/DEPLOY.md gives, through the whole DR lifecycle.
//!
//! The lab ([`Sites`]) deploys the way docs/DEPLOY.md does, with paths in a
//! temp dir instead of /etc/rebound: `rebound-cs init --listen --name`,
//! `<daemon> enroll --cs --passphrase-file --id --name --out`, `<daemon>
//! run --config`, and `rebound protect|failover|commit|reprotect`. This is
//! the lifecycle's full loop: every lab is multi-host, so no other test
//! repeats it.

use crate::lifecycle::{
    a, b, fail_over_at_latest, protect, replica_hash, reprotect, source_hash, succeeded,
    wait_point_seq, JOB, MIB,
};
use rebound_lab::*;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

/// The names (DNS and IP subjectAltNames) a PEM certificate carries.
fn cert_names(path: &Path) -> Vec<String> {
    let pem = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("PEM");
    let cert = pem.parse_x509().expect("X.509");
    let Some(san) = cert.subject_alternative_name().expect("SAN extension") else {
        return Vec::new();
    };
    (san.value.general_names.iter())
        .map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
            x509_parser::extensions::GeneralName::IPAddress(b) if b.len() == 4 => {
                std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()
            }
            other => format!("{other:?}"),
        })
        .collect()
}

/// Every address the lab listens on belongs to one of `hosts`, and none is
/// 127.0.0.1 or a wildcard.
fn assert_bound_only_on(s: &Sites, hosts: &BTreeSet<IpAddr>, when: &str) {
    let bound: Vec<SocketAddr> = s.listening().expect("listening sockets");
    assert!(!bound.is_empty(), "{when}: the lab listens nowhere?");
    for a in &bound {
        assert!(
            !a.ip().is_unspecified() && a.ip() != IpAddr::from([127, 0, 0, 1]),
            "{when}: something listens on {a}: {bound:?}"
        );
        assert!(
            hosts.contains(&a.ip()),
            "{when}: {a} is not one of the lab's hosts {hosts:?}"
        );
    }
}

/// Cuts a crash point on the machine running at `at`, and asserts that the
/// MT at `to` lists it and its view of disk0 hashes to `want`.
fn assert_new_point_is(s: &Sites, m: &str, at: &str, to: &str, want: &str) {
    let (tag, seq) = s.tag(m, at, "crash").expect("tag");
    wait_point_seq(s, m, seq);
    s.wait_view_hash(to, m, "disk0", &tag, want, JOB)
        .unwrap_or_else(|e| panic!("point {tag} at {to} differs from {m} at {at}: {e:#}"));
}

#[test]
fn every_component_on_its_own_host_through_failover_and_failback() {
    let mut s = Sites::start(SitesOptions::default()).expect("sites");
    let m = "m1";

    // Four hosts: the CS, each site (its PS and MT), the protected machine.
    let cs_host: IpAddr = rebound_common::tls::host_of(&s.cs_addr).parse().unwrap();
    let onprem = IpAddr::V4(s.sites[a()].host.0);
    let azure = IpAddr::V4(s.sites[b()].host.0);
    let machine_a = s.agent_addr(m, a()).unwrap().ip();
    let machine_b = s.agent_addr(m, b()).unwrap().ip();
    let hosts: BTreeSet<IpAddr> = [cs_host, onprem, azure, machine_a, machine_b].into();
    assert_eq!(hosts.len(), 5, "hosts are not distinct: {hosts:?}");
    assert_bound_only_on(&s, &hosts, "after start");
    let listening = s.listening().unwrap();
    for (site, host) in [(a(), onprem), (b(), azure)] {
        let addrs = &s.sites[site];
        for a in [addrs.mt, addrs.mt_nbd]
            .iter()
            .chain(addrs.ps.iter().map(|(_, a)| a))
        {
            assert_eq!(a.ip(), host, "{site}: {a} is not on the site's host");
            assert!(listening.contains(a), "{site}: nothing listens on {a}");
        }
        // Each server's certificate names exactly the host it is reached at.
        let want = vec![host.to_string()];
        let mt_cert = s.path(&format!("{site}/mt/certs/mt.pem"));
        assert_eq!(cert_names(&mt_cert), want, "{}", mt_cert.display());
        let ps_cert = s.path(&format!("{site}/{}/certs/ps.pem", ps_id(site)));
        assert_eq!(cert_names(&ps_cert), want, "{}", ps_cert.display());
    }
    // The agent's certificate can serve nothing: no names.
    let agent_cert = s.agent_certs(m).join("agent.pem");
    assert_eq!(cert_names(&agent_cert), Vec::<String>::new());

    // Protect A→B: the first point at B equals the source.
    protect(&s, m, a(), b());
    s.write(m, a(), "disk0", 0, 4 * MIB, 0xa1)
        .expect("write at A");
    let h1 = source_hash(&s, m);
    assert_new_point_is(&s, m, a(), b(), &h1);

    // Planned failover at latest, commit: the machine runs at B from a
    // replica equal to the source.
    let r1 = fail_over_at_latest(&mut s, m, a(), b(), &h1);
    s.stop_agent(m, a()).expect("stop the agent at A");
    succeeded(&s.job(&["commit", m]).expect("commit"));
    s.wait_state(m, "Committed", JOB).expect("committed");
    s.wait_online("agent", m, JOB).expect("agent at B online");
    assert_bound_only_on(&s, &hosts, "running at B");

    // Reprotect B→A with the agent at B started only after the command:
    // the job waits for it to register, then succeeds.
    s.stop_agent(m, b()).expect("stop the agent at B");
    let started = reprotect(&s, m, b(), a(), "5m", false);
    let id = started["id"].as_str().unwrap().to_string();
    s.wait_job_status(&id, &format!("waiting for agent on {m} to register"), JOB)
        .expect("reprotect waits for the agent");
    s.start_agent(m, b()).expect("start the agent at B");
    succeeded(
        &s.cli_json(&["jobs", &id, "--watch"])
            .expect("watch reprotect"),
    );
    let mm = s.wait_state(m, "Protected", JOB).expect("protected B→A");
    assert_eq!(mm["from_site"], b());
    assert_eq!(mm["to_site"], a());

    // Write at B, fail back at latest, commit.
    s.write(m, b(), "disk0", 2 * MIB, 4 * MIB, 0xb2)
        .expect("write at B");
    let h2 = replica_hash(&s, b(), &r1);
    assert_ne!(h2, h1);
    assert_new_point_is(&s, m, b(), a(), &h2);
    let r2 = fail_over_at_latest(&mut s, m, b(), a(), &h2);
    s.stop_agent(m, b()).expect("stop the agent at B");
    succeeded(&s.job(&["commit", m]).expect("commit the failback"));
    s.wait_online("agent", m, JOB).expect("agent at A online");

    // Reprotect A→B again: protected as at the start, the new point equal.
    succeeded(&reprotect(&s, m, a(), b(), "2m", true));
    let mm = s.wait_state(m, "Protected", JOB).expect("protected A→B");
    assert_eq!(mm["from_site"], a());
    s.write(m, a(), "disk0", 8 * MIB, MIB, 0xc3)
        .expect("write at A again");
    let h3 = replica_hash(&s, a(), &r2);
    assert_new_point_is(&s, m, a(), b(), &h3);
    assert_bound_only_on(&s, &hosts, "at the end");
}
