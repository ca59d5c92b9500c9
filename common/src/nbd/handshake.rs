//! Fixed newstyle option haggling: from the greeting to the chosen export.
//!
//! Separate from the transmission loop because its job is different: it
//! answers option requests (GO, INFO, EXPORT_NAME, LIST, ABORT, STARTTLS),
//! refuses every other option with NBD_REP_ERR_UNSUP so the client can go
//! on, and hands the transmission loop an opened [`BlockDevice`].
//!
//! On a server that requires TLS, everything but STARTTLS and ABORT before
//! the upgrade is refused with NBD_REP_ERR_TLS_REQD (EXPORT_NAME, which
//! cannot carry an error, closes the connection), as proto.md's "forced
//! TLS" mode says; after STARTTLS the caller upgrades the stream and
//! haggling goes on with the client's certificate identity, which the
//! registry uses to decide what it lists and opens.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::{debug, info, warn};

use super::proto::*;
use super::{
    BlockDevice, ExportRegistry, NbdError, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE,
};
use crate::pki::PeerIdentity;

/// Option data larger than this is treated as a denial of service and the
/// connection is closed (the largest legitimate option is a GO with a
/// 4 KiB name and a handful of info requests).
const MAX_OPTION_LEN: u32 = 1 << 20;

/// The refusal a client sees for an option it sends before STARTTLS to a
/// server that requires TLS.
pub(crate) const TLS_REQUIRED: &str = "this NBD server requires TLS: start it with NBD_OPT_STARTTLS and present a client certificate from the deployment's CA (nbdcopy/nbdinfo: nbds://HOST:PORT/EXPORT?tls-certificates=DIR; qemu: --object tls-creds-x509,dir=DIR,endpoint=client; DIR holds ca-cert.pem, client-cert.pem, client-key.pem)";

/// Where a connection stands with TLS.
#[derive(Clone, Copy)]
pub(crate) enum Tls<'a> {
    /// This server does not offer TLS (STARTTLS is unsupported); the
    /// transport is the boundary (e.g. a unix socket only its owner opens).
    NotOffered,
    /// TLS is required and not started yet.
    Required,
    /// TLS is up, with this client certificate's identity.
    Established(&'a PeerIdentity),
}

impl Tls<'_> {
    fn client(&self) -> Option<&PeerIdentity> {
        match self {
            Tls::Established(who) => Some(who),
            _ => None,
        }
    }
}

/// The client's handshake flags, from the greeting.
#[derive(Clone, Copy)]
pub(crate) struct ClientFlags {
    fixed: bool,
    no_zeroes: bool,
}

/// How option haggling ended.
pub(crate) enum Haggled {
    /// An export is chosen: the transmission phase starts.
    Attached(Negotiated),
    /// The client asked for TLS and got the ACK: the caller runs the TLS
    /// handshake on the stream and haggles again over it.
    StartTls,
    /// The client aborted or left.
    Left,
}

/// The outcome of a successful handshake.
pub(crate) struct Negotiated {
    /// The export name as resolved (the default export for an empty name).
    pub name: String,
    pub device: Arc<dyn BlockDevice>,
}

fn protocol_error(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn read_u32<R: Read>(r: &mut R) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64<R: Read>(r: &mut R) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Sends one option reply (header and data).
fn reply<W: Write>(w: &mut W, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut hdr = [0u8; 20];
    hdr[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    hdr[8..12].copy_from_slice(&opt.to_be_bytes());
    hdr[12..16].copy_from_slice(&kind.to_be_bytes());
    let len = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "option reply too long"))?;
    hdr[16..20].copy_from_slice(&len.to_be_bytes());
    w.write_all(&hdr)?;
    w.write_all(data)
}

/// Sends an error reply with a message the client can show, then flushes.
fn reply_err<W: Write>(w: &mut W, opt: u32, kind: u32, msg: &str) -> io::Result<()> {
    let mut end = msg.len().min(MAX_STRING_LEN);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    reply(w, opt, kind, &msg.as_bytes()[..end])?;
    w.flush()
}

/// Runs option haggling on a server without TLS. `Ok(None)` means the
/// client aborted or left; `Err` covers IO errors and protocol violations
/// (the caller closes).
#[cfg(test)]
pub(crate) fn negotiate<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    registry: &dyn ExportRegistry,
    shutdown: &AtomicBool,
    peer: &str,
) -> io::Result<Option<Negotiated>> {
    let flags = greet(r, w, peer)?;
    match haggle(r, w, flags, Tls::NotOffered, registry, shutdown, peer)? {
        Haggled::Attached(n) => Ok(Some(n)),
        Haggled::StartTls | Haggled::Left => Ok(None),
    }
}

