//! A small synchronous NBD client: one export, one request at a time.
//!
//! Rebound's own tools (the demo, tests) write and read disks through the
//! agent's and the master target's NBD exports; with this client they need
//! no external NBD tools. It speaks the fixed newstyle handshake, picks the
//! export with NBD_OPT_GO (NBD_OPT_EXPORT_NAME only when the server does not
//! know GO), honours the export size, the read-only flag and the server's
//! block size constraints, and uses simple replies only. Reads and writes
//! longer than the server's maximum payload are split into several
//! requests; every reply's cookie is checked against its request's.
//!
//! After a broken connection or a reply that does not fit the protocol the
//! client refuses further requests ([`ClientError::Broken`]): the stream
//! can no longer be trusted to be in step. An error the server reports for
//! one request ([`ClientError::Server`]) leaves the connection usable.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::proto::*;
pub use super::uri::Endpoint;

/// How long one reply may take before the request fails.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest option reply accepted during the handshake; option replies
/// are a few bytes, so anything bigger is not an NBD server.
const MAX_OPTION_REPLY: u32 = 1 << 20;
/// The maximum payload when the server does not advertise one (proto.md:
/// servers support at least 32 MiB).
const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;
/// TRIM and WRITE_ZEROES carry no payload, so they are split at this length
/// rather than at the maximum payload.
const MAX_EFFECT_LEN: u64 = 1 << 30;
/// Oldstyle servers send this where newstyle ones send IHAVEOPT.
const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Simple replies are the only ones a client that never asked for
/// structured replies may receive; this one means the server sent another.
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// What went wrong, with the export and the request it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URI is not one [`Endpoint::parse_uri`] understands.
    #[error("NBD URI {uri:?} is not usable: {reason}")]
    InvalidUri { uri: String, reason: &'static str },
    /// No connection could be made.
    #[error("cannot connect to the NBD server at {endpoint} (is it running and listening there?): {source}")]
    Connect {
        endpoint: Endpoint,
        #[source]
        source: io::Error,
    },
    /// The peer's greeting is not a fixed newstyle NBD server's.
    #[error("the server at {endpoint} is not a fixed newstyle NBD server: {detail}")]
    NotNbd {
        endpoint: Endpoint,
        detail: &'static str,
    },
    /// STARTTLS was refused or the TLS handshake failed.
    #[error("cannot start TLS with the NBD server at {endpoint}: {reason}")]
    Tls { endpoint: Endpoint, reason: String },
    /// The server refused the export (unknown name, policy, shutting down).
    #[error("the NBD server refused export {export:?} ({kind}): {message}")]
    Refused {
        export: String,
        kind: &'static str,
        message: String,
    },
    /// A handshake or reply broke the protocol.
    #[error("the NBD server broke the protocol on export {export:?}: {detail}")]
    Protocol {
        export: String,
        detail: &'static str,
    },
    /// The request does not fit the export.
    #[error(
        "{command} of {len} bytes at offset {offset} is outside export {export:?} of {size} bytes"
    )]
    OutOfRange {
        export: String,
        command: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// The request breaks the server's minimum block size.
    #[error("{command} of {len} bytes at offset {offset} on export {export:?} is not aligned to its {min_block}-byte blocks")]
    Misaligned {
        export: String,
        command: &'static str,
        offset: u64,
        len: u64,
        min_block: u32,
    },
    /// The export does not allow this command (read-only, no flush, ...).
    #[error("export {export:?} does not support {command}")]
    Unsupported {
        export: String,
        command: &'static str,
    },
    /// The server answered the request with an error.
    #[error("{command} of {len} bytes at offset {offset} on export {export:?} failed on the server: {errno_name} ({errno})")]
    Server {
        export: String,
        command: &'static str,
        offset: u64,
        len: u64,
        errno: u32,
        errno_name: &'static str,
    },
    /// The connection failed during the handshake or the disconnect.
    #[error("NBD connection for export {export:?} failed during {during}: {source}")]
    Io {
        export: String,
        during: &'static str,
        #[source]
        source: io::Error,
    },
    /// The connection failed while a request was under way.
    #[error("NBD connection for export {export:?} failed during {command} of {len} bytes at offset {offset}: {source}")]
    RequestIo {
        export: String,
        command: &'static str,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    /// An earlier failure left the stream out of step; reconnect.
    #[error(
        "the NBD connection for export {export:?} is unusable after an earlier failure; reconnect"
    )]
    Broken { export: String },
}

