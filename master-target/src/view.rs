//! Reading a disk as it was at a recovery point, and serving that as
//! read-only NBD exports (DESIGN.md §7 "Recovery points", "Views"); the
//! writable test copy of a test failover is served here too (`test_copy`).
//!
//! The content of a block at a point is the retention journal's to say
//! (`retention_journal`); where it says "unchanged since", it is the
//! replica's current content. While the replica is rolled back to a point
//! Q, the latest content of the blocks the rollback changed lives in the
//! pre-image file, so for points after Q "the replica" is replaced by the
//! pre-image where there is one. Every read holds the replication's read
//! lock, so a view always sees a frame boundary while apply goes on.
//!
//! Views are served over TLS only, and each client sees by its certificate:
//! an admin every machine's views, an agent only its own machine's, any
//! other role none (a PS or MT has no business reading disks).

use crate::error::{MtError, Result};
use crate::journal::{self, BLOCK};
use crate::replication::{Disk, Inner, Replication, Store};
use crate::retention_journal::Undo;
use crate::test_copy::TEST_POINT;
use rebound_common::chunk::read_full_at;
use rebound_common::nbd::{BlockDevice, ExportRegistry, NbdError};
use rebound_common::pki::{PeerIdentity, Role};
use std::cmp::Reverse;
use std::sync::Arc;
use thiserror::Error;

const BS: u64 = BLOCK as u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Replica,
    Journal(Undo),
    Pre(u64),
}

impl Replication {
    /// Reads `buf.len()` bytes of disk `disk` at `offset` as they were at
    /// recovery point `point` (`None`: the replica as it is now).
    pub fn read_at_point(
        &self,
        disk: u32,
        offset: u64,
        buf: &mut [u8],
        point: Option<&str>,
    ) -> Result<()> {
        self.read_resolved(disk, offset, buf, |inner| match point {
            None => Ok(None),
            Some(id) => match inner.points().by_id(id) {
                Some(p) => Ok(Some((p.interval, p.id.clone()))),
                None => Err(self.no_point(id)),
            },
        })
    }

    /// Like `read_at_point`, for a view that holds the point it was opened
    /// at (id and interval), so a point cut later under the same id does not
    /// change what an open view shows.
    pub(crate) fn read_view(
        &self,
        disk: u32,
        offset: u64,
        buf: &mut [u8],
        point: Option<&(String, u64)>,
    ) -> Result<()> {
        self.read_resolved(disk, offset, buf, |inner| match point {
            None => Ok(None),
            Some((id, k)) => match inner.points().by_interval(*k) {
                Some(p) if &p.id == id => Ok(Some((*k, id.clone()))),
                _ => Err(MtError::NotFound(format!(
                    "recovery point {id} of machine {} (replication {}) has expired from retention; reconnect to a newer point",
                    self.machine_id(), self.id()
                ))),
            },
        })
    }

    /// Reads under the read lock at the point `point` resolves to (its
    /// interval and id; `None`: the replica as it is now).
    fn read_resolved(
        &self,
        disk: u32,
        offset: u64,
        buf: &mut [u8],
        point: impl FnOnce(&Inner) -> Result<Option<(u64, String)>>,
    ) -> Result<()> {
        let inner = self.read_inner()?;
        self.check_no_machine_writes(&inner)?;
        let d = self.disk(disk)?;
        self.check_range(d, offset, buf.len())?;
        match point(&inner)? {
            None => self.read_replica(d, offset, buf),
            Some((k, id)) => self.read_at_interval(&inner, d, offset, buf, k, &id),
        }
    }

    fn no_point(&self, id: &str) -> MtError {
        MtError::NotFound(format!(
            "replication {} (machine {}) has no recovery point {id:?}; it may have expired from retention: list the points with ListPoints",
            self.id(), self.machine_id()
        ))
    }

