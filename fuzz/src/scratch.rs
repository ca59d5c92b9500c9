//! Scratch files for the targets whose decoder reads a file (journal,
//! segment, catalog, dirty log): one file per thread in the temp directory
//! (set `TMPDIR=/dev/shm` when fuzzing so no disk is touched), removed
//! when the guard drops.

use std::path::{Path, PathBuf};

/// A scratch file path, removed (with anything the decoder left next to it)
/// on drop.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// A fresh path for `what`, unique to this process and thread.
    pub fn new(what: &str) -> Scratch {
        let thread = format!("{:?}", std::thread::current().id());
        let thread: String = thread.chars().filter(char::is_ascii_digit).collect();
        let path = std::env::temp_dir().join(format!(
            "rebound-fuzz-{}-{thread}-{what}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        Scratch { path }
    }

    /// A scratch file holding `bytes`.
    pub fn with(what: &str, bytes: &[u8]) -> Scratch {
        let s = Scratch::new(what);
        s.write(bytes);
        s
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&self, bytes: &[u8]) {
        std::fs::write(&self.path, bytes)
            .unwrap_or_else(|e| panic!("cannot write scratch file {}: {e}", self.path.display()));
    }

    pub fn read(&self) -> Vec<u8> {
        std::fs::read(&self.path)
            .unwrap_or_else(|e| panic!("cannot read scratch file {}: {e}", self.path.display()))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
