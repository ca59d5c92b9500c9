//! The transmission phase: requests handled in order, simple replies only.
//!
//! This is where the server keeps its promises to a [`BlockDevice`]: every
//! request is checked (range, length, alignment, read-only) before the
//! device sees it, and a bad request gets an errno while the stream stays in
//! sync (a refused WRITE's payload is read and dropped).
//!
//! Two threads per connection: [`super::readahead`] reads headers and WRITE
//! payloads off the socket ahead of time, and this loop hands the requests
//! to the device one at a time in the client's order, so the device sees
//! exactly the sequence it would without read-ahead. Replies are batched in
//! the writer and flushed once no further request is waiting, so pipelining
//! clients (fio at iodepth 32, the kernel) get one syscall per batch rather
//! than per request. Durable order: a WRITE's reply is written only after
//! the device returned from it (with FUA, once it is durable), and a FLUSH
//! reaches the device only after every earlier request was handled, so its
//! reply covers every write whose reply went out before it.

use std::io::{self, BufReader, BufWriter, Write};
use std::net::Shutdown;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::thread;

use tracing::{debug, warn};

use super::handshake::Negotiated;
use super::proto::*;
use super::readahead::{self, Msg, Payload, Shared};
use super::server::Conn;
use super::{BlockDevice, NbdError, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};

enum Next {
    Continue,
    Close,
}

struct Session<'a, W: Write> {
    writer: &'a mut W,
    device: &'a dyn BlockDevice,
    shared: &'a Shared,
    export: &'a str,
    peer: &'a str,
    size: u64,
    buf: Vec<u8>,
}

/// Serves requests until the client disconnects (`Ok`) or the connection
/// breaks or violates the protocol (`Err`).
pub(crate) fn serve<S: Conn>(
    reader: BufReader<S>,
    writer: &mut BufWriter<S>,
    negotiated: &Negotiated,
    peer: &str,
) -> io::Result<()> {
    let device = &*negotiated.device;
    let shared = Shared::new();
    let control = writer.get_ref().clone_conn()?;
    thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel(readahead::QUEUED);
        let shared_ref = &shared;
        let _stop = StopReader {
            shared: &shared,
            control,
        };
        thread::Builder::new()
            .name("nbd-read".to_string())
            .spawn_scoped(scope, move || readahead::run(reader, tx, shared_ref))?;
        let mut s = Session {
            writer,
            device,
            shared: &shared,
            export: &negotiated.name,
            peer,
            size: device.size(),
            buf: Vec::new(),
        };
        s.serve_all(&rx)
        // `_stop` and `rx` drop here, even when unwinding, so the
        // reader wakes up and the scope can join it.
    })
}

/// Stops the read-ahead thread when the handler is done: wherever it
/// waits (payload budget, a full channel, the socket), it returns.
struct StopReader<'a, S: Conn> {
    shared: &'a Shared,
    control: S,
}

impl<S: Conn> Drop for StopReader<'_, S> {
    fn drop(&mut self) {
        self.shared.close();
        let _ = self.control.shutdown_conn(Shutdown::Read);
    }
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

