//! The ticker the CS's periodic tasks (health monitor, verify scheduler,
//! alert evaluation) wake on: a fixed period that does not catch up on
//! missed ticks, ending when the CS stops.

use std::time::Duration;
use tokio::sync::watch;

pub struct Ticker {
    interval: tokio::time::Interval,
    stop: watch::Receiver<bool>,
}

impl Ticker {
    /// Ticks every `every` (the first at once) until `stop` turns true.
    pub fn new(every: Duration, stop: watch::Receiver<bool>) -> Ticker {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticker { interval, stop }
    }

    /// Waits for the next tick; false once the CS stops.
    pub async fn tick(&mut self) -> bool {
        tokio::select! {
            _ = self.interval.tick() => true,
            _ = self.stop.wait_for(|s| *s) => false,
        }
    }
}
