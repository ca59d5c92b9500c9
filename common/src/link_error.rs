//! Why a link to a peer failed, in words an operator can act on.
//!
//! The agent's link to its PS and the PS's link to its MT fail for a few
//! causes an operator must fix by hand (a certificate that does not name the
//! address it is reached at, one from another CA, expired or revoked, a
//! service that does not run, a network that does not route). A raw error
//! chain ("transport error: ... invalid peer certificate: ...") tells a
//! developer; [`LinkFailure`] sorts it into a [`LinkCause`] with a
//! machine-readable event kind and a sentence saying what to do, and
//! [`report`] turns it into rate-limited events for the configuration server.
//!
//! Classification walks the error's source chain for typed errors (rustls,
//! io) and falls back to the chain's text, because some errors on the way
//! ([`crate::tls::TlsError::Connect`]) keep only the message.

pub mod report;

use crate::pki::Role;
use crate::tls::error_chain;
use rustls::{AlertDescription, CertificateError};
use std::error::Error;
use std::fmt;
use std::io;

/// Why a connection or stream to a peer failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkCause {
    /// The server's certificate does not name the address it is reached at.
    TlsName {
        /// The name we checked (the address, or the configured server name).
        expected: String,
        /// What the certificate names instead, as rustls tells it ("" if not).
        presented: String,
    },
    /// The server's certificate is for another role than the one expected.
    WrongRole,
    /// A certificate not signed by this deployment's CA: theirs (`ours` =
    /// false, we refused it) or ours (the peer refused it).
    Untrusted { ours: bool },
    /// A certificate past its validity: theirs or ours.
    Expired { ours: bool },
    /// The peer's certificate is not valid yet: one of the two clocks is
    /// wrong (enrollment issues certificates valid from the CS's now).
    NotYetValid,
    /// A revoked certificate: theirs or ours.
    Revoked { ours: bool },
    /// Nothing listens on the port (TCP RST).
    Refused,
    /// No answer: host down, no route, firewall drop, timeout.
    Unreachable,
    /// Anything else; the failure's detail says what.
    Other,
}

impl LinkCause {
    /// Sorts an error (and its sources) into a cause.
    pub fn classify(err: &(dyn Error + 'static)) -> LinkCause {
        let mut cur: Option<&(dyn Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(cause) = typed(e) {
                return cause;
            }
            cur = e.source();
        }
        LinkCause::from_text(&error_chain(err))
    }

    /// Sorts an error message (an error chain flattened to text) into a cause.
    pub fn from_text(text: &str) -> LinkCause {
        let lower = text.to_ascii_lowercase();
        let has = |needles: &[&str]| needles.iter().any(|n| lower.contains(n));
        if has(&["not valid for name"]) {
            return LinkCause::TlsName {
                expected: quoted_after(text, "not valid for name").unwrap_or_default(),
                presented: presented_names(text),
            };
        }
        // crate::tls::WrongServerRole, by its Debug or Display text.
        if has(&["wrongserverrole", "certificate is required here"]) {
            return LinkCause::WrongRole;
        }
        // Alerts: the peer refused our certificate.
        if has(&["certificateexpired"]) {
            return LinkCause::Expired { ours: true };
        }
        if has(&["certificaterevoked"]) {
            return LinkCause::Revoked { ours: true };
        }
        if has(&[
            "unknownca",
            "badcertificate",
            "certificaterequired",
            "certificateunknown",
            "unsupportedcertificate",
        ]) {
            return LinkCause::Untrusted { ours: true };
        }
        // Our verdict on the peer's certificate.
        if has(&["invalid peer certificate"]) {
            if has(&["notvalidyet", "not valid yet"]) {
                return LinkCause::NotYetValid;
            }
            if has(&["expired"]) {
                return LinkCause::Expired { ours: false };
            }
            if has(&["revoked"]) {
                return LinkCause::Revoked { ours: false };
            }
            return LinkCause::Untrusted { ours: false };
        }
        if has(&["connection refused"]) {
            return LinkCause::Refused;
        }
        if has(&[
            "timed out",
            "timeout",
            "no route to host",
            "network is unreachable",
            "host is unreachable",
            "failed to lookup address",
            "name or service not known",
        ]) {
            return LinkCause::Unreachable;
        }
        LinkCause::Other
    }

    /// The event kind the configuration server stores and shows.
    pub fn kind(&self) -> &'static str {
        match self {
            LinkCause::TlsName { .. } => "link-tls-name",
            LinkCause::WrongRole => "link-wrong-role",
            LinkCause::Untrusted { .. } => "link-untrusted",
            LinkCause::Expired { .. } => "link-cert-expired",
            LinkCause::NotYetValid => "link-cert-not-yet-valid",
            LinkCause::Revoked { .. } => "link-cert-revoked",
            LinkCause::Refused => "link-refused",
            LinkCause::Unreachable => "link-unreachable",
            LinkCause::Other => "link-error",
        }
    }
}

