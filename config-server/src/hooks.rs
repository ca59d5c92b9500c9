//! Plan hooks: only executables installed in the CS's hook directory run,
//! named by the plan; an RPC never carries a command line.
//!
//! A plan names a hook (`pre-failover`), never a command: whoever may call
//! the operator RPCs could otherwise run any shell command on the CS host.
//! The name is a file directly in `hook_dir` (no `/`, no `..`), installed by
//! someone who can write there (root by default), and it runs without a
//! shell, with the job's environment (`REBOUND_JOB`, `REBOUND_JOB_KIND`,
//! `REBOUND_PLAN`, `REBOUND_MACHINES`). `CreatePlan` refuses a name that is
//! not installed, and the hook step checks it again before it runs (a plan
//! stored earlier may hold a name that is gone, or an old command line).
//!
//! A hook runs as the CS, so whoever can change it can act as the CS: the
//! hook and `hook_dir` must be owned by root or the CS's own user and not
//! writable by group or others, and a hook that is a symlink must stay in
//! `hook_dir`. Anything else is refused with the fix.

use crate::error::CsError;
use crate::store::Plan;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Why a hook may not or did not run.
#[derive(Debug, Error)]
pub enum HookError {
    #[error(
        "hook {name:?} is not a hook name: a plan names an executable installed in the CS's hook \
         directory {} (a file name without '/' or spaces, not '.' or '..'), never a command line; \
         install the script there and give its name",
        dir.display()
    )]
    BadName { name: String, dir: PathBuf },
    #[error(
        "hook {name:?} is not installed: no file {} in the CS's hook directory (`hook_dir` in the \
         CS config); install it there (owned by root, mode 0755) or give another name",
        path.display()
    )]
    NotInstalled { name: String, path: PathBuf },
    #[error(
        "hook {name:?} ({}) is not an executable file: make it one (`chmod 0755 {}`)",
        path.display(),
        path.display()
    )]
    NotExecutable { name: String, path: PathBuf },
    #[error(
        "{what} {} is owned by uid {uid} with mode {mode:o}, but a hook runs as the CS: it must be \
         owned by root or the CS's user (uid {cs_uid}) and not writable by group or others; \
         fix it with `chown root:root {}; chmod go-w {}`",
        path.display(),
        path.display(),
        path.display()
    )]
    Unsafe {
        /// "hook file" or "hook directory".
        what: &'static str,
        path: PathBuf,
        uid: u32,
        mode: u32,
        cs_uid: u32,
    },
    #[error(
        "hook {name:?} ({}) is a symlink to {}, outside the CS's hook directory {}: install the \
         executable itself in the hook directory",
        path.display(),
        target.display(),
        dir.display()
    )]
    OutsideDir {
        name: String,
        path: PathBuf,
        target: PathBuf,
        dir: PathBuf,
    },
    #[error("cannot check hook {name:?} ({}): {source}", path.display())]
    Unreadable {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {label} {}: {source}", path.display())]
    Spawn {
        label: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{label} {} did not finish within {}: make it faster or check what it waits for",
        path.display(),
        crate::lifecycle::steps::human(*after)
    )]
    Timeout {
        label: String,
        path: PathBuf,
        after: Duration,
    },
    #[error("{label} {} failed ({status}): {stderr}", path.display())]
    Failed {
        label: String,
        path: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

impl From<HookError> for CsError {
    fn from(e: HookError) -> CsError {
        match e {
            HookError::BadName { .. } => CsError::InvalidArgument(e.to_string()),
            HookError::NotInstalled { .. } => CsError::NotFound(e.to_string()),
            HookError::Timeout { .. } => CsError::Unavailable(e.to_string()),
            HookError::Unreadable { .. } | HookError::Spawn { .. } => {
                CsError::Internal(e.to_string())
            }
            HookError::NotExecutable { .. }
            | HookError::Unsafe { .. }
            | HookError::OutsideDir { .. }
            | HookError::Failed { .. } => CsError::FailedPrecondition(e.to_string()),
        }
    }
}

/// Whether `name` can only name a file directly in the hook directory.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '@'))
}

