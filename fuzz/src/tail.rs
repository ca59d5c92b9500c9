//! What every scan of an append-only file (undo journal, PS segment)
//! promises about where its valid data ends.

use std::fmt::Debug;

/// The scan saw the whole file, its valid data is a prefix of it, and it
/// says why exactly when that prefix is shorter than the file.
pub fn check_valid_prefix(file: &[u8], file_len: u64, valid_len: u64, why: Option<&impl Debug>) {
    assert_eq!(
        file_len,
        file.len() as u64,
        "the scan saw another file length"
    );
    assert!(valid_len <= file_len, "valid data past the end of the file");
    assert_eq!(
        why.is_none(),
        valid_len == file_len,
        "the scan must say why exactly when the valid data ends early: {why:?}"
    );
}
