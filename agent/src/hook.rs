//! Hooks: the operator's shell commands the agent runs around points and
//! failover (`[hooks]` in the config: freeze, thaw, shutdown), each with a
//! timeout (DESIGN.md §5 "Tags", "Fence and shutdown").

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use thiserror::Error;

/// Why a hook did not succeed. Each names the hook; the operator fixes the
/// command or raises the timeout.
#[derive(Debug, Error)]
pub enum HookError {
    #[error("{name} hook cannot start: {source}")]
    Start {
        name: String,
        source: std::io::Error,
    },
    #[error("{name} hook did not finish within {} ms", .timeout.as_millis())]
    Timeout { name: String, timeout: Duration },
    #[error("{name} hook: {source}")]
    Wait {
        name: String,
        source: std::io::Error,
    },
    #[error("{name} hook {status}{}", if .stderr.is_empty() { String::new() } else { format!(": {}", .stderr) })]
    Failed {
        name: String,
        status: ExitStatus,
        /// The last line of its standard error, shortened.
        stderr: String,
    },
}

/// Runs `sh -c command` with `env`, killed after `timeout`.
pub async fn run_hook(
    name: &str,
    command: &str,
    env: &[(String, String)],
    timeout: Duration,
) -> Result<(), HookError> {
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    let name = name.to_string();
    let child = match c.spawn() {
        Ok(c) => c,
        Err(source) => return Err(HookError::Start { name, source }),
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Err(HookError::Timeout { name, timeout }),
        Ok(Err(source)) => Err(HookError::Wait { name, source }),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let err = String::from_utf8_lossy(&out.stderr);
            // The last line says most; keep the message short.
            let last: String = err
                .trim()
                .lines()
                .last()
                .unwrap_or("")
                .chars()
                .take(300)
                .collect();
            Err(HookError::Failed {
                name,
                status: out.status,
                stderr: last.trim().to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_name_the_hook_and_the_cause() {
        let t = Duration::from_secs(5);
        run_hook("thaw", "true", &[], t).await.unwrap();
        let e = run_hook("freeze", "echo one >&2; echo db busy >&2; exit 3", &[], t)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "freeze hook exit status: 3: db busy");
        let e = run_hook("freeze", "exit 1", &[], t).await.unwrap_err();
        assert_eq!(e.to_string(), "freeze hook exit status: 1");
        let e = run_hook("freeze", "sleep 5", &[], Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "freeze hook did not finish within 50 ms");
    }
}