/// The kind of the event that says a link that failed works again.
pub const RESTORED_KIND: &str = "link-restored";

/// A cause from a typed error, when `e` is one we know.
fn typed(e: &(dyn Error + 'static)) -> Option<LinkCause> {
    if let Some(t) = e.downcast_ref::<rustls::Error>() {
        return from_rustls(t);
    }
    let io = e.downcast_ref::<io::Error>()?;
    // A TLS failure inside an io error (tokio-rustls wraps them so).
    if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return from_rustls(t);
    }
    match io.kind() {
        io::ErrorKind::ConnectionRefused => Some(LinkCause::Refused),
        io::ErrorKind::TimedOut
        | io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable => Some(LinkCause::Unreachable),
        _ => None,
    }
}

fn from_rustls(e: &rustls::Error) -> Option<LinkCause> {
    Some(match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                return Some(LinkCause::from_text(&e.to_string()))
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                LinkCause::Expired { ours: false }
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                LinkCause::NotYetValid
            }
            CertificateError::Revoked => LinkCause::Revoked { ours: false },
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                LinkCause::Untrusted { ours: false }
            }
            // Another check (e.g. of the role) said no: its text tells.
            _ => return Some(LinkCause::from_text(&e.to_string())),
        },
        rustls::Error::AlertReceived(a) => match a {
            AlertDescription::CertificateExpired => LinkCause::Expired { ours: true },
            AlertDescription::CertificateRevoked => LinkCause::Revoked { ours: true },
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRequired
            | AlertDescription::UnsupportedCertificate => LinkCause::Untrusted { ours: true },
            _ => return None,
        },
        _ => return None,
    })
}

/// The names a certificate is valid for, from rustls' "certificate is only
/// valid for DnsName(\"a\") or IpAddress(..)" ("" when not said).
fn presented_names(text: &str) -> String {
    let Some((_, rest)) = text.split_once("is only valid for ") else {
        return String::new();
    };
    let end = [": ", ";", "\n"]
        .iter()
        .filter_map(|t| rest.find(t))
        .min()
        .unwrap_or(rest.len());
    rest[..end]
        .replace("DnsName(\"", "")
        .replace("IpAddress(", "")
        .replace("\")", "")
        .replace(')', "")
        .trim()
        .to_string()
}

/// The text between the first pair of double quotes after `marker`.
fn quoted_after(text: &str, marker: &str) -> Option<String> {
    let (_, rest) = text.split_once(marker)?;
    let (_, rest) = rest.split_once('"')?;
    let (inner, _) = rest.split_once('"')?;
    Some(inner.to_string())
}

/// The other end of a link: what it is, its id when known, its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    /// Its id ("" when the caller does not know it).
    pub id: String,
    /// `host:port` we connect to.
    pub addr: String,
}

impl Peer {
    /// "PS", "MT", "CS": how the docs name the role.
    fn title(&self) -> String {
        self.role.as_str().to_ascii_uppercase()
    }

    /// The daemon and unit name of the role, `rebound-ps`.
    fn service(&self) -> String {
        format!("rebound-{}", self.role.as_str())
    }

    fn host(&self) -> &str {
        self.addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or(&self.addr)
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.id.is_empty() {
            write!(f, "{} at {}", self.role, self.addr)
        } else {
            write!(f, "{} {} at {}", self.role, self.id, self.addr)
        }
    }
}

