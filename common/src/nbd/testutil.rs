//! Test helpers for the NBD server: in-memory and file devices, a map
//! registry, a server on an ephemeral port, and a raw-protocol client.
//!
//! The raw client speaks the wire format byte by byte so tests can send
//! exactly the malformed requests real clients never would.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::proto::*;
use super::{serve_tcp, BlockDevice, ExportRegistry, NbdError};

/// A device in memory.
pub(crate) struct MemDevice {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    pub flushes: AtomicU64,
    pub fua_writes: AtomicU64,
    pub trims: Mutex<Vec<(u64, u64)>>,
}

impl MemDevice {
    pub(crate) fn new(size: usize, read_only: bool) -> Arc<MemDevice> {
        Arc::new(MemDevice {
            data: Mutex::new(vec![0u8; size]),
            read_only,
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            trims: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    pub(crate) fn fill(&self, offset: usize, bytes: &[u8]) {
        self.data.lock().unwrap()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let d = self.data.lock().unwrap();
        let o = offset as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        assert!(
            !self.read_only,
            "the server let a write reach a read-only device"
        );
        let mut d = self.data.lock().unwrap();
        let o = offset as usize;
        d[o..o + data.len()].copy_from_slice(data);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), NbdError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), NbdError> {
        assert!(!self.read_only);
        self.trims.lock().unwrap().push((offset, len));
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), NbdError> {
        assert!(!self.read_only);
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// A device over a file, with positional IO (what the agent does).
pub(crate) struct FileDevice {
    file: File,
    size: u64,
}

impl FileDevice {
    pub(crate) fn new(file: File, size: u64) -> io::Result<Arc<FileDevice>> {
        file.set_len(size)?;
        Ok(Arc::new(FileDevice { file, size }))
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| NbdError::from_io(&e, format_args!("read at {offset}")))
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| NbdError::from_io(&e, format_args!("write at {offset}")))?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), NbdError> {
        self.file
            .sync_data()
            .map_err(|e| NbdError::from_io(&e, "fdatasync"))
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), NbdError> {
        self.write_zeroes(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), NbdError> {
        let zeroes = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64);
            self.write(offset + done, &zeroes[..n as usize], false)?;
            done += n;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }
}

/// A device whose every operation fails with a fixed errno.
pub(crate) struct FailingDevice {
    pub errno: u32,
}

impl BlockDevice for FailingDevice {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, _: u64, _: &mut [u8]) -> Result<(), NbdError> {
        Err(NbdError::new(self.errno, "injected read failure"))
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), NbdError> {
        Err(NbdError::new(self.errno, "injected write failure"))
    }
    fn flush(&self) -> Result<(), NbdError> {
        Err(NbdError::new(self.errno, "injected flush failure"))
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> Result<(), NbdError> {
        Err(NbdError::new(self.errno, "injected trim failure"))
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), NbdError> {
        Err(NbdError::new(self.errno, "injected zero failure"))
    }
}

/// Exports by name, in insertion order.
pub(crate) struct MapRegistry {
    pub exports: Vec<(String, Arc<dyn BlockDevice>)>,
}

impl ExportRegistry for MapRegistry {
    fn list(&self) -> Vec<String> {
        self.exports.iter().map(|(n, _)| n.clone()).collect()
    }
    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, NbdError> {
        if name == "forbidden" {
            return Err(NbdError::eperm("export forbidden by policy"));
        }
        self.exports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
            .ok_or_else(|| NbdError::einval(format!("no export named {name:?}")))
    }
}

/// A server on 127.0.0.1 with an ephemeral port, stopped on drop.
pub(crate) struct TestServer {
    pub addr: SocketAddr,
    pub shutdown: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl TestServer {
    pub(crate) fn start(exports: Vec<(&str, Arc<dyn BlockDevice>)>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let registry = Arc::new(MapRegistry {
            exports: exports
                .into_iter()
                .map(|(n, d)| (n.to_string(), d))
                .collect(),
        });
        let shutdown = Arc::new(AtomicBool::new(false));
        let handle = serve_tcp(listener, registry, shutdown.clone());
        TestServer {
            addr,
            shutdown,
            handle: Some(handle),
        }
    }

    pub(crate) fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    pub(crate) fn stop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// An option reply as received.
#[derive(Debug)]
pub(crate) struct OptReply {
    pub opt: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A client speaking raw NBD.
pub(crate) struct RawClient {
    pub s: TcpStream,
}

impl RawClient {
    /// Connects and completes the greeting with the given client flags.
    pub(crate) fn greet(addr: SocketAddr, client_flags: u32) -> RawClient {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = RawClient { s };
        assert_eq!(c.u64(), NBDMAGIC);
        assert_eq!(c.u64(), IHAVEOPT);
        assert_eq!(c.u16(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c.send(&client_flags.to_be_bytes());
        c
    }

    /// Connects, sends GO for `name` (requesting NAME and BLOCK_SIZE info)
    /// and returns the client with the export's size and flags.
    pub(crate) fn go(addr: SocketAddr, name: &str) -> (RawClient, u64, u16) {
        let mut c = Self::greet(addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        let (size, flags) = c.go_on(name).unwrap_or_else(|r| panic!("GO failed: {r:?}"));
        (c, size, flags)
    }

    /// Sends GO on an already greeted connection: Ok(size, flags) after the
    /// ACK, or the error reply.
    pub(crate) fn go_on(&mut self, name: &str) -> Result<(u64, u16), OptReply> {
        self.send_option(OPT_GO, &info_data(name, &[INFO_NAME, INFO_BLOCK_SIZE]));
        let mut export = None;
        loop {
            let r = self.opt_reply();
            assert_eq!(r.opt, OPT_GO);
            match r.kind {
                REP_INFO => {
                    let t = u16::from_be_bytes([r.data[0], r.data[1]]);
                    if t == INFO_EXPORT {
                        assert_eq!(r.data.len(), 12);
                        let size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([r.data[10], r.data[11]]);
                        export = Some((size, flags));
                    }
                }
                REP_ACK => return Ok(export.expect("GO acknowledged without NBD_INFO_EXPORT")),
                _ => return Err(r),
            }
        }
    }

    pub(crate) fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub(crate) fn send_option(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    pub(crate) fn opt_reply(&mut self) -> OptReply {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC);
        let opt = self.u32();
        let kind = self.u32();
        let len = self.u32() as usize;
        let data = self.bytes(len);
        OptReply { opt, kind, data }
    }

    pub(crate) fn request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut b = Request::new(command, flags, cookie, offset, length)
            .encode()
            .to_vec();
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// Reads a simple reply: (errno, cookie).
    pub(crate) fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        let errno = self.u32();
        let cookie = self.u64();
        (errno, cookie)
    }

    pub(crate) fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, 0, cookie, offset, len, &[]);
        let (errno, c) = self.reply();
        assert_eq!(c, cookie);
        if errno != 0 {
            return Err(errno);
        }
        Ok(self.bytes(len as usize))
    }

    pub(crate) fn write(&mut self, cookie: u64, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.request(CMD_WRITE, flags, cookie, offset, data.len() as u32, data);
        let (errno, c) = self.reply();
        assert_eq!(c, cookie);
        errno
    }

    /// A command without payload and without reply data.
    pub(crate) fn simple(
        &mut self,
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> u32 {
        self.request(cmd, flags, cookie, offset, len, &[]);
        let (errno, c) = self.reply();
        assert_eq!(c, cookie);
        errno
    }

    /// True once the server has closed the connection (EOF or reset).
    pub(crate) fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
        }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }
    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }
    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }
    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }
}

/// NBD_OPT_INFO / NBD_OPT_GO data.
pub(crate) fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// A small deterministic PRNG (xorshift64*) for patterns and fuzzing.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
