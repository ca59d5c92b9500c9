//! Crate tests: apply frames built with `FrameBuilder`, then check every
//! recovery point, rollback and retention against an in-memory model of the
//! disks, by blake3 of their content.

use crate::config::RetentionConfig;
use crate::error::MtError;
use crate::replication::{Replication, Store};
use rebound_common::chunk::{chunk_hash, CHUNK_SIZE, SUB_CHUNK_SIZE};
use rebound_common::frame::{Frame, FrameBuilder, Record, Tag, TagKind};
use rebound_proto::{DiskInfo, ReplicationInfo};
use std::path::Path;
use std::sync::Arc;

pub(crate) const RID: &str = "m1-ab";
/// Disk 0 is not a multiple of 4 KiB (short last block); disk 1 is small.
pub(crate) const SIZES: [u64; 2] = [(1 << 20) + 1536, 256 << 10];

pub(crate) fn info() -> ReplicationInfo {
    ReplicationInfo {
        replication_id: RID.into(),
        machine_id: "m1".into(),
        disks: SIZES
            .iter()
            .enumerate()
            .map(|(i, &size)| DiskInfo {
                index: i as u32,
                name: format!("disk{i}"),
                size,
            })
            .collect(),
    }
}

/// Generates a change stream and keeps the model of the disks it produces.
pub(crate) struct Gen {
    rng: u64,
    pub records: Vec<Record>,
    pub disks: Vec<Vec<u8>>,
    /// (point id, disks at that point)
    pub snaps: Vec<(String, Vec<Vec<u8>>)>,
    pub time_ms: u64,
}

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen {
            rng: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            records: Vec::new(),
            disks: SIZES.iter().map(|&s| vec![0u8; s as usize]).collect(),
            snaps: Vec::new(),
            time_ms: 1_000_000,
        }
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Seq of the last record.
    pub fn seq(&self) -> u64 {
        self.records.len() as u64
    }

    pub fn write(&mut self, disk: u32, offset: u64, len: u64, zero_data: bool) {
        let mut data = vec![0u8; len as usize];
        if !zero_data {
            let base = self.next();
            for (i, b) in data.iter_mut().enumerate() {
                *b = (base.wrapping_add(i as u64 * 7919) >> 11) as u8;
            }
        }
        self.disks[disk as usize][offset as usize..(offset + len) as usize].copy_from_slice(&data);
        self.records.push(Record::Write {
            disk,
            offset,
            data: data.into(),
        });
    }

    pub fn zero(&mut self, disk: u32, offset: u64, len: u64) {
        self.disks[disk as usize][offset as usize..(offset + len) as usize].fill(0);
        self.records.push(Record::Zero { disk, offset, len });
    }

    pub fn tag(&mut self, id: &str) {
        self.tag_with(id, TagKind::Crash, "");
    }

    pub fn tag_with(&mut self, id: &str, kind: TagKind, group: &str) {
        self.time_ms += 1000;
        self.records.push(Record::Tag(Tag {
            id: id.into(),
            kind,
            time_ms: self.time_ms,
            group: group.into(),
        }));
        self.snaps.push((id.to_string(), self.disks.clone()));
    }

    /// `n` random writes and zeroes, 512-aligned, some at the odd disk end.
    pub fn random_ops(&mut self, n: usize) {
        for _ in 0..n {
            let disk = (self.next() % 2) as u32;
            let size = SIZES[disk as usize];
            let sectors = size / 512;
            let r = self.next() % 10;
            let len_sectors = 1 + self.next() % 40;
            let start = if r == 0 {
                sectors.saturating_sub(len_sectors) // at the end of the disk
            } else {
                self.next() % sectors
            };
            let len = (len_sectors * 512).min(size - start * 512);
            match r {
                1 => self.zero(disk, start * 512, len),
                2 => self.write(disk, start * 512, len, true),
                _ => self.write(disk, start * 512, len, false),
            }
        }
    }

    /// The frame holding records `first..=last` (seqs).
    pub fn frame(&self, first: u64, last: u64) -> Frame {
        let mut b = FrameBuilder::new(RID, first);
        for r in &self.records[(first - 1) as usize..last as usize] {
            b.push(r);
        }
        b.finish()
    }

    pub fn frame_bytes(&self, first: u64, last: u64) -> Vec<u8> {
        self.frame(first, last).to_bytes()
    }

    pub fn snap(&self, id: &str) -> &Vec<Vec<u8>> {
        &self
            .snaps
            .iter()
            .find(|(p, _)| p == id)
            .expect("snapshot")
            .1
    }
}

