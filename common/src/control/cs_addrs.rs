//! Every address of the configuration server: a deployment on PostgreSQL
//! runs an active CS and one or more standbys, and a standby does not
//! listen until it takes over. Components and the CLI know them all
//! (`[cs] addr` and `standby`, or `--cs A,B`) and dial them in turn: the
//! next one at once when one does not answer, a backoff only after every
//! address failed in a row.

use super::{CsConfig, BACKOFF, BACKOFF_MAX};
use backon::{BackoffBuilder, ExponentialBackoff};
use std::future::Future;
use std::time::Duration;

/// The addresses of a `--cs` value (or `REBOUND_CS`): one `host:port`, or
/// several comma-separated with the active CS first. Blank entries are
/// dropped.
pub fn split_addrs(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect()
}

impl CsConfig {
    /// The `[cs]` section for a `--cs` list: the first address is `addr`,
    /// the others `standby`.
    pub fn from_list(list: &str) -> CsConfig {
        let mut addrs = split_addrs(list).into_iter();
        CsConfig {
            addr: addrs.next().unwrap_or_default(),
            standby: addrs.collect(),
            server_name: String::new(),
        }
    }

    /// Every CS address, `addr` first and then `standby` in order, each
    /// once (blank entries left out).
    pub fn addrs(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::with_capacity(1 + self.standby.len());
        for a in std::iter::once(&self.addr).chain(&self.standby) {
            let a = a.trim();
            if !a.is_empty() && !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }

    /// The name the certificate of the CS at `addr` is checked against:
    /// `server_name` when set (for every address), else the host dialed.
    pub fn server_name_at<'a>(&'a self, addr: &'a str) -> &'a str {
        crate::tls::server_name_for(&self.server_name, addr)
    }
}

/// How [`in_turn`] ended without a result.
#[derive(Debug)]
pub enum Tried<E> {
    /// A CS answered with this error (the addresses after it were not
    /// tried: the deployment's CS spoke).
    Answered(E),
    /// No address answered: each one's error, in the order tried.
    Unreachable(Vec<E>),
}

impl<E> Tried<E> {
    /// One error: the answer, the only failure, or `many` of several.
    pub fn into_error(self, many: impl FnOnce(Vec<E>) -> E) -> E {
        match self {
            Tried::Answered(e) => e,
            Tried::Unreachable(mut v) if v.len() == 1 => v.remove(0),
            Tried::Unreachable(v) => many(v),
        }
    }

    /// [`Tried::into_error`] with several failures made into one error by
    /// `many` of their `describe`d texts joined by "; ".
    pub fn into_error_listing(
        self,
        describe: impl Fn(&E) -> String,
        many: impl FnOnce(String) -> E,
    ) -> E {
        self.into_error(|all| many(all.iter().map(describe).collect::<Vec<_>>().join("; ")))
    }
}

/// Runs `attempt` at each address in turn until one answers: an error for
/// which `unreachable` is true (no connection) moves on to the next address
/// at once; a result or any other error (a CS answered) ends the turn.
pub async fn in_turn<T, E, Fut>(
    addrs: &[String],
    mut attempt: impl FnMut(String) -> Fut,
    unreachable: impl Fn(&E) -> bool,
) -> Result<T, Tried<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut failed = Vec::new();
    for addr in addrs {
        match attempt(addr.clone()).await {
            Ok(t) => return Ok(t),
            Err(e) if unreachable(&e) => failed.push(e),
            Err(e) => return Err(Tried::Answered(e)),
        }
    }
    Err(Tried::Unreachable(failed))
}

/// Which address the control task dials and how long it waits first: it
/// stays on an address that works, moves to the next at once when one
/// fails, and backs off only when a whole round failed.
pub(super) struct Rounds {
    len: usize,
    current: usize,
    /// Failures in a row since the last welcome or backoff.
    failed: usize,
    backoff: ExponentialBackoff,
}

impl Rounds {
    pub(super) fn new(len: usize) -> Rounds {
        Rounds {
            len: len.max(1),
            current: 0,
            failed: 0,
            backoff: BACKOFF.build(),
        }
    }

    /// The index of the address to dial.
    pub(super) fn current(&self) -> usize {
        self.current
    }

    /// The CS at the current address welcomed the component: stay on it,
    /// and start the backoff over.
    pub(super) fn connected(&mut self) {
        self.failed = 0;
        self.backoff = BACKOFF.build();
    }

    /// The CS at the current address answered but refused the component:
    /// stay on it (it is the one serving) and retry later.
    pub(super) fn refused(&mut self) {
        self.failed = 0;
    }

    /// The current address failed (no connection, or the stream broke):
    /// moves to the next one; the wait before dialing it, zero unless this
    /// ended a round of failures.
    pub(super) fn failed(&mut self) -> Duration {
        self.current = (self.current + 1) % self.len;
        self.failed += 1;
        if self.failed < self.len {
            return Duration::ZERO;
        }
        self.failed = 0;
        self.backoff.next().unwrap_or(BACKOFF_MAX)
    }
}
