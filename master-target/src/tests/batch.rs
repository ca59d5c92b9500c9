//! Applying many frames in one durability cycle (`apply_frames`): points
//! inside a batch are cut at their exact seq, a refused frame stops the
//! batch with the frames before it applied, and a replication from before
//! `applied.seq` existed opens at its state.json seq.

use super::{
    applied_history, check_after_restart, check_all, check_latest, history, open_store, Gen,
};
use crate::error::MtError;
use prost::bytes::Bytes;

/// Frames of `per` records covering `from..=to`.
fn frames(g: &Gen, from: u64, to: u64, per: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut s = from;
    while s <= to {
        let e = (s + per - 1).min(to);
        out.push(g.frame_bytes(s, e));
        s = e + 1;
    }
    out
}

#[test]
fn batched_frames_cut_every_point_at_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    let g = history(11);
    {
        let (_s, r) = open_store(dir.path());
        let all = frames(&g, 1, g.seq(), 6);
        // Batches of 1, 2, 3, ... frames; each batch also repeats the last
        // frame of the one before (already applied: skipped).
        let mut i = 0;
        let mut size = 1;
        while i < all.len() {
            let end = (i + size).min(all.len());
            let from = i.saturating_sub(1);
            let (applied, res) =
                r.apply_frames(all[from..end].iter().map(|f| Bytes::copy_from_slice(f)));
            res.expect("batch applies");
            assert_eq!(applied, r.applied_seq());
            i = end;
            size += 1;
        }
        assert_eq!(r.applied_seq(), g.seq());
        assert_eq!(r.points().len(), 5);
        check_all(&r, &g);
    }
    check_after_restart(dir.path(), &g);
}

#[test]
fn refused_frame_stops_the_batch_after_the_good_ones() {
    let (mut g, _dir, _s, r) = applied_history(12, 10);
    let n = g.seq();
    g.random_ops(8);
    g.tag("q1");
    g.random_ops(4);
    let mid = g.seq();
    let mid_disks = g.disks.clone();
    g.random_ops(8);
    g.tag("q2");
    g.random_ops(8);
    let a = g.frame_bytes(n + 1, mid - 3);
    let b = g.frame_bytes(mid - 2, mid); // the point q1 is in a
    let mut c = g.frame_bytes(mid + 1, mid + 5);
    let d = g.frame_bytes(mid + 6, g.seq());
    let len = c.len();
    c[len - 20] ^= 0x33;
    let (applied, res) = r.apply_frames([&a, &b, &c, &d].map(|f| Bytes::copy_from_slice(f)));
    assert!(matches!(res, Err(MtError::DataLoss(_))), "{res:?}");
    assert_eq!(applied, mid);
    assert_eq!(r.applied_seq(), mid);
    assert_eq!(r.points().last().unwrap().id, "q1");
    check_latest(&r, &mid_disks);
    // A gap after a good frame: the good one is applied, the gap refused.
    let c = g.frame_bytes(mid + 1, mid + 5);
    let gap = g.frame_bytes(mid + 7, g.seq());
    let (applied, res) = r.apply_frames([&c, &gap].map(|f| Bytes::copy_from_slice(f)));
    assert!(
        matches!(res, Err(MtError::FailedPrecondition(_))),
        "{res:?}"
    );
    assert_eq!(applied, mid + 5);
    let (applied, res) = r.apply_frames([g.frame_bytes(mid + 6, g.seq()).into()]);
    res.expect("the rest applies");
    assert_eq!(applied, g.seq());
    check_all(&r, &g);
}

#[test]
fn opens_a_replication_that_has_only_state_json() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = history(13);
    let n = g.seq();
    let root = {
        let (_s, r) = open_store(dir.path());
        super::apply_range(&r, &g, 1, n, 9);
        r.root().to_path_buf()
    };
    // As an MT before applied.seq wrote it: everything in state.json.
    std::fs::remove_file(root.join("applied.seq")).unwrap();
    let path = root.join("state.json");
    let mut st: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    st["applied_seq"] = n.into();
    st["interval"] = 5.into();
    std::fs::write(&path, serde_json::to_vec(&st).unwrap()).unwrap();
    {
        let (_s, r) = open_store(dir.path());
        assert_eq!(r.applied_seq(), n);
        assert!(root.join("applied.seq").exists());
        check_all(&r, &g);
        g.random_ops(10);
        g.tag("p5");
        g.random_ops(5);
        super::apply_range(&r, &g, n + 1, g.seq(), 4);
    }
    check_after_restart(dir.path(), &g);
}