/// Sends the server greeting and reads the client's flags.
pub(crate) fn greet<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    peer: &str,
) -> io::Result<ClientFlags> {
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    w.flush()?;

    let client_flags = read_u32(r)?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        warn!(
            peer,
            client_flags, "NBD client sent unknown handshake flags; closing"
        );
        return Err(protocol_error(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    Ok(ClientFlags {
        fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// Answers options until the client picks an export, asks for TLS, or
/// leaves. `Err` covers IO errors and protocol violations (the caller
/// closes).
pub(crate) fn haggle<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    flags: ClientFlags,
    tls: Tls<'_>,
    registry: &dyn ExportRegistry,
    shutdown: &AtomicBool,
    peer: &str,
) -> io::Result<Haggled> {
    let ClientFlags { fixed, no_zeroes } = flags;
    let client = tls.client();
    loop {
        let magic = read_u64(r)?;
        if magic != IHAVEOPT {
            warn!(
                peer,
                magic = format_args!("{magic:#x}"),
                "NBD client sent a bad option magic; closing"
            );
            return Err(protocol_error(format!("bad option magic {magic:#x}")));
        }
        let opt = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION_LEN {
            warn!(
                peer,
                option = option_name(opt),
                len,
                "NBD option data too long; closing"
            );
            return Err(protocol_error(format!(
                "option {opt} with {len} bytes of data"
            )));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        debug!(peer, option = option_name(opt), len, "NBD option");

        if !fixed && opt != OPT_EXPORT_NAME {
            // A plain newstyle client cannot parse option replies.
            warn!(
                peer,
                option = option_name(opt),
                "NBD client without fixed newstyle sent an option other than EXPORT_NAME; closing"
            );
            return Err(protocol_error("option without fixed newstyle".to_string()));
        }
        if shutdown.load(Ordering::SeqCst) && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Err(protocol_error("server shutting down".to_string()));
            }
            reply_err(w, opt, REP_ERR_SHUTDOWN, "the NBD server is shutting down")?;
            continue;
        }

        if matches!(tls, Tls::Required) {
            match opt {
                OPT_STARTTLS => {
                    if !data.is_empty() {
                        reply_err(w, opt, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")?;
                        continue;
                    }
                    reply(w, opt, REP_ACK, &[])?;
                    w.flush()?;
                    return Ok(Haggled::StartTls);
                }
                OPT_ABORT => {}
                OPT_EXPORT_NAME => {
                    warn!(peer, "NBD client asked for an export without TLS on a server that requires it; closing (EXPORT_NAME cannot report errors)");
                    return Err(protocol_error(format!(
                        "EXPORT_NAME before STARTTLS: {TLS_REQUIRED}"
                    )));
                }
                _ => {
                    info!(
                        peer,
                        option = option_name(opt),
                        "NBD option before STARTTLS refused: TLS is required"
                    );
                    reply_err(w, opt, REP_ERR_TLS_REQD, TLS_REQUIRED)?;
                    continue;
                }
            }
        }

        match opt {
            OPT_STARTTLS if matches!(tls, Tls::Established(_)) => {
                reply_err(
                    w,
                    opt,
                    REP_ERR_INVALID,
                    "TLS is already started on this connection",
                )?;
            }
            OPT_EXPORT_NAME => {
                let Ok(requested) = String::from_utf8(data) else {
                    warn!(peer, "NBD EXPORT_NAME is not UTF-8; closing");
                    return Err(protocol_error("export name is not UTF-8".to_string()));
                };
                let (name, device) = match open_export(registry, &requested, client) {
                    Ok(x) => x,
                    Err((_, e)) => {
                        warn!(peer, export = %requested, error = %e, "NBD client asked for an export that cannot be opened; closing (EXPORT_NAME cannot report errors)");
                        return Err(protocol_error(format!("export {requested:?}: {e}")));
                    }
                };
                let flags = transmission_flags(&*device);
                w.write_all(&device.size().to_be_bytes())?;
                w.write_all(&flags.to_be_bytes())?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124])?;
                }
                w.flush()?;
                info!(peer, export = %name, size = device.size(), read_only = device.read_only(), "NBD client attached (EXPORT_NAME)");
                return Ok(Haggled::Attached(Negotiated { name, device }));
            }
            OPT_ABORT => {
                // The client may already have closed; a failed ACK is fine.
                let _ = reply(w, opt, REP_ACK, &[]).and_then(|()| w.flush());
                return Ok(Haggled::Left);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_err(w, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for name in registry.list_for(client) {
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    reply(w, opt, REP_SERVER, &d)?;
                }
                reply(w, opt, REP_ACK, &[])?;
                w.flush()?;
            }
            OPT_INFO | OPT_GO => {
                let (requested, infos) = match parse_info_request(&data) {
                    Ok(x) => x,
                    Err(msg) => {
                        warn!(peer, option = option_name(opt), reason = %msg, "malformed NBD option");
                        reply_err(w, opt, REP_ERR_INVALID, &msg)?;
                        continue;
                    }
                };
                let (name, device) = match open_export(registry, &requested, client) {
                    Ok(x) => x,
                    Err((kind, e)) => {
                        warn!(peer, export = %requested, error = %e, "NBD client asked for an export that cannot be opened");
                        reply_err(w, opt, kind, &e.message)?;
                        continue;
                    }
                };
                send_info(w, opt, &name, &*device, &infos)?;
                reply(w, opt, REP_ACK, &[])?;
                w.flush()?;
                if opt == OPT_GO {
                    info!(peer, export = %name, size = device.size(), read_only = device.read_only(), "NBD client attached");
                    return Ok(Haggled::Attached(Negotiated { name, device }));
                }
            }
            _ => {
                let msg = format!(
                    "option {} ({opt}) is not supported by this server",
                    option_name(opt)
                );
                reply_err(w, opt, REP_ERR_UNSUP, &msg)?;
            }
        }
    }
}

/// Transmission flags for a device.
pub(crate) fn transmission_flags(device: &dyn BlockDevice) -> u16 {
    let mut flags =
        FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    if device.read_only() {
        flags |= FLAG_READ_ONLY;
    }
    flags
}

/// Resolves the empty name to the default export and opens it. On failure
/// returns the option error to send with the registry's error.
fn open_export(
    registry: &dyn ExportRegistry,
    requested: &str,
    client: Option<&PeerIdentity>,
) -> Result<(String, Arc<dyn BlockDevice>), (u32, NbdError)> {
    let name = if requested.is_empty() {
        match registry.list_for(client).into_iter().next() {
            Some(n) => n,
            None => {
                return Err((
                    REP_ERR_UNKNOWN,
                    NbdError::einval("this server has no exports"),
                ))
            }
        }
    } else {
        requested.to_string()
    };
    match registry.open_for(&name, client) {
        Ok(dev) => Ok((name, dev)),
        Err(e) => {
            let kind = match e.errno {
                EPERM => REP_ERR_POLICY,
                ESHUTDOWN => REP_ERR_SHUTDOWN,
                _ => REP_ERR_UNKNOWN,
            };
            Err((kind, e))
        }
    }
}

/// Parses NBD_OPT_INFO / NBD_OPT_GO data: name length, name, count of
/// info requests, the requests.
fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), String> {
    let too_short = || format!("option data of {} bytes is too short", data.len());
    let name_len = data
        .get(0..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(too_short)?;
    if name_len > MAX_STRING_LEN {
        return Err(format!("export name of {name_len} bytes is too long"));
    }
    let name_bytes = data.get(4..4 + name_len).ok_or_else(too_short)?;
    let name = std::str::from_utf8(name_bytes)
        .map_err(|_| "export name is not UTF-8".to_string())?
        .to_string();
    let rest = &data[4 + name_len..];
    let count = rest
        .get(0..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
        .ok_or_else(too_short)?;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return Err(format!(
            "{count} information requests announced but {} bytes follow",
            list.len()
        ));
    }
    let infos = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok((name, infos))
}

/// Sends NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE always, NBD_INFO_NAME when
/// asked; other information requests are ignored, as the protocol allows.
fn send_info<W: Write>(
    w: &mut W,
    opt: u32,
    name: &str,
    device: &dyn BlockDevice,
    infos: &[u16],
) -> io::Result<()> {
    let mut export = Vec::with_capacity(12);
    export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    export.extend_from_slice(&device.size().to_be_bytes());
    export.extend_from_slice(&transmission_flags(device).to_be_bytes());
    reply(w, opt, REP_INFO, &export)?;

    let mut bs = Vec::with_capacity(14);
    bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    bs.extend_from_slice(&MIN_BLOCK_SIZE.to_be_bytes());
    bs.extend_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
    bs.extend_from_slice(&MAX_BLOCK_SIZE.to_be_bytes());
    reply(w, opt, REP_INFO, &bs)?;

    if infos.contains(&INFO_NAME) {
        let mut d = Vec::with_capacity(2 + name.len());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        reply(w, opt, REP_INFO, &d)?;
    }
    Ok(())
}

#[cfg(test)]
mod unit {
    use super::parse_info_request;

    #[test]
    fn info_request_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_info_request(&d), Ok(("abc".to_string(), vec![1, 3])));
        // Every truncation is an error, never a panic.
        for cut in 0..d.len() {
            assert!(parse_info_request(&d[..cut]).is_err(), "cut at {cut}");
        }
        // Trailing garbage is an error too.
        d.push(0);
        assert!(parse_info_request(&d).is_err());
        // A name length that would overflow the buffer.
        let mut big = u32::MAX.to_be_bytes().to_vec();
        big.extend_from_slice(&[0, 0]);
        assert!(parse_info_request(&big).is_err());
    }
}
