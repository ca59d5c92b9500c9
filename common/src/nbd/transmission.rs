//! The transmission phase: one request at a time, simple replies only.
//!
//! This is where the server keeps its promises to a [`BlockDevice`]: every
//! request is checked (range, length, alignment, read-only) before the
//! device sees it, and a bad request gets an errno while the stream stays in
//! sync (a refused WRITE's payload is read and dropped). Replies are batched
//! in the writer and flushed once no further request is already buffered,
//! so pipelining clients (fio at iodepth 32, the kernel) get one syscall per
//! batch rather than per request.

use std::io::{self, BufRead, BufReader, Read, Write};

use tracing::{debug, warn};

use super::handshake::Negotiated;
use super::proto::*;
use super::{BlockDevice, NbdError, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};

/// A WRITE longer than the maximum but at most this long has its payload
/// read and dropped before the EINVAL; anything longer is answered with
/// EINVAL and the connection is closed (the client is not speaking NBD).
const DISCARD_LIMIT: u32 = 64 << 20;

enum Next {
    Continue,
    Close,
}

struct Session<'a, R: Read, W: Write> {
    reader: &'a mut BufReader<R>,
    writer: &'a mut W,
    device: &'a dyn BlockDevice,
    export: &'a str,
    peer: &'a str,
    size: u64,
    buf: Vec<u8>,
}

/// Reads a WRITE's payload: what the reader already buffered, then the rest
/// straight from the socket into `out`. `BufReader::read_exact` would refill
/// its buffer and copy out of it whenever the rest is shorter than the
/// buffer: a second copy of most of every write up to the buffer's size.
fn read_payload<R: Read>(reader: &mut BufReader<R>, out: &mut [u8]) -> io::Result<()> {
    let buffered = reader.buffer();
    let have = buffered.len().min(out.len());
    out[..have].copy_from_slice(&buffered[..have]);
    reader.consume(have);
    if have < out.len() {
        // The buffer is empty now, so reading past it keeps the order.
        reader.get_mut().read_exact(&mut out[have..])?;
    }
    Ok(())
}

/// Serves requests until the client disconnects (`Ok`) or the connection
/// breaks or violates the protocol (`Err`).
pub(crate) fn serve<R: Read, W: Write>(
    reader: &mut BufReader<R>,
    writer: &mut W,
    negotiated: &Negotiated,
    peer: &str,
) -> io::Result<()> {
    let device = &*negotiated.device;
    let mut s = Session {
        reader,
        writer,
        device,
        export: &negotiated.name,
        peer,
        size: device.size(),
        buf: Vec::new(),
    };
    loop {
        if s.reader.buffer().len() < REQUEST_LEN {
            // Nothing more to answer without waiting for the client.
            s.writer.flush()?;
        }
        let Some(req) = read_request(s.reader)? else {
            s.writer.flush()?;
            return Ok(());
        };
        if req.magic != REQUEST_MAGIC {
            warn!(
                peer = s.peer,
                export = s.export,
                magic = format_args!("{:#x}", req.magic),
                "NBD request with a bad magic; closing the connection"
            );
            s.writer.flush()?;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad request magic {:#x}", req.magic),
            ));
        }
        debug!(
            export = s.export,
            cmd = command_name(req.command),
            offset = req.offset,
            length = req.length,
            flags = req.flags,
            "NBD request"
        );
        let next = match req.command {
            CMD_READ => s.read(&req)?,
            CMD_WRITE => s.write(&req)?,
            CMD_DISC => {
                s.writer.flush()?;
                return Ok(());
            }
            CMD_FLUSH => s.flush(&req)?,
            CMD_TRIM => s.trim(&req)?,
            CMD_WRITE_ZEROES => s.write_zeroes(&req)?,
            _ => s.bad(&req, EINVAL, "unknown command")?,
        };
        if let Next::Close = next {
            s.writer.flush()?;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request not recoverable; connection closed",
            ));
        }
    }
}

