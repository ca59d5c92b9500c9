//! A Prometheus stand-in for runs with metrics on: scrapes every daemon's
//! `/metrics` once a second, with the same HTTP client and text parser the
//! tests use ([`rebound_lab::metrics::scrape`]), while the lab is measured,
//! so the figures include what serving scrapes costs the daemons. A real
//! Prometheus scrapes every 15 s; 1 s makes the cost visible.
//!
//! A failed scrape is counted, not an error: the RTO section stops and
//! restarts daemons while the scraper runs.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Time between two rounds of scrapes.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// What a scraper did while it ran.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Scrapes {
    pub ok: u64,
    pub failed: u64,
    /// Mean time of a successful scrape (request and parse), seconds.
    pub mean_secs: f64,
}

/// The scraping thread; stops when dropped.
pub struct Scraper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Scrapes>>,
}

impl Scraper {
    /// Starts scraping `targets` every [`INTERVAL`].
    pub fn start(targets: Vec<SocketAddr>) -> std::io::Result<Scraper> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics-scraper".into())
            .spawn(move || scrape_until(&targets, &flag))?;
        Ok(Scraper {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops scraping and says how it went.
    pub fn stop(mut self) -> Scrapes {
        self.finish()
    }

    fn finish(&mut self) -> Scrapes {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.finish();
    }
}

fn scrape_until(targets: &[SocketAddr], stop: &AtomicBool) -> Scrapes {
    let mut s = Scrapes::default();
    let mut spent = 0.0;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        for &addr in targets {
            let t = Instant::now();
            match rebound_lab::metrics::scrape(addr) {
                Ok(_) => {
                    s.ok += 1;
                    spent += t.elapsed().as_secs_f64();
                }
                Err(_) => s.failed += 1,
            }
        }
        next += INTERVAL;
        // Sleep in short steps so that stopping is prompt.
        while !stop.load(Ordering::Relaxed) && Instant::now() < next {
            std::thread::sleep(
                Duration::from_millis(50).min(next.saturating_duration_since(Instant::now())),
            );
        }
    }
    s.mean_secs = spent / s.ok.max(1) as f64;
    s
}
