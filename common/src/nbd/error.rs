//! The error a [`super::BlockDevice`] or [`super::ExportRegistry`] returns.
//!
//! NBD replies carry a bare errno from a small fixed set, so device errors
//! are expressed in that vocabulary directly; the message is for logs and
//! for option errors, which clients show to the user.

use std::fmt;
use std::io;

use super::proto;

/// An NBD error: the errno the client receives and a message for the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdError {
    /// One of the NBD error values (`EPERM`, `EIO`, `EINVAL`, ...). Values
    /// the protocol does not define are sent as `EIO`.
    pub errno: u32,
    /// What failed, for logs (and for the client, for option errors).
    pub message: String,
}

impl NbdError {
    /// An error with an explicit errno.
    pub fn new(errno: u32, message: impl Into<String>) -> Self {
        NbdError {
            errno,
            message: message.into(),
        }
    }
    /// Maps an IO error to the NBD error set, keeping its text.
    pub fn from_io(err: &io::Error, context: impl fmt::Display) -> Self {
        let errno = match err.raw_os_error() {
            Some(libc::EPERM | libc::EACCES | libc::EROFS) => proto::EPERM,
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => proto::ENOSPC,
            Some(libc::EINVAL) => proto::EINVAL,
            Some(libc::ENOMEM) => proto::ENOMEM,
            Some(libc::EOVERFLOW) => proto::EOVERFLOW,
            Some(libc::EOPNOTSUPP) => proto::ENOTSUP,
            Some(libc::ESHUTDOWN) => proto::ESHUTDOWN,
            _ => proto::EIO,
        };
        Self::new(errno, format!("{context}: {err}"))
    }

    /// The errno to put on the wire: undefined values (and 0, which would
    /// read as success) become EIO.
    pub(crate) fn wire_errno(&self) -> u32 {
        if proto::is_wire_errno(self.errno) {
            self.errno
        } else {
            proto::EIO
        }
    }
}

/// The constructors named after an errno, taking the message.
macro_rules! errno_constructors {
    ($($(#[$doc:meta])* $constructor:ident => $errno:ident;)*) => {
        impl NbdError {
            $(
                $(#[$doc])*
                pub fn $constructor(message: impl Into<String>) -> Self {
                    Self::new(proto::$errno, message)
                }
            )*
        }
    };
}

errno_constructors! {
    /// EPERM: not permitted (read-only export, fenced writes).
    eperm => EPERM;
    /// EIO: the backing storage failed.
    eio => EIO;
    /// ENOMEM: out of memory (the protocol asks servers to avoid it).
    enomem => ENOMEM;
    /// EINVAL: invalid request.
    einval => EINVAL;
    /// ENOSPC: no space left (also for EDQUOT and EFBIG).
    enospc => ENOSPC;
    /// EOVERFLOW: value too large.
    eoverflow => EOVERFLOW;
    /// ENOTSUP: operation not supported.
    enotsup => ENOTSUP;
    /// ESHUTDOWN: the server is shutting down; the client disconnects.
    eshutdown => ESHUTDOWN;
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            proto::errno_name(self.errno),
            self.errno,
            self.message
        )
    }
}

impl std::error::Error for NbdError {}

impl From<io::Error> for NbdError {
    fn from(err: io::Error) -> Self {
        NbdError::from_io(&err, "io error")
    }
}
