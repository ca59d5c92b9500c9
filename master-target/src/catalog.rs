//! The recovery-point catalog `points.log` (DESIGN.md §7 "Recovery points").
//!
//! One line per point, appended and fsynced when a tag closes an interval:
//! `<16 hex digits of blake3(json)> <json>\n`. The checksum makes a torn last
//! line (a crash mid-append) recognisable; it is cut off on open. Retention
//! rewrites the whole file atomically when it drops the oldest points.
//!
//! Beside the agent's tag, each line carries `cut_ms`: the MT's own clock
//! when it cut the point. Retention measures a point's age by it, so an
//! agent whose clock is a day behind or ahead changes nothing about which
//! points are kept; the agent's `time_ms` stays what operators see and
//! choose points by. Lines written before `cut_ms` existed lack it; for
//! those, retention falls back to the agent's time.

use crate::error::{io_err, MtError, Result};
use crate::storage::{sync_data, Storage, Target};
use rebound_common::durable::{fsync_dir, write_atomic};
use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::path::Path;
use tracing::{error, warn};

/// A recovery point as the MT keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointEntry {
    pub id: String,
    /// "crash", "app" or "shutdown".
    pub kind: String,
    /// Milliseconds since the Unix epoch, from the agent's clock (for
    /// display and point choice; retention goes by [`Cataloged::cut_ms`]).
    pub time_ms: u64,
    /// Seq of the tag record.
    pub seq: u64,
    /// Consistency-group tag id, empty when not a group point.
    pub group: String,
    /// Number of the interval this point closes. The content at this point
    /// is reconstructed from the journals of the intervals after it.
    pub interval: u64,
}

impl PointEntry {
    pub fn to_proto(&self) -> rebound_proto::RecoveryPoint {
        rebound_proto::RecoveryPoint {
            id: self.id.clone(),
            kind: self.kind.clone(),
            time_ms: self.time_ms,
            seq: self.seq,
            group: self.group.clone(),
            damaged: String::new(),
        }
    }
}

/// One catalog line: the point as the tag made it, and when the MT cut it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cataloged {
    #[serde(flatten)]
    pub point: PointEntry,
    /// The MT's clock (ms since the Unix epoch) when it cut the point;
    /// `None` in lines written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_ms: Option<u64>,
}

impl Cataloged {
    /// The time retention measures the point's age from: the MT's clock at
    /// the cut, or the agent's time for a line that predates it.
    pub fn retention_ms(&self) -> u64 {
        self.cut_ms.unwrap_or(self.point.time_ms)
    }
}

fn line_sum(json: &str) -> String {
    blake3::hash(json.as_bytes()).to_hex()[..16].to_string()
}

pub fn encode_line(c: &Cataloged) -> String {
    let json = serde_json::to_string(c).expect("point serializes");
    format!("{} {}\n", line_sum(&json), json)
}

fn decode_line(line: &str) -> Option<Cataloged> {
    let (sum, json) = line.split_once(' ')?;
    if sum != line_sum(json) {
        return None;
    }
    serde_json::from_str(json).ok()
}

/// Loads the points of the catalog (see [`load_lines`]).
pub fn load(path: &Path, repair: bool) -> Result<Vec<PointEntry>> {
    Ok(load_lines(path, repair)?
        .into_iter()
        .map(|c| c.point)
        .collect())
}

/// Loads the catalog. With `repair`, a torn or corrupt tail is truncated
/// away (and fsynced); without it (offline listing) the file is untouched.
/// A corrupt line in the middle is skipped with an error log: the points
/// around it stay restorable.
pub fn load_lines(path: &Path, repair: bool) -> Result<Vec<Cataloged>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(MtError::io(
                format!("cannot read recovery-point catalog {}", path.display()),
                e,
            ))
        }
    };
    let mut points = Vec::new();
    let mut pos = 0usize;
    let mut good_end = 0usize;
    let mut bad_tail: Option<usize> = None;
    let mut lineno = 0;
    while pos < bytes.len() {
        lineno += 1;
        let Some(nl) = bytes[pos..].iter().position(|&b| b == b'\n') else {
            bad_tail.get_or_insert(pos);
            break;
        };
        let line = &bytes[pos..pos + nl];
        match std::str::from_utf8(line).ok().and_then(decode_line) {
            Some(p) => {
                if bad_tail.take().is_some() {
                    error!(
                        catalog = %path.display(),
                        line = lineno - 1,
                        "recovery-point catalog has a corrupt line in the middle; that point is lost, the others stay restorable"
                    );
                }
                points.push(p);
                good_end = pos + nl + 1;
            }
            None => {
                if bad_tail.is_some() {
                    error!(catalog = %path.display(), line = lineno, "corrupt line in recovery-point catalog");
                }
                bad_tail.get_or_insert(pos);
            }
        }
        pos += nl + 1;
    }
    if bad_tail.is_some() && repair {
        warn!(
            catalog = %path.display(),
            cut_at = good_end,
            len = bytes.len(),
            "recovery-point catalog has a torn tail (crash while cutting a point); cutting it off"
        );
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err(|| format!("cannot open {}", path.display())))?;
        f.set_len(good_end as u64)
            .and_then(|_| f.sync_all())
            .map_err(io_err(|| format!("cannot truncate {}", path.display())))?;
    }
    // Points are appended in seq order; keep it so even after a repair.
    points.sort_by_key(|c: &Cataloged| c.point.seq);
    Ok(points)
}

