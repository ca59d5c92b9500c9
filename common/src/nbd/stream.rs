//! One NBD connection over any byte stream, without a listener, TLS or
//! threads: the greeting, option haggling and the transmission phase, in
//! the caller's thread.
//!
//! The listeners in `server` add sockets, timeouts and shutdown around the
//! same three steps. This entry point exists so the protocol parser can be
//! driven from plain buffers: the fuzz targets (crate `rebound-fuzz`) feed
//! it arbitrary client bytes, and an embedder with its own transport can
//! serve a connection it already holds.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::atomic::AtomicBool;

use super::handshake::{self, Haggled, Tls};
use super::{transmission, ExportRegistry};

/// Serves one client whose bytes come from `reader` and whose answers go
/// to `writer`, until it disconnects (`Ok`), breaks the protocol or the
/// stream fails (`Err`). TLS is not offered (NBD_OPT_STARTTLS is refused).
pub fn serve_stream<R: Read, W: Write>(
    reader: R,
    writer: W,
    registry: &dyn ExportRegistry,
    peer: &str,
) -> io::Result<()> {
    let shutdown = AtomicBool::new(false);
    let mut reader = BufReader::new(reader);
    let mut writer = BufWriter::new(writer);
    let flags = handshake::greet(&mut reader, &mut writer, peer)?;
    let haggled = handshake::haggle(
        &mut reader,
        &mut writer,
        flags,
        Tls::NotOffered,
        registry,
        &shutdown,
        peer,
    )?;
    match haggled {
        Haggled::Attached(negotiated) => {
            transmission::serve(&mut reader, &mut writer, &negotiated, peer)?;
        }
        Haggled::StartTls | Haggled::Left => {}
    }
    writer.flush()
}