/// Reads one request header; `None` on a clean end of stream.
fn read_request<R: Read>(reader: &mut BufReader<R>) -> io::Result<Option<Request>> {
    loop {
        match reader.fill_buf() {
            Ok([]) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let mut b = [0u8; REQUEST_LEN];
    reader.read_exact(&mut b)?;
    Ok(Some(Request::decode(&b)))
}

/// `offset..offset+len` lies inside a device of `size` bytes.
fn in_range(offset: u64, len: u64, size: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= size)
}

/// Write-like requests start on a block boundary and cover whole blocks,
/// except that the last block of a device whose size is not a multiple of
/// the block size can be reached.
fn aligned(offset: u64, len: u64, size: u64) -> bool {
    let mask = u64::from(MIN_BLOCK_SIZE) - 1; // a power of two
    offset & mask == 0 && (len & mask == 0 || offset + len == size)
}

impl<R: Read, W: Write> Session<'_, R, W> {
    fn reply(&mut self, errno: u32, cookie: u64) -> io::Result<()> {
        self.writer.write_all(&simple_reply(errno, cookie))
    }

    /// Refuses a malformed request with `errno`, keeping the stream in sync.
    fn bad(&mut self, req: &Request, errno: u32, why: &str) -> io::Result<Next> {
        warn!(
            peer = self.peer,
            export = self.export,
            cmd = command_name(req.command),
            offset = req.offset,
            length = req.length,
            flags = req.flags,
            size = self.size,
            errno = errno_name(errno),
            "bad NBD request: {why}"
        );
        self.reply(errno, req.cookie)?;
        Ok(Next::Continue)
    }

    /// Answers a request the device failed.
    fn failed(&mut self, req: &Request, e: &NbdError) -> io::Result<Next> {
        let errno = e.wire_errno();
        if errno == EPERM || errno == ESHUTDOWN {
            debug!(export = self.export, cmd = command_name(req.command), offset = req.offset, length = req.length, error = %e, "NBD request refused by the device");
        } else {
            warn!(export = self.export, cmd = command_name(req.command), offset = req.offset, length = req.length, error = %e, "NBD device error");
        }
        self.reply(errno, req.cookie)?;
        Ok(Next::Continue)
    }

    fn done(&mut self, req: &Request, result: Result<(), NbdError>) -> io::Result<Next> {
        match result {
            Ok(()) => {
                self.reply(0, req.cookie)?;
                Ok(Next::Continue)
            }
            Err(e) => self.failed(req, &e),
        }
    }

    fn read(&mut self, req: &Request) -> io::Result<Next> {
        if unknown_flags(req) {
            return self.bad(req, EINVAL, "unknown command flags");
        }
        if req.length > MAX_BLOCK_SIZE {
            return self.bad(req, EINVAL, "read longer than the maximum block size");
        }
        let len = u64::from(req.length);
        if !in_range(req.offset, len, self.size) {
            return self.bad(req, EINVAL, "read beyond the end of the export");
        }
        if len == 0 {
            return self.done(req, Ok(()));
        }
        let n = req.length as usize;
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        match self.device.read(req.offset, &mut self.buf[..n]) {
            Ok(()) => {
                self.writer.write_all(&simple_reply(0, req.cookie))?;
                self.writer.write_all(&self.buf[..n])?;
                Ok(Next::Continue)
            }
            Err(e) => self.failed(req, &e),
        }
    }

    fn write(&mut self, req: &Request) -> io::Result<Next> {
        if req.length > DISCARD_LIMIT {
            self.bad(
                req,
                EINVAL,
                "write far longer than the maximum block size; closing",
            )?;
            return Ok(Next::Close);
        }
        let n = req.length as usize;
        if req.length > MAX_BLOCK_SIZE {
            let dropped = io::copy(
                &mut (&mut *self.reader).take(u64::from(req.length)),
                &mut io::sink(),
            )?;
            if dropped != u64::from(req.length) {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            return self.bad(req, EINVAL, "write longer than the maximum block size");
        }
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        read_payload(self.reader, &mut self.buf[..n])?;
        if let Some((errno, why)) = self.refuse_change(req, "write", true) {
            return self.bad(req, errno, &why);
        }
        if n == 0 {
            return self.done(req, Ok(()));
        }
        let result = self.device.write(req.offset, &self.buf[..n], fua(req));
        self.done(req, result)
    }

    fn flush(&mut self, req: &Request) -> io::Result<Next> {
        if unknown_flags(req) {
            return self.bad(req, EINVAL, "unknown command flags");
        }
        let result = self.device.flush();
        self.done(req, result)
    }

    fn trim(&mut self, req: &Request) -> io::Result<Next> {
        // A trim is a hint: any alignment is accepted, and the range is
        // shrunk inwards to whole blocks.
        if let Some((errno, why)) = self.refuse_change(req, "trim", false) {
            return self.bad(req, errno, &why);
        }
        let bs = u64::from(MIN_BLOCK_SIZE);
        let end = req.offset + u64::from(req.length);
        let start = req.offset.div_ceil(bs).saturating_mul(bs);
        let end = if end == self.size { end } else { end / bs * bs };
        if start >= end {
            return self.done(req, Ok(()));
        }
        let result = self.device.trim(start, end - start, fua(req));
        self.done(req, result)
    }

    fn write_zeroes(&mut self, req: &Request) -> io::Result<Next> {
        if let Some((errno, why)) = self.refuse_change(req, "write zeroes", true) {
            return self.bad(req, errno, &why);
        }
        if req.length == 0 {
            return self.done(req, Ok(()));
        }
        let len = u64::from(req.length);
        let result = self.device.write_zeroes(req.offset, len, fua(req));
        self.done(req, result)
    }

    /// The checks every command that changes the export (`what`) passes
    /// before the device sees it: known flags, a writable export, a range
    /// inside it and, for `whole_blocks` commands, block alignment. The
    /// refusal is the errno for the client and the reason for the log.
    fn refuse_change(
        &self,
        req: &Request,
        what: &str,
        whole_blocks: bool,
    ) -> Option<(u32, String)> {
        let len = u64::from(req.length);
        if unknown_flags(req) {
            Some((EINVAL, "unknown command flags".to_string()))
        } else if self.device.read_only() {
            Some((EPERM, format!("{what} on a read-only export")))
        } else if !in_range(req.offset, len, self.size) {
            Some((ENOSPC, format!("{what} beyond the end of the export")))
        } else if whole_blocks && !aligned(req.offset, len, self.size) {
            Some((
                EINVAL,
                format!("{what} not aligned to {MIN_BLOCK_SIZE} bytes"),
            ))
        } else {
            None
        }
    }
}

/// Flags other than FUA and NO_HOLE, which no command here understands.
fn unknown_flags(req: &Request) -> bool {
    req.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) != 0
}

