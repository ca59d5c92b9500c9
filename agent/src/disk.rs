//! A protected disk: its backing file or block device, and the NBD face the
//! machine writes through (DESIGN.md §5 "NBD front end").
//!
//! Reads go straight to the backing file. Writes, trims and zeroes go through
//! the machine's ordering point in [`crate::capture`], which does the IO and
//! records the change in the same critical section. On a failed-over
//! machine the disk IO first saves the pre-images of the blocks it changes
//! in the disk's hand-over journal ([`crate::handover`]), synced before the
//! blocks change.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rebound_common::nbd::{BlockDevice, ExportRegistry, NbdError};

use crate::capture::Capture;
use crate::handover::Handover;
use crate::metrics::{AgentMetrics, DiskCounters};
use crate::sys;
use crate::AgentError;

/// The backing store of one protected disk.
#[derive(Debug)]
pub struct Disk {
    pub index: u32,
    pub name: String,
    pub path: PathBuf,
    file: File,
    size: u64,
    block_device: bool,
    /// Set on a failed-over machine: pre-images are saved before writes.
    journal: Option<Handover>,
}

impl Disk {
    /// Opens the backing file or block device read-write; its size is the
    /// disk's size. A block device is opened exclusively (`O_EXCL`): while
    /// the agent runs, nothing can mount it or open it exclusively, so no
    /// write reaches the disk around the agent's change stream.
    pub fn open(index: u32, name: &str, path: &Path) -> Result<Disk, AgentError> {
        let err = |message: String| AgentError::Disk {
            name: name.to_string(),
            path: path.to_path_buf(),
            message,
        };
        let is_device = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if is_device {
            options.custom_flags(libc::O_EXCL);
        }
        let mut file = options.open(path).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) if is_device => err(format!(
                "is in use by another program (mounted? part of an md/LVM/dm device?): {e}; \
                 unmount it or stop its user, then start the agent, and put the workload \
                 on the agent's NBD export instead of {}",
                path.display()
            )),
            Some(libc::EACCES | libc::EPERM | libc::EROFS) => err(format!(
                "cannot open read-write: {e}; the agent must run as root, and under systemd \
                 the unit must allow it (rebound-agent.service: DeviceAllow= for a block \
                 device, ReadWritePaths= for a file outside /var/lib/rebound/agent; add them \
                 with `systemctl edit rebound-agent`)"
            )),
            _ if is_device => err(format!(
                "cannot open the block device read-write: {e}; check that {} is the disk \
                 named in agent.toml and that it exists",
                path.display()
            )),
            Some(libc::ENOENT) => err(format!(
                "cannot open read-write: {e} (create the file, e.g. `truncate -s 10G {}`)",
                path.display()
            )),
            _ => err(format!("cannot open read-write: {e}")),
        })?;
        let meta = file
            .metadata()
            .map_err(|e| err(format!("cannot stat: {e}")))?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(err("is neither a regular file nor a block device".into()));
        }
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| err(format!("cannot find the size: {e}")))?;
        if size == 0 {
            return Err(err("has size 0; give it a size first".into()));
        }
        Ok(Disk {
            index,
            name: name.to_string(),
            path: path.to_path_buf(),
            file,
            size,
            block_device,
            journal: None,
        })
    }

    /// Journals the pre-image of every block before its first write from
    /// now on, into the hand-over journal at `journal` (see
    /// [`crate::handover`]); `None`, or a committed journal, journals
    /// nothing; a fenced, missing or foreign journal is an error.
    pub fn with_handover_journal(mut self, journal: Option<&Path>) -> Result<Disk, AgentError> {
        if let Some(path) = journal {
            self.journal = Handover::open(&self.name, path, self.size)?;
        }
        Ok(self)
    }

    /// True while writes to this disk are journaled.
    pub fn is_journaling(&self) -> bool {
        self.journal.as_ref().is_some_and(Handover::is_journaling)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        rebound_common::chunk::read_full_at(&self.file, buf, offset)
    }

    /// Writes `data` at `offset`, after saving the pre-images of the blocks
    /// it changes when the disk is journaled.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if let Some(j) = &self.journal {
            j.before_change(&self.file, offset, data.len() as u64, false)?;
        }
        self.file.write_all_at(data, offset)
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Makes `len` bytes at `offset` read as zeroes: punches a hole where
    /// the file system or device supports it, writes zeroes otherwise; after
    /// saving the pre-images of the blocks it changes when journaled.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(j) = &self.journal {
            j.before_change(&self.file, offset, len, true)?;
        }
        for mode in [
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        ] {
            let Err(e) = sys::fallocate(&self.file, mode, offset, len) else {
                return Ok(());
            };
            match e.raw_os_error() {
                Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENODEV | libc::ENOSYS) => continue,
                _ => return Err(e),
            }
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// The NBD face of one disk.
pub struct DiskDevice {
    disk: Arc<Disk>,
    capture: Arc<Capture>,
    counters: DiskCounters,
}

