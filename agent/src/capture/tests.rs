//! The ordering point's tests: seq order, modes, windows, dirty-extent
//! clearing, tags and resume, driven through [`Capture`]'s public API.

use super::*;
use rebound_common::frame::{Frame, Record, TagKind};
use std::path::Path;
use std::time::Duration;

pub(crate) fn make_disk(dir: &Path, i: u32, size: u64) -> Arc<Disk> {
    let p = dir.join(format!("d{i}.img"));
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    Arc::new(Disk::open(i, &format!("disk{i}"), &p).unwrap())
}

pub(crate) fn make_capture(dir: &Path, sizes: &[u64], limit: u64) -> Arc<Capture> {
    let disks: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| make_disk(dir, i as u32, s))
        .collect();
    let extents: Vec<u64> = sizes.iter().map(|s| s.div_ceil(EXTENT_SIZE)).collect();
    let (dlog, _) = DirtyLog::open(&dir.join("dirty.log"), &extents).unwrap();
    Arc::new(Capture::new("m1", disks, Arc::new(dlog), limit))
}

/// Drains the buffer into records with their seqs.
pub(crate) fn drain(cap: &Capture) -> Vec<(u64, Record)> {
    let (frames, _) = cap.stream().take_frames(true);
    let mut out = Vec::new();
    for f in frames {
        let frame = f.builder.finish();
        let bytes = frame.to_bytes();
        let parsed = Frame::parse(&bytes).unwrap();
        let first = parsed.header.first_seq;
        for (i, r) in parsed.records().unwrap().into_iter().enumerate() {
            out.push((first + i as u64, r));
        }
    }
    out
}

/// Connected at `resume` and in data mode.
pub(crate) fn start(cap: &Capture, resume: u64) {
    assert_eq!(cap.stream().on_resume(resume), ResumeOutcome::Fresh);
    assert!(cap.resync().next_batch().is_none());
    assert_eq!(cap.mode(), Mode::Data);
}

