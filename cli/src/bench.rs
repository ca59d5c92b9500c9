//! `rebound bench` and `rebound soak`: aliases for the `rebound-bench`
//! binary beside this one (`rebound soak ARGS` runs `rebound-bench soak
//! ARGS`).
//!
//! The bench starts every server as a child process and measures them, so it
//! lives in its own crate and binary; the operator CLI keeps the familiar
//! subcommand by running that binary with the same arguments and exiting
//! with its exit code.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

/// The binary `rebound bench` runs, looked up next to the running `rebound`.
pub const BINARY: &str = "rebound-bench";

/// Why `rebound bench` could not run the bench binary.
#[derive(Debug, thiserror::Error)]
pub enum BenchAliasError {
    #[error("cannot find the running rebound executable: {0}")]
    CurrentExe(#[source] std::io::Error),
    #[error(
        "{path} not found: the bench is its own binary, built beside rebound; build all the \
         binaries with `cargo build --release --workspace --bins` and run \
         target/release/rebound bench (or target/release/rebound-bench)"
    )]
    Missing { path: PathBuf },
    #[error("starting {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Path of `rebound-bench` in the directory of the running executable.
pub fn binary_path() -> Result<PathBuf, BenchAliasError> {
    let exe = std::env::current_exe().map_err(BenchAliasError::CurrentExe)?;
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    let path = dir.join(BINARY);
    if !path.is_file() {
        return Err(BenchAliasError::Missing { path });
    }
    Ok(path)
}

/// Runs `rebound-bench ARGS` with this process's stdin, stdout and stderr,
/// and returns the exit code to exit with (128 + the signal if the bench
/// was killed by one, as a shell reports it).
pub fn run(args: &[OsString]) -> Result<i32, BenchAliasError> {
    let path = binary_path()?;
    let spawn_failed = |source| BenchAliasError::Spawn {
        path: path.clone(),
        source,
    };
    let status = Command::new(&path)
        .args(args)
        .status()
        .map_err(spawn_failed)?;
    Ok(exit_code(status))
}

/// `rebound soak ARGS`: runs `rebound-bench soak ARGS` as [`run`] does.
pub fn soak(args: &[OsString]) -> Result<i32, BenchAliasError> {
    run(&soak_args(args))
}

fn soak_args(args: &[OsString]) -> Vec<OsString> {
    std::iter::once(OsString::from("soak"))
        .chain(args.iter().cloned())
        .collect()
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    #[test]
    fn exit_code_passes_the_code_or_the_signal_through() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        // Killed by SIGTERM (15).
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
    }

    #[test]
    fn soak_runs_the_bench_soak_mode_with_the_same_arguments() {
        let args: Vec<OsString> = ["--minutes", "1", "--seed", "7"]
            .iter()
            .map(OsString::from)
            .collect();
        let got = soak_args(&args);
        assert_eq!(got[0], "soak");
        assert_eq!(&got[1..], &args[..]);
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let e = BenchAliasError::Missing {
            path: PathBuf::from("/x/rebound-bench"),
        };
        let msg = e.to_string();
        assert!(
            msg.contains("cargo build --release --workspace --bins"),
            "{msg}"
        );
        assert!(msg.contains("/x/rebound-bench"), "{msg}");
    }
}