/// Appends one point and fdatasyncs it, both through `storage`: a failed
/// fdatasync is [`MtError::Sync`], which poisons the replication.
pub(crate) fn append(storage: &dyn Storage, path: &Path, c: &Cataloged) -> Result<()> {
    let p = &c.point;
    let existed = path.exists();
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .map_err(io_err(|| {
            format!("cannot open recovery-point catalog {}", path.display())
        }))?;
    let end = f
        .metadata()
        .map_err(io_err(|| format!("cannot stat {}", path.display())))?
        .len();
    storage
        .write_all_at(Target::Catalog, &f, encode_line(c).as_bytes(), end)
        .map_err(io_err(|| {
            format!("cannot append point {} to catalog {}", p.id, path.display())
        }))?;
    sync_data(storage, Target::Catalog, &f, path)?;
    if !existed {
        if let Some(dir) = path.parent() {
            fsync_dir(dir).map_err(io_err(|| format!("cannot fsync {}", dir.display())))?;
        }
    }
    Ok(())
}

/// Replaces the catalog with `points`, atomically.
pub fn rewrite(path: &Path, points: &[Cataloged]) -> Result<()> {
    let text: String = points.iter().map(encode_line).collect();
    write_atomic(path, text.as_bytes()).map_err(io_err(|| {
        format!("cannot rewrite recovery-point catalog {}", path.display())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Disk;
    use std::io::Write;

    fn p(i: u64) -> PointEntry {
        PointEntry {
            id: format!("p{i}"),
            kind: "crash".into(),
            time_ms: 1000 * i,
            seq: 10 * i,
            group: String::new(),
            interval: i,
        }
    }

    fn c(i: u64) -> Cataloged {
        Cataloged {
            point: p(i),
            cut_ms: Some(7_000 + i),
        }
    }

    #[test]
    fn append_load_and_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("points.log");
        assert!(load(&path, true).unwrap().is_empty());
        for i in 0..3 {
            append(&Disk, &path, &c(i)).unwrap();
        }
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        let line = encode_line(&c(3));
        f.write_all(&line.as_bytes()[..line.len() - 5]).unwrap();
        drop(f);
        assert_eq!(load(&path, false).unwrap().len(), 3);
        let before = std::fs::metadata(&path).unwrap().len();
        assert_eq!(load(&path, true).unwrap(), vec![p(0), p(1), p(2)]);
        assert!(std::fs::metadata(&path).unwrap().len() < before);
        append(&Disk, &path, &c(3)).unwrap();
        assert_eq!(load(&path, true).unwrap().len(), 4);
        rewrite(&path, &[c(2), c(3)]).unwrap();
        assert_eq!(load(&path, true).unwrap(), vec![p(2), p(3)]);
        assert_eq!(load_lines(&path, true).unwrap(), vec![c(2), c(3)]);
    }

    #[test]
    fn corrupt_middle_line_is_skipped() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("points.log");
        let mut text = String::new();
        for i in 0..3 {
            text.push_str(&encode_line(&c(i)));
        }
        let bad = text.replacen("\"p1\"", "\"pX\"", 1);
        std::fs::write(&path, bad).unwrap();
        assert_eq!(load(&path, true).unwrap(), vec![p(0), p(2)]);
    }

    #[test]
    fn a_line_without_the_cut_time_falls_back_to_the_agents_time() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("points.log");
        // A line as catalogs before `cut_ms` wrote it: the bare point.
        let json = serde_json::to_string(&p(4)).unwrap();
        std::fs::write(&path, format!("{} {json}\n", line_sum(&json))).unwrap();
        let lines = load_lines(&path, true).unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].cut_ms, None);
        assert_eq!(lines[0].retention_ms(), p(4).time_ms);
        assert_eq!(c(4).retention_ms(), 7_004);
        assert!(!encode_line(&Cataloged {
            cut_ms: None,
            ..c(1)
        })
        .contains("cut_ms"));
    }
}