    fn check_range(&self, d: &Disk, offset: u64, len: usize) -> Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= d.size() => Ok(()),
            _ => Err(MtError::InvalidArgument(format!(
                "read of {len} bytes at offset {offset} is outside disk {} ({}) of replication {}, which has {} bytes",
                d.index(), d.name(), self.id(), d.size()
            ))),
        }
    }

    fn read_replica(&self, d: &Disk, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_full_at(d.file(), buf, offset).map_err(|e| {
            MtError::io(
                format!(
                    "cannot read replica {} of replication {} at offset {offset}",
                    d.path().display(),
                    self.id()
                ),
                e,
            )
        })
    }

    /// Reads at the point closing interval `k`; `buf` is inside the disk.
    pub(crate) fn read_at_interval(
        &self,
        inner: &Inner,
        d: &Disk,
        offset: u64,
        buf: &mut [u8],
        k: u64,
        point_id: &str,
    ) -> Result<()> {
        self.check_no_machine_writes(inner)?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let first = offset / BS;
        let last = (end - 1) / BS;
        // After a rollback to Q, points after Q need the pre-images.
        let pre_point = inner.state().rolled_back_to.as_ref().or(inner
            .state()
            .rollback
            .as_ref()
            .filter(|r| r.preimages_complete)
            .map(|r| &r.point));
        let pre = match pre_point {
            Some(q) if k > q.interval => Some(inner.pre().ok_or_else(|| {
                MtError::DataLoss(format!(
                    "the replica of machine {} is rolled back to {} and its pre-images cannot be read, so point {point_id} (after it) cannot be shown",
                    self.machine_id(), q.id
                ))
            })?),
            _ => None,
        };
        let undo = inner
            .journal()
            .locate(k, (first..=last).map(|b| journal::key(d.index(), b)))?;
        let srcs: Vec<Src> = (first..=last)
            .zip(undo)
            .map(|(b, undo)| {
                let key = journal::key(d.index(), b);
                match (undo, pre.and_then(|p| p.offset_of(key))) {
                    (Some(u), _) => Src::Journal(u),
                    (None, Some(off)) => Src::Pre(off),
                    (None, None) => Src::Replica,
                }
            })
            .collect();
        let mut tmp = vec![0u8; BLOCK];
        let mut i = 0usize;
        while i < srcs.len() {
            let b = first + i as u64;
            let bstart = (b * BS).max(offset);
            match srcs[i] {
                Src::Replica => {
                    let mut j = i;
                    while j + 1 < srcs.len() && srcs[j + 1] == Src::Replica {
                        j += 1;
                    }
                    let rend = ((first + j as u64 + 1) * BS).min(end);
                    let s = (bstart - offset) as usize;
                    let e = (rend - offset) as usize;
                    self.read_replica(d, bstart, &mut buf[s..e])?;
                    i = j + 1;
                    continue;
                }
                Src::Journal(u) => {
                    inner
                        .journal()
                        .read_undo(journal::key(d.index(), b), u, &mut tmp)
                        .map_err(|e| {
                            MtError::DataLoss(format!(
                                "replication {} disk {} block {b} at point {point_id}: {e}",
                                self.id(),
                                d.name()
                            ))
                        })?;
                }
                Src::Pre(off) => {
                    let p = pre.expect("pre-images present");
                    journal::read_block(p.file(), off, journal::key(d.index(), b), &mut tmp).map_err(|e| {
                        MtError::DataLoss(format!(
                            "replication {} disk {} block {b} at point {point_id}: pre-image file {}: {e}",
                            self.id(),
                            d.name(),
                            self.layout().preimages().display()
                        ))
                    })?;
                }
            }
            let bend = ((b + 1) * BS).min(end);
            let from = (bstart - b * BS) as usize;
            let to = (bend - b * BS) as usize;
            buf[(bstart - offset) as usize..(bend - offset) as usize]
                .copy_from_slice(&tmp[from..to]);
            i += 1;
        }
        Ok(())
    }
}