/// A failed link: the cause, and the error text it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkFailure {
    pub cause: LinkCause,
    /// The whole error chain as text.
    pub detail: String,
}

impl LinkFailure {
    pub fn from_error(err: &(dyn Error + 'static)) -> LinkFailure {
        LinkFailure {
            cause: LinkCause::classify(err),
            detail: error_chain(err),
        }
    }

    pub fn from_text(text: &str) -> LinkFailure {
        LinkFailure {
            cause: LinkCause::from_text(text),
            detail: text.to_string(),
        }
    }

    /// What went wrong, in a few words.
    pub fn what(&self, peer: &Peer) -> String {
        match &self.cause {
            LinkCause::TlsName {
                expected,
                presented,
            } => {
                let mut s = format!("TLS certificate not valid for name {expected}");
                if !presented.is_empty() {
                    s.push_str(&format!(" (it is only valid for {presented})"));
                }
                s
            }
            LinkCause::WrongRole => format!("its certificate is not a {} certificate", peer.role),
            LinkCause::Untrusted { ours: false } => {
                "its TLS certificate is not signed by this deployment's CA".into()
            }
            LinkCause::Untrusted { ours: true } => {
                "it does not accept our TLS certificate (not signed by its CA)".into()
            }
            LinkCause::Expired { ours: false } => "its TLS certificate has expired".into(),
            LinkCause::NotYetValid => "its TLS certificate is not valid yet".into(),
            LinkCause::Expired { ours: true } => "it refuses our TLS certificate as expired".into(),
            LinkCause::Revoked { ours: false } => "its TLS certificate is revoked".into(),
            LinkCause::Revoked { ours: true } => "it refuses our TLS certificate as revoked".into(),
            LinkCause::Refused => "connection refused".into(),
            LinkCause::Unreachable => "no answer (host unreachable or timed out)".into(),
            LinkCause::Other => self.detail.clone(),
        }
    }

    /// What the operator should do about it, for a link to `peer`.
    pub fn fix(&self, peer: &Peer) -> String {
        let (title, service) = (peer.title(), peer.service());
        match &self.cause {
            LinkCause::TlsName { expected, .. } => format!(
                "re-enroll the {title} with `{service} enroll --name {expected}` (the address it \
                 is reached at), then restart {service}"
            ),
            LinkCause::WrongRole => format!(
                "another component answers at {}: check that this is the {title}'s address (its \
                 advertised address and the CS's record of it)",
                peer.addr
            ),
            LinkCause::Untrusted { ours: false } => format!(
                "enroll the {title} with this deployment's configuration server \
                 (`{service} enroll`), then restart {service}"
            ),
            LinkCause::Untrusted { ours: true } => format!(
                "enroll this component with the configuration server the {title} belongs to, \
                 then restart it"
            ),
            LinkCause::Expired { ours: false } | LinkCause::Revoked { ours: false } => format!(
                "renew the {title}'s certificate (`{service} enroll` again), then restart {service}"
            ),
            LinkCause::Expired { ours: true } | LinkCause::Revoked { ours: true } => {
                "renew this component's certificate (enroll it again), then restart it".into()
            }
            LinkCause::NotYetValid => format!(
                "check the clocks of this host and the {title}'s host (NTP, `timedatectl`): a \
                 certificate the CS issued is valid from the CS's time"
            ),
            LinkCause::Refused => format!(
                "check that {service} runs on {} and listens on {} (`systemctl status {service}`), \
                 and the firewall",
                peer.host(),
                peer.addr
            ),
            LinkCause::Unreachable => format!(
                "check that {} is up, the network route to it and the firewall (port {})",
                peer.host(),
                peer.addr.rsplit_once(':').map(|(_, p)| p).unwrap_or("?")
            ),
            LinkCause::Other => format!("see this component's log and the {title}'s log"),
        }
    }

    /// The whole sentence: who, what, what to do.
    pub fn message(&self, peer: &Peer) -> String {
        format!(
            "cannot reach {peer}: {}; {}",
            self.what(peer),
            self.fix(peer)
        )
    }
}

#[cfg(test)]
mod tests;