#[test]
fn seqs_are_consecutive_across_disks_and_follow_write_order() {
    let dir = tempfile::tempdir().unwrap();
    let cap = make_capture(dir.path(), &[4 << 20, 2 << 20], 64 << 20);
    start(&cap, 41);
    cap.write(0, 0, &[1u8; 4096], false).unwrap();
    cap.write(1, 512, &[2u8; 1024], false).unwrap();
    cap.write(0, 2048, &[3u8; 4096], true).unwrap();
    cap.zero(1, 0, 4096, false).unwrap();
    cap.write(0, 0, &[4u8; 512], false).unwrap();
    let recs = drain(&cap);
    let seqs: Vec<u64> = recs.iter().map(|r| r.0).collect();
    assert_eq!(seqs, vec![42, 43, 44, 45, 46]);
    assert!(matches!(&recs[0].1, Record::Write { disk: 0, offset: 0, data } if data[0] == 1));
    assert!(matches!(
        &recs[1].1,
        Record::Write {
            disk: 1,
            offset: 512,
            ..
        }
    ));
    assert!(matches!(
        &recs[3].1,
        Record::Zero {
            disk: 1,
            offset: 0,
            len: 4096
        }
    ));
    // Replaying the stream on a zeroed disk gives the source disk.
    let mut img = vec![0u8; 4 << 20];
    for (_, r) in &recs {
        if let Record::Write {
            disk: 0,
            offset,
            data,
        } = r
        {
            img[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
    }
    let mut src = vec![0u8; 4 << 20];
    cap.disks()[0].read_at(&mut src, 0).unwrap();
    assert_eq!(img, src);
    assert_eq!(cap.snapshot().seq, 46);
    assert_eq!(cap.dirty_extents().log().count(), 2);
}

#[test]
fn concurrent_overlapping_writes_stream_order_matches_disk() {
    let dir = tempfile::tempdir().unwrap();
    let cap = make_capture(dir.path(), &[1 << 20, 1 << 20], 256 << 20);
    start(&cap, 0);
    let hs: Vec<_> = (0..4u8)
        .map(|t| {
            let cap = cap.clone();
            std::thread::spawn(move || {
                for i in 0..200u32 {
                    let v = t.wrapping_mul(50).wrapping_add(i as u8);
                    let off = ((i * 7 + t as u32 * 3) % 64) as u64 * 4096;
                    cap.write(i % 2, off, &[v; 8192], false).unwrap();
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let recs = drain(&cap);
    assert_eq!(recs.len(), 800);
    for (i, (s, _)) in recs.iter().enumerate() {
        assert_eq!(*s, i as u64 + 1);
    }
    for disk in 0..2u32 {
        let mut img = vec![0u8; 1 << 20];
        for (_, r) in &recs {
            if let Record::Write {
                disk: d,
                offset,
                data,
            } = r
            {
                if *d == disk {
                    img[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
                }
            }
        }
        let mut src = vec![0u8; 1 << 20];
        cap.disks()[disk as usize].read_at(&mut src, 0).unwrap();
        assert!(img == src, "replayed stream differs from disk {disk}");
    }
}

#[test]
fn full_buffer_switches_to_bitmap_and_back_through_a_window() {
    let dir = tempfile::tempdir().unwrap();
    let cap = make_capture(dir.path(), &[16 << 20], 3 << 20);
    start(&cap, 0);
    for i in 0..3u64 {
        cap.write(0, i << 20, &vec![7u8; 1 << 20], false).unwrap();
    }
    assert_eq!(cap.mode(), Mode::Bitmap);
    let s = cap.snapshot();
    assert_eq!(s.seq, 2);
    assert_eq!(s.resync_pending_extents, 1);
    assert!(cap.cut_tag(TagKind::Crash, true).is_err());
    cap.write(0, 5 << 20, &[9u8; 4096], false).unwrap();
    assert_eq!(cap.snapshot().resync_pending_extents, 2);
    // The sender drains and the PS acknowledges everything.
    let recs = drain(&cap);
    assert_eq!(recs.len(), 2);
    let freed = cap.stream().buffer_bytes();
    cap.stream().on_durable(2, freed);
    assert_eq!(cap.stream().buffer_bytes(), 0);
    // Back to data mode: a window over exactly the missed extents.
    let b = cap.resync().next_batch().unwrap();
    assert!(b.opened);
    assert_eq!(b.reason, "bitmap");
    assert_eq!(b.disks, vec![(0, vec![2, 5])]);
    assert_eq!(cap.mode(), Mode::Resync);
    assert!(cap.cut_tag(TagKind::Crash, true).is_err());
    cap.resync().copy(0, 2 << 20, 1 << 20, false).unwrap();
    cap.resync().copy(0, 5 << 20, 1 << 20, false).unwrap();
    let end = cap.resync().finish().unwrap();
    assert_eq!(cap.mode(), Mode::Data);
    let recs = drain(&cap);
    assert!(matches!(recs[0].1, Record::ResyncBegin { .. }));
    assert_eq!(recs[0].0, 3);
    assert!(matches!(recs[recs.len() - 2].1, Record::ResyncEnd));
    assert!(
        matches!(&recs[recs.len() - 1].1, Record::Tag(t) if t.id == end.tag && t.kind == TagKind::Crash)
    );
    assert_eq!(end.tag, format!("crash-{}", end.tag_seq));
    // Extent 5: 4 KiB data + 15 zero sub-chunks, extent 2: one 1 MiB write.
    assert_eq!(end.bytes, (1 << 20) + 65536);
    // Dirty bits clear once the window is durable (extents 0 and 1 and the
    // look-ahead ones now; 2 and 5 wait for the window's records).
    cap.dirty_extents().clear_durable().unwrap();
    assert_eq!(cap.dirty_extents().log().count(), 2);
    let freed = cap.stream().buffer_bytes();
    cap.stream().on_durable(end.tag_seq, freed);
    cap.dirty_extents().clear_durable().unwrap();
    assert_eq!(cap.dirty_extents().log().count(), 0);
}

#[test]
fn hot_extents_stay_dirty_until_cold_or_over_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cap = make_capture(dir.path(), &[8 << 20], 64 << 20);
    start(&cap, 0);
    // Extents 0, 2, 4 written; 0 and 2 durable at the PS, 4 not.
    cap.write(0, 0, &[1u8; 4096], false).unwrap();
    cap.write(0, 2 << 20, &[2u8; 4096], false).unwrap();
    let durable = cap.stream().handed_over_seq();
    cap.write(0, 4 << 20, &[3u8; 4096], false).unwrap();
    assert_eq!(cap.dirty_extents().log().count(), 3);
    cap.stream().on_durable(durable, 0);
    // Hot (written within the idle time) and under the limit: all kept,
    // and a new write to them does not touch the log.
    let idle = Duration::from_secs(3600);
    assert_eq!(cap.dirty_extents().clear_cold(idle, 8).unwrap(), 0);
    assert!(cap.dirty_extents().log().is_durably_set(0, 0));
    // Over the limit: durable extents are cleared, oldest first; extent 4
    // (records not durable) is never cleared.
    assert_eq!(cap.dirty_extents().clear_cold(idle, 2).unwrap(), 1);
    assert_eq!(cap.dirty_extents().log().count(), 2);
    assert!(cap.dirty_extents().log().is_set(0, 4));
    assert_eq!(cap.dirty_extents().clear_cold(idle, 0).unwrap(), 1);
    assert_eq!(cap.dirty_extents().log().set_extents(0), vec![4]);
    // Idle time 0: every durable extent is cold.
    cap.write(0, 6 << 20, &[4u8; 4096], false).unwrap();
    cap.stream().on_durable(cap.stream().handed_over_seq(), 0);
    assert_eq!(
        cap.dirty_extents()
            .clear_cold(Duration::ZERO, 4096)
            .unwrap(),
        2
    );
    assert_eq!(cap.dirty_extents().log().count(), 0);
    assert!(!cap.dirty_extents().log().is_durably_set(0, 6));
}

#[test]
fn tags_only_after_changes_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let cap = make_capture(dir.path(), &[1 << 20], 64 << 20);
    assert_eq!(
        cap.cut_tag(TagKind::Crash, false),
        Err(TagError::NotConnected)
    );
    start(&cap, 10);
    assert_eq!(cap.cut_tag(TagKind::Crash, false), Ok(None));
    cap.write(0, 0, &[1u8; 512], false).unwrap();
    assert_eq!(
        cap.cut_tag(TagKind::Crash, false),
        Ok(Some(("crash-12".into(), 12)))
    );
    assert_eq!(cap.cut_tag(TagKind::Crash, false), Ok(None));
    assert_eq!(
        cap.cut_tag(TagKind::App, true),
        Ok(Some(("app-13".into(), 13)))
    );
    assert_eq!(cap.snapshot().last_tag, "app-13");
}

#[test]
fn resume_trims_or_resets() {
    let dir = tempfile::tempdir().unwrap();
    let cap = make_capture(dir.path(), &[4 << 20], 64 << 20);
    // Writes before the first connection: bitmap until the PS answers.
    cap.write(0, 0, &[1u8; 512], false).unwrap();
    assert_eq!(cap.mode(), Mode::Bitmap);
    assert_eq!(cap.stream().on_resume(100), ResumeOutcome::Fresh);
    let b = cap.resync().next_batch().unwrap();
    assert_eq!(b.disks, vec![(0, vec![0])]);
    cap.resync().copy(0, 0, 1 << 20, false).unwrap();
    cap.resync().finish().unwrap();
    let recs = drain(&cap);
    assert_eq!(recs[0].0, 101);
    assert!(matches!(recs[0].1, Record::ResyncBegin { .. }));
    cap.write(0, 0, &[2u8; 512], false).unwrap();
    let last = cap.stream().handed_over_seq();
    assert_eq!(cap.stream().on_resume(last - 1), ResumeOutcome::Continue);
    assert_eq!(cap.snapshot().durable_seq, last - 1);
    // The PS went backwards: everything is resynced.
    assert_eq!(cap.stream().on_resume(50), ResumeOutcome::Reset);
    assert_eq!(cap.mode(), Mode::Bitmap);
    let b = cap.resync().next_batch().unwrap();
    assert!(b.full);
    assert_eq!(b.reason, "stream-gap");
    assert_eq!(b.disks, vec![(0, vec![0, 1, 2, 3])]);
    let recs = drain(&cap);
    assert_eq!(recs[0].0, 51);
}