/// The client asks for the change to be durable before the reply.
fn fua(req: &Request) -> bool {
    req.flags & CMD_FLAG_FUA != 0
}

#[cfg(test)]
mod unit {
    use super::{aligned, in_range, read_payload};
    use std::io::{BufReader, Read};

    /// A reader that hands out at most `step` bytes per read, like a
    /// socket whose data arrives in pieces.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = out.len().min(self.step).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn payload_reads_past_the_buffer_in_order() {
        let stream: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        for (cap, step) in [(16, 7), (64, 1000), (4096, 5), (4096, 4096)] {
            let mut r = BufReader::with_capacity(
                cap,
                Trickle {
                    data: &stream,
                    step,
                },
            );
            let mut head = [0u8; 10];
            r.read_exact(&mut head).unwrap();
            // A payload longer than the buffer, one shorter, then the rest.
            let mut long = vec![0u8; 1500];
            read_payload(&mut r, &mut long).unwrap();
            let mut short = vec![0u8; 9];
            read_payload(&mut r, &mut short).unwrap();
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).unwrap();
            let got = [&head[..], &long, &short, &rest].concat();
            assert_eq!(got, stream, "capacity {cap}, step {step}");
        }
        // A stream that ends inside the payload is an error, not a short read.
        let mut r = BufReader::with_capacity(8, &stream[..100]);
        assert!(read_payload(&mut r, &mut [0u8; 200]).is_err());
    }

    #[test]
    fn range_and_alignment() {
        assert!(in_range(0, 0, 0));
        assert!(in_range(0, 4096, 4096));
        assert!(!in_range(1, 4096, 4096));
        assert!(!in_range(u64::MAX, 1, u64::MAX));
        assert!(!in_range(u64::MAX - 1, 4096, u64::MAX));
        assert!(aligned(512, 1024, 1 << 20));
        assert!(!aligned(100, 512, 1 << 20));
        assert!(!aligned(512, 100, 1 << 20));
        // The short last block of an odd-sized device.
        assert!(aligned(1024, 100, 1124));
    }
}