/// Why an export name names no view.
#[derive(Debug, Error)]
enum NoExport {
    #[error("no export {0:?}: export names look like <machine>/<disk name>@<point id> or <machine>/<disk name>@latest")]
    Malformed(String),
    #[error("no export {name:?}: this MT has no replication of machine {machine:?}")]
    Machine { name: String, machine: String },
    #[error("no export {name:?}: machine {machine:?} has no disk {disk:?} with a recovery point {point:?} (it may have expired from retention)")]
    DiskOrPoint {
        name: String,
        machine: String,
        disk: String,
        point: String,
    },
    #[error("export {name:?} refused: {source}")]
    Damaged {
        name: String,
        source: crate::retention_journal::JournalError,
    },
    #[error("export {name:?} not available now: {source}")]
    Unavailable { name: String, source: MtError },
    #[error("{source}")]
    TestCopy { source: MtError },
}

/// The NBD export registry of recovery-point views:
/// `<machine>/<disk name>@<point id>` and `<machine>/<disk name>@latest`,
/// and while a test failover runs the writable test copy
/// `<machine>/<disk name>@test` (see `test_copy`).
pub struct Views {
    store: Arc<Store>,
}

impl Views {
    pub fn new(store: Arc<Store>) -> Views {
        Views { store }
    }

    /// Resolves an export name to a replication, disk and point. The
    /// machine part may also be a replication id. When several replications
    /// of a machine are here (after a failback), the newest one that has the
    /// point wins.
    fn resolve(&self, name: &str) -> Result<(Arc<Replication>, Arc<dyn BlockDevice>), NoExport> {
        let malformed = || NoExport::Malformed(name.to_string());
        let (path, point) = name.split_once('@').ok_or_else(malformed)?;
        let (machine, disk) = path.split_once('/').ok_or_else(malformed)?;
        let mut cands: Vec<_> = self
            .store
            .list()
            .into_iter()
            .filter(|r| r.machine_id() == machine || r.id() == machine)
            .collect();
        if cands.is_empty() {
            return Err(NoExport::Machine {
                name: name.to_string(),
                machine: machine.to_string(),
            });
        }
        cands.sort_by_key(|r| Reverse(r.created_ms()));
        if point == TEST_POINT {
            // The replication of the machine whose test failover runs.
            let r = cands
                .iter()
                .find(|r| r.test_failover().is_some())
                .unwrap_or(&cands[0]);
            let dev = r
                .open_test_copy(disk, name)
                .map_err(|source| NoExport::TestCopy { source })?;
            return Ok((r.clone(), Arc::new(dev)));
        }
        for r in cands {
            let Some(d) = r.disk_by_name(disk) else {
                continue;
            };
            let (index, size) = (d.index(), d.size());
            let point = if point == "latest" {
                None
            } else {
                let inner = r.read_inner().map_err(|source| NoExport::Unavailable {
                    name: name.to_string(),
                    source,
                })?;
                match inner.points().by_id(point) {
                    Some(p) => {
                        // Refused when opened, so the client sees why.
                        if let Err(source) = inner.journal().check_point(p.interval) {
                            return Err(NoExport::Damaged {
                                name: name.to_string(),
                                source,
                            });
                        }
                        Some((p.id.clone(), p.interval))
                    }
                    None => continue,
                }
            };
            let dev = ViewDevice {
                repl: r.clone(),
                disk: index,
                size,
                point,
                name: name.to_string(),
            };
            return Ok((r, Arc::new(dev)));
        }
        Err(NoExport::DiskOrPoint {
            name: name.to_string(),
            machine: machine.to_string(),
            disk: disk.to_string(),
            point: point.to_string(),
        })
    }

