//! Process stdio over vsock: one stream per stdio stream of a container's process, from the
//! host to the agent's listener on [`STDIO_VSOCK_PORT`], carrying the bytes as
//! [frames](crate::frame) with no per-chunk protobuf and no round trip per chunk. Flow control
//! is vsock's own credit: a process writing faster than the host reads blocks on its pipe.
//!
//! The host opens the streams a process needs before it asks for the process
//! (`CreateContainer`/`ExecProcess` with `StdioConfig.stream_token`), each starting with a
//! fixed-size [`Header`]: the token and which stream it is. The agent joins the streams with
//! that token to the new process's pipes (or terminal): stdout and stderr are framed from guest
//! to host, ending with the end frame once the process and every child holding the pipe closed
//! it (the end of a stream is not the process's exit: `WaitProcess` reports that); stdin is
//! framed from host to guest, its end frame closes the process's stdin (on a terminal it sends
//! the EOF character). Ordering holds within a stream, as on a pipe.
//!
//! ```
//! use runvm_protocol::stdio::{Header, StreamKind};
//! let h = Header { token: [7; 16], kind: StreamKind::Stderr };
//! assert_eq!(Header::decode(&h.encode()).unwrap(), h);
//! ```

/// The vsock port the agent's stdio listener serves.
pub const STDIO_VSOCK_PORT: u32 = 1027;

/// The first bytes of every header.
pub const MAGIC: [u8; 4] = *b"RVIO";
/// The revision of this stream format.
pub const VERSION: u8 = 1;
/// Length of a header, bytes.
pub const HEADER_LEN: usize = 24;
/// Bytes of a token.
pub const TOKEN_LEN: usize = 16;
/// The largest frame either side sends and accepts, bytes (the agent's output pipes hold
/// 1 MiB; one frame carries what one read of the pipe gives).
pub const MAX_FRAME: usize = 1 << 20;

/// Which stdio stream a vsock stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// Host to process.
    Stdin = 0,
    /// Process to host (the terminal's output with a terminal).
    Stdout = 1,
    /// Process to host.
    Stderr = 2,
}

impl StreamKind {
    /// Its name, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdin => "stdin",
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        }
    }
}

/// A header that breaks the format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The magic bytes are wrong: not a stdio stream.
    #[error("not a stdio stream header (magic {0:02x?}, expected \"RVIO\")")]
    Magic([u8; 4]),
    /// Another revision of the format.
    #[error("stdio stream format version {0} (this side speaks {VERSION})")]
    Version(u8),
    /// A stream kind this side does not know.
    #[error("unknown stdio stream kind {0} (valid: 0 stdin, 1 stdout, 2 stderr)")]
    Kind(u8),
    /// The all-zero token, which no process has.
    #[error("stdio stream with the all-zero token")]
    ZeroToken,
}

/// Host to guest, first on every stdio stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The token the host put in the process's `StdioConfig.stream_token`.
    pub token: [u8; TOKEN_LEN],
    /// Which stream.
    pub kind: StreamKind,
}

impl Header {
    /// `RVIO`, version, kind, two reserved bytes, the token.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.kind as u8;
        b[8..].copy_from_slice(&self.token);
        b
    }

    /// Parses a header; the reserved bytes are ignored.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, HeaderError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(HeaderError::Magic(magic));
        }
        if b[4] != VERSION {
            return Err(HeaderError::Version(b[4]));
        }
        let kind = match b[5] {
            0 => StreamKind::Stdin,
            1 => StreamKind::Stdout,
            2 => StreamKind::Stderr,
            other => return Err(HeaderError::Kind(other)),
        };
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&b[8..]);
        if token == [0u8; TOKEN_LEN] {
            return Err(HeaderError::ZeroToken);
        }
        Ok(Header { token, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_bad_ones_are_refused_by_name() {
        for kind in [StreamKind::Stdin, StreamKind::Stdout, StreamKind::Stderr] {
            let h = Header {
                token: [0xab; TOKEN_LEN],
                kind,
            };
            assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        }
        let good = Header {
            token: [1; TOKEN_LEN],
            kind: StreamKind::Stdout,
        }
        .encode();
        let mut b = good;
        b[..4].copy_from_slice(b"HTTP");
        assert_eq!(Header::decode(&b), Err(HeaderError::Magic(*b"HTTP")));
        let mut b = good;
        b[4] = 9;
        assert_eq!(Header::decode(&b), Err(HeaderError::Version(9)));
        let mut b = good;
        b[5] = 3;
        let e = Header::decode(&b).unwrap_err();
        assert_eq!(e, HeaderError::Kind(3));
        assert!(e.to_string().contains("stderr"), "{e}");
        let mut b = good;
        b[8..].fill(0);
        assert_eq!(Header::decode(&b), Err(HeaderError::ZeroToken));
    }
}