/// Applies records `from..=to` in frames of about `per` records.
pub(crate) fn apply_range(r: &Replication, g: &Gen, from: u64, to: u64, per: u64) {
    let mut s = from;
    while s <= to {
        let e = (s + per - 1).min(to);
        let applied = r.apply_frame(&g.frame_bytes(s, e)).expect("apply");
        // An old frame is acknowledged with the (higher) applied seq.
        assert!(applied >= e, "applied {applied} < {e}");
        s = e + 1;
    }
}

fn h(b: &[u8]) -> blake3::Hash {
    blake3::hash(b)
}

/// Every retained point and latest equal the model; plus unaligned reads.
pub(crate) fn check_all(r: &Replication, g: &Gen) {
    check_points(r, g);
    check_latest(r, &g.disks);
}

/// Every retained point equals the model; plus unaligned reads.
pub(crate) fn check_points(r: &Replication, g: &Gen) {
    let points = r.points();
    for p in &points {
        let snap = g.snap(&p.id);
        for (d, want) in snap.iter().enumerate() {
            let mut buf = vec![0u8; want.len()];
            r.read_at_point(d as u32, 0, &mut buf, Some(&p.id))
                .expect("read at point");
            assert_eq!(h(&buf), h(want), "disk {d} at point {}", p.id);
            for (off, len) in [
                (1, 5000),
                (4095, 2),
                (want.len() - 1000, 1000),
                (12345, 77777),
            ] {
                let mut part = vec![0u8; len];
                r.read_at_point(d as u32, off as u64, &mut part, Some(&p.id))
                    .expect("partial");
                assert_eq!(
                    part,
                    want[off..off + len],
                    "disk {d} at {} offset {off}",
                    p.id
                );
            }
        }
    }
}

pub(crate) fn check_latest(r: &Replication, disks: &[Vec<u8>]) {
    for (d, want) in disks.iter().enumerate() {
        let mut buf = vec![0u8; want.len()];
        r.read_at_point(d as u32, 0, &mut buf, None)
            .expect("read latest");
        assert_eq!(h(&buf), h(want), "disk {d} at latest");
    }
}

pub(crate) fn open_store(dir: &Path) -> (Arc<Store>, Arc<Replication>) {
    let store = Arc::new(Store::open(dir).expect("open store"));
    let r = store.get_or_create(&info()).expect("replication");
    (store, r)
}

/// Opens the store in `dir` again, as after a restart: every change of `g`
/// is applied and every point and latest equal the model.
pub(crate) fn check_after_restart(dir: &Path, g: &Gen) {
    let (_s, r) = open_store(dir);
    assert_eq!(r.applied_seq(), g.seq());
    check_all(&r, g);
}

/// A fresh directory holding replication [`RID`] with all of `g` applied,
/// in frames of `per` records.
pub(crate) fn applied(g: &Gen, per: u64) -> (tempfile::TempDir, Arc<Store>, Arc<Replication>) {
    let dir = tempfile::tempdir().unwrap();
    let (s, r) = open_store(dir.path());
    apply_range(&r, g, 1, g.seq(), per);
    (dir, s, r)
}

/// [`applied`] of the standard [`history`] of `seed`, with that history.
pub(crate) fn applied_history(
    seed: u64,
    per: u64,
) -> (Gen, tempfile::TempDir, Arc<Store>, Arc<Replication>) {
    let g = history(seed);
    let (dir, s, r) = applied(&g, per);
    (g, dir, s, r)
}

/// Like [`open_store`], with every durable write going through `storage`.
pub(crate) fn open_store_on(
    dir: &Path,
    storage: Arc<dyn crate::storage::Storage>,
) -> (Arc<Store>, Arc<Replication>) {
    let env = crate::replication::Env::new(storage);
    let store = Arc::new(Store::open_in(dir, env).expect("open store"));
    let r = store.get_or_create(&info()).expect("replication");
    (store, r)
}

