//! Failures injected through the storage (`storage::Faulty`): a crash in
//! the middle of apply or rollback (every write and sync after the fault
//! fails, then the store is reopened from disk as after `kill -9`), and a
//! failed fdatasync, which poisons the replication until a restart.

use super::{
    apply_range, check_all, check_latest, check_points, history, open_store, open_store_on, RID,
};
use crate::error::MtError;
use crate::storage::{Faulty, Op, Target};
use rebound_common::frame::FrameBuilder;
use std::sync::Arc;

#[test]
fn half_applied_frame_and_torn_journal_tail_recover() {
    let dir = tempfile::tempdir().unwrap();
    let g = history(4);
    let n = g.seq();
    // Stop apply of the last frame after its journal is synced and part of
    // its data is written, as a crash would.
    let last_frame_start = n - 20;
    {
        let faulty = Arc::new(Faulty::default());
        let (_s, r) = open_store_on(dir.path(), faulty.clone());
        apply_range(&r, &g, 1, last_frame_start - 1, 8);
        faulty.arm(Op::Write, Target::Replica, 5, true);
        let e = r.apply_frame(&g.frame_bytes(last_frame_start, n));
        assert!(e.is_err());
        assert!(faulty.fired());
        assert_eq!(r.applied_seq(), last_frame_start - 1);
    }
    // Plus a torn record at the end of the current interval's journal.
    let jdir = dir.path().join(RID).join("retention");
    let cur = std::fs::read_dir(&jdir)
        .unwrap()
        .filter_map(|e| crate::layout::parse_journal_name(e.unwrap().file_name().to_str().unwrap()))
        .max()
        .unwrap();
    let jpath = jdir.join(format!("interval-{cur}.undo"));
    let good_len = std::fs::metadata(&jpath).unwrap().len();
    let mut torn = Vec::new();
    crate::journal::encode(&mut torn, 0, 3, &[9u8; 4096]);
    torn.truncate(1000);
    let mut bytes = std::fs::read(&jpath).unwrap();
    bytes.extend_from_slice(&torn);
    std::fs::write(&jpath, bytes).unwrap();
    let (_s, r) = open_store(dir.path());
    assert_eq!(
        std::fs::metadata(&jpath).unwrap().len(),
        good_len,
        "torn tail cut"
    );
    assert_eq!(r.applied_seq(), last_frame_start - 1);
    // The PS resends from resume_seq + 1.
    apply_range(&r, &g, last_frame_start, n, 100);
    check_all(&r, &g);
}

/// Where a rollback is interrupted: (operation, file, which call).
const ROLLBACK_CRASHES: [(&str, Op, Target, usize); 3] = [
    // The header is written, then the first segment of pre-images fails.
    ("during pre-images", Op::Write, Target::PreImages, 2),
    // Pre-images complete; the first write of the point's content fails.
    ("after pre-images", Op::Write, Target::Replica, 1),
    // Part of the point's content is written.
    ("mid-write", Op::Write, Target::Replica, 2),
];

#[test]
fn interrupted_rollback_reruns_to_the_exact_point() {
    for (name, op, target, nth) in ROLLBACK_CRASHES {
        for then_restore in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let g = history(7);
            {
                let faulty = Arc::new(Faulty::default());
                let (_s, r) = open_store_on(dir.path(), faulty.clone());
                apply_range(&r, &g, 1, g.seq(), 13);
                faulty.arm(op, target, nth, true);
                assert!(r.rollback("p2").is_err(), "{name}");
                assert!(faulty.fired(), "{name}");
            }
            // "kill -9": reopen from disk.
            let (_s, r) = open_store(dir.path());
            assert!(r.status().rollback_pending.is_some(), "{name}");
            let mut b = FrameBuilder::new(RID, g.seq() + 1);
            b.push_write(0, 0, &[1u8; 512]);
            assert!(matches!(
                r.apply_frame(&b.finish().to_bytes()),
                Err(MtError::FailedPrecondition(_))
            ));
            assert!(matches!(
                r.rollback("p3"),
                Err(MtError::FailedPrecondition(_))
            ));
            if then_restore {
                r.restore_pre_images().unwrap();
                check_all(&r, &g);
                assert!(r.status().rollback_pending.is_none());
            } else {
                rollback_p2_and_back(&r, &g);
            }
        }
    }
}

