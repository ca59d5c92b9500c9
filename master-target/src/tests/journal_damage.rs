//! A damaged record in a closed interval's retention journal: the journal
//! is not cut, the damaged bytes are copied aside, the points that need the
//! journal are refused (views and rollback) instead of served inexact, the
//! points after it stay exact, and apply goes on.

use super::retention_policy::window_secs;
use super::{applied_history, apply_range, check_latest, open_store, Gen};
use crate::replication::Replication;
use std::path::{Path, PathBuf};

fn journal(r: &Replication, n: u64) -> PathBuf {
    r.root().join(format!("retention/interval-{n}.undo"))
}

/// Names of the set-aside files in `r`'s retention directory.
fn asides(r: &Replication) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(r.root().join("retention"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".damaged-"))
        .collect();
    v.sort();
    v
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

/// Interval `n`'s damaged journal kept its `len` bytes (not cut at the
/// damage) and is the one set aside: the aside file's name.
fn kept_whole_and_aside(r: &Replication, n: u64, len: u64) -> String {
    let path = journal(r, n);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        len,
        "a damaged journal is not cut ({})",
        path.display()
    );
    let aside = asides(r);
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(
        aside[0].starts_with(&format!("interval-{n}.undo.damaged-")),
        "{aside:?}"
    );
    aside[0].clone()
}

/// Reads every disk of `r` at point `id` whole.
fn read_point(r: &Replication, g: &Gen, id: &str) -> crate::error::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for d in 0..g.disks.len() {
        let mut buf = vec![0u8; g.disks[d].len()];
        r.read_at_point(d as u32, 0, &mut buf, Some(id))?;
        out.push(buf);
    }
    Ok(out)
}

/// Points closing an interval at or after `n` equal the model; those
/// before it are refused with a message naming the damaged interval.
fn check_around_damage(r: &Replication, g: &Gen, n: u64) {
    for p in r.points() {
        match read_point(r, g, &p.id) {
            Ok(disks) if p.interval >= n => {
                for (d, want) in g.snap(&p.id).iter().enumerate() {
                    assert!(
                        blake3::hash(&disks[d]) == blake3::hash(want),
                        "disk {d} at point {}",
                        p.id
                    );
                }
            }
            Ok(_) => panic!(
                "point {} (interval {}) needs damaged interval {n} but was served",
                p.id, p.interval
            ),
            Err(e) if p.interval < n => {
                let msg = e.to_string();
                assert!(
                    msg.contains("cannot be rebuilt exactly")
                        && msg.contains(&format!("interval {n}"))
                        && msg.contains(".damaged-"),
                    "point {}: {msg}",
                    p.id
                );
            }
            Err(e) => panic!("point {} after the damage: {e}", p.id),
        }
    }
}

#[test]
fn a_corrupt_record_in_a_closed_journal_is_set_aside_and_the_points_needing_it_are_refused() {
    let (mut g, dir, s, r) = applied_history(51, 10);
    let points = r.points();
    // p2 closes interval n: its journal is needed by p0 and p1 only.
    let n = points[2].interval;
    let path = journal(&r, n);
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(
        len > 8192,
        "interval {n} saved several blocks ({len} bytes)"
    );
    drop((r, s));
    flip_byte(&path, len / 2);

    let (s, r) = open_store(dir.path());
    let aside = vec![kept_whole_and_aside(&r, n, len)];
    let offset: u64 = aside[0].rsplit('-').next().unwrap().parse().unwrap();
    assert!(offset <= len / 2, "damage at {offset}");
    let copied = std::fs::read(r.root().join("retention").join(&aside[0])).unwrap();
    assert_eq!(copied, std::fs::read(&path).unwrap()[offset as usize..]);
    assert_eq!(r.points().len(), 5, "no point is forgotten");
    check_marks(&r, n);
    // The damage is raised as an event once (by the next retention pass).
    let unreported = || r.write_inner().unwrap().journal_mut().unreported_damage();
    let raised = unreported();
    assert_eq!(raised.len(), 1);
    let msg = raised[0]
        .1
        .message(crate::tests::RID, raised[0].0, &raised[0].2);
    for want in [
        format!("interval {n}"),
        format!("offset {offset}"),
        aside[0].clone(),
        "choose a point cut after".into(),
    ] {
        assert!(msg.contains(&want), "{want}: {msg}");
    }
    assert!(unreported().is_empty());
    check_around_damage(&r, &g, n);
    check_latest(&r, &g.disks);
    // Rollback to a damaged point is refused before it touches anything.
    let err = r.rollback(&points[1].id).unwrap_err().to_string();
    assert!(err.contains("cannot be rebuilt exactly"), "{err}");
    check_latest(&r, &g.disks);

    // Apply goes on; a new point is exact.
    let mid = g.seq();
    g.random_ops(30);
    g.tag("p5");
    g.random_ops(10);
    apply_range(&r, &g, mid + 1, g.seq(), 7);
    check_around_damage(&r, &g, n);
    check_latest(&r, &g.disks);

    // A restart finds the same damage, and copies nothing again.
    drop((r, s));
    let (s, r) = open_store(dir.path());
    assert_eq!(asides(&r), aside);
    check_around_damage(&r, &g, n);

    // Once retention drops the points that needed it, nothing is refused.
    let cfg = window_secs(0);
    r.enforce_retention(&cfg, u64::MAX / 2).unwrap();
    assert_eq!(r.points().len(), 1);
    check_around_damage(&r, &g, 0);
    check_marks(&r, 0);
    // The aside copy goes with the interval's journal.
    assert!(!path.exists(), "the dropped interval's journal is deleted");
    assert_eq!(asides(&r), Vec::<String>::new());
    drop((r, s));
}

