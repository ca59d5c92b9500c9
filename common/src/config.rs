//! Config loading shared by every binary (DESIGN.md §2).
//!
//! One TOML file per process with documented defaults; unknown keys are an
//! error so a typo never silently falls back to a default.

use serde::de::DeserializeOwned;
use std::fmt::Debug;
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

/// For components' tests: parses a shipped example config and asserts that
/// it spells out exactly the defaults once `sample` has reset the fields the
/// example fills with sample values (such as TLS paths). Returns the config
/// as compared.
pub fn check_example<T>(text: &str, sample: impl FnOnce(&mut T)) -> T
where
    T: DeserializeOwned + Default + PartialEq + Debug,
{
    let mut c: T = match parse(text, Path::new("example-config.toml")) {
        Ok(c) => c,
        Err(e) => panic!("the example config does not parse: {e}"),
    };
    sample(&mut c);
    assert_eq!(
        c,
        T::default(),
        "the example config differs from the defaults"
    );
    c
}

/// For components' tests: asserts that `text` is refused as a config and
/// that the error names `key`, so a typo is reported where it is.
pub fn check_refused<T: DeserializeOwned + Debug>(text: &str, key: &str) {
    match parse::<T>(text, Path::new("bad.toml")) {
        Ok(c) => panic!("{text:?} was accepted as {c:?}"),
        Err(e) => assert!(e.to_string().contains(key), "{e}"),
    }
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