/// A failed fdatasync of `state.json` (here when a rollback records its
/// progress) poisons the replication like one of apply; after a restart
/// the rollback runs.
#[test]
fn failed_state_fdatasync_poisons_until_restart() {
    let dir = tempfile::tempdir().unwrap();
    let g = history(5);
    {
        let faulty = Arc::new(Faulty::default());
        let (_s, r) = open_store_on(dir.path(), faulty.clone());
        apply_range(&r, &g, 1, g.seq(), 9);
        faulty.arm(Op::Sync, Target::State, 1, false);
        let e = r.rollback("p2").unwrap_err();
        assert!(faulty.fired());
        assert!(e.is_failed_sync(), "{e}");
        assert!(e.to_string().contains("state.json"), "{e}");
        faulty.disarm();
        assert_eq!(r.state_name(), "poisoned");
        assert!(matches!(r.rollback("p2"), Err(MtError::Poisoned { .. })));
    }
    let (_s, r) = open_store(dir.path());
    assert!(r.status().poisoned.is_none());
    rollback_p2_and_back(&r, &g);
}

/// Rolls back to p2, checks the replica there, restores the pre-images and
/// checks everything again.
fn rollback_p2_and_back(r: &crate::Replication, g: &super::Gen) {
    r.rollback("p2").unwrap();
    check_latest(r, g.snap("p2"));
    r.restore_pre_images().unwrap();
    check_all(r, g);
}

/// A failed fdatasync of any file apply syncs poisons the replication: it
/// refuses apply (and rollback) with an error that says to check the disk
/// and restart, without rebuilding anything from the page cache. Reopened
/// from disk ("restart"), everything acknowledged is there (the views at
/// every point and the replica match the model by blake3) and apply
/// resumes from the acknowledged seq.
#[test]
fn failed_fdatasync_poisons_until_restart_and_loses_nothing_acknowledged() {
    for (target, nth) in [
        (Target::Journal, 1),
        (Target::Replica, 1),
        (Target::AppliedSeq, 2),
        (Target::Catalog, 1),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let g = history(11);
        let n = g.seq();
        let half = n / 2;
        let acked;
        {
            let faulty = Arc::new(Faulty::default());
            let (_s, r) = open_store_on(dir.path(), faulty.clone());
            apply_range(&r, &g, 1, half, 9);
            acked = r.applied_seq();
            assert_eq!(acked, half);
            faulty.arm(Op::Sync, target, nth, false);
            let mut from = half + 1;
            let failed = loop {
                assert!(from <= n, "{target:?}: the fault never fired");
                let to = (from + 8).min(n);
                match r.apply_frame(&g.frame_bytes(from, to)) {
                    Ok(seq) => {
                        assert_eq!(seq, to);
                        from = to + 1;
                    }
                    Err(e) => break e,
                }
            };
            assert!(faulty.fired(), "{target:?}");
            assert!(failed.is_failed_sync(), "{target:?}: {failed}");
            let acked_before = r.applied_seq();
            assert_eq!(
                acked_before,
                from - 1,
                "{target:?}: nothing of the failed cycle is acknowledged"
            );
            // (a) The fault is gone, but the replication stays poisoned.
            faulty.disarm();
            let e = r.apply_frame(&g.frame_bytes(from, n)).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, MtError::Poisoned { .. }), "{target:?}: {msg}");
            assert!(
                msg.contains(RID) && msg.contains("restart rebound-mt"),
                "{msg}"
            );
            assert!(matches!(r.rollback("p1"), Err(MtError::Poisoned { .. })));
            assert!(r.status().poisoned.is_some());
            assert_eq!(r.state_name(), "poisoned");
            assert_eq!(r.applied_seq(), acked_before);
        }
        // (b) Restart: reopened from disk, nothing acknowledged is lost.
        let (_s, r) = open_store(dir.path());
        assert!(r.status().poisoned.is_none());
        let resumed = r.applied_seq();
        assert!(
            resumed >= acked,
            "{target:?}: applied seq went back to {resumed} from {acked}"
        );
        check_points(&r, &g);
        if target != Target::Replica {
            // The replica was synced up to the resume seq. (After a failed
            // replica fdatasync it may also hold writes never acknowledged,
            // which the resent frames overwrite.)
            check_latest(&r, &g.clone_disks_at(resumed));
        }
        // The PS resends from the resume seq + 1; apply goes on.
        apply_range(&r, &g, resumed + 1, n, 9);
        check_all(&r, &g);
    }
}

