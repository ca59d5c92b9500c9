//! Certificate lifetimes (DESIGN.md §3): how long what the CA signs stays
//! valid, and when its holder renews it.
//!
//! A stolen key must stop working by itself, so component certificates
//! expire (90 days unless the CS's `cert_lifetime` says otherwise) and the
//! components renew them over the control channel at two thirds of their
//! life. The CA lives ten years: rotating it means re-enrolling everyone.
//!
//! A certificate's `notBefore` lies a little before its issue time, so a
//! peer whose clock runs slightly behind the CA's still accepts it; its
//! `notAfter` is exactly the lifetime after issue, which is what
//! `openssl x509 -enddate` shows.

use super::PkiError;
use rcgen::CertificateParams;
use std::time::Duration;
use thiserror::Error;

/// A component certificate's lifetime unless configured otherwise.
pub const DEFAULT: Duration = Duration::from_secs(90 * 24 * 3600);
/// The CA certificate's lifetime.
pub const CA: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The shortest lifetime accepted (a renewal needs time to happen).
pub const MIN: Duration = Duration::from_secs(10);
/// How far `notBefore` may lie before the issue time, at most.
const MAX_BACKDATE: Duration = Duration::from_secs(60);

/// A lifetime outside what renewal can keep up with or the CA covers.
#[derive(Debug, Error, PartialEq)]
pub enum LifetimeError {
    #[error(
        "certificate lifetime {0:?} is not a duration: {1} (write e.g. \"90d\", \"12h\", \"30s\")"
    )]
    Unparsed(String, String),
    #[error(
        "certificate lifetime {given} is out of range: use from {min} to {max} (the CA's own \
         lifetime)",
        given = format(*.0),
        min = format(MIN),
        max = format(CA)
    )]
    OutOfRange(Duration),
}

/// Checks a lifetime: from [`MIN`] to [`CA`].
pub fn check(lifetime: Duration) -> Result<Duration, LifetimeError> {
    if (MIN..=CA).contains(&lifetime) {
        Ok(lifetime)
    } else {
        Err(LifetimeError::OutOfRange(lifetime))
    }
}

/// Parses and checks a lifetime as an operator writes it ("90d", "30s").
pub fn parse(text: &str) -> Result<Duration, LifetimeError> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| LifetimeError::Unparsed(text.to_string(), e.to_string()))?;
    check(d)
}

/// A lifetime as an operator writes it: "90d", "12h", "30s".
pub fn format(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        return humantime::format_duration(d).to_string();
    }
    match secs {
        s if s % 86400 == 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Sets `params` to be valid from (a little before) now for `lifetime`.
pub fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    let backdate = (lifetime / 10).min(MAX_BACKDATE);
    params.not_before = now - backdate;
    params.not_after = now + lifetime;
}

/// When a certificate is valid, in milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

impl Validity {
    /// Reads a DER certificate's validity.
    pub fn of_der(der: &[u8]) -> Result<Validity, PkiError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::Parse(e.to_string()))?;
        let ms = |t: x509_parser::time::ASN1Time| (t.timestamp().max(0) as u64) * 1000;
        Ok(Validity {
            not_before_ms: ms(cert.validity().not_before),
            not_after_ms: ms(cert.validity().not_after),
        })
    }

    /// When the holder renews: two thirds into the certificate's life.
    pub fn renew_at_ms(&self) -> u64 {
        let life = self.not_after_ms.saturating_sub(self.not_before_ms);
        self.not_before_ms + life / 3 * 2
    }
}

/// `#[serde(with = "...")]` for a lifetime written as a humantime string
/// ("90d"), checked when read.
pub mod humantime_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_parse_and_are_bounded() {
        assert_eq!(parse("90d").unwrap(), DEFAULT);
        for text in ["90d", "12h", "30s", "90m"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
        assert_eq!(parse(" 30s ").unwrap(), Duration::from_secs(30));
        let e = parse("1s").unwrap_err().to_string();
        assert!(
            e.contains("1s is out of range: use from 10s to 3650d"),
            "{e}"
        );
        let e = parse("11years").unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        let e = parse("soon").unwrap_err().to_string();
        assert!(e.contains("\"soon\"") && e.contains("90d"), "{e}");
    }

    #[test]
    fn renewal_is_due_at_two_thirds() {
        let v = Validity {
            not_before_ms: 1_000,
            not_after_ms: 31_000,
        };
        assert_eq!(v.renew_at_ms(), 21_000);
    }
}
