//! The write hold: new writes wait before the ordering point while a
//! consistency-group barrier or an app tag is in force (DESIGN.md §5
//! "Tags", §8 group tags). Writes already past the ordering point finish,
//! so the tag cut under the hold is a prefix of acknowledged writes.

use std::sync::{Condvar, Mutex};

/// The token of the hold in force, and the writers waiting for its release.
#[derive(Default)]
pub struct WriteHold {
    token: Mutex<Option<String>>,
    released: Condvar,
}

impl WriteHold {
    /// Blocks while a hold is in force.
    pub(super) fn wait(&self) {
        let mut h = self.token.lock().unwrap_or_else(|p| p.into_inner());
        while h.is_some() {
            h = self.released.wait(h).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Holds new writes under `token`. False when another hold is in force.
    pub fn hold(&self, token: &str) -> bool {
        let mut h = self.token.lock().unwrap_or_else(|p| p.into_inner());
        match h.as_deref() {
            Some(t) => t == token,
            None => {
                *h = Some(token.to_string());
                true
            }
        }
    }

    /// Releases the hold `token` (false when that hold is not in force).
    pub fn release(&self, token: &str) -> bool {
        let mut h = self.token.lock().unwrap_or_else(|p| p.into_inner());
        if h.as_deref() == Some(token) {
            *h = None;
            self.released.notify_all();
            true
        } else {
            false
        }
    }

    /// The token of the hold in force.
    pub fn held_by(&self) -> Option<String> {
        self.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