/// The server's block size constraints (NBD_INFO_BLOCK_SIZE, or defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Offsets and lengths of requests are multiples of this.
    pub minimum: u32,
    /// The size the server handles best.
    pub preferred: u32,
    /// The largest READ or WRITE payload.
    pub max_payload: u32,
}

/// A connected socket of either kind.
trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

fn open(endpoint: &Endpoint) -> io::Result<Box<dyn Conn>> {
    Ok(match endpoint {
        Endpoint::Tcp(addr) | Endpoint::Tls { addr, .. } => {
            let s = TcpStream::connect(addr.as_str())?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Box::new(s)
        }
        Endpoint::Unix(path) => {
            let s = UnixStream::connect(path)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Box::new(s)
        }
    })
}

/// One connection to one export.
pub struct NbdClient {
    stream: Box<dyn Conn>,
    export: String,
    size: u64,
    flags: u16,
    blocks: BlockSizes,
    next_cookie: u64,
    broken: bool,
}

/// The export as the handshake described it.
struct Attached {
    size: u64,
    flags: u16,
    blocks: Option<BlockSizes>,
}

impl NbdClient {
    /// Connects to `export` at an NBD URI (see [`Endpoint::parse_uri`]).
    pub fn connect_uri(uri: &str) -> Result<NbdClient, ClientError> {
        let (endpoint, export) = Endpoint::parse_uri(uri)?;
        Self::connect(&endpoint, &export)
    }

    /// Connects to `endpoint` and attaches to `export` (the empty name is
    /// the server's default export).
    pub fn connect(endpoint: &Endpoint, export: &str) -> Result<NbdClient, ClientError> {
        let stream = open(endpoint).map_err(|source| ClientError::Connect {
            endpoint: endpoint.clone(),
            source,
        })?;
        let mut c = NbdClient {
            stream,
            export: export.to_string(),
            size: 0,
            flags: 0,
            blocks: BlockSizes {
                minimum: 1,
                preferred: 4096,
                max_payload: DEFAULT_MAX_PAYLOAD,
            },
            next_cookie: 1,
            // Not in the transmission phase until the handshake ends, so a
            // failed handshake must not send NBD_CMD_DISC on drop.
            broken: true,
        };
        let attached = c.handshake(endpoint)?;
        c.broken = false;
        c.size = attached.size;
        c.flags = attached.flags;
        if let Some(b) = attached.blocks {
            c.blocks = b;
        }
        Ok(c)
    }

    /// The export's name as asked for.
    pub fn export(&self) -> &str {
        &self.export
    }
    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// True when the server refuses writes to this export.
    pub fn read_only(&self) -> bool {
        self.flags & FLAG_READ_ONLY != 0
    }
    /// The block size constraints requests are held to.
    pub fn block_sizes(&self) -> BlockSizes {
        self.blocks
    }

