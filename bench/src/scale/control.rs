//! A thousand simulated agents on the configuration server's control
//! channel, and how long `rebound machines` and `rebound status` take then.

use crate::Bench;
use anyhow::{bail, Result};

/// Measures the control-channel scale rows (`scale.control.*`).
pub fn run(b: &mut Bench) -> Result<()> {
    let _ = b;
    bail!("the control-channel scale section is not built yet")
}