impl DiskDevice {
    /// Counts `r` as an answered error when it is one.
    fn counted(&self, r: Result<(), NbdError>) -> Result<(), NbdError> {
        if r.is_err() {
            self.counters.failed();
        }
        r
    }

    /// Counts `r` as a captured write of `bytes` when it succeeded.
    fn captured(&self, bytes: u64, r: Result<(), NbdError>) -> Result<(), NbdError> {
        if r.is_ok() {
            self.counters.captured(bytes);
        }
        self.counted(r)
    }
}

impl BlockDevice for DiskDevice {
    fn size(&self) -> u64 {
        self.disk.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.counted(self.disk.read_at(buf, offset).map_err(|e| {
            NbdError::from_io(
                &e,
                format!("read of disk {} at offset {offset}", self.disk.name),
            )
        }))
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        let r = self.capture.write(self.disk.index, offset, data, fua);
        self.captured(data.len() as u64, r)
    }
    fn flush(&self) -> Result<(), NbdError> {
        self.counted(
            self.disk
                .sync()
                .map_err(|e| NbdError::from_io(&e, format!("flush of disk {}", self.disk.name))),
        )
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), NbdError> {
        self.counted(self.capture.zero(self.disk.index, offset, len, fua))
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), NbdError> {
        let r = self.capture.zero(self.disk.index, offset, len, fua);
        self.captured(len, r)
    }
}

/// The agent's exports: one per protected disk, named after the disk.
pub struct Exports {
    devices: Vec<(String, Arc<DiskDevice>)>,
}

impl Exports {
    /// The exports of `capture`'s disks, counting into `metrics`.
    pub fn new(capture: &Arc<Capture>, metrics: &AgentMetrics) -> Exports {
        Exports {
            devices: capture
                .disks()
                .iter()
                .map(|d| {
                    (
                        d.name.clone(),
                        Arc::new(DiskDevice {
                            disk: d.clone(),
                            capture: capture.clone(),
                            counters: metrics.disk(&d.name),
                        }),
                    )
                })
                .collect(),
        }
    }
}

impl ExportRegistry for Exports {
    fn list(&self) -> Vec<String> {
        self.devices.iter().map(|(n, _)| n.clone()).collect()
    }
    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, NbdError> {
        self.devices
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone() as Arc<dyn BlockDevice>)
            .ok_or_else(|| {
                NbdError::einval(format!(
                    "no export named {name:?}; this agent exports {}",
                    self.list().join(", ")
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_range_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![0xabu8; 3 << 20]).unwrap();
        let d = Disk::open(0, "d", &p).unwrap();
        assert_eq!(d.size(), 3 << 20);
        d.zero_range(4096, (1 << 20) + 512).unwrap();
        let mut buf = vec![0u8; 3 << 20];
        d.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0xab));
        assert!(buf[4096..4096 + (1 << 20) + 512].iter().all(|&b| b == 0));
        assert!(buf[4096 + (1 << 20) + 512..].iter().all(|&b| b == 0xab));
    }

    /// A loop device over a temp file, detached on drop; `None` where loop
    /// devices cannot be set up (not root, no loop driver), which fails the
    /// test rather than passing it unexercised.
    struct Loop(PathBuf);

    impl Loop {
        fn over(file: &Path) -> Option<Loop> {
            let out = std::process::Command::new("losetup")
                .args(["--find", "--show"])
                .arg(file)
                .output()
                .ok()?;
            let dev = String::from_utf8(out.stdout).ok()?.trim().to_string();
            (out.status.success() && !dev.is_empty()).then(|| Loop(PathBuf::from(dev)))
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.0)
                .status();
        }
    }

    #[test]
    fn a_block_device_is_opened_exclusively() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev.img");
        std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
        let dev = Loop::over(&p).expect(
            "cannot set up a loop device: this test needs root, losetup and the loop driver",
        );
        let d = Disk::open(0, "d", &dev.0).unwrap();
        assert!(d.is_block_device());
        let e = Disk::open(1, "again", &dev.0).unwrap_err().to_string();
        assert!(e.contains("in use by another program (mounted?"), "{e}");
        assert!(e.contains(&dev.0.display().to_string()), "{e}");
        drop(d);
        Disk::open(0, "d", &dev.0).expect("free again once closed");
    }
}