    /// Every export name, `@latest` first per disk, then points newest first.
    pub fn export_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut repls = self.store.list();
        repls.sort_by_key(|r| Reverse(r.created_ms()));
        for r in repls {
            let points = r.points();
            for d in r.replica_disks() {
                let mut push = |n: String| {
                    if seen.insert(n.clone()) {
                        names.push(n);
                    }
                };
                push(format!("{}/{}@latest", r.machine_id(), d.name()));
                if r.test_failover().is_some() {
                    push(format!("{}/{}@{TEST_POINT}", r.machine_id(), d.name()));
                }
                for p in points.iter().rev() {
                    push(format!("{}/{}@{}", r.machine_id(), d.name(), p.id));
                }
            }
        }
        names
    }
}

/// Whether `client` may see the views of `machine`.
fn may_see(client: Option<&PeerIdentity>, machine: &str) -> bool {
    match client {
        Some(who) => match who.role {
            Role::Admin => true,
            Role::Agent => who.id == machine,
            Role::Ps | Role::Mt | Role::Cs => false,
        },
        // Only a server without TLS has no client identity; the MT never
        // serves views that way.
        None => false,
    }
}

fn refusal(client: Option<&PeerIdentity>, name: &str) -> NbdError {
    let who = client.map_or("a client without a certificate".to_string(), |w| {
        format!("certificate {w}")
    });
    NbdError::eperm(format!(
        "{who} may not read view {name:?}: an agent certificate sees only its own machine's views, an admin certificate sees all (use the admin certificate, e.g. from `rebound certs`)"
    ))
}

impl ExportRegistry for Views {
    fn list(&self) -> Vec<String> {
        self.export_names()
    }

    fn list_for(&self, client: Option<&PeerIdentity>) -> Vec<String> {
        self.export_names()
            .into_iter()
            .filter(|n| {
                n.split_once('/')
                    .is_some_and(|(machine, _)| may_see(client, machine))
            })
            .collect()
    }

    fn open_for(
        &self,
        name: &str,
        client: Option<&PeerIdentity>,
    ) -> Result<Arc<dyn BlockDevice>, NbdError> {
        // Resolve first: the name's machine part may be a replication id.
        let (repl, dev) = self.resolve(name).map_err(|e| {
            // Say "no such export" only to who may see that machine.
            match name.split_once('/') {
                Some((machine, _)) if !may_see(client, machine) => refusal(client, name),
                // The export exists, but its point cannot be served exactly.
                _ if matches!(e, NoExport::Damaged { .. }) => {
                    tracing::warn!(export = %name, error = %e, "view refused");
                    NbdError::eperm(e.to_string())
                }
                _ => NbdError::einval(e.to_string()),
            }
        })?;
        if !may_see(client, repl.machine_id()) {
            tracing::info!(export = %name, client = ?client.map(|w| w.to_string()), "view refused: the certificate may not see this machine");
            return Err(refusal(client, name));
        }
        tracing::debug!(export = %name, "view opened");
        Ok(dev)
    }

    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, NbdError> {
        let (_, dev) = self
            .resolve(name)
            .map_err(|e| NbdError::einval(e.to_string()))?;
        tracing::debug!(export = %name, "view opened");
        Ok(dev)
    }
}

/// One read-only view of a disk at a point (or at latest).
struct ViewDevice {
    repl: Arc<Replication>,
    disk: u32,
    size: u64,
    point: Option<(String, u64)>,
    name: String,
}

impl ViewDevice {
    fn refuse(&self) -> NbdError {
        NbdError::eperm(format!("view {} is read-only", self.name))
    }
}

impl BlockDevice for ViewDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.repl
            .read_view(self.disk, offset, buf, self.point.as_ref())
            .map_err(|e| NbdError::eio(format!("view {}: {e}", self.name)))
    }
    fn write(&self, _offset: u64, _data: &[u8], _fua: bool) -> Result<(), NbdError> {
        Err(self.refuse())
    }
    fn flush(&self) -> Result<(), NbdError> {
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> Result<(), NbdError> {
        Err(self.refuse())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> Result<(), NbdError> {
        Err(self.refuse())
    }
}
