//! A loopback webhook receiver for the CS's alerts (being written).