impl<W: Write> Session<'_, W> {
    fn serve_all(&mut self, rx: &Receiver<Msg>) -> io::Result<()> {
        loop {
            let msg = match rx.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Empty) => {
                    // Nothing more to answer without waiting for the client.
                    self.writer.flush()?;
                    match rx.recv() {
                        Ok(m) => m,
                        Err(_) => return Ok(()),
                    }
                }
                Err(TryRecvError::Disconnected) => {
                    self.writer.flush()?;
                    return Ok(());
                }
            };
            let (req, payload) = match msg {
                Msg::Req(req, payload) => (req, payload),
                Msg::BadMagic(magic) => {
                    warn!(
                        peer = self.peer,
                        export = self.export,
                        magic = format_args!("{magic:#x}"),
                        "NBD request with a bad magic; closing the connection"
                    );
                    self.writer.flush()?;
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("bad request magic {magic:#x}"),
                    ));
                }
                Msg::Broken(e) => {
                    let _ = self.writer.flush();
                    return Err(e);
                }
            };
            debug!(
                export = self.export,
                cmd = command_name(req.command),
                offset = req.offset,
                length = req.length,
                flags = req.flags,
                "NBD request"
            );
            let next = match req.command {
                CMD_READ => self.read(&req)?,
                CMD_WRITE => self.write(&req, payload)?,
                CMD_DISC => {
                    self.writer.flush()?;
                    return Ok(());
                }
                CMD_FLUSH => self.flush(&req)?,
                CMD_TRIM => self.trim(&req)?,
                CMD_WRITE_ZEROES => self.write_zeroes(&req)?,
                _ => self.bad(&req, EINVAL, "unknown command")?,
            };
            if let Next::Close = next {
                self.writer.flush()?;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "request not recoverable; connection closed",
                ));
            }
        }
    }

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

    fn unknown_flags(req: &Request) -> bool {
        req.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) != 0
    }

    fn read(&mut self, req: &Request) -> io::Result<Next> {
        if Self::unknown_flags(req) {
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

    fn write(&mut self, req: &Request, payload: Payload) -> io::Result<Next> {
        match payload {
            Payload::Data(data) => {
                let next = self.write_data(req, &data);
                self.shared.recycle(data);
                next
            }
            Payload::Dropped => self.bad(req, EINVAL, "write longer than the maximum block size"),
            Payload::Unread | Payload::None => {
                self.bad(
                    req,
                    EINVAL,
                    "write far longer than the maximum block size; closing",
                )?;
                Ok(Next::Close)
            }
        }
    }

    /// A WRITE whose payload was read whole.
    fn write_data(&mut self, req: &Request, data: &[u8]) -> io::Result<Next> {
        if Self::unknown_flags(req) {
            return self.bad(req, EINVAL, "unknown command flags");
        }
        if self.device.read_only() {
            return self.bad(req, EPERM, "write to a read-only export");
        }
        let len = u64::from(req.length);
        if !in_range(req.offset, len, self.size) {
            return self.bad(req, ENOSPC, "write beyond the end of the export");
        }
        if !aligned(req.offset, len, self.size) {
            return self.bad(req, EINVAL, "write not aligned to 512 bytes");
        }
        if len == 0 {
            return self.done(req, Ok(()));
        }
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let result = self.device.write(req.offset, data, fua);
        self.done(req, result)
    }

    fn flush(&mut self, req: &Request) -> io::Result<Next> {
        if Self::unknown_flags(req) {
            return self.bad(req, EINVAL, "unknown command flags");
        }
        let result = self.device.flush();
        self.done(req, result)
    }

    fn trim(&mut self, req: &Request) -> io::Result<Next> {
        if Self::unknown_flags(req) {
            return self.bad(req, EINVAL, "unknown command flags");
        }
        if self.device.read_only() {
            return self.bad(req, EPERM, "trim on a read-only export");
        }
        let len = u64::from(req.length);
        if !in_range(req.offset, len, self.size) {
            return self.bad(req, ENOSPC, "trim beyond the end of the export");
        }
        // A trim is a hint: shrink it inwards to whole blocks.
        let bs = u64::from(MIN_BLOCK_SIZE);
        let end = req.offset + len;
        let start = req.offset.div_ceil(bs).saturating_mul(bs);
        let end = if end == self.size { end } else { end / bs * bs };
        if start >= end {
            return self.done(req, Ok(()));
        }
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let result = self.device.trim(start, end - start, fua);
        self.done(req, result)
    }

    fn write_zeroes(&mut self, req: &Request) -> io::Result<Next> {
        if Self::unknown_flags(req) {
            return self.bad(req, EINVAL, "unknown command flags");
        }
        if self.device.read_only() {
            return self.bad(req, EPERM, "write zeroes on a read-only export");
        }
        let len = u64::from(req.length);
        if !in_range(req.offset, len, self.size) {
            return self.bad(req, ENOSPC, "write zeroes beyond the end of the export");
        }
        if !aligned(req.offset, len, self.size) {
            return self.bad(req, EINVAL, "write zeroes not aligned to 512 bytes");
        }
        if len == 0 {
            return self.done(req, Ok(()));
        }
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let result = self.device.write_zeroes(req.offset, len, fua);
        self.done(req, result)
    }
}

#[cfg(test)]
mod unit {
    use super::{aligned, in_range};

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
