//! The bench's data profiles: zeros, compressible text-like, random.
//!
//! Replication cost depends on what is written (the process server
//! compresses, the master target journals old blocks), so every churn figure
//! is measured per profile, and the machine-limit figures (zstd) use the same
//! bytes. A profile is a pool of bytes the writers take slices from at
//! random offsets, so consecutive writes differ.

use rebound_lab::Rng;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Zeros,
    Text,
    Random,
}

impl Profile {
    pub const ALL: [Profile; 3] = [Profile::Zeros, Profile::Text, Profile::Random];

    /// The name used in row ids.
    pub fn id(self) -> &'static str {
        match self {
            Profile::Zeros => "zeros",
            Profile::Text => "text",
            Profile::Random => "random",
        }
    }

    /// A pool of `len` bytes of this profile.
    pub fn pool(self, len: usize) -> Vec<u8> {
        match self {
            Profile::Zeros => vec![0u8; len],
            Profile::Text => text(len, 0x7e57),
            Profile::Random => random(len, 0x5eed),
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Profile::Zeros => "zeros",
            Profile::Text => "text-like",
            Profile::Random => "random",
        })
    }
}

/// Incompressible bytes.
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng(seed).fill(&mut v);
    v
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "order",
    "customer",
    "invoice",
    "replica",
    "payment",
    "status",
    "shipped",
    "pending",
    "account",
    "warehouse",
    "quantity",
    "total",
    "update",
    "insert",
    "select",
    "where",
    "value",
    "error",
    "request",
    "response",
    "session",
    "user",
    "timeout",
    "connection",
    "database",
    "table",
    "index",
    "commit",
    "rollback",
    "transaction",
    "record",
    "field",
    "price",
    "amount",
    "address",
    "street",
    "city",
    "country",
    "phone",
    "email",
    "product",
    "category",
    "description",
    "available",
    "delivered",
    "returned",
    "cancelled",
    "approved",
];

/// Text-like bytes: log and table lines of words, numbers and timestamps,
/// which zstd level 1 shrinks about three to four times, like the text and
/// database pages of a typical server disk.
pub fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut v = Vec::with_capacity(len + 256);
    while v.len() < len {
        let ts = 1_790_000_000 + rng.below(10_000_000);
        v.extend_from_slice(
            format!("{ts}.{:03} id={} ", rng.below(1000), rng.below(100_000_000)).as_bytes(),
        );
        for _ in 0..(6 + rng.below(12)) {
            v.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
            v.push(if rng.below(9) == 0 { b',' } else { b' ' });
        }
        v.extend_from_slice(format!("{:.2}\n", rng.below(1_000_000) as f64 / 100.0).as_bytes());
    }
    v.truncate(len);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_compresses_like_text_and_random_does_not() {
        let t = Profile::Text.pool(1 << 20);
        let r = Profile::Random.pool(1 << 20);
        let ct = zstd::bulk::compress(&t, 1).unwrap().len() as f64;
        let cr = zstd::bulk::compress(&r, 1).unwrap().len() as f64;
        let ratio = (1 << 20) as f64 / ct;
        assert!((2.0..8.0).contains(&ratio), "text ratio {ratio}");
        assert!(cr > (1 << 20) as f64 * 0.99);
        assert_eq!(t.len(), 1 << 20);
    }
}