/// The path of the installed hook `name` in `dir`, checked: a valid name,
/// an existing regular file, executable.
pub fn resolve(dir: &Path, name: &str) -> Result<PathBuf, HookError> {
    if !valid_name(name) {
        return Err(HookError::BadName {
            name: name.to_string(),
            dir: dir.to_path_buf(),
        });
    }
    let path = dir.join(name);
    let unreadable = |path: &Path, source| HookError::Unreadable {
        name: name.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let target = match std::fs::canonicalize(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(HookError::NotInstalled {
                name: name.to_string(),
                path,
            })
        }
        Err(source) => return Err(unreadable(&path, source)),
    };
    let real_dir = std::fs::canonicalize(dir).map_err(|e| unreadable(dir, e))?;
    if target.parent() != Some(real_dir.as_path()) {
        return Err(HookError::OutsideDir {
            name: name.to_string(),
            path,
            target,
            dir: dir.to_path_buf(),
        });
    }
    let dir_meta = std::fs::metadata(&real_dir).map_err(|e| unreadable(dir, e))?;
    check_owner("hook directory", dir, &dir_meta)?;
    let meta = std::fs::metadata(&target).map_err(|e| unreadable(&path, e))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(HookError::NotExecutable {
            name: name.to_string(),
            path,
        });
    }
    check_owner("hook file", &path, &meta)?;
    Ok(path)
}

/// The CS's effective uid: the owner of its `/proc/self` (the crate holds
/// no unsafe code to call `geteuid`). Root when it cannot be read, which
/// only narrows who may own a hook.
fn cs_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

/// Refuses a hook file or directory that someone other than root or the
/// CS's user could change.
fn check_owner(what: &'static str, path: &Path, meta: &std::fs::Metadata) -> Result<(), HookError> {
    let cs_uid = cs_uid();
    let mode = meta.permissions().mode() & 0o7777;
    if (meta.uid() == 0 || meta.uid() == cs_uid) && mode & 0o022 == 0 {
        return Ok(());
    }
    Err(HookError::Unsafe {
        what,
        path: path.to_path_buf(),
        uid: meta.uid(),
        mode,
        cs_uid,
    })
}

/// Every hook a plan names is installed in `dir`.
pub fn check_plan(dir: &Path, plan: &Plan) -> Result<(), HookError> {
    for g in &plan.groups {
        for name in [&g.pre_hook, &g.post_hook] {
            if !name.is_empty() {
                resolve(dir, name)?;
            }
        }
    }
    Ok(())
}

/// One hook run: which hook, what it is called in messages, its
/// environment and how long it may take.
pub struct Run<'a> {
    pub dir: &'a Path,
    pub name: &'a str,
    /// "pre-hook of plan group 1".
    pub label: &'a str,
    pub env: Vec<(&'static str, String)>,
    pub timeout: Duration,
}

/// The last 500 characters of a hook's stderr, trimmed.
fn tail(stderr: &[u8]) -> String {
    let err = String::from_utf8_lossy(stderr);
    let err = err.trim();
    let start = err
        .char_indices()
        .rev()
        .nth(499)
        .map(|(i, _)| i)
        .unwrap_or(0);
    err[start..].to_string()
}

