//! The cache through its public API: deduplication and gaps, group commit
//! across rotations, trimming and the cap, skipping ahead to the master
//! target, recovery of torn and corrupt segments, and the reader.

use super::reader::read_all;
use super::*;
use crate::segment::{self, tests::frame_bytes};
use crate::tests::support::{info, wait_for};
use std::fs;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// A cache in a temporary directory, reopened as a restarted process
/// server would.
struct Lab {
    dir: tempfile::TempDir,
    cap: u64,
    seg_max: u64,
    cache: Arc<Cache>,
}

impl Lab {
    async fn new(cap: u64, seg_max: u64) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), cap, seg_max).await;
        Lab {
            dir,
            cap,
            seg_max,
            cache,
        }
    }

    async fn hello(&self, rid: &str, machine: &str) -> Result<Arc<Replication>, CacheError> {
        let c = self.cache.clone();
        let i = info(rid, machine);
        tokio::task::spawn_blocking(move || c.hello(&i).map(|(r, _)| r))
            .await
            .unwrap()
    }

    fn get(&self, rid: &str) -> Arc<Replication> {
        self.cache.get(rid).unwrap()
    }

    /// Stops every writer and opens the directory again.
    async fn restart(&mut self) {
        self.shutdown().await;
        self.cache = open(self.dir.path(), self.cap, self.seg_max).await;
    }

    async fn shutdown(&self) {
        let c = self.cache.clone();
        tokio::task::spawn_blocking(move || c.shutdown())
            .await
            .unwrap();
    }
}

async fn open(root: &std::path::Path, cap: u64, seg_max: u64) -> Arc<Cache> {
    let root = root.to_path_buf();
    let cache =
        tokio::task::spawn_blocking(move || Cache::open_with_segment_max(&root, cap, seg_max))
            .await
            .unwrap()
            .unwrap();
    Arc::new(cache)
}

/// The uncompressed length [`put`] claims for every frame.
const PLAIN_LEN: u64 = 1000;

async fn put(rep: &Replication, first: u64, last: u64) -> Result<u64, AppendError> {
    let bytes = frame_bytes(rep.id(), first, last);
    rep.append(bytes.into(), first, last, PLAIN_LEN, 0)
        .await?
        .await
        .expect("writer answers")
}

/// Segment bytes of one single-seq test frame.
fn entry_len() -> u64 {
    frame_bytes("r", 1, 1).len() as u64 + segment::ENTRY_HEADER as u64
}

fn stored_seqs(rep: &Replication) -> Vec<(u64, u64)> {
    read_all(rep)
        .unwrap()
        .iter()
        .map(|(m, _)| (m.first_seq, m.last_seq))
        .collect()
}

