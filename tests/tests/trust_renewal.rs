//! Trust model: certificate lifetimes and renewal. Component certificates
//! expire (the CS's `cert_lifetime`) and the agent, PS and MT renew theirs
//! over the control channel at two thirds of their life, with no restart:
//! replication runs across the renewals and every point before and after is
//! exact. `openssl x509 -enddate` of every certificate that enrollment,
//! `rebound-cs init` and `rebound certs` write shows the configured
//! lifetime.

use crate::lifecycle::{a, b, protect, source_hash, JOB, MIB};
use rebound_lab::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn now_secs() -> u64 {
    rebound_common::time::now_ms() / 1000
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `notAfter=2026-12-05 20:47:54Z` (openssl's `-dateopt iso_8601`) as
/// seconds since the epoch.
fn parse_not_after(text: &str) -> u64 {
    let t = text
        .trim()
        .strip_prefix("notAfter=")
        .unwrap_or_else(|| panic!("no notAfter in {text:?}"));
    let n: Vec<i64> = t
        .trim_end_matches('Z')
        .split(['-', ' ', ':'])
        .map(|p| p.parse().unwrap_or_else(|_| panic!("{text:?}")))
        .collect();
    assert_eq!(n.len(), 6, "{text:?}");
    (days_from_civil(n[0], n[1], n[2]) * 86_400 + n[3] * 3600 + n[4] * 60 + n[5]) as u64
}

/// `openssl x509 -enddate` of the first certificate in `pem` (a file).
fn openssl_enddate(pem: &Path) -> u64 {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-dateopt", "iso_8601", "-in"])
        .arg(pem)
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl x509 {}: {}",
        pem.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_not_after(&String::from_utf8_lossy(&out.stdout))
}

/// Asserts `openssl x509 -enddate` of `pem` is `lifetime` after `issued`
/// (a few seconds' slack for the time the writing took).
fn assert_lifetime(pem: &Path, issued: u64, lifetime: u64) {
    let end = openssl_enddate(pem);
    let want = issued + lifetime;
    assert!(
        end + 2 >= want && end <= now_secs() + lifetime + 1,
        "{}: notAfter {end}, expected {want} (issued at {issued}, lifetime {lifetime} s)",
        pem.display()
    );
}

/// The notAfter of the certificate a TLS server at `addr` presents, as
/// `openssl s_client` sees it with the lab's admin certificate.
fn served_enddate(s: &Sites, addr: &str) -> u64 {
    let d = &s.cs_dir;
    let script = format!(
        "openssl s_client -connect {addr} -cert {} -key {} -CAfile {} </dev/null 2>/dev/null \
         | openssl x509 -noout -enddate -dateopt iso_8601",
        d.join("admin.pem").display(),
        d.join("admin.key").display(),
        d.join("ca.pem").display()
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_not_after(&String::from_utf8_lossy(&out.stdout))
}

/// A CS whose `cert_lifetime` is `lifetime`, then the default sites and
/// machine m1 enrolled and started under it.
fn sites_with_lifetime(lifetime: &str) -> Sites {
    let mut s = Sites::cs_only(SitesOptions::default()).expect("cs");
    let path = s.cs_dir.join("config.toml");
    let text = std::fs::read_to_string(&path).expect("CS config");
    let default = "cert_lifetime = \"90d\"";
    assert!(text.contains(default), "init wrote no {default}: {text}");
    let text = text.replace(default, &format!("cert_lifetime = \"{lifetime}\""));
    std::fs::write(&path, text).expect("write the CS config");
    s.restart_cs().expect("restart the CS");
    for site in s.opts.sites.clone() {
        s.start_site(&site).expect("site");
    }
    s.add_machine("m1").expect("machine m1");
    s
}

/// The enrolled certificate files of the agent of m1, the PS at A and the
/// MT at B, and where each keeps its renewed identity.
fn certificates(s: &Sites) -> Vec<(&'static str, PathBuf, PathBuf)> {
    let ps = ps_id(a());
    let agent_state = s.agent_state_dir("m1", a()).expect("agent state dir");
    let renewed = |dir: PathBuf| dir.join("tls").join("renewed-identity.pem");
    vec![
        (
            "agent-m1@onprem",
            s.agent_certs("m1").join("agent.pem"),
            renewed(agent_state),
        ),
        (
            "ps-onprem",
            s.path(&format!("{}/{ps}/certs/ps.pem", a())),
            renewed(s.path(&format!("{}/{ps}/cache", a()))),
        ),
        (
            "mt-azure",
            s.path(&format!("{}/mt/certs/mt.pem", b())),
            renewed(s.path(&format!("{}/mt/data", b()))),
        ),
    ]
}

/// Writes `pattern` over one MiB of m1's 16 MiB disk0 (which one by the
/// pattern), cuts a crash point, and waits until the MT's view of it equals
/// the source: (point, blake3).
fn exact_point(s: &Sites, pattern: u8) -> (String, String) {
    s.write(
        "m1",
        a(),
        "disk0",
        u64::from(pattern % 16) * MIB,
        MIB,
        pattern,
    )
    .expect("write through the agent");
    let want = source_hash(s, "m1");
    let (id, _) = s.tag("m1", a(), "crash").expect("crash point");
    s.wait_view_hash(b(), "m1", "disk0", &id, &want, JOB)
        .unwrap_or_else(|e| panic!("point {id} after pattern {pattern}: {e:#}"));
    (id, want)
}

#[test]
fn replication_runs_across_renewals_of_the_agent_ps_and_mt_certificates_without_a_restart() {
    // Renewal at 40 s: after the first point, before the end of the test.
    const LIFETIME: u64 = 60;
    let started = now_secs();
    let s = sites_with_lifetime(&format!("{LIFETIME}s"));
    let certs = certificates(&s);
    let mut first_expiry = 0;
    for (name, enrolled, _) in &certs {
        assert_lifetime(enrolled, started, LIFETIME);
        first_expiry = first_expiry.max(openssl_enddate(enrolled));
        eprintln!("{name}: enrolled certificate expires at {first_expiry}");
    }
    let pids: Vec<Option<u32>> = certs.iter().map(|(name, _, _)| s.pid(name)).collect();
    assert!(pids.iter().all(Option::is_some), "{pids:?}");
    protect(&s, "m1", a(), b());
    let mut points = vec![exact_point(&s, 1)];
    let (_, _, agent_renewed) = &certs[0];
    assert!(
        !agent_renewed.exists(),
        "the agent renewed before the first point: make LIFETIME longer"
    );

    // Past the end of every enrolled certificate: each component runs on
    // its renewed one, and replication goes on.
    let mut pattern = 2;
    while now_secs() <= first_expiry + 2 {
        points.push(exact_point(&s, pattern));
        pattern += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    for (name, enrolled, renewed) in &certs {
        assert!(
            renewed.exists(),
            "{name} did not renew {} (no {}): {}",
            enrolled.display(),
            renewed.display(),
            s.log_tail(name, 30)
        );
        let end = openssl_enddate(renewed);
        assert!(
            end > now_secs() && end > openssl_enddate(enrolled),
            "{name}: the renewed certificate {} ends at {end}, now is {}",
            renewed.display(),
            now_secs()
        );
        let log = std::fs::read_to_string(s.path(&format!("{name}.log"))).unwrap_or_default();
        assert!(
            log.contains("certificate renewed"),
            "{name} logged no renewal: {}",
            s.log_tail(name, 30)
        );
    }
    // The servers present their renewed certificates to new connections.
    let ps = s.sites[a()].ps[0].1.to_string();
    let mt = s.sites[b()].mt.to_string();
    for (what, addr) in [("PS", ps), ("MT", mt)] {
        let end = served_enddate(&s, &addr);
        assert!(
            end > now_secs(),
            "the {what} at {addr} serves a certificate that ended at {end}"
        );
    }
    // The components stayed the same processes and online at the CS.
    for ((name, _, _), pid) in certs.iter().zip(&pids) {
        assert_eq!(s.pid(name), *pid, "{name} was restarted");
    }
    let list = s.cli_json(&["components"]).expect("components");
    for (role, id) in [
        ("agent", "m1".to_string()),
        ("ps", ps_id(a())),
        ("mt", mt_id(b())),
    ] {
        let c = list["components"]
            .as_array()
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c["role"] == role && c["id"] == id.as_str())
            })
            .unwrap_or_else(|| panic!("{role}:{id} not listed: {list:#}"));
        assert_eq!(c["health"], "online", "{c:#}");
        assert!(
            c["cert_expiry_ms"].as_u64().unwrap_or(0) / 1000 > first_expiry,
            "{role}:{id}: `rebound components` shows the enrolled certificate's expiry: {c:#}"
        );
    }
    // A point after the renewals, and every point still exact.
    points.push(exact_point(&s, pattern));
    let deadline = Instant::now() + JOB;
    for (id, want) in &points {
        let left = deadline.saturating_duration_since(Instant::now());
        s.wait_view_hash(
            b(),
            "m1",
            "disk0",
            id,
            want,
            left.max(Duration::from_secs(10)),
        )
        .unwrap_or_else(|e| panic!("point {id} is not exact after the renewals: {e:#}"));
    }
}

/// [`run`] that must succeed, with `flag path` last.
fn run_ok(s: &Sites, bin: &str, args: &[&str], flag: &str, path: &Path) {
    let out = run(s, bin, args, &[flag.as_ref(), path.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{bin} {args:?}: {err}");
}

/// Runs the lab's binary `bin` with `args` and then `paths`.
fn run(s: &Sites, bin: &str, args: &[&str], paths: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(s.bins.path(bin).expect(bin))
        .args(args)
        .args(paths)
        .output()
        .unwrap_or_else(|e| panic!("{bin} {args:?}: {e}"))
}

#[test]
fn openssl_shows_the_configured_lifetime_of_every_certificate_written() {
    // Enrollment: the agent, PS and MT certificates from a CS with a 7-day
    // lifetime.
    const WEEK: u64 = 7 * 86_400;
    let started = now_secs();
    let s = sites_with_lifetime("7d");
    for (_, enrolled, _) in certificates(&s) {
        assert_lifetime(&enrolled, started, WEEK);
    }

    // `rebound-cs init --cert-lifetime`: the CS's and the admin's.
    let dir = tempfile::tempdir().expect("tempdir");
    let init = dir.path().join("cs");
    let init_args = [
        "init",
        "--listen",
        "127.0.0.1:7443",
        "--cert-lifetime",
        "12h",
    ];
    run_ok(&s, "rebound-cs", &init_args, "--dir", &init);
    for name in ["cs.pem", "admin.pem"] {
        assert_lifetime(&init.join(name), started, 12 * 3600);
    }
    let config = std::fs::read_to_string(init.join("config.toml")).expect("config");
    assert!(config.contains("cert_lifetime = \"12h\""), "{config}");

    // `rebound certs --lifetime`, and the CA's ten years.
    let certs = dir.path().join("certs");
    let certs_args = ["certs", "--machine", "m1", "--lifetime", "3d"];
    run_ok(&s, "rebound", &certs_args, "--out", &certs);
    for name in ["ps.pem", "mt.pem", "admin.pem", "agent-m1.pem"] {
        assert_lifetime(&certs.join(name), started, 3 * 86_400);
    }
    assert_lifetime(&certs.join("ca.pem"), started, 10 * 365 * 86_400);

    // A lifetime renewal cannot keep up with is refused, with its range.
    let short = dir.path().join("short");
    let out = run(
        &s,
        "rebound",
        &["certs", "--lifetime", "1s"],
        &["--out".as_ref(), short.as_os_str()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("out of range") && err.contains("10s"),
        "{err}"
    );
}
