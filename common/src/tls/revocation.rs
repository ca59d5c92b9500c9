//! The revocation list a server enforces (DESIGN.md §3).
//!
//! The CS is the authority: it pushes the serials of every revoked,
//! unexpired certificate to each PS and MT (`SetRevoked` on the control
//! channel) and holds its own copy. A revoked certificate must be refused
//! within seconds, and a refusal at the next handshake is not enough: a
//! revoked agent may hold an ingest stream open for days. So every accepted
//! TLS connection registers the serial of its client certificate here, and
//! [`Revocations::set`] cancels the connections of every newly revoked
//! serial; the acceptor turns that cancellation into a closed socket, which
//! ends every stream on it.
//!
//! Serials are compared in the one canonical form [`crate::pki::serial_hex`]
//! gives (lower-case hex of the DER integer's value, no leading zero bytes).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Inner {
    revoked: HashSet<String>,
    /// Open connections by client-certificate serial.
    open: HashMap<String, Vec<CancellationToken>>,
}

impl Inner {
    /// Forgets the connections already closed (a connection cancels its
    /// token when it is dropped), so the registry holds only open ones.
    fn prune(&mut self) {
        self.open.retain(|_, tokens| {
            tokens.retain(|t| !t.is_cancelled());
            !tokens.is_empty()
        });
    }
}

/// The shared revocation list and the open connections it can cut. Cheap to
/// clone; all clones share one list.
#[derive(Clone, Default)]
pub struct Revocations {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.lock().revoked.len();
        write!(f, "Revocations({n} revoked)")
    }
}

impl Revocations {
    pub fn new() -> Revocations {
        Revocations::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the certificate with this serial is revoked.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.lock().revoked.contains(serial)
    }

    /// Replaces the list, and cancels every open connection whose client
    /// certificate is now revoked. Returns how many connections were cut.
    pub fn set<I: IntoIterator<Item = String>>(&self, serials: I) -> usize {
        let mut g = self.lock();
        g.revoked = serials.into_iter().collect();
        g.prune();
        let Inner { revoked, open } = &mut *g;
        let mut cut = 0;
        open.retain(|serial, tokens| {
            if revoked.contains(serial) {
                cut += tokens.len();
                tokens.drain(..).for_each(|t| t.cancel());
            }
            !tokens.is_empty()
        });
        cut
    }

    /// How many open connections are registered (closed ones are pruned
    /// first), for tests and status.
    pub fn open_connections(&self) -> usize {
        let mut g = self.lock();
        g.prune();
        g.open.values().map(Vec::len).sum()
    }

    /// The current list, sorted (for persisting and for status).
    pub fn serials(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().revoked.iter().cloned().collect();
        v.sort();
        v
    }

    /// Registers an open connection authenticated by `serial`: the token is
    /// cancelled at once when the serial is already revoked, else when a
    /// later [`set`](Self::set) revokes it.
    pub fn watch(&self, serial: &str, token: CancellationToken) {
        let mut g = self.lock();
        if g.revoked.contains(serial) {
            token.cancel();
            return;
        }
        g.prune();
        g.open.entry(serial.to_string()).or_default().push(token);
    }

    /// Loads a list persisted by [`save`](Self::save) (a PS or MT restarted
    /// before the CS reached it still refuses what was revoked). A missing
    /// file is an empty list.
    pub fn load(path: &Path) -> std::io::Result<Revocations> {
        let r = Revocations::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                r.set(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(str::to_string),
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(r)
    }

    /// Persists the list, one serial per line: written to a temporary file,
    /// fsynced, renamed over `path`, and the directory fsynced.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut text = String::from("# revoked certificate serials, pushed by the CS\n");
        for s in self.serials() {
            text.push_str(&s);
            text.push('\n');
        }
        crate::durable::write_atomic(path, text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoking_a_serial_cuts_its_open_connections_only() {
        let r = Revocations::new();
        let (a, b) = (CancellationToken::new(), CancellationToken::new());
        r.watch("0a", a.clone());
        r.watch("0b", b.clone());
        assert_eq!(r.set(["0a".to_string()]), 1);
        assert!(a.is_cancelled() && !b.is_cancelled());
        assert!(r.is_revoked("0a") && !r.is_revoked("0b"));
        let late = CancellationToken::new();
        r.watch("0a", late.clone());
        assert!(late.is_cancelled(), "a revoked serial is cut on arrival");
    }

    #[test]
    fn closed_connections_leave_the_registry() {
        let r = Revocations::new();
        let tokens: Vec<_> = (0..5).map(|_| CancellationToken::new()).collect();
        for (i, t) in tokens.iter().enumerate() {
            r.watch(&format!("{i:02x}"), t.clone());
        }
        assert_eq!(r.open_connections(), 5);
        tokens.iter().for_each(CancellationToken::cancel);
        r.watch("ff", CancellationToken::new());
        assert_eq!(r.open_connections(), 1, "watch prunes the closed ones");
        assert_eq!(r.set(Vec::new()), 0);
    }

    #[test]
    fn the_list_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked");
        assert!(Revocations::load(&path).unwrap().serials().is_empty());
        let r = Revocations::new();
        r.set(["ff01".to_string(), "0a".to_string()]);
        r.save(&path).unwrap();
        assert_eq!(Revocations::load(&path).unwrap().serials(), ["0a", "ff01"]);
    }
}
