//! The NBD server's handshake and request parser (common/src/nbd), driven
//! through [`serve_stream`] with the fuzzer's bytes as everything the
//! client sends.
//!
//! The exports are in-memory devices that assert what the server promises
//! a `BlockDevice` (module docs of `rebound_common::nbd`): every request in
//! range, reads and writes non-empty and at most `MAX_BLOCK_SIZE`, writes
//! block-aligned except at the end of the device, nothing written to a
//! read-only export.

use std::sync::{Arc, Mutex};

use rebound_common::nbd::{
    serve_stream, BlockDevice, ExportRegistry, NbdError, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE,
};

use crate::input::Input;

/// Not a multiple of the block size, so the rule for the last block is
/// reached.
const DEVICE_SIZE: u64 = 64 * 1024 + 1000;
const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_GO: u32 = 7;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const CMD_WRITE: u16 = 1;

/// The bytes are the client's, from its handshake flags on.
pub fn nbd_handshake(data: &[u8]) {
    serve(data);
}

/// The client completed the handshake (fixed newstyle, NBD_OPT_GO of the
/// export the first byte picks); the bytes are its requests. An odd second
/// byte makes well-framed requests from the bytes (magic and write payloads
/// filled in) so the checks behind the framing are reached.
pub fn nbd_request(data: &[u8]) {
    let mut input = Input::new(data);
    let export = if input.u8() & 1 == 0 { "disk" } else { "ro" };
    let mut client = handshake(export);
    if input.u8() & 1 == 0 {
        client.extend_from_slice(input.rest());
    } else {
        while !input.is_empty() {
            framed_request(&mut input, &mut client);
        }
    }
    serve(&client);
}

fn serve(client: &[u8]) {
    let registry = Exports::new();
    let mut out = Vec::new();
    let _ = serve_stream(client, &mut out, &registry, "fuzz");
    assert!(out.starts_with(NBDMAGIC), "the server did not greet first");
}

/// Client flags and NBD_OPT_GO for `export` without information requests.
fn handshake(export: &str) -> Vec<u8> {
    let mut c = Vec::new();
    c.extend_from_slice(&3u32.to_be_bytes()); // fixed newstyle, no zeroes
    c.extend_from_slice(&IHAVEOPT.to_be_bytes());
    c.extend_from_slice(&OPT_GO.to_be_bytes());
    c.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    c.extend_from_slice(&(export.len() as u32).to_be_bytes());
    c.extend_from_slice(export.as_bytes());
    c.extend_from_slice(&0u16.to_be_bytes());
    c
}

/// One request with the right magic; a write carries the payload its length
/// announces (zero-filled past the input), up to 64 KiB.
fn framed_request(input: &mut Input<'_>, out: &mut Vec<u8>) {
    let command = u16::from(input.u8() % 10);
    let flags = u16::from(input.u8());
    let cookie = u64::from(input.u8());
    let offset = match input.u8() % 4 {
        0 => u64::from(input.u16()) * 512,
        1 => u64::from(input.u32()),
        2 => DEVICE_SIZE - u64::from(input.u16() % 4096),
        _ => input.u64(),
    };
    let length = match input.u8() % 4 {
        0 => u32::from(input.u16() % 128) * 512,
        1 => u32::from(input.u16()),
        _ => input.u32(),
    };
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&command.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    if command == CMD_WRITE && length <= 64 * 1024 {
        let payload = input.take(length as usize);
        out.extend_from_slice(payload);
        out.resize(out.len() + (length as usize - payload.len()), 0);
    }
}

struct Exports {
    disk: Arc<Memory>,
    ro: Arc<Memory>,
}

impl Exports {
    fn new() -> Exports {
        Exports {
            disk: Arc::new(Memory::new(false)),
            ro: Arc::new(Memory::new(true)),
        }
    }
}

impl ExportRegistry for Exports {
    fn list(&self) -> Vec<String> {
        vec!["disk".into(), "ro".into()]
    }

    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, NbdError> {
        match name {
            "disk" | "" => Ok(self.disk.clone()),
            "ro" => Ok(self.ro.clone()),
            _ => Err(NbdError::einval(format!("no export {name:?}"))),
        }
    }
}

/// An in-memory device that checks the server's promises.
struct Memory {
    read_only: bool,
    bytes: Mutex<Vec<u8>>,
}

impl Memory {
    fn new(read_only: bool) -> Memory {
        Memory {
            read_only,
            bytes: Mutex::new(vec![0u8; DEVICE_SIZE as usize]),
        }
    }

    fn range(&self, what: &str, offset: u64, len: u64) -> std::ops::Range<usize> {
        let end = offset.checked_add(len);
        assert!(
            end.is_some_and(|e| e <= DEVICE_SIZE),
            "{what} at {offset} of {len} bytes reached the device past its end"
        );
        offset as usize..(offset + len) as usize
    }

    fn writable(&self, what: &str, offset: u64, len: u64) -> std::ops::Range<usize> {
        assert!(!self.read_only, "{what} reached a read-only device");
        let mask = u64::from(MIN_BLOCK_SIZE) - 1;
        assert!(
            offset & mask == 0 && (len & mask == 0 || offset + len == DEVICE_SIZE),
            "{what} at {offset} of {len} bytes is not block-aligned"
        );
        self.range(what, offset, len)
    }
}

impl BlockDevice for Memory {
    fn size(&self) -> u64 {
        DEVICE_SIZE
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        assert!(
            !buf.is_empty() && buf.len() <= MAX_BLOCK_SIZE as usize,
            "read of {} bytes",
            buf.len()
        );
        let r = self.range("read", offset, buf.len() as u64);
        buf.copy_from_slice(&self.bytes.lock().expect("device lock")[r]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), NbdError> {
        assert!(
            !data.is_empty() && data.len() <= MAX_BLOCK_SIZE as usize,
            "write of {} bytes",
            data.len()
        );
        let r = self.writable("write", offset, data.len() as u64);
        self.bytes.lock().expect("device lock")[r].copy_from_slice(data);
        Ok(())
    }

    fn flush(&self) -> Result<(), NbdError> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), NbdError> {
        self.writable("trim", offset, len);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), NbdError> {
        let r = self.writable("write_zeroes", offset, len);
        self.bytes.lock().expect("device lock")[r].fill(0);
        Ok(())
    }
}