#[tokio::test]
async fn dedup_overlap_and_gap_rules() {
    let mut lab = Lab::new(1 << 30, 1 << 20).await;
    let rep = lab.hello("r1", "m1").await.unwrap();
    assert_eq!(rep.durable(), 0);
    assert_eq!(put(&rep, 1, 3).await.unwrap(), 3);
    assert_eq!(put(&rep, 4, 6).await.unwrap(), 6);
    // Already held: dropped, answered with the durable seq.
    assert_eq!(put(&rep, 2, 5).await.unwrap(), 6);
    assert_eq!(put(&rep, 1, 6).await.unwrap(), 6);
    // Overlapping: stored as it is.
    assert_eq!(put(&rep, 5, 8).await.unwrap(), 8);
    // Gap: refused, nothing stored.
    let e = put(&rep, 10, 12).await.unwrap_err();
    assert!(
        matches!(
            e,
            AppendError::Gap {
                first_seq: 10,
                held: 8,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        tonic::Status::from(e).code(),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(put(&rep, 9, 9).await.unwrap(), 9);
    assert_eq!(stored_seqs(&rep), vec![(1, 3), (4, 6), (5, 8), (9, 9)]);
    assert_eq!(rep.stats().frames_duplicate.load(Ordering::Relaxed), 2);
    // Only the frames stored count towards the compression ratio: not the
    // duplicates, not the refused gap.
    assert_eq!(
        rep.stats().bytes_uncompressed.load(Ordering::Relaxed),
        4 * PLAIN_LEN
    );

    // Another machine may not use this replication.
    let e = lab.hello("r1", "m2").await.unwrap_err();
    assert!(matches!(e, CacheError::WrongMachine { .. }), "{e}");
    assert!(lab.hello("../x", "m1").await.is_err());

    // Restart: the durable seq and the info come back.
    lab.restart().await;
    let rep = lab.get("r1");
    assert_eq!(rep.durable(), 9);
    assert_eq!(rep.info().unwrap().machine_id, "m1");
    assert_eq!(put(&rep, 10, 10).await.unwrap(), 10);
    lab.shutdown().await;
}

#[tokio::test]
async fn torn_tail_is_cut_on_restart_and_earlier_frames_survive() {
    for damage in ["truncate", "flip"] {
        let mut lab = Lab::new(1 << 30, 1 << 20).await;
        let rep = lab.hello("r", "m").await.unwrap();
        for s in 1..=5 {
            put(&rep, s, s).await.unwrap();
        }
        let seg = rep.segments_dir().join(segment::file_name(1));
        lab.shutdown().await;

        let full = fs::read(&seg).unwrap();
        let entry = full.len() / 5;
        match damage {
            "truncate" => fs::write(&seg, &full[..full.len() - entry / 2]).unwrap(),
            _ => {
                let mut b = full.clone();
                b[full.len() - 10] ^= 1;
                fs::write(&seg, &b).unwrap();
            }
        }
        lab.restart().await;
        let rep = lab.get("r");
        assert_eq!(rep.durable(), 4, "{damage}");
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            (entry * 4) as u64,
            "{damage}"
        );
        assert_eq!(read_all(&rep).unwrap().len(), 4);
        // The agent resends seq 5 and appending carries on from the cut.
        assert_eq!(put(&rep, 5, 6).await.unwrap(), 6);
        assert_eq!(read_all(&rep).unwrap().len(), 5);
        lab.shutdown().await;
    }
}

#[tokio::test]
async fn rotation_trim_and_cap_accounting() {
    let frame_len = entry_len();
    // Three entries per segment; the cap is reached after eight.
    let mut lab = Lab::new(frame_len * 8, frame_len * 3).await;
    let account = lab.cache.account().clone();
    let rep = lab.hello("r", "m").await.unwrap();
    for s in 1..=7 {
        put(&rep, s, s).await.unwrap();
    }
    assert_eq!(account.total(), frame_len * 7);
    assert!(!account.is_full());
    put(&rep, 8, 8).await.unwrap();
    assert!(account.is_full());
    assert_eq!(rep.cache_bytes(), frame_len * 8);
    let names: Vec<u64> = rep.segments().keys().copied().collect();
    assert_eq!(names, vec![1, 4, 7]);

    // Waiters are released once trimming brings the total under the cap.
    let waiter = {
        let a = account.clone();
        tokio::spawn(async move { a.wait_below_cap().await })
    };
    rep.set_applied(4);
    wait_for("trim of segment 1", || !rep.segments().contains_key(&1)).await;
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(account.total(), frame_len * 5);
    assert!(!rep.segments_dir().join(segment::file_name(1)).exists());
    // Segment 4 holds seqs up to 6, not all applied yet.
    assert!(rep.segments().contains_key(&4));

    // Everything applied: the newest segment is replaced by an empty one
    // that still records the durable seq.
    rep.set_applied(8);
    wait_for("trim of everything", || account.total() == 0).await;
    assert_eq!(rep.segments().keys().copied().collect::<Vec<_>>(), vec![9]);
    lab.restart().await;
    let rep = lab.get("r");
    assert_eq!((rep.durable(), rep.cache_bytes()), (8, 0));
    lab.shutdown().await;
}

#[tokio::test]
async fn frames_sent_back_to_back_are_durable_in_order_across_rotations() {
    // Frames queued faster than the writer syncs them go into group
    // commits: every answer must still come after its own frame is
    // synced, in order, also when a group crosses into a new segment.
    let frame_len = entry_len();
    let mut lab = Lab::new(1 << 30, frame_len * 5).await;
    let rep = lab.hello("r", "m").await.unwrap();
    let mut answers = Vec::new();
    for s in 1..=200u64 {
        let bytes = frame_bytes(rep.id(), s, s);
        answers.push((s, rep.append(bytes.into(), s, s, 0, 0).await.unwrap()));
    }
    let mut last = 0;
    for (s, rx) in answers {
        let durable = rx.await.expect("writer answers").unwrap();
        assert!(
            durable >= s,
            "frame {s} answered with durable seq {durable}"
        );
        assert!(
            durable >= last,
            "answers went back from {last} to {durable}"
        );
        last = durable;
    }
    assert_eq!(rep.durable(), 200);
    lab.restart().await;
    let rep = lab.get("r");
    assert_eq!(rep.durable(), 200);
    assert_eq!(rep.cache_bytes(), frame_len * 200);
    lab.shutdown().await;
}

#[tokio::test]
async fn cache_skips_ahead_to_the_mt() {
    let mut lab = Lab::new(1 << 30, 1 << 20).await;
    let rep = lab.hello("r", "m").await.unwrap();
    put(&rep, 1, 2).await.unwrap();
    let mut durable = rep.durable_watch();
    rep.set_applied(10);
    tokio::time::timeout(Duration::from_secs(5), durable.wait_for(|d| *d == 10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(put(&rep, 5, 10).await.unwrap(), 10);
    assert!(put(&rep, 12, 12).await.is_err());
    assert_eq!(put(&rep, 11, 11).await.unwrap(), 11);
    assert_eq!(stored_seqs(&rep), vec![(11, 11)]);
    lab.restart().await;
    assert_eq!(lab.get("r").durable(), 11);
    lab.shutdown().await;
}

#[tokio::test]
async fn corrupt_middle_segment_sets_later_ones_aside() {
    let mut lab = Lab::new(1 << 30, entry_len() * 2).await;
    let rep = lab.hello("r", "m").await.unwrap();
    for s in 1..=6 {
        put(&rep, s, s).await.unwrap();
    }
    let dir = rep.segments_dir();
    lab.shutdown().await;
    // Segments 1 (1-2), 3 (3-4), 5 (5-6). Damage the second entry of 3.
    let p = dir.join(segment::file_name(3));
    let mut b = fs::read(&p).unwrap();
    let n = b.len();
    b[n - 5] ^= 0xff;
    fs::write(&p, &b).unwrap();
    lab.restart().await;
    let rep = lab.get("r");
    assert_eq!(rep.durable(), 3);
    assert!(dir
        .join(format!("{}.corrupt", segment::file_name(5)))
        .exists());
    assert_eq!(put(&rep, 4, 4).await.unwrap(), 4);
    lab.shutdown().await;
}

#[tokio::test]
async fn cursor_follows_rotation_and_trim() {
    let lab = Lab::new(1 << 30, entry_len() * 2).await;
    let rep = lab.hello("r", "m").await.unwrap();
    for s in 1..=5 {
        put(&rep, s, s).await.unwrap();
    }
    // From the start, across segments 1, 3, 5.
    let mut cur = Cursor::new(rep.clone(), 1);
    assert_eq!(
        seqs(cur.read(1 << 30)),
        vec![(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]
    );
    assert!(seqs(cur.read(1 << 30)).is_empty());
    // Tailing: new frames, including an overlapping one.
    put(&rep, 5, 7).await.unwrap();
    assert_eq!(seqs(cur.read(1 << 30)), vec![(5, 7)]);
    // A resume in the middle of a segment and of a frame.
    let mut mid = Cursor::new(rep.clone(), 6);
    assert_eq!(seqs(mid.read(1 << 30)), vec![(5, 7)]);
    let mut mid = Cursor::new(rep.clone(), 4);
    assert_eq!(seqs(mid.read(1)), vec![(4, 4)]);
    // Trimmed below the reader: it finds its place again.
    rep.set_applied(4);
    wait_for("trim of segment 3", || !rep.segments().contains_key(&3)).await;
    assert_eq!(seqs(mid.read(1 << 30)), vec![(5, 5), (5, 7)]);
    // The MT needs a seq the cache no longer holds.
    let mut old = Cursor::new(rep.clone(), 2);
    assert!(matches!(
        old.read(1 << 30),
        Err(ReadError::Gap { need: 2, have: 5 })
    ));
    lab.shutdown().await;
}

fn seqs(items: Result<Vec<Item>, ReadError>) -> Vec<(u64, u64)> {
    items
        .unwrap()
        .iter()
        .map(|i| (i.first_seq, i.last_seq))
        .collect()
}

/// RemoveReplication leaves nothing of the replication on disk and in the
/// account; a frame on a stream still open and a later hello are refused,
/// naming the removal (not a shutdown); AddReplication takes it back.
#[tokio::test]
async fn remove_drops_the_cache_and_refuses_later_frames() {
    let mut lab = Lab::new(1 << 30, 1 << 20).await;
    let rep = lab.hello("r1", "m1").await.unwrap();
    assert_eq!(put(&rep, 1, 3).await.unwrap(), 3);
    let dir = rep.dir().to_path_buf();
    assert!(dir.join("segments").read_dir().unwrap().count() > 0);
    let c = lab.cache.clone();
    let existed = tokio::task::spawn_blocking(move || c.remove("r1"))
        .await
        .unwrap()
        .unwrap();
    assert!(existed);
    assert!(!dir.exists(), "the replication's directory is gone");
    let left: Vec<_> = fs::read_dir(lab.dir.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "nothing is left in the cache dir: {left:?}"
    );
    assert_eq!(lab.cache.account().total(), 0);
    assert!(lab.cache.get("r1").is_none());

    // A frame on the stream still open.
    let e = put(&rep, 4, 4).await.unwrap_err();
    assert!(matches!(e, AppendError::Removed { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("was removed from this process server"),
        "{e}"
    );
    assert_eq!(
        tonic::Status::from(e).code(),
        tonic::Code::FailedPrecondition
    );
    // A new stream's hello does not bring it back.
    let e = lab.hello("r1", "m1").await.unwrap_err();
    assert!(matches!(e, CacheError::Removed { .. }), "{e}");
    assert!(e.to_string().contains("rebound protect"), "{e}");
    assert!(!dir.exists());
    // Other replications are not affected.
    assert_eq!(
        put(&lab.hello("r2", "m2").await.unwrap(), 1, 1)
            .await
            .unwrap(),
        1
    );

    // The CS adds it again (a new protect): it starts empty.
    let c = lab.cache.clone();
    let rep = tokio::task::spawn_blocking(move || c.ensure("r1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rep.durable(), 0);
    assert!(lab.hello("r1", "m1").await.is_ok());
    lab.restart().await;
    assert_eq!(lab.get("r1").durable(), 0);
    lab.shutdown().await;
}

/// The PS keeps its renewed identity (`tls/`) and its revocation list in
/// the cache directory: neither is ever a replication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ps_own_files_are_not_replications() {
    let mut lab = Lab::new(1 << 30, 1 << 20).await;
    std::fs::create_dir_all(lab.dir.path().join("tls")).unwrap();
    std::fs::write(lab.dir.path().join("tls/renewed-identity.pem"), "x").unwrap();
    std::fs::write(lab.dir.path().join("revoked"), "").unwrap();
    lab.restart().await;
    assert!(lab.cache.replications().is_empty());
    for id in ["tls", "revoked"] {
        let e = lab.hello(id, "m1").await.unwrap_err();
        assert!(matches!(e, CacheError::BadReplicationId { .. }), "{e}");
        assert!(e.to_string().contains("own files"), "{e}");
    }
    lab.shutdown().await;
}
