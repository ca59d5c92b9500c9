//! The PS on the control channel: its hello, its sampled status and the
//! revocation list.

use super::support::*;
use std::sync::Arc;

/// The hello carries the certificate's id; the status is sampled from the
/// cache (durable/applied seqs, lag, cache use and cap); SetRevoked is
/// enforced and saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_hello_and_status() {
    use crate::cache::Cache;
    use crate::control::{Handler, Identity, PsControl};
    use crate::forward::{Forwarders, MtLink};
    use rebound_common::control::ControlHandler;
    use rebound_proto::control::status::Status as St;

    let lab = Lab::new();
    let ps_tls = lab.tls("ps");
    assert_eq!(crate::own_id(&ps_tls).unwrap(), "ps1");
    let e = crate::own_id(&lab.tls("mt")).unwrap_err();
    assert!(e.to_string().contains("ps certificate"), "{e}");

    let cache = Arc::new(Cache::open(&lab.dir.path().join("cache"), 1 << 30).unwrap());
    cache.ensure("r1").unwrap();
    let fw = Arc::new(Forwarders::new(Arc::new(MtLink::new(
        ps_tls,
        "127.0.0.1:1".into(),
        "localhost".into(),
    ))));
    let ctl = Arc::new(PsControl {
        cache: cache.clone(),
        forwarders: fw.clone(),
        identity: Identity {
            id: "ps1".into(),
            site: "onprem".into(),
            addresses: vec!["127.0.0.1:9443".into()],
            instance: crate::instance_id(),
        },
        status: Default::default(),
        revocations: Default::default(),
        revoked_path: lab.dir.path().join("cache/revoked"),
    });
    let h = Handler(ctl.clone());
    let hello = h.hello();
    assert_eq!(
        (hello.role.as_str(), hello.id.as_str(), hello.site.as_str()),
        ("ps", "ps1", "onprem")
    );
    assert_eq!(hello.addresses, vec!["127.0.0.1:9443".to_string()]);
    assert_eq!(hello.instance.len(), 16);
    let sampler = Sampler::start(cache, fw, ctl.status.clone());
    wait_for("first status", || h.status().is_some()).await;
    let Some(St::Ps(st)) = h.status().unwrap().status else {
        panic!("not a PS status")
    };
    assert_eq!(st.cache_limit, 1 << 30);
    assert_eq!(st.replications.len(), 1);
    assert_eq!(st.replications[0].replication_id, "r1");
    assert_eq!(st.replications[0].lag_ms, 0);

    // SetRevoked: enforced and saved before the answer.
    let set = rebound_proto::control::Command {
        id: "c1".into(),
        cmd: Some(rebound_proto::control::command::Cmd::SetRevoked(
            rebound_proto::control::SetRevoked {
                serials: vec!["0a".into(), "ff01".into()],
            },
        )),
        ..Default::default()
    };
    let r = h.handle(set).await;
    assert!(r.ok, "{}", r.error);
    assert!(ctl.revocations.is_revoked("ff01"));
    let saved = rebound_common::tls::Revocations::load(&ctl.revoked_path).unwrap();
    assert_eq!(saved.serials(), ["0a", "ff01"]);

    sampler.stop().await;
}
