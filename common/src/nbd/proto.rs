//! NBD wire constants and the fixed-size request codec.
//!
//! Numbers come from the protocol document (NetworkBlockDevice/nbd
//! doc/proto.md). Kept apart from the state machines so that the handshake,
//! the transmission loop and the tests share one spelling of each value.

/// Declares wire values of one kind and a `$table` of them with their
/// names for logs, so that each value and its name are written once.
macro_rules! named_values {
    ($(#[$doc:meta])* $table:ident: $ty:ty { $($value:ident = $number:literal, $name:literal;)* }) => {
        $(#[$doc])*
        $(pub(crate) const $value: $ty = $number;)*
        const $table: &[($ty, &str)] = &[$(($value, $name)),*];
    };
}

// Handshake magics.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub(crate) const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// Handshake flags (server) and client flags.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

named_values! {
    /// Options.
    OPTIONS: u32 {
        OPT_EXPORT_NAME = 1, "EXPORT_NAME";
        OPT_ABORT = 2, "ABORT";
        OPT_LIST = 3, "LIST";
        OPT_STARTTLS = 5, "STARTTLS";
        OPT_INFO = 6, "INFO";
        OPT_GO = 7, "GO";
        OPT_STRUCTURED_REPLY = 8, "STRUCTURED_REPLY";
        OPT_LIST_META_CONTEXT = 9, "LIST_META_CONTEXT";
        OPT_SET_META_CONTEXT = 10, "SET_META_CONTEXT";
        OPT_EXTENDED_HEADERS = 11, "EXTENDED_HEADERS";
    }
}

// Option replies.
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub(crate) const REP_ERR_POLICY: u32 = 0x8000_0002;
pub(crate) const REP_ERR_INVALID: u32 = 0x8000_0003;
pub(crate) const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub(crate) const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub(crate) const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;

// NBD_REP_INFO types.
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub(crate) const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const FLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const FLAG_SEND_FUA: u16 = 1 << 3;
pub(crate) const FLAG_SEND_TRIM: u16 = 1 << 5;
pub(crate) const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

// Transmission phase.
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const REQUEST_LEN: usize = 28;

named_values! {
    /// Commands; CACHE, BLOCK_STATUS and RESIZE are refused and only named.
    COMMANDS: u16 {
        CMD_READ = 0, "READ";
        CMD_WRITE = 1, "WRITE";
        CMD_DISC = 2, "DISC";
        CMD_FLUSH = 3, "FLUSH";
        CMD_TRIM = 4, "TRIM";
        CMD_CACHE = 5, "CACHE";
        CMD_WRITE_ZEROES = 6, "WRITE_ZEROES";
        CMD_BLOCK_STATUS = 7, "BLOCK_STATUS";
        CMD_RESIZE = 8, "RESIZE";
    }
}

pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

named_values! {
    /// Error values allowed on the wire.
    ERRNOS: u32 {
        EPERM = 1, "EPERM";
        EIO = 5, "EIO";
        ENOMEM = 12, "ENOMEM";
        EINVAL = 22, "EINVAL";
        ENOSPC = 28, "ENOSPC";
        EOVERFLOW = 75, "EOVERFLOW";
        ENOTSUP = 95, "ENOTSUP";
        ESHUTDOWN = 108, "ESHUTDOWN";
    }
}

/// Strings in the protocol (names, messages) must not exceed this.
pub(crate) const MAX_STRING_LEN: usize = 4096;

/// The name of `value` in a table of [`named_values!`].
fn name_in<T: PartialEq>(table: &[(T, &'static str)], value: T) -> Option<&'static str> {
    table
        .iter()
        .find(|(v, _)| *v == value)
        .map(|&(_, name)| name)
}

pub(crate) fn errno_name(errno: u32) -> &'static str {
    name_in(ERRNOS, errno).unwrap_or("errno")
}

/// One of the error values the protocol defines.
pub(crate) fn is_wire_errno(errno: u32) -> bool {
    name_in(ERRNOS, errno).is_some()
}

pub(crate) fn option_name(opt: u32) -> &'static str {
    name_in(OPTIONS, opt).unwrap_or("unknown")
}

pub(crate) fn command_name(cmd: u16) -> &'static str {
    name_in(COMMANDS, cmd).unwrap_or("unknown")
}

/// A decoded transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub magic: u32,
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Decodes the fixed 28-byte header. Any byte pattern decodes; the
    /// caller checks the magic.
    pub(crate) fn decode(b: &[u8; REQUEST_LEN]) -> Request {
        Request {
            magic: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            flags: u16::from_be_bytes([b[4], b[5]]),
            command: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            offset: u64::from_be_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
            length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        }
    }

    /// A request with the request magic.
    pub(crate) fn new(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Request {
        Request {
            magic: REQUEST_MAGIC,
            flags,
            command,
            cookie,
            offset,
            length,
        }
    }

    /// Encodes the fixed 28-byte header (the client's requests, and the
    /// tests').
    pub(crate) fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Encodes a simple reply header.
pub(crate) fn simple_reply(errno: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}