/// Runs the installed hook without a shell; it fails when it is not
/// installed, exits non-zero (with its stderr) or runs past the timeout
/// (it is killed).
pub async fn run(r: Run<'_>) -> Result<(), HookError> {
    let path = resolve(r.dir, r.name)?;
    let mut cmd = tokio::process::Command::new(&path);
    cmd.current_dir(r.dir)
        .envs(r.env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(r.timeout, cmd.output())
        .await
        .map_err(|_| HookError::Timeout {
            label: r.label.to_string(),
            path: path.clone(),
            after: r.timeout,
        })?
        .map_err(|source| HookError::Spawn {
            label: r.label.to_string(),
            path: path.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(HookError::Failed {
            label: r.label.to_string(),
            path,
            status: out.status,
            stderr: tail(&out.stderr),
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::PlanGroup;

    /// Installs an executable script `name` in `dir`.
    pub(crate) fn install(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn plan(pre: &str) -> Plan {
        Plan {
            name: "p".into(),
            groups: vec![PlanGroup {
                machines: vec!["m1".into()],
                pre_hook: pre.into(),
                post_hook: String::new(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_plan_names_only_installed_executables_in_the_hook_dir() {
        let d = tempfile::tempdir().unwrap();
        let hooks = d.path().join("hooks");
        std::fs::create_dir(&hooks).unwrap();
        install(&hooks, "start-app", "true");
        install(d.path(), "outside", "true");
        std::fs::write(hooks.join("plain"), "not executable").unwrap();
        check_plan(&hooks, &plan("start-app")).unwrap();
        check_plan(&hooks, &plan("")).unwrap();
        for bad in [
            "../outside",
            "/bin/true",
            "echo start",
            "..",
            "a/b",
            "true; rm -rf /",
        ] {
            let e = check_plan(&hooks, &plan(bad)).unwrap_err();
            assert!(matches!(e, HookError::BadName { .. }), "{bad}: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{bad:?}")) && msg.contains("never a command line"),
                "{msg}"
            );
            assert!(msg.contains(&hooks.display().to_string()), "{msg}");
        }
        let e = check_plan(&hooks, &plan("missing")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("is not installed"), "{msg}");
        assert!(
            msg.contains(&hooks.join("missing").display().to_string()),
            "{msg}"
        );
        let e = check_plan(&hooks, &plan("plain")).unwrap_err();
        assert!(e.to_string().contains("chmod 0755"), "{e}");
        assert!(matches!(
            CsError::from(check_plan(&hooks, &plan("x y")).unwrap_err()),
            CsError::InvalidArgument(_)
        ));
    }

    #[test]
    fn a_hook_others_can_change_is_refused_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let hook = install(d.path(), "start-app", "true");
        resolve(d.path(), "start-app").unwrap();
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = resolve(d.path(), "start-app").unwrap_err();
        assert!(matches!(e, HookError::Unsafe { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&hook.display().to_string()), "{msg}");
        assert!(msg.contains("mode 775") && msg.contains("uid 0"), "{msg}");
        assert!(
            msg.contains("chown root:root") && msg.contains("chmod go-w"),
            "{msg}"
        );
        assert!(matches!(CsError::from(e), CsError::FailedPrecondition(_)));
        // A hook directory others can write to is refused too.
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = resolve(d.path(), "start-app").unwrap_err();
        assert!(e.to_string().starts_with("hook directory"), "{e}");
        // A file owned by another user (65534, nobody) is refused (needs root).
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&hook, Some(65534), None).expect("chown: this test needs root");
        let e = resolve(d.path(), "start-app").unwrap_err();
        assert!(e.to_string().contains("uid 65534"), "{e}");
    }

    #[test]
    fn a_hook_symlink_may_not_leave_the_hook_dir() {
        let d = tempfile::tempdir().unwrap();
        let hooks = d.path().join("hooks");
        std::fs::create_dir(&hooks).unwrap();
        let outside = install(d.path(), "outside", "true");
        install(&hooks, "inside", "true");
        std::os::unix::fs::symlink(&outside, hooks.join("escape")).unwrap();
        std::os::unix::fs::symlink("inside", hooks.join("alias")).unwrap();
        let e = resolve(&hooks, "escape").unwrap_err();
        assert!(matches!(e, HookError::OutsideDir { .. }), "{e}");
        assert!(
            e.to_string().contains("outside the CS's hook directory"),
            "{e}"
        );
        resolve(&hooks, "alias").unwrap();
        // A dangling symlink is not installed.
        std::os::unix::fs::symlink("gone", hooks.join("dangling")).unwrap();
        let e = resolve(&hooks, "dangling").unwrap_err();
        assert!(matches!(e, HookError::NotInstalled { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_hook_runs_without_a_shell_with_the_job_environment() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        install(
            d.path(),
            "record",
            &format!("echo \"$REBOUND_PLAN $0 $#\" > {}", out.display()),
        );
        install(d.path(), "fail", "echo broke >&2; exit 3");
        install(d.path(), "slow", "sleep 5");
        let run1 = |name: &'static str, timeout| Run {
            dir: d.path(),
            name,
            label: "pre-hook of plan group 1",
            env: vec![("REBOUND_PLAN", "erp".into())],
            timeout,
        };
        run(run1("record", Duration::from_secs(5))).await.unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            got.trim(),
            format!("erp {} 0", d.path().join("record").display())
        );
        let e = run(run1("fail", Duration::from_secs(5))).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("pre-hook of plan group 1") && msg.contains("broke"),
            "{msg}"
        );
        let e = run(run1("slow", Duration::from_millis(200)))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("did not finish within"), "{e}");
        let e = run(run1("gone", Duration::from_secs(1))).await.unwrap_err();
        assert!(matches!(e, HookError::NotInstalled { .. }), "{e}");
    }
}
