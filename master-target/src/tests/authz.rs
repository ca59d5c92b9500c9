//! Which PS may feed and read a replication: the assigned one in managed
//! mode (and nothing the CS did not prepare), the first one in lab mode;
//! chunk hashes only for the replication's own machine; a bounded hello.

use super::{info, open_store, RID};
use crate::authz::{for_apply, for_chunk_hashes};
use crate::error::MtError;
use crate::replication::Store;
use rebound_common::pki::{PeerIdentity, Role};
use rebound_proto::{DiskInfo, ReplicationInfo};

fn ps(id: &str) -> PeerIdentity {
    PeerIdentity {
        role: Role::Ps,
        id: id.into(),
    }
}

/// The message of a permission refusal.
fn denied<T>(r: Result<T, MtError>) -> String {
    match r {
        Err(MtError::PermissionDenied(m)) => m,
        Err(e) => panic!("expected a permission refusal, got {e:?}"),
        Ok(_) => panic!("expected a permission refusal, got success"),
    }
}

#[test]
fn managed_mode_takes_only_the_assigned_ps_and_prepared_replications() {
    let dir = tempfile::tempdir().unwrap();
    let (store, r) = open_store(dir.path());
    r.assign_ps("ps-a").unwrap();
    assert!(for_apply(&store, &info(), &ps("ps-a"), true).is_ok());
    let m = denied(for_apply(&store, &info(), &ps("ps-b"), true));
    assert!(
        m.contains("ps:ps-b") && m.contains("assigned to process server ps-a"),
        "{m}"
    );
    let m = denied(for_chunk_hashes(&store, RID, None, &ps("ps-b"), true));
    assert!(m.contains("assigned to process server ps-a"), "{m}");
    // Not prepared by the CS: neither Apply nor ChunkHashes creates it.
    let new = ReplicationInfo {
        replication_id: "m1-new".into(),
        ..info()
    };
    let m = denied(for_apply(&store, &new, &ps("ps-a"), true));
    assert!(m.contains("did not prepare it"), "{m}");
    let m = denied(for_chunk_hashes(
        &store,
        "m1-new",
        Some(&new),
        &ps("ps-a"),
        true,
    ));
    assert!(m.contains("did not prepare it"), "{m}");
    assert!(store.get("m1-new").is_none());
    // Another machine's info never gets this replica's hashes, whoever asks.
    let m2 = ReplicationInfo {
        machine_id: "m2".into(),
        ..info()
    };
    let admin = PeerIdentity {
        role: Role::Admin,
        id: "admin".into(),
    };
    for who in [ps("ps-a"), admin] {
        let m = denied(for_chunk_hashes(&store, RID, Some(&m2), &who, true));
        assert!(m.contains("belongs to machine m1"), "{m}");
    }
    // The assignment survives a restart.
    drop((store, r));
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.get(RID).unwrap().assigned_ps().as_deref(),
        Some("ps-a")
    );
}

#[test]
fn lab_mode_binds_the_first_ps_and_caps_the_disks() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let r = for_apply(&store, &info(), &ps("ps1"), false).unwrap();
    assert_eq!(r.assigned_ps().as_deref(), Some("ps1"));
    let m = denied(for_apply(&store, &info(), &ps("ps2"), false));
    assert!(m.contains("assigned to process server ps1"), "{m}");
    let mut many = ReplicationInfo {
        replication_id: "m1-many".into(),
        ..info()
    };
    many.disks = (0..65)
        .map(|i| DiskInfo {
            index: i,
            name: format!("d{i}"),
            size: 4096,
        })
        .collect();
    match for_apply(&store, &many, &ps("ps1"), false) {
        Err(MtError::InvalidArgument(m)) => assert!(m.contains("at most 64"), "{m}"),
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("65 disks accepted"),
    }
}

#[test]
fn a_move_accepts_the_old_ps_until_it_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let (store, r) = open_store(dir.path());
    r.assign_ps("ps-a").unwrap();
    r.move_to_ps("ps-b", false).unwrap();
    // Repeated (a CS step that runs twice): the same.
    r.move_to_ps("ps-b", false).unwrap();
    assert_eq!(r.assigned_ps().as_deref(), Some("ps-b"));
    for who in ["ps-a", "ps-b"] {
        assert!(for_apply(&store, &info(), &ps(who), true).is_ok(), "{who}");
        assert!(for_chunk_hashes(&store, RID, None, &ps(who), true).is_ok());
    }
    let m = denied(for_apply(&store, &info(), &ps("ps-c"), true));
    assert!(m.contains("assigned to process server ps-b"), "{m}");
    // The old PS stays accepted across a restart while the move is under way.
    drop((store, r));
    let store = Store::open(dir.path()).unwrap();
    assert!(for_apply(&store, &info(), &ps("ps-a"), true).is_ok());
    let r = store.get(RID).unwrap();
    assert_eq!(r.previous_ps(), vec!["ps-a".to_string()]);
    r.move_to_ps("ps-b", true).unwrap();
    r.move_to_ps("ps-b", true).unwrap();
    let m = denied(for_apply(&store, &info(), &ps("ps-a"), true));
    assert!(m.contains("assigned to process server ps-b"), "{m}");
    assert!(for_apply(&store, &info(), &ps("ps-b"), true).is_ok());
    assert!(r.previous_ps().is_empty());
}
