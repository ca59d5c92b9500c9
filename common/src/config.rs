//! Config loading shared by every binary (DESIGN.md §2).
//!
//! One TOML file per process with documented defaults; unknown keys are an
//! error so a typo never silently falls back to a default.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Loads `T` from `path`, or returns `T::default()` when no path is given.
/// The config structs use `#[serde(deny_unknown_fields, default)]`.
pub fn load<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses TOML text; `origin` names the source in errors.
pub fn parse<T: DeserializeOwned>(text: &str, origin: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use std::path::Path;

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct C {
        listen: String,
        n: u32,
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let c: C = super::parse("listen = 'x'", Path::new("t.toml")).unwrap();
        assert_eq!(c.listen, "x");
        assert_eq!(c.n, 0);
        let e = super::parse::<C>("lisen = 'x'", Path::new("t.toml")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("t.toml") && msg.contains("lisen"), "{msg}");
    }
}
