//! Scraping a daemon's `/metrics` (being written).
