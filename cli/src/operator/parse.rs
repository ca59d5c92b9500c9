//! Parsing `--point` choices and durations.

use anyhow::{bail, Result};
use rebound_proto::control::{point_choice::Choice, Empty, PointChoice};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A duration like `90s`, `30m`, `1h30m`, `250ms`, `2d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration: use e.g. 90s, 30m or 1h".into());
    }
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{s:?}: a number needs a unit (ms, s, m, h, d)"))?;
        if digits == 0 {
            return Err(format!("{s:?} is not a duration: use e.g. 90s, 30m or 1h"));
        }
        let n: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?} is not a duration: use e.g. 90s, 30m or 1h"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ms" => n / 1000.0,
            "s" | "sec" | "secs" => n,
            "m" | "min" | "mins" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            u => return Err(format!("{s:?}: unknown unit {u:?} (use ms, s, m, h or d)")),
        };
        total += Duration::from_secs_f64(secs);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// `YYYY-MM-DDTHH:MM[:SS][Z]` (UTC; a space may replace the T) → ms.
fn parse_utc(s: &str) -> Option<u64> {
    let s = s.trim().trim_end_matches('Z').trim_end_matches('z');
    let (date, time) = s.split_once(['T', ' '])?;
    let mut d = date.split('-');
    let y: i64 = d.next()?.parse().ok()?;
    let mo: u32 = d.next()?.parse().ok()?;
    let da: u32 = d.next()?.parse().ok()?;
    if d.next().is_some() || !(1..=12).contains(&mo) || !(1..=31).contains(&da) {
        return None;
    }
    let mut t = time.split(':');
    let h: u64 = t.next()?.parse().ok()?;
    let mi: u64 = t.next()?.parse().ok()?;
    let sec: f64 = match t.next() {
        Some(x) => x.parse().ok()?,
        None => 0.0,
    };
    if h > 23 || mi > 59 || !(0.0..61.0).contains(&sec) {
        return None;
    }
    let days = days_from_civil(y, mo, da);
    if days < 0 {
        return None;
    }
    Some(days as u64 * 86_400_000 + h * 3_600_000 + mi * 60_000 + (sec * 1000.0) as u64)
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
                let d = parse_duration(age).map_err(anyhow::Error::msg)?;
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
        assert!(parse_point("").is_err());
    }
}
