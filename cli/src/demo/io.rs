//! Data-side helpers of `rebound demo`: writes and reads through NBD with
//! Rebound's own NBD client, so the demo needs no NBD tools installed, and
//! blake3 of exports.

use anyhow::{bail, Context, Result};
use rebound_common::nbd::client::NbdClient;

/// Bytes per read when hashing an export: a multiple of every block size
/// an NBD server may demand, well under the maximum payload.
const HASH_CHUNK: usize = 4 << 20;

/// Runs qemu-io-style commands (`write -P PATTERN OFFSET LENGTH`,
/// `write -z OFFSET LENGTH`, `flush`, as [`rebound_lab::random_writes`]
/// makes them) against an NBD URI through Rebound's own NBD client, then
/// flushes, as qemu-io does on close; the bytes written.
pub fn nbd_io(uri: &str, cmds: &[String]) -> Result<u64> {
    let mut c = NbdClient::connect_uri(uri).with_context(|| {
        format!(
            "opening {uri} to write the demo's data: check that the agent serving it is running"
        )
    })?;
    let mut written = 0;
    for cmd in cmds {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let done = match words[..] {
            ["write", "-P", pattern, off, len] => {
                let byte = number(pattern, cmd)?;
                let Ok(byte) = u8::try_from(byte) else {
                    bail!("pattern {pattern} in {cmd:?} is not a byte");
                };
                let data = vec![byte; usize::try_from(number(len, cmd)?)?];
                written += data.len() as u64;
                c.write_at(number(off, cmd)?, &data, false)
            }
            ["write", "-z", off, len] => {
                c.write_zeroes(number(off, cmd)?, number(len, cmd)?, false)
            }
            ["flush"] => c.flush(),
            _ => bail!("{cmd:?} is not a write command the demo knows (write -P, write -z, flush)"),
        };
        done.with_context(|| format!("{cmd:?} on {uri}"))?;
    }
    c.flush()
        .with_context(|| format!("flushing {uri} after the demo's writes"))?;
    c.disconnect()
        .with_context(|| format!("disconnecting from {uri}"))?;
    Ok(written)
}

/// A number as qemu-io writes it: decimal or 0x hex, with an optional
/// k/M/G suffix (powers of 1024).
fn number(word: &str, cmd: &str) -> Result<u64> {
    let (digits, scale) = match word.char_indices().last() {
        Some((i, 'k' | 'K')) => (&word[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&word[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&word[..i], 1 << 30),
        _ => (word, 1),
    };
    let n = match digits.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => digits.parse(),
    };
    n.ok()
        .and_then(|n| n.checked_mul(scale))
        .with_context(|| format!("{word:?} in {cmd:?} is not a number"))
}

/// blake3 of an NBD export, read through Rebound's own NBD client in
/// chunks as it streams.
pub fn hash_export(uri: &str) -> Result<String> {
    let mut c = NbdClient::connect_uri(uri).with_context(|| {
        format!("opening {uri} to hash it: check that the master target serving it is running and lists the point")
    })?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut off = 0u64;
    while off < c.size() {
        let n = (c.size() - off).min(HASH_CHUNK as u64) as usize;
        c.read_at(off, &mut buf[..n])
            .with_context(|| format!("reading {uri} to hash it"))?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    c.disconnect()
        .with_context(|| format!("disconnecting from {uri}"))?;
    Ok(h.finalize().to_hex().to_string())
}