/// A frame with any header over `body` (its hash valid, so only the seq
/// range can be wrong), as a broken or hostile PS could send.
fn hand_made(first_seq: u64, last_seq: u64, body: Vec<u8>) -> Vec<u8> {
    use rebound_common::frame::{Frame, FrameHeader};
    Frame {
        header: FrameHeader {
            replication_id: RID.into(),
            first_seq,
            last_seq,
            flags: 0,
            uncompressed_len: body.len() as u32,
            hash: *blake3::hash(&body).as_bytes(),
        },
        body,
    }
    .to_bytes()
}

/// The body of `n` 4 KiB writes of `byte` at the start of disk 0.
fn writes_body(n: u64, byte: u8) -> Vec<u8> {
    let mut b = FrameBuilder::new(RID, 1);
    for i in 0..n {
        b.push_write(0, i * 4096, &[byte; 4096]);
    }
    b.finish().body
}

/// Frames whose seq range does not fit their records (first seq 0, an
/// empty body, a count that does not match, a range reaching u64::MAX) are
/// refused with an error naming the replication and the range: never a
/// panic, nothing of them applied, and the replication goes on applying
/// good frames afterwards (exact by blake3).
#[test]
fn malformed_seq_ranges_are_refused_and_apply_goes_on() {
    let (g, _dir, _s, r) = super::applied_history(3, 10);
    let n = g.seq();
    let cases: Vec<(&str, u64, u64, Vec<u8>)> = vec![
        (
            "first seq 0, empty body, to u64::MAX",
            0,
            u64::MAX,
            Vec::new(),
        ),
        ("first seq 0, one record", 0, 0, writes_body(1, 0xa1)),
        (
            "first seq 0, records up to the next seq",
            0,
            n + 1,
            writes_body(n + 2, 0xa2),
        ),
        ("empty body", n + 1, n + 1, Vec::new()),
        (
            "more records than the range",
            n + 1,
            n + 1,
            writes_body(2, 0xa3),
        ),
        (
            "fewer records than the range",
            n + 1,
            n + 3,
            writes_body(2, 0xa4),
        ),
        (
            "range up to u64::MAX",
            n + 1,
            u64::MAX,
            writes_body(1, 0xa5),
        ),
        (
            "range at u64::MAX",
            u64::MAX,
            u64::MAX,
            writes_body(1, 0xa6),
        ),
    ];
    for (what, first, last, body) in cases {
        let bytes = hand_made(first, last, body);
        let r2 = r.clone();
        let res =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || r2.apply_frame(&bytes)));
        let res = res.unwrap_or_else(|_| panic!("{what}: apply panicked"));
        let e = res.expect_err(what);
        let msg = e.to_string();
        assert!(
            matches!(
                e,
                MtError::InvalidArgument(_) | MtError::FailedPrecondition(_)
            ),
            "{what}: {e:?}"
        );
        assert!(
            msg.contains(RID) && msg.contains(&format!("{first}..={last}")),
            "{what}: the error names neither the replication nor the range: {msg}"
        );
        assert_eq!(r.applied_seq(), n, "{what}: applied seq moved");
    }
    check_all(&r, &g);
    // Good frames still apply after every refusal.
    let mut g = g;
    g.random_ops(10);
    g.tag("after");
    apply_range(&r, &g, n + 1, g.seq(), 4);
    check_all(&r, &g);
}

/// Records `from..=to` of `g` prepared for apply, in frames of `per`.
fn prepared(
    r: &crate::Replication,
    g: &super::Gen,
    from: u64,
    to: u64,
    per: u64,
) -> Vec<crate::apply::Prepared> {
    (from..=to)
        .step_by(per as usize)
        .map(|s| {
            let bytes = prost::bytes::Bytes::from(g.frame_bytes(s, (s + per - 1).min(to)));
            r.prepare_frame(&bytes).expect("a good frame")
        })
        .collect()
}

/// The disk fills in the middle of a cycle (journal appends, replica
/// writes, catalog and seq writes fail with ENOSPC from the third write
/// on): apply neither fails back to the PS nor acknowledges anything more;
/// it says why (the replication's status names it and the bytes needed)
/// and waits; once space returns it applies everything by itself, every
/// point and latest exact, also after a restart.
#[test]
fn out_of_space_waits_then_applies_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let g = history(13);
    let n = g.seq();
    let half = n / 2;
    let faulty = Arc::new(Faulty::default());
    let (_s, r) = open_store_on(dir.path(), faulty.clone());
    apply_range(&r, &g, 1, half, 9);
    faulty.arm_full(3);
    let frames = prepared(&r, &g, half + 1, n, 9);
    std::thread::scope(|s| {
        let waiting = s.spawn(|| r.apply_waiting_for_space(frames, &|| false));
        std::thread::sleep(std::time::Duration::from_millis(1500));
        assert!(faulty.fired());
        assert!(!waiting.is_finished(), "apply gave up on a full disk");
        let cause = r
            .status()
            .disk_full
            .expect("the status says the disk is full");
        assert!(cause.contains(RID) && cause.contains("bytes"), "{cause}");
        assert!(r.applied_seq() < n, "applied everything on a full disk");
        faulty.disarm();
        let (applied, res) = waiting.join().unwrap();
        res.expect("applied once space returned");
        assert_eq!(applied, n);
    });
    assert!(r.status().disk_full.is_none());
    check_all(&r, &g);
    drop((_s, r));
    super::check_after_restart(dir.path(), &g);
}

