//! Reads requests ahead of the handler, on a thread of their own.
//!
//! A pipelining client (fio at iodepth 32, the kernel) has many requests in
//! flight; reading the next headers and WRITE payloads off the socket while
//! the handler is inside the device overlaps the two instead of taking turns.
//! Only the framing is done here: a header, its magic, and a WRITE's payload
//! (read whole, or read and dropped when longer than the maximum, or left
//! unread when the client is plainly not speaking NBD). Every check a
//! [`super::BlockDevice`] relies on stays with the handler, which still sees
//! the requests one at a time in the client's order.
//!
//! Memory is bounded per connection: at most [`QUEUED`] requests wait in the
//! channel, and at most [`IN_FLIGHT_BYTES`] of WRITE payload is held between
//! this thread and the handler (a single request may always proceed when
//! nothing else is held, so a maximum-size WRITE never waits forever).
//! Payload buffers come back from the handler into a small pool.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::mpsc::SyncSender;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::proto::*;
use super::MAX_BLOCK_SIZE;

/// Requests waiting for the handler, at most.
pub(crate) const QUEUED: usize = 64;
/// WRITE payload bytes read but not yet handled, at most (unless one
/// request alone is larger).
pub(crate) const IN_FLIGHT_BYTES: usize = 32 << 20;
/// Idle payload buffers kept for reuse, at most this many bytes in all.
const POOL_BYTES: usize = 8 << 20;

/// A WRITE longer than the maximum but at most this long has its payload
/// read and dropped before the EINVAL; anything longer is answered with
/// EINVAL and the connection is closed (the client is not speaking NBD).
pub(crate) const DISCARD_LIMIT: u32 = 64 << 20;

/// What came with a request header.
pub(crate) enum Payload {
    /// Not a WRITE.
    None,
    /// A WRITE's payload; give it back with [`Shared::recycle`].
    Data(Vec<u8>),
    /// A WRITE longer than [`MAX_BLOCK_SIZE`] whose payload was dropped.
    Dropped,
    /// A WRITE longer than [`DISCARD_LIMIT`]; its payload was not read and
    /// nothing after it will be.
    Unread,
}

/// One item for the handler, in stream order.
pub(crate) enum Msg {
    Req(Request, Payload),
    /// A header with a bad magic; nothing after it is read.
    BadMagic(u32),
    /// The stream broke (read error, end of stream inside a request).
    Broken(io::Error),
}

struct State {
    in_flight: usize,
    closed: bool,
    pool: Vec<Vec<u8>>,
    pooled: usize,
}

/// The payload budget and buffer pool shared by the reader and the handler.
pub(crate) struct Shared {
    state: Mutex<State>,
    freed: Condvar,
}

impl Shared {
    pub(crate) fn new() -> Shared {
        Shared {
            state: Mutex::new(State {
                in_flight: 0,
                closed: false,
                pool: Vec::new(),
                pooled: 0,
            }),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain counters: a panic elsewhere cannot leave them inconsistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `n` more payload bytes fit; `None` once the handler is gone.
    fn take(&self, n: usize) -> Option<Vec<u8>> {
        let mut st = self.lock();
        while !st.closed && st.in_flight > 0 && st.in_flight + n > IN_FLIGHT_BYTES {
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.closed {
            return None;
        }
        st.in_flight += n;
        let mut buf = st.pool.pop().unwrap_or_default();
        st.pooled -= buf.capacity();
        drop(st);
        buf.resize(n, 0);
        Some(buf)
    }

    /// Returns a handled WRITE's payload: frees its budget, keeps the buffer.
    pub(crate) fn recycle(&self, mut buf: Vec<u8>) {
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(buf.len());
        if st.pooled + buf.capacity() <= POOL_BYTES {
            buf.clear();
            st.pooled += buf.capacity();
            st.pool.push(buf);
        }
        drop(st);
        self.freed.notify_one();
    }

    /// The handler is done: wake and stop the reader.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.freed.notify_all();
    }
}

/// Reads requests until the end of the stream, a DISC, a request after
/// which nothing can be read, or the handler going away.
pub(crate) fn run<R: Read>(mut reader: BufReader<R>, tx: SyncSender<Msg>, shared: &Shared) {
    loop {
        let (msg, last) = match next(&mut reader, shared) {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => (Msg::Broken(e), true),
        };
        if tx.send(msg).is_err() || last {
            return;
        }
    }
}

/// The next item and whether it is the last; `None` on a clean end of the
/// stream or when the handler is gone.
fn next<R: Read>(reader: &mut BufReader<R>, shared: &Shared) -> io::Result<Option<(Msg, bool)>> {
    let Some(req) = read_request(reader)? else {
        return Ok(None);
    };
    if req.magic != REQUEST_MAGIC {
        return Ok(Some((Msg::BadMagic(req.magic), true)));
    }
    let item = match req.command {
        CMD_DISC => (Msg::Req(req, Payload::None), true),
        CMD_WRITE if req.length > DISCARD_LIMIT => (Msg::Req(req, Payload::Unread), true),
        CMD_WRITE if req.length > MAX_BLOCK_SIZE => {
            let want = u64::from(req.length);
            let dropped = io::copy(&mut (&mut *reader).take(want), &mut io::sink())?;
            if dropped != want {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            (Msg::Req(req, Payload::Dropped), false)
        }
        CMD_WRITE => {
            let Some(mut buf) = shared.take(req.length as usize) else {
                return Ok(None);
            };
            reader.read_exact(&mut buf)?;
            (Msg::Req(req, Payload::Data(buf)), false)
        }
        _ => (Msg::Req(req, Payload::None), false),
    };
    Ok(Some(item))
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

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn budget_admits_one_large_request_and_recycles() {
        let s = Shared::new();
        let a = s.take(IN_FLIGHT_BYTES).unwrap();
        assert_eq!(a.len(), IN_FLIGHT_BYTES);
        s.recycle(a);
        assert_eq!(s.lock().in_flight, 0);
        // Too large for the pool: dropped, not kept.
        assert_eq!(s.lock().pooled, 0);
        let b = s.take(4096).unwrap();
        s.recycle(b);
        assert_eq!(s.lock().pool.len(), 1);
        let c = s.take(512).unwrap();
        assert_eq!(c.len(), 512);
        assert!(s.lock().pool.is_empty());
        s.close();
        assert!(s.take(1).is_none());
    }
}