/// A standard history: initial sync, then five points with writes between,
/// and writes after the last point.
pub(crate) fn history(seed: u64) -> Gen {
    let mut g = Gen::new(seed);
    g.write(0, 0, SIZES[0], false); // initial sync, whole disk 0
    g.random_ops(20);
    g.tag("p0");
    for i in 1..5 {
        g.random_ops(30);
        g.tag(&format!("p{i}"));
    }
    g.random_ops(25);
    g
}

#[test]
fn points_match_model_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let g = history(1);
    {
        let (_s, r) = open_store(dir.path());
        apply_range(&r, &g, 1, g.seq(), 7);
        assert_eq!(r.applied_seq(), g.seq());
        assert_eq!(
            r.points().iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["p0", "p1", "p2", "p3", "p4"]
        );
        check_all(&r, &g);
        // No journal for the interval before the first point.
        assert!(!r.root().join("retention/interval-0.undo").exists());
    }
    check_after_restart(dir.path(), &g);
}

#[test]
fn views_stay_exact_while_apply_goes_on() {
    let (mut g, _dir, _s, r) = applied_history(2, 9);
    let mid = g.seq();
    check_all(&r, &g); // caches point maps
    g.random_ops(40);
    g.tag("p5");
    g.random_ops(40);
    apply_range(&r, &g, mid + 1, g.seq(), 5);
    check_all(&r, &g); // the cached maps were kept current
}

#[test]
fn concurrent_view_reads_during_apply() {
    let (mut g, _dir, _s, r) = applied_history(12, 10);
    let mid = g.seq();
    for i in 5..12 {
        g.random_ops(30);
        g.tag(&format!("p{i}"));
    }
    let want = blake3::hash(&g.snap("p2")[0]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (r, stop) = (r.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads == 0 {
                let mut buf = vec![0u8; SIZES[0] as usize];
                r.read_at_point(0, 0, &mut buf, Some("p2")).unwrap();
                assert_eq!(blake3::hash(&buf), want);
                reads += 1;
            }
            reads
        })
    };
    apply_range(&r, &g, mid + 1, g.seq(), 3);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    check_all(&r, &g);
}

#[test]
fn reapplying_frames_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let g = history(3);
    let (_s, r) = open_store(dir.path());
    let n = g.seq();
    apply_range(&r, &g, 1, n / 2, 10);
    // The same frames again, and an overlapping frame reaching further.
    apply_range(&r, &g, 1, n / 2, 10);
    assert_eq!(
        r.apply_frame(&g.frame_bytes(n / 4, n / 2 + 10)).unwrap(),
        n / 2 + 10
    );
    apply_range(&r, &g, n / 2 + 11, n, 10);
    apply_range(&r, &g, 1, n, 33);
    assert_eq!(r.applied_seq(), n);
    assert_eq!(r.points().len(), 5);
    check_all(&r, &g);
}

