//! The agent's local admin socket (`<state_dir>/admin.sock`): one JSON
//! request per line, one JSON answer per line; an answer with `error` is a
//! failure.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A connection to an agent's admin socket, reusable for many requests.
pub struct AgentAdmin {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl AgentAdmin {
    pub fn connect(sock: &Path) -> Result<AgentAdmin> {
        let w = UnixStream::connect(sock).with_context(|| {
            format!(
                "cannot connect to the agent admin socket {}",
                sock.display()
            )
        })?;
        w.set_read_timeout(Some(Duration::from_secs(180)))?;
        Ok(AgentAdmin {
            r: BufReader::new(w.try_clone()?),
            w,
        })
    }

    /// One request; the answer, or its `error` as an error.
    pub fn call(&mut self, req: Value) -> Result<Value> {
        writeln!(self.w, "{req}")?;
        let mut line = String::new();
        self.r.read_line(&mut line)?;
        let v: Value = serde_json::from_str(&line)
            .with_context(|| format!("agent admin answer {line:?} is not JSON"))?;
        if let Some(e) = v.get("error") {
            bail!("agent admin {req} failed: {e}");
        }
        Ok(v)
    }

    pub fn status(&mut self) -> Result<Value> {
        self.call(json!({"cmd": "status"}))
    }

    /// Cuts a tag of `kind` ("crash", "app") now; its id and seq.
    pub fn tag(&mut self, kind: &str) -> Result<(String, u64)> {
        let v = self.call(json!({"cmd": "tag", "kind": kind}))?;
        let id = v["id"]
            .as_str()
            .ok_or_else(|| anyhow!("tag answer {v} has no id"))?;
        let seq = v["seq"]
            .as_u64()
            .ok_or_else(|| anyhow!("tag answer {v} has no seq"))?;
        Ok((id.to_string(), seq))
    }
}

/// One request on a fresh connection.
pub fn call(sock: &Path, req: Value) -> Result<Value> {
    AgentAdmin::connect(sock)?.call(req)
}