/// The points listed are marked: those closing an interval before `n`
/// say why they cannot be rebuilt, the others are not marked.
fn check_marks(r: &Replication, n: u64) {
    for (p, damaged) in r.points_with_damage() {
        if p.interval < n {
            assert!(
                damaged.contains("cannot be rebuilt exactly")
                    && damaged.contains(&format!("choose a point cut after interval {n}")),
                "point {} (interval {}): {damaged:?}",
                p.id,
                p.interval
            );
        } else {
            assert_eq!(damaged, "", "point {} (interval {})", p.id, p.interval);
        }
    }
}

/// Offset of the first invalid record of the journal at `path`.
fn first_damage(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    crate::journal::scan(&f, 0, |_| true).unwrap().valid_len
}

/// Bit rot in the last record of the current interval's journal: the
/// record is whole, so it is no torn append to cut (the replica already
/// holds what followed it); it is damage, set aside and marked, and every
/// point (all need the current interval) is refused.
#[test]
fn a_whole_last_record_failing_its_checksum_is_damage_not_a_torn_tail() {
    let (mut g, dir, s, r) = applied_history(52, 10);
    let cur = r.points().last().unwrap().interval + 1;
    let path = journal(&r, cur);
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len > 0, "the current interval saved blocks");
    drop((r, s));
    flip_byte(&path, len - 1);

    let (s, r) = open_store(dir.path());
    kept_whole_and_aside(&r, cur, len);
    let raised = r.write_inner().unwrap().journal_mut().unreported_damage();
    assert_eq!(raised.len(), 1, "raised as an event");
    check_marks(&r, cur);
    check_around_damage(&r, &g, cur);
    check_latest(&r, &g.disks);

    // Apply goes on after the damaged record; a new point is exact.
    let mid = g.seq();
    g.random_ops(20);
    g.tag("p5");
    apply_range(&r, &g, mid + 1, g.seq(), 7);
    check_around_damage(&r, &g, cur);
    check_latest(&r, &g.disks);
    drop((r, s));
}

/// The damaged records cannot be copied aside (as on a full disk: here the
/// copy's temporary name is taken): the replication opens anyway, the log
/// and the event say the copy failed, the points needing the journal are
/// refused, and the copy is made at the next open that can.
#[test]
fn damage_that_cannot_be_copied_aside_still_opens_and_is_reported() {
    let (g, dir, s, r) = applied_history(53, 10);
    let n = r.points()[2].interval;
    let path = journal(&r, n);
    let len = std::fs::metadata(&path).unwrap().len();
    drop((r, s));
    flip_byte(&path, len / 2);
    let offset = first_damage(&path);
    let aside = format!("interval-{n}.undo.damaged-{offset}");
    let blocker = path.with_file_name(format!("{aside}.tmp"));
    std::fs::create_dir(&blocker).unwrap();

    let (s, r) = open_store(dir.path());
    assert!(!path.with_file_name(&aside).exists());
    let raised = r.write_inner().unwrap().journal_mut().unreported_damage();
    assert_eq!(raised.len(), 1);
    let msg = raised[0]
        .1
        .message(crate::tests::RID, raised[0].0, &raised[0].2);
    assert!(msg.contains("could not be copied"), "{msg}");
    check_marks(&r, n);
    check_around_damage(&r, &g, n);
    drop((r, s));

    std::fs::remove_dir(&blocker).unwrap();
    let (s, r) = open_store(dir.path());
    assert_eq!(asides(&r), vec![aside]);
    drop((r, s));
}
