//! The error values that may appear on the wire.
//!
//! The spec restricts errors to this list (their values are the common Linux errno numbers);
//! anything the server wants to report must be squeezed into one of them.

use std::fmt;

/// An NBD error value, as carried by a simple reply or an error chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Errno {
    /// Operation not permitted: writes to a read-only (or frozen) export.
    Perm = 1,
    /// Input/output error: the backing store failed.
    Io = 5,
    /// Cannot allocate memory (the spec asks servers to avoid it).
    NoMem = 12,
    /// Invalid argument: bad flags, unknown commands, reads past the end, lengths over limits.
    Inval = 22,
    /// No space left: writes past the end of the export.
    NoSpc = 28,
    /// Value too large (only for `NBD_CMD_FLAG_DF` reads).
    Overflow = 75,
    /// Not supported (only for `NBD_CMD_FLAG_FAST_ZERO`).
    NotSup = 95,
    /// The server is shutting down; the client must disconnect.
    Shutdown = 108,
}

impl Errno {
    /// The value on the wire.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// Decodes a wire value; values outside the spec's list are `None`.
    pub const fn from_code(code: u32) -> Option<Errno> {
        Some(match code {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            22 => Errno::Inval,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => return None,
        })
    }

    /// The symbolic name (as in the spec, without `NBD_`).
    pub const fn name(self) -> &'static str {
        match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for e in [
            Errno::Perm,
            Errno::Io,
            Errno::NoMem,
            Errno::Inval,
            Errno::NoSpc,
            Errno::Overflow,
            Errno::NotSup,
            Errno::Shutdown,
        ] {
            assert_eq!(Errno::from_code(e.code()), Some(e));
        }
        assert_eq!(Errno::from_code(0), None);
        assert_eq!(Errno::from_code(2), None);
        assert_eq!(Errno::Inval.code(), 22);
        assert_eq!(Errno::Shutdown.to_string(), "ESHUTDOWN");
    }
}
