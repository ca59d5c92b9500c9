//! The multi-site lab comes up through enrollment alone: per site a PS and
//! an MT enroll with `enroll --cs --passphrase-file`, open their control
//! channel and show as online at their site in `rebound status`.

use rebound_lab::*;
use std::time::Duration;

#[test]
fn ps_and_mt_of_both_sites_enroll_and_come_online() {
    let s = Sites::start(SitesOptions {
        machines: vec![],
        ..Default::default()
    })
    .expect("sites");
    let st = s.cli_json(&["status"]).expect("status");
    let comps = st["components"].as_array().cloned().unwrap_or_default();
    for site in &s.opts.sites {
        for (role, id) in [("ps", ps_id(site)), ("mt", mt_id(site))] {
            let c = comps
                .iter()
                .find(|c| c["role"] == role && c["id"] == id.as_str())
                .unwrap_or_else(|| panic!("{role}:{id} missing from status: {st}"));
            assert_eq!(c["health"], "online", "{c}");
            assert_eq!(c["site"], site.as_str(), "{c}");
        }
    }
    let sites: Vec<String> = st["sites"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    for site in &s.opts.sites {
        assert!(sites.contains(site), "site {site} missing: {st}");
    }
    // The table form names them too.
    let out = s.cli_ok(&["status"]).expect("status table");
    assert!(
        out.contains("ps-onprem") && out.contains("mt-azure"),
        "{out}"
    );

    // A PS that stops goes offline after three missed heartbeats.
    let mut s = s;
    s.stop("ps-onprem").expect("stop ps");
    let start = std::time::Instant::now();
    loop {
        let st = s.cli_json(&["status"]).expect("status");
        let off = st["components"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["id"] == "ps-onprem" && c["health"] == "offline")
        });
        if off {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "ps-onprem still not offline: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn two_process_servers_at_a_site_enroll_and_come_online() {
    let s = Sites::start(SitesOptions {
        sites: vec!["onprem".into()],
        ps_per_site: 2,
        machines: vec![],
        ..Default::default()
    })
    .expect("sites");
    let ps = &s.sites["onprem"].ps;
    assert_eq!(ps.len(), 2, "{ps:?}");
    assert_ne!(ps[0].1, ps[1].1, "the PSs share an address: {ps:?}");
    let st = s.cli_json(&["status"]).expect("status");
    for (id, _) in ps {
        let online = st["components"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["role"] == "ps" && c["id"] == id.as_str() && c["health"] == "online")
        });
        assert!(online, "{id} not online: {st}");
    }
}
