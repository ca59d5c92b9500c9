//! Parsing `--point` choices, durations and sizes.

use anyhow::{bail, Result};
use rebound_common::time::now_ms;
use rebound_proto::control::{point_choice::Choice, Empty, PointChoice};
use std::time::{Duration, UNIX_EPOCH};

/// A duration flag that is not one.
#[derive(Debug, thiserror::Error)]
pub enum BadDuration {
    #[error("empty duration: use e.g. 90s, 30m or 1h")]
    Empty,
    #[error("{text:?} is not a duration ({source}): use e.g. 90s, 30m or 1h")]
    Unparsed {
        text: String,
        source: humantime::DurationError,
    },
}

/// A duration like `90s`, `30m`, `1h30m`, `250ms`, `2d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, BadDuration> {
    let s = s.trim();
    if s.is_empty() {
        return Err(BadDuration::Empty);
    }
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    humantime::parse_duration(s).map_err(|source| BadDuration::Unparsed {
        text: s.to_string(),
        source,
    })
}

/// A size flag that is not one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a size: use bytes or a number with K, M, G or T (powers of 1024), e.g. 10G or 512M")]
pub struct BadSize(String);

/// A size like `10G`, `512M`, `1.5T`, `10GiB` or plain bytes; units are
/// powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, BadSize> {
    let bad = || BadSize(s.to_string());
    let t = s.trim();
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(bad()),
    };
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(1u64 << shift).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let bytes = f * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// `YYYY-MM-DDTHH:MM[:SS][Z]` (UTC; a space may replace the T) → ms.
fn parse_utc(s: &str) -> Option<u64> {
    let (date, time) = s.trim().split_once(['T', ' '])?;
    let time = time.trim_end_matches(['Z', 'z']);
    let seconds = if time.matches(':').count() == 1 {
        ":00"
    } else {
        ""
    };
    let t = humantime::parse_rfc3339_weak(&format!("{date}T{time}{seconds}Z")).ok()?;
    t.duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

/// A `--point` value (see `rebound failover --help`).
pub fn parse_point(s: &str) -> Result<PointChoice> {
    let t = s.trim();
    let e = Empty {};
    let choice = match t.to_ascii_lowercase().as_str() {
        "" => bail!(
            "--point is empty: use latest, latest-processed, latest-app, latest-multi, \
                     latest-multi-app, a point id or a time"
        ),
        "latest" => Choice::Latest(e),
        "latest-processed" => Choice::LatestProcessed(e),
        "latest-app" => Choice::LatestApp(e),
        "latest-multi" => Choice::LatestMulti(e),
        "latest-multi-app" => Choice::LatestMultiApp(e),
        _ => {
            if let Some(tag) = t.strip_prefix("group:") {
                Choice::GroupTag(tag.to_string())
            } else if let Some(id) = t.strip_prefix("id:") {
                Choice::Id(id.to_string())
            } else if let Some(ms) = parse_utc(t) {
                Choice::AtOrBeforeMs(ms)
            } else if t.len() >= 12 && t.chars().all(|c| c.is_ascii_digit()) {
                // A Unix time in ms (13 digits today).
                Choice::AtOrBeforeMs(t.parse()?)
            } else if let Some(age) = t.strip_suffix(" ago").or(Some(t)).filter(|a| {
                a.chars().next().is_some_and(|c| c.is_ascii_digit())
                    && a.chars().last().is_some_and(|c| c.is_ascii_alphabetic())
                    && parse_duration(a).is_ok()
            }) {
                let d = parse_duration(age)?;
                Choice::AtOrBeforeMs(now_ms().saturating_sub(d.as_millis() as u64))
            } else {
                Choice::Id(t.to_string())
            }
        }
    };
    Ok(PointChoice {
        choice: Some(choice),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("5x").is_err());
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10gb"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5T"), Ok(3 << 39));
        assert_eq!(parse_size(" 64k "), Ok(64 << 10));
        for bad in ["", "G", "10X", "ten", "1.2.3G", "99999999999T"] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.contains("10G"), "{bad}: {e}");
        }
    }

    #[test]
    fn points() {
        let c = |s: &str| parse_point(s).unwrap().choice.unwrap();
        assert_eq!(c("latest"), Choice::Latest(Empty {}));
        assert_eq!(c("latest-app"), Choice::LatestApp(Empty {}));
        assert_eq!(c("latest-multi"), Choice::LatestMulti(Empty {}));
        assert_eq!(c("group:g-17"), Choice::GroupTag("g-17".into()));
        assert_eq!(c("p-000012"), Choice::Id("p-000012".into()));
        assert_eq!(
            c("1970-01-02T00:00:01Z"),
            Choice::AtOrBeforeMs(86_400_000 + 1000)
        );
        assert_eq!(c("1764158400000"), Choice::AtOrBeforeMs(1764158400000));
        assert!(matches!(c("10m"), Choice::AtOrBeforeMs(_)));
        assert_eq!(c("1970-01-02 00:01"), Choice::AtOrBeforeMs(86_460_000));
        assert!(parse_point("").is_err());
    }
}