    /// Fills `buf` with the bytes at `offset`, in requests of at most the
    /// maximum payload.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        self.check("READ", offset, buf.len() as u64)?;
        let step = self.payload_step();
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(step);
            let part = &mut buf[done..done + n];
            self.request(CMD_READ, 0, offset + done as u64, n as u64, &[], part)?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset`, in requests of at most the maximum
    /// payload. With `fua` every part is durable when this returns (FUA,
    /// or a FLUSH after the writes when the server has no FUA).
    pub fn write_at(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        self.check_writable("WRITE")?;
        self.check("WRITE", offset, data.len() as u64)?;
        let wire_fua = fua && self.flags & FLAG_SEND_FUA != 0;
        let flags = if wire_fua { CMD_FLAG_FUA } else { 0 };
        let step = self.payload_step();
        let mut done = 0usize;
        while done < data.len() {
            let n = (data.len() - done).min(step);
            let part = &data[done..done + n];
            self.request(
                CMD_WRITE,
                flags,
                offset + done as u64,
                n as u64,
                part,
                &mut [],
            )?;
            done += n;
        }
        if fua && !wire_fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes every write acknowledged so far durable.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        if self.flags & FLAG_SEND_FLUSH == 0 {
            return Err(self.unsupported("FLUSH"));
        }
        self.request(CMD_FLUSH, 0, 0, 0, &[], &mut [])
    }

    /// Tells the server `len` bytes at `offset` are no longer needed.
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.effect(CMD_TRIM, FLAG_SEND_TRIM, "TRIM", offset, len, false)
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, fua: bool) -> Result<(), ClientError> {
        self.effect(
            CMD_WRITE_ZEROES,
            FLAG_SEND_WRITE_ZEROES,
            "WRITE_ZEROES",
            offset,
            len,
            fua,
        )
    }

    /// Sends NBD_CMD_DISC and closes the connection. Dropping the client
    /// does the same without reporting errors.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.send_disc()
    }

    fn send_disc(&mut self) -> Result<(), ClientError> {
        if self.broken {
            return Err(self.broken_err());
        }
        self.broken = true;
        let cookie = self.cookie();
        let hdr = Request::new(CMD_DISC, 0, cookie, 0, 0).encode();
        self.stream
            .write_all(&hdr)
            .and_then(|()| self.stream.flush())
            .map_err(|source| self.io_err("DISC", source))
    }

    /// TRIM and WRITE_ZEROES: commands without payload or reply data.
    fn effect(
        &mut self,
        cmd: u16,
        needs: u16,
        name: &'static str,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), ClientError> {
        self.check_writable(name)?;
        if self.flags & needs == 0 {
            return Err(self.unsupported(name));
        }
        self.check(name, offset, len)?;
        let wire_fua = fua && self.flags & FLAG_SEND_FUA != 0;
        let flags = if wire_fua { CMD_FLAG_FUA } else { 0 };
        let step = MAX_EFFECT_LEN - MAX_EFFECT_LEN % u64::from(self.blocks.minimum);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(step);
            self.request(cmd, flags, offset + done, n, &[], &mut [])?;
            done += n;
        }
        if fua && !wire_fua {
            self.flush()?;
        }
        Ok(())
    }

    /// The largest READ/WRITE part: the maximum payload, in whole blocks.
    fn payload_step(&self) -> usize {
        let min = self.blocks.minimum.max(1);
        let step = self.blocks.max_payload - self.blocks.max_payload % min;
        step.max(min) as usize
    }

    /// Range and alignment of a request against the export.
    fn check(&self, command: &'static str, offset: u64, len: u64) -> Result<(), ClientError> {
        if self.broken {
            return Err(self.broken_err());
        }
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.size) {
            return Err(ClientError::OutOfRange {
                export: self.export.clone(),
                command,
                offset,
                len,
                size: self.size,
            });
        }
        let min = u64::from(self.blocks.minimum);
        let tail = end == Some(self.size);
        if !offset.is_multiple_of(min) || (!len.is_multiple_of(min) && !tail) {
            return Err(ClientError::Misaligned {
                export: self.export.clone(),
                command,
                offset,
                len,
                min_block: self.blocks.minimum,
            });
        }
        Ok(())
    }

    fn check_writable(&self, command: &'static str) -> Result<(), ClientError> {
        if self.read_only() {
            return Err(self.unsupported(command));
        }
        Ok(())
    }

    fn unsupported(&self, command: &'static str) -> ClientError {
        ClientError::Unsupported {
            export: self.export.clone(),
            command,
        }
    }

    fn broken_err(&self) -> ClientError {
        ClientError::Broken {
            export: self.export.clone(),
        }
    }

    fn io_err(&self, during: &'static str, source: io::Error) -> ClientError {
        ClientError::Io {
            export: self.export.clone(),
            during,
            source,
        }
    }

    fn protocol(&mut self, detail: &'static str) -> ClientError {
        self.broken = true;
        ClientError::Protocol {
            export: self.export.clone(),
            detail,
        }
    }

    fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        c
    }

    /// One request and its simple reply. `payload` goes after the header
    /// (WRITE); `into` receives the reply data (READ).
    fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
        into: &mut [u8],
    ) -> Result<(), ClientError> {
        let name = command_name(cmd);
        let Ok(len32) = u32::try_from(len) else {
            return Err(self.protocol("a request longer than 4 GiB was about to be sent"));
        };
        let cookie = self.cookie();
        let hdr = Request::new(cmd, flags, cookie, offset, len32).encode();
        let sent = self
            .stream
            .write_all(&hdr)
            .and_then(|()| self.stream.write_all(payload))
            .and_then(|()| self.stream.flush());
        let request_io = |this: &mut Self, source| {
            this.broken = true;
            ClientError::RequestIo {
                export: this.export.clone(),
                command: name,
                offset,
                len,
                source,
            }
        };
        if let Err(e) = sent {
            return Err(request_io(self, e));
        }
        let mut reply = [0u8; 16];
        if let Err(e) = self.stream.read_exact(&mut reply) {
            return Err(request_io(self, e));
        }
        let magic = be_u32(&reply[0..4]);
        let errno = be_u32(&reply[4..8]);
        let got = be_u64(&reply[8..16]);
        if magic == STRUCTURED_REPLY_MAGIC {
            return Err(self.protocol("a structured reply, which was never negotiated"));
        }
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(self.protocol("a reply with a bad magic"));
        }
        if got != cookie {
            return Err(self.protocol("a reply whose cookie is not the request's"));
        }
        if errno != 0 {
            return Err(ClientError::Server {
                export: self.export.clone(),
                command: name,
                offset,
                len,
                errno,
                errno_name: errno_name(errno),
            });
        }
        if let Err(e) = self.stream.read_exact(into) {
            return Err(request_io(self, e));
        }
        Ok(())
    }

    /// Greeting and option haggling up to the transmission phase.
    fn handshake(&mut self, endpoint: &Endpoint) -> Result<Attached, ClientError> {
        let not_nbd = |detail| ClientError::NotNbd {
            endpoint: endpoint.clone(),
            detail,
        };
        let mut greeting = [0u8; 18];
        self.stream
            .read_exact(&mut greeting[..16])
            .map_err(|e| self.io_err("the greeting", e))?;
        if be_u64(&greeting[0..8]) != NBDMAGIC {
            return Err(not_nbd("its greeting does not start with NBDMAGIC"));
        }
        match be_u64(&greeting[8..16]) {
            IHAVEOPT => {}
            CLISERV_MAGIC => return Err(not_nbd("it speaks the oldstyle handshake")),
            _ => return Err(not_nbd("its greeting has an unknown magic")),
        }
        self.stream
            .read_exact(&mut greeting[16..18])
            .map_err(|e| self.io_err("the greeting", e))?;
        let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(not_nbd("it does not offer fixed newstyle"));
        }
        let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        self.send_all(&client_flags.to_be_bytes(), "the greeting")?;
        if let Endpoint::Tls { addr, certificates } = endpoint {
            self.start_tls(endpoint, addr, certificates)?;
        }

        match self.go()? {
            Some(a) => Ok(a),
            None => self.export_name(no_zeroes),
        }
    }

    /// NBD_OPT_STARTTLS, then the TLS handshake; every later byte goes
    /// over TLS.
    fn start_tls(
        &mut self,
        endpoint: &Endpoint,
        addr: &str,
        certificates: &std::path::Path,
    ) -> Result<(), ClientError> {
        let refused = |reason: String| ClientError::Tls {
            endpoint: endpoint.clone(),
            reason,
        };
        self.send_option(OPT_STARTTLS, &[])?;
        let (kind, reply) = self.option_reply(OPT_STARTTLS)?;
        if kind != REP_ACK {
            self.broken = true;
            let message = String::from_utf8_lossy(&reply);
            return Err(refused(format!("{}: {message}", option_error_name(kind))));
        }
        let plain = std::mem::replace(&mut self.stream, Box::new(io::empty()));
        let tls = super::tls::client_upgrade(plain, addr, certificates)
            .map_err(|e| refused(crate::tls::error_chain(&e)))?;
        self.stream = Box::new(tls);
        Ok(())
    }

    /// NBD_OPT_GO asking for the block size; `None` if the server does not
    /// know GO.
    fn go(&mut self) -> Result<Option<Attached>, ClientError> {
        let name = self.export.clone();
        if name.len() > MAX_STRING_LEN {
            return Err(self.protocol("the export name is longer than 4096 bytes"));
        }
        let mut data = Vec::with_capacity(8 + name.len());
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &data)?;

        let mut export = None;
        let mut blocks = None;
        loop {
            let (kind, reply) = self.option_reply(OPT_GO)?;
            match kind {
                REP_ACK => {
                    let Some((size, flags)) = export else {
                        return Err(self.protocol("GO was acknowledged without NBD_INFO_EXPORT"));
                    };
                    return Ok(Some(Attached {
                        size,
                        flags,
                        blocks,
                    }));
                }
                REP_INFO => match reply.get(0..2).map(be_u16) {
                    Some(INFO_EXPORT) if reply.len() == 12 => {
                        export = Some((be_u64(&reply[2..10]), be_u16(&reply[10..12])));
                    }
                    Some(INFO_BLOCK_SIZE) if reply.len() == 14 => {
                        blocks = Some(self.block_sizes_from(&reply[2..14])?);
                    }
                    Some(INFO_EXPORT | INFO_BLOCK_SIZE) | None => {
                        return Err(self.protocol("an NBD_REP_INFO of the wrong length"));
                    }
                    Some(_) => {}
                },
                REP_ERR_UNSUP => return Ok(None),
                k if k & 0x8000_0000 != 0 => {
                    let message = String::from_utf8_lossy(&reply).into_owned();
                    self.broken = true;
                    return Err(ClientError::Refused {
                        export: name,
                        kind: option_error_name(k),
                        message,
                    });
                }
                _ => return Err(self.protocol("an unexpected reply to NBD_OPT_GO")),
            }
        }
    }

    /// NBD_OPT_EXPORT_NAME, for servers without GO. A refused name makes
    /// the server close the connection, so that shows as an IO error.
    fn export_name(&mut self, no_zeroes: bool) -> Result<Attached, ClientError> {
        let name = self.export.clone();
        self.send_option(OPT_EXPORT_NAME, name.as_bytes())?;
        let mut b = [0u8; 10 + 124];
        let n = if no_zeroes { 10 } else { b.len() };
        self.stream.read_exact(&mut b[..n]).map_err(|e| {
            self.io_err(
                "NBD_OPT_EXPORT_NAME (the server may not know the export)",
                e,
            )
        })?;
        Ok(Attached {
            size: be_u64(&b[0..8]),
            flags: be_u16(&b[8..10]),
            blocks: None,
        })
    }

    fn block_sizes_from(&mut self, b: &[u8]) -> Result<BlockSizes, ClientError> {
        let s = BlockSizes {
            minimum: be_u32(&b[0..4]),
            preferred: be_u32(&b[4..8]),
            max_payload: be_u32(&b[8..12]),
        };
        let sane = s.minimum.is_power_of_two()
            && s.minimum <= 1 << 16
            && s.preferred >= s.minimum
            && s.max_payload >= s.minimum;
        if !sane {
            return Err(self.protocol("block size constraints that contradict each other"));
        }
        Ok(s)
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) -> Result<(), ClientError> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send_all(&b, option_during(opt))
    }

    /// One option reply to `opt`: its type and data.
    fn option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>), ClientError> {
        let during = option_during(opt);
        let mut h = [0u8; 20];
        self.stream
            .read_exact(&mut h)
            .map_err(|e| self.io_err(during, e))?;
        if be_u64(&h[0..8]) != OPT_REPLY_MAGIC {
            return Err(self.protocol("an option reply with a bad magic"));
        }
        if be_u32(&h[8..12]) != opt {
            return Err(self.protocol("an option reply for another option"));
        }
        let kind = be_u32(&h[12..16]);
        let len = be_u32(&h[16..20]);
        if len > MAX_OPTION_REPLY {
            return Err(self.protocol("an option reply longer than 1 MiB"));
        }
        let mut data = vec![0u8; len as usize];
        self.stream
            .read_exact(&mut data)
            .map_err(|e| self.io_err(during, e))?;
        Ok((kind, data))
    }

    fn send_all(&mut self, b: &[u8], during: &'static str) -> Result<(), ClientError> {
        self.stream
            .write_all(b)
            .and_then(|()| self.stream.flush())
            .map_err(|e| self.io_err(during, e))
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if !self.broken {
            let _ = self.send_disc();
        }
    }
}

fn option_during(opt: u32) -> &'static str {
    match opt {
        OPT_GO => "NBD_OPT_GO",
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        _ => "option haggling",
    }
}

fn option_error_name(kind: u32) -> &'static str {
    match kind {
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN: no such export",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        _ => "an option error",
    }
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}
