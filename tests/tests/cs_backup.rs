//! `rebound-cs backup` and `restore` of the SQLite deployment, with the real
//! binaries.
