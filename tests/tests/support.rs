//! Checks that several integration modules share, so each test says what
//! it expects in one line.

use rebound_lab::Lab;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Tags a crash point now and asserts that, once applied at the MT (within
/// `within`), the point's view of disk0 equals the source at tagging time.
/// `what` says in the failure which convergence was expected.
pub fn assert_tag_converges(lab: &Lab, within: Duration, what: &str) {
    let (id, seq, h) = lab.tag_hash("crash").unwrap();
    assert_eq!(
        lab.applied_point_hash(&id, seq, within).unwrap(),
        h,
        "{what}: point {id} (seq {seq}) differs from the source"
    );
}

/// [`assert_tag_converges`], then the bytes the agent's resync has sent
/// since it started (its `resync_bytes_sent` counter).
pub fn resync_bytes_to_converge(lab: &Lab, within: Duration, what: &str) -> u64 {
    assert_tag_converges(lab, within, what);
    lab.agent_counter("resync_bytes_sent").unwrap()
}

/// A tmpfs mounted on a directory (a small disk a test can fill),
/// unmounted on drop (lazily, in case a process still has a file open in
/// it). Mounting needs root: without it the test fails saying so.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "16m") on `dir` (created), for
    /// `what` (named in the failure).
    pub fn mount(dir: &Path, size: &str, what: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test needs root to mount a tmpfs on {} ({what}): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` until its filesystem is full, then gives back `keep`
/// bytes: a ballast whose removal returns the space.
pub fn fill_leaving(path: &Path, keep: u64) {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .unwrap();
    let block = vec![0x5au8; 64 << 10];
    let mut n = 0u64;
    while f.write_all(&block).is_ok() {
        n += block.len() as u64;
    }
    // A partial write may have landed past `n`.
    f.set_len(n.saturating_sub(keep)).unwrap();
    f.sync_all().unwrap();
}

/// The number of lines of `log` holding `what`.
pub fn lines_with(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

/// A lab process stopped with SIGSTOP, continued when dropped (also when
/// the test fails, so the lab can stop it).
pub struct Paused(u32);

impl Paused {
    pub fn new(pid: u32) -> Paused {
        rebound_lab::process::signal(pid, "STOP").expect("SIGSTOP a lab process");
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = rebound_lab::process::signal(self.0, "CONT");
    }
}