#[test]
fn bad_frames_are_refused_and_nothing_is_applied() {
    let (mut g, _dir, _s, r) = applied_history(5, 10);
    let n = g.seq();
    let before = g.disks.clone();
    g.random_ops(10);
    g.tag("p9");
    // Corrupt body: refused with DATA_LOSS naming replication and seqs.
    let mut bytes = g.frame_bytes(n + 1, g.seq());
    let len = bytes.len();
    bytes[len - 30] ^= 0x55;
    let e = r.apply_frame(&bytes).unwrap_err();
    assert!(matches!(e, MtError::DataLoss(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(RID) && msg.contains(&format!("{}..={}", n + 1, g.seq())),
        "{msg}"
    );
    // A gap.
    let e = r.apply_frame(&g.frame_bytes(n + 2, g.seq())).unwrap_err();
    assert!(matches!(e, MtError::FailedPrecondition(_)), "{e}");
    // A write past the end of a disk after good records.
    let mut b = FrameBuilder::new(RID, n + 1);
    b.push_write(0, 0, &[1u8; 4096]);
    b.push_write(1, SIZES[1] - 512, &[1u8; 1024]);
    let e = r.apply_frame(&b.finish().to_bytes()).unwrap_err();
    assert!(matches!(e, MtError::InvalidArgument(_)), "{e}");
    // Another replication's frame.
    let mut b = FrameBuilder::new("other", n + 1);
    b.push_write(0, 0, &[1u8; 4096]);
    assert!(r.apply_frame(&b.finish().to_bytes()).is_err());
    assert!(r.apply_frame(b"garbage").is_err());
    assert_eq!(r.applied_seq(), n);
    assert_eq!(r.points().len(), 5);
    check_latest(&r, &before);
    // The good frame still applies.
    apply_range(&r, &g, n + 1, g.seq(), 100);
    check_all(&r, &g);
}

#[test]
fn rollback_and_restore() {
    let (mut g, dir, _s, r) = applied_history(6, 11);
    let rep = r.rollback("p1").unwrap();
    assert_eq!(rep.point.id, "p1");
    assert!(rep.blocks_restored > 0);
    check_latest(&r, g.snap("p1"));
    // Every point stays exact while rolled back (later ones via pre-images).
    let latest = g.disks.clone();
    g.disks = g.snap("p1").clone();
    check_all(&r, &g);
    g.disks = latest;
    assert_eq!(r.status().rolled_back_to.as_deref(), Some("p1"));
    // Again: idempotent. Another point: refused until restore.
    assert_eq!(r.rollback("p1").unwrap().blocks_restored, 0);
    assert!(matches!(
        r.rollback("p3"),
        Err(MtError::FailedPrecondition(_))
    ));
    // Apply refuses frames.
    let n = g.seq();
    g.random_ops(5);
    let e = r.apply_frame(&g.frame_bytes(n + 1, g.seq())).unwrap_err();
    assert!(matches!(e, MtError::FailedPrecondition(_)));
    assert_eq!(
        e.to_string(),
        "replica of m1 is rolled back to p1; restore pre-images first"
    );
    // Survives a restart.
    drop(r);
    drop(_s);
    let (_s, r) = open_store(dir.path());
    check_latest(&r, g.snap("p1"));
    // Restore: back at latest; then another point; then apply resumes.
    assert_eq!(r.restore_pre_images().unwrap(), rep.blocks_restored);
    assert!(!r.root().join("rollback/preimages").exists());
    check_latest(&r, &g.clone_disks_at(n));
    r.rollback("p3").unwrap();
    check_latest(&r, g.snap("p3"));
    r.restore_pre_images().unwrap();
    assert_eq!(r.restore_pre_images().unwrap(), 0);
    apply_range(&r, &g, n + 1, g.seq(), 100);
    check_all(&r, &g);
    // The newest point, with writes after it.
    r.rollback("p4").unwrap();
    check_latest(&r, g.snap("p4"));
}

impl Gen {
    /// The model replayed up to seq `n` (for tests that ran ahead).
    pub(crate) fn clone_disks_at(&self, n: u64) -> Vec<Vec<u8>> {
        let mut disks: Vec<Vec<u8>> = SIZES.iter().map(|&s| vec![0u8; s as usize]).collect();
        for r in &self.records[..n as usize] {
            match r {
                Record::Write { disk, offset, data } => disks[*disk as usize]
                    [*offset as usize..*offset as usize + data.len()]
                    .copy_from_slice(data),
                Record::Zero { disk, offset, len } => {
                    disks[*disk as usize][*offset as usize..(*offset + *len) as usize].fill(0)
                }
                _ => {}
            }
        }
        disks
    }
}

#[test]
fn retention_by_window() {
    let (g, dir, _s, r) = applied_history(8, 10);
    // The MT cut each point at the agent's time (the clocks agree).
    let (_s, r) = retention_policy::restamp(dir.path(), (_s, r), |p| Some(p.time_ms));
    let journals = |r: &Replication| {
        std::fs::read_dir(r.root().join("retention"))
            .unwrap()
            .count()
    };
    let before = journals(&r);
    let times: Vec<u64> = r.points().iter().map(|p| p.time_ms).collect();
    // Window 1.5 s at the time of p4 + 0.5 s: p0..p2 are older.
    let cfg = RetentionConfig {
        window_secs: 1,
        max_bytes: 0,
        check_secs: 1,
    };
    let out = r.enforce_retention(&cfg, times[3] + 500).unwrap();
    assert_eq!(out.dropped, 3);
    assert!(!out.size_capped);
    assert_eq!(out.oldest.as_deref(), Some("p3"));
    assert_eq!(r.points().len(), 2);
    assert_eq!(journals(&r), before - 3);
    check_all(&r, &g);
    // Far in the future: the newest point stays.
    r.enforce_retention(&cfg, times[4] + 10_000_000).unwrap();
    assert_eq!(r.points().len(), 1);
    check_all(&r, &g);
    drop(r);
    drop(_s);
    let (_s, r) = open_store(dir.path());
    assert_eq!(r.points().len(), 1);
    check_all(&r, &g);
}

#[test]
fn retention_by_size_cap() {
    let (g, _dir, _s, r) = applied_history(9, 10);
    let total = r.status().journal_bytes;
    let cfg = RetentionConfig {
        window_secs: 365 * 86400,
        max_bytes: total * 6 / 10,
        check_secs: 1,
    };
    let out = r.enforce_retention(&cfg, g.time_ms).unwrap();
    assert!(out.size_capped && out.dropped > 0, "{out:?}");
    assert!(out.journal_bytes <= cfg.max_bytes, "{out:?}");
    assert_eq!(r.points().len(), 5 - out.dropped);
    check_all(&r, &g);
    // Nothing more to do.
    assert_eq!(r.enforce_retention(&cfg, g.time_ms).unwrap().dropped, 0);
}

#[test]
fn chunk_hashes_and_wait() {
    let (g, _dir, _s, r) = applied_history(10, 50);
    let hs = r.chunk_hashes(0, 0, 64 << 10, 17).unwrap();
    assert_eq!(hs.len(), 17 * 32);
    let d = &g.disks[0];
    assert_eq!(&hs[..32], blake3::hash(&d[..64 << 10]).as_bytes());
    assert_eq!(&hs[16 * 32..], blake3::hash(&d[16 << 16..]).as_bytes());
    assert!(r.chunk_hashes(5, 0, 4096, 1).is_err());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let n = g.seq();
    assert_eq!(
        rt.block_on(r.wait_applied(n, std::time::Duration::from_secs(1)))
            .unwrap(),
        n
    );
    let e = rt
        .block_on(r.wait_applied(n + 1, std::time::Duration::from_millis(50)))
        .unwrap_err();
    assert!(matches!(e, MtError::Unavailable(_)));
}

/// The first-level chunk hashes of the model's disks.
fn model_chunk_hashes(disk: &[u8]) -> Vec<u8> {
    disk.chunks(CHUNK_SIZE as usize)
        .flat_map(chunk_hash)
        .collect()
}

/// Every first-level ChunkHashes answer equals the hashes of what the
/// replica holds.
fn check_chunk_hashes(r: &Replication, disks: &[Vec<u8>]) {
    for (d, want) in disks.iter().enumerate() {
        let n = want.len().div_ceil(CHUNK_SIZE as usize) as u32;
        let got = r.chunk_hashes(d as u32, 0, CHUNK_SIZE as u32, n).unwrap();
        assert_eq!(got, model_chunk_hashes(want), "disk {d}");
        // From the second chunk, and past the end of the disk.
        if want.len() as u64 > CHUNK_SIZE {
            let tail = r
                .chunk_hashes(d as u32, CHUNK_SIZE, CHUNK_SIZE as u32, 3)
                .unwrap();
            let mut expect = model_chunk_hashes(&want[CHUNK_SIZE as usize..]);
            while expect.len() < 3 * 32 {
                expect.extend_from_slice(blake3::hash(&[]).as_bytes());
            }
            assert_eq!(tail, expect, "disk {d} from chunk 1");
        }
    }
}

#[test]
fn cached_chunk_hashes_follow_every_change_to_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Gen::new(21);
    let (_s, r) = open_store(dir.path());
    // An initial sync writes whole chunks: apply learns their hashes.
    g.write(0, 0, SIZES[0], false);
    g.write(1, 0, SIZES[1], false);
    g.tag("p0");
    apply_range(&r, &g, 1, g.seq(), 10);
    assert_eq!(r.cached_chunk_hashes(), 3);
    check_chunk_hashes(&r, &g.disks);
    for round in 0..6 {
        let from = g.seq() + 1;
        g.random_ops(15);
        match round % 3 {
            0 => g.write(0, CHUNK_SIZE, SIZES[0] - CHUNK_SIZE, false),
            1 => g.zero(0, 0, CHUNK_SIZE),
            _ => g.write(1, 0, SIZES[1], true),
        }
        g.random_ops(3);
        g.tag(&format!("p{}", round + 1));
        apply_range(&r, &g, from, g.seq(), 7);
        // Partly written chunks were forgotten and are hashed from the
        // replica again (and kept): every answer equals the content.
        check_chunk_hashes(&r, &g.disks);
        assert_eq!(r.cached_chunk_hashes(), 3);
    }
    // A rollback changes the replica other than by apply: all forgotten.
    let latest = g.disks.clone();
    r.rollback("p2").unwrap();
    assert_eq!(r.cached_chunk_hashes(), 0);
    check_chunk_hashes(&r, g.snap("p2"));
    r.restore_pre_images().unwrap();
    assert_eq!(r.cached_chunk_hashes(), 0);
    check_chunk_hashes(&r, &latest);
    // Sub-chunk requests are answered from the replica, as before.
    let subs = r.chunk_hashes(0, 0, SUB_CHUNK_SIZE as u32, 3).unwrap();
    let want: Vec<u8> = latest[0]
        .chunks(SUB_CHUNK_SIZE as usize)
        .take(3)
        .flat_map(chunk_hash)
        .collect();
    assert_eq!(subs, want);
}

#[test]
fn nbd_views_resolve_and_read() {
    use rebound_common::nbd::ExportRegistry;
    let (g, _dir, s, r) = applied_history(11, 10);
    let views = crate::view::Views::new(s.clone());
    let names = views.list();
    assert_eq!(names[0], "m1/disk0@latest");
    assert!(names.contains(&"m1/disk1@p2".to_string()));
    assert_eq!(names.len(), 2 * 6);
    for (name, want) in [
        ("m1/disk0@p2", &g.snap("p2")[0]),
        ("m1/disk1@p0", &g.snap("p0")[1]),
        ("m1/disk0@latest", &g.disks[0]),
        ("m1-ab/disk1@latest", &g.disks[1]),
    ] {
        let dev = views.open(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(dev.read_only());
        assert_eq!(dev.size(), want.len() as u64);
        let mut buf = vec![0u8; want.len()];
        dev.read(0, &mut buf).unwrap();
        assert!(buf == *want, "{name}");
        assert!(dev.write(0, &[0u8; 512], false).is_err());
    }
    for bad in [
        "m1/disk0",
        "m2/disk0@latest",
        "m1/disk9@latest",
        "m1/disk0@nope",
    ] {
        assert!(views.open(bad).is_err(), "{bad}");
    }
    // A view whose point expires reports EIO on reads.
    let dev = views.open("m1/disk0@p0").unwrap();
    let cfg = RetentionConfig {
        window_secs: 0,
        max_bytes: 0,
        check_secs: 1,
    };
    r.enforce_retention(&cfg, u64::MAX / 2).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(dev.read(0, &mut buf).is_err());
}

#[test]
fn hello_must_match() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _r) = open_store(dir.path());
    let mut other = info();
    other.disks[1].size += 4096;
    assert!(matches!(
        s.get_or_create(&other),
        Err(MtError::FailedPrecondition(_))
    ));
    let mut other = info();
    other.machine_id = "m2".into();
    assert!(s.get_or_create(&other).is_err());
    let mut bad = info();
    bad.replication_id = "../x".into();
    assert!(matches!(
        s.get_or_create(&bad),
        Err(MtError::InvalidArgument(_))
    ));
    // Hello without disks is accepted for an existing replication.
    let mut bare = info();
    bare.disks.clear();
    assert!(s.get_or_create(&bare).is_ok());
}

#[test]
fn index_memory_is_compact() {
    // A closed interval holds (key, offset) pairs: 16 bytes per block.
    let mut idx = crate::interval::IntervalIndex::new_open();
    for i in 0..1000 {
        idx.insert(i, i * 4128);
    }
    idx.close();
    assert_eq!(idx.count(), 1000);
    assert_eq!(std::mem::size_of::<(u64, u64)>(), 16);
}

mod authz;
mod batch;
mod faults;
mod grpc;
mod journal_damage;
mod lifecycle;
mod metrics;
mod retention_policy;