/// A history of `seed` whose first half is applied on a faulty storage.
fn half_applied_on_faulty(
    seed: u64,
) -> (
    tempfile::TempDir,
    super::Gen,
    Arc<Faulty>,
    Arc<crate::Store>,
    Arc<crate::Replication>,
) {
    let dir = tempfile::tempdir().unwrap();
    let g = history(seed);
    let faulty = Arc::new(Faulty::default());
    let (s, r) = open_store_on(dir.path(), faulty.clone());
    apply_range(&r, &g, 1, g.seq() / 2, 9);
    (dir, g, faulty, s, r)
}

/// A stream that ends while its apply waits for space gets the ENOSPC
/// error back, with nothing of the failed cycle acknowledged.
#[test]
fn out_of_space_wait_ends_with_the_stream() {
    let (_dir, g, faulty, _s, r) = half_applied_on_faulty(14);
    let n = g.seq();
    faulty.arm_full(1);
    let frames = prepared(&r, &g, n / 2 + 1, n, 9);
    let (applied, res) = r.apply_waiting_for_space(frames, &|| true);
    let e = res.expect_err("the disk is full");
    assert!(e.is_no_space(), "{e}");
    assert_eq!(applied, n / 2);
    faulty.disarm();
    apply_range(&r, &g, n / 2 + 1, n, 9);
    check_all(&r, &g);
}

/// A panic while apply holds the write lock does not stop the replication
/// for good: the next writer rebuilds the state from disk (as after a
/// crash) and apply goes on, exact.
#[test]
fn a_panic_under_the_write_lock_heals() {
    let (g, _dir, _s, r) = super::applied_history(21, 10);
    let n = g.seq();
    let r2 = r.clone();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _inner = r2.write_inner().expect("the write lock");
        panic!("a bug while applying");
    }));
    assert!(panicked.is_err());
    assert_eq!(r.applied_seq(), n);
    // A reader heals it as well, and reads what the files hold.
    check_latest(&r, &g.disks);
    let mut g = g;
    g.random_ops(12);
    g.tag("after-panic");
    apply_range(&r, &g, n + 1, g.seq(), 5);
    check_all(&r, &g);
}

/// A failed write whose state cannot be rebuilt from disk either (here
/// `state.json` cannot be read back) leaves memory stale: views are refused
/// as unavailable rather than read from a state that may not match the
/// files, every writer tries the rebuild again first (and gets its error
/// while it fails), and once the disk reads again the next writer rebuilds
/// the state and apply goes on, exact.
#[test]
fn a_failed_rebuild_is_retried_by_the_next_writer_and_refuses_views_meanwhile() {
    let (dir, g, faulty, _s, r) = half_applied_on_faulty(22);
    let n = g.seq();
    let state = dir.path().join(RID).join("state.json");
    let good = std::fs::read(&state).unwrap();
    std::fs::write(&state, b"{ not json").unwrap();
    faulty.arm(Op::Write, Target::Replica, 1, false);
    r.apply_frame(&g.frame_bytes(n / 2 + 1, n / 2 + 9))
        .expect_err("the replica write fails");
    assert!(faulty.fired());

    let mut buf = vec![0u8; 4096];
    let err = r
        .read_at_point(0, 0, &mut buf, None)
        .expect_err("a view of a state that could not be rebuilt");
    assert!(matches!(err, MtError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("retry"), "{err}");
    let err = r
        .apply_frame(&g.frame_bytes(n / 2 + 1, n))
        .expect_err("the next writer rebuilds first, and that still fails");
    assert!(err.to_string().contains("state.json"), "{err}");
    assert_eq!(r.applied_seq(), n / 2);

    std::fs::write(&state, &good).unwrap();
    apply_range(&r, &g, n / 2 + 1, n, 9);
    check_all(&r, &g);
}
