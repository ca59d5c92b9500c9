//! Parsing `--point` choices and durations.

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
