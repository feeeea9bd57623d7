//! Port forwarding into the guest (`kubectl port-forward`): one vsock stream per forwarded TCP
//! connection, from the host's forwarder to the agent's listener on [`PORT_FORWARD_VSOCK_PORT`].
//!
//! The stream starts with a fixed-size [`Request`] (host to guest: which port of the guest's
//! loopback to connect to) and a fixed-size [`Reply`] (guest to host: connected, or why not).
//! Then both directions carry [frames](crate::frame); the end frame is a TCP half-close, the end
//! of the stream without an end frame is an abort: the receiver resets its TCP connection.
//!
//! ```
//! use runvm_protocol::portfwd::{Reply, Request, Status};
//! let req = Request { port: 8080 };
//! assert_eq!(Request::decode(&req.encode()).unwrap(), req);
//! let reply = Reply::refused(111);
//! assert_eq!(Reply::decode(&reply.encode()).unwrap().status, Status::Refused);
//! ```

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::frame;

/// The vsock port the agent's port-forward listener serves.
pub const PORT_FORWARD_VSOCK_PORT: u32 = 1026;

/// The first bytes of every request and reply.
pub const MAGIC: [u8; 4] = *b"RVPF";
/// The revision of this stream format.
pub const VERSION: u8 = 1;
/// Length of a request and of a reply, bytes.
pub const HEADER_LEN: usize = 8;
/// The largest frame a sender makes and a receiver accepts, bytes.
pub const MAX_FRAME: usize = 64 * 1024;

/// A header or frame that breaks the format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The magic bytes are wrong: not a port-forward stream.
    #[error("not a port-forward header (magic {0:02x?}, expected \"RVPF\")")]
    Magic([u8; 4]),
    /// Another revision of the format.
    #[error("port-forward format version {0} (this side speaks {VERSION})")]
    Version(u8),
    /// Port 0 cannot be connected to.
    #[error("port 0 requested (valid: 1 to 65535)")]
    PortZero,
    /// A reply status this side does not know.
    #[error("unknown port-forward reply status {0}")]
    Status(u8),
}

impl From<HeaderError> for std::io::Error {
    fn from(e: HeaderError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

fn check_prefix(bytes: &[u8; HEADER_LEN]) -> Result<(), HeaderError> {
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if magic != MAGIC {
        return Err(HeaderError::Magic(magic));
    }
    if bytes[4] != VERSION {
        return Err(HeaderError::Version(bytes[4]));
    }
    Ok(())
}

/// Host to guest: connect to this TCP port of the guest's loopback (127.0.0.1, else ::1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The port; never 0.
    pub port: u16,
}

impl Request {
    /// `RVPF`, version, 0, port (big-endian).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let p = self.port.to_be_bytes();
        [
            MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], VERSION, 0, p[0], p[1],
        ]
    }

    /// Parses a request; the reserved byte is ignored.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Request, HeaderError> {
        check_prefix(bytes)?;
        let port = u16::from_be_bytes([bytes[6], bytes[7]]);
        if port == 0 {
            return Err(HeaderError::PortZero);
        }
        Ok(Request { port })
    }
}

/// What became of a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Connected: frames follow.
    Connected = 0,
    /// Nothing listens on the port (ECONNREFUSED on both loopback addresses).
    Refused = 1,
    /// The connection failed otherwise (`errno` says how).
    Failed = 2,
    /// The request broke the format.
    BadRequest = 3,
}

/// Guest to host: the outcome of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The outcome.
    pub status: Status,
    /// The guest's errno for `Refused` and `Failed` (0 when none, capped at 65535).
    pub errno: u16,
}

impl Reply {
    /// Connected.
    pub fn connected() -> Reply {
        Reply {
            status: Status::Connected,
            errno: 0,
        }
    }

    /// Nothing listens.
    pub fn refused(errno: i32) -> Reply {
        Reply {
            status: Status::Refused,
            errno: u16::try_from(errno).unwrap_or(u16::MAX),
        }
    }

    /// `RVPF`, version, status, errno (big-endian).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let e = self.errno.to_be_bytes();
        [
            MAGIC[0],
            MAGIC[1],
            MAGIC[2],
            MAGIC[3],
            VERSION,
            self.status as u8,
            e[0],
            e[1],
        ]
    }

    /// Parses a reply.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Reply, HeaderError> {
        check_prefix(bytes)?;
        let status = match bytes[5] {
            0 => Status::Connected,
            1 => Status::Refused,
            2 => Status::Failed,
            3 => Status::BadRequest,
            other => return Err(HeaderError::Status(other)),
        };
        Ok(Reply {
            status,
            errno: u16::from_be_bytes([bytes[6], bytes[7]]),
        })
    }
}

/// Reads exactly one header.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<[u8; HEADER_LEN]> {
    let mut buf = [0u8; HEADER_LEN];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Bytes moved by [`splice`], per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spliced {
    /// From the plain stream into frames.
    pub sent: u64,
    /// From frames to the plain stream.
    pub received: u64,
}

/// Joins a plain byte stream (the TCP connection) to a framed one (the vsock stream), both
/// ways, until both directions ended; each end of input becomes a half-close on the other
/// side. An error in either direction ends both: the caller drops the streams (and should
/// reset the TCP connection, so its peer sees the abort).
pub async fn splice<P, F>(plain: P, framed: F) -> std::io::Result<Spliced>
where
    P: AsyncRead + AsyncWrite,
    F: AsyncRead + AsyncWrite,
{
    let (plain_r, plain_w) = tokio::io::split(plain);
    let (framed_r, framed_w) = tokio::io::split(framed);
    let (sent, received) = tokio::try_join!(
        frame::send(plain_r, framed_w, MAX_FRAME),
        frame::receive(framed_r, plain_w, MAX_FRAME)
    )?;
    Ok(Spliced { sent, received })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncWriteExt};

    #[test]
    fn request_round_trips_and_refuses_bad_headers() {
        for port in [1u16, 80, 8080, 65535] {
            let r = Request { port };
            assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }
        assert_eq!(&Request { port: 0x1f90 }.encode(), b"RVPF\x01\x00\x1f\x90");
        assert_eq!(
            Request::decode(b"RVPF\x01\x00\x00\x00"),
            Err(HeaderError::PortZero)
        );
        assert_eq!(
            Request::decode(b"HTTP\x01\x00\x00\x50"),
            Err(HeaderError::Magic(*b"HTTP"))
        );
        assert_eq!(
            Request::decode(b"RVPF\x02\x00\x00\x50"),
            Err(HeaderError::Version(2))
        );
        let msg = HeaderError::Magic(*b"HTTP").to_string();
        assert!(msg.contains("RVPF"), "{msg}");
    }

    #[test]
    fn reply_round_trips_and_refuses_unknown_status() {
        for reply in [
            Reply::connected(),
            Reply::refused(111),
            Reply {
                status: Status::Failed,
                errno: 113,
            },
            Reply {
                status: Status::BadRequest,
                errno: 0,
            },
        ] {
            assert_eq!(Reply::decode(&reply.encode()).unwrap(), reply);
        }
        assert_eq!(Reply::refused(1 << 20).errno, u16::MAX);
        assert_eq!(
            Reply::decode(b"RVPF\x01\x09\x00\x00"),
            Err(HeaderError::Status(9))
        );
    }

    /// One side of a forwarded connection: `splice` between an in-memory "TCP" stream and a
    /// framed stream whose far end the test plays by hand.
    #[tokio::test]
    async fn splice_frames_data_and_carries_half_closes_both_ways() {
        let (plain, mut app) = duplex(1 << 20);
        let (framed, mut peer) = duplex(1 << 20);
        let task = tokio::spawn(splice(plain, framed));

        // App -> frames; the app's half-close becomes the end frame.
        app.write_all(b"ping").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        loop {
            let mut len = [0u8; 4];
            peer.read_exact(&mut len).await.unwrap();
            let n = u32::from_be_bytes(len) as usize;
            if n == 0 {
                break;
            }
            let mut data = vec![0u8; n];
            peer.read_exact(&mut data).await.unwrap();
            got.extend(data);
        }
        assert_eq!(got, b"ping");

        // After the app's half-close, data still flows to it; then the end frame is its EOF.
        peer.write_all(&[0, 0, 0, 4]).await.unwrap();
        peer.write_all(b"pong").await.unwrap();
        peer.write_all(&[0, 0, 0, 0]).await.unwrap();
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
        let spliced = task.await.unwrap().unwrap();
        assert_eq!(
            spliced,
            Spliced {
                sent: 4,
                received: 4
            }
        );
    }

    #[tokio::test]
    async fn two_splices_back_to_back_copy_a_large_stream_exactly() {
        // host app <-> splice <-> frames <-> splice <-> guest app, as in a real forward.
        let (host_plain, mut host_app) = duplex(64 * 1024);
        let (guest_plain, mut guest_app) = duplex(64 * 1024);
        let (host_framed, guest_framed) = duplex(64 * 1024);
        let host = tokio::spawn(splice(host_plain, host_framed));
        let guest = tokio::spawn(splice(guest_plain, guest_framed));
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            host_app.write_all(&sent).await.unwrap();
            host_app.shutdown().await.unwrap();
            let mut reply = Vec::new();
            host_app.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut received = Vec::new();
        guest_app.read_to_end(&mut received).await.unwrap();
        assert!(received == data, "the guest got other bytes than sent");
        guest_app.write_all(b"done").await.unwrap();
        guest_app.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
        assert_eq!(host.await.unwrap().unwrap().sent, 1_000_000);
        assert_eq!(guest.await.unwrap().unwrap().received, 1_000_000);
    }

    #[tokio::test]
    async fn a_stream_ending_without_end_frame_is_an_abort() {
        let (plain, _app) = duplex(1024);
        let (framed, mut peer) = duplex(1024);
        let task = tokio::spawn(splice(plain, framed));
        peer.write_all(&[0, 0, 0, 2, b'h']).await.unwrap();
        drop(peer);
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused() {
        let (plain, _app) = duplex(1024);
        let (framed, mut peer) = duplex(1024);
        let task = tokio::spawn(splice(plain, framed));
        let len = (MAX_FRAME as u32 + 1).to_be_bytes();
        peer.write_all(&len).await.unwrap();
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("65537"), "{err}");
    }
}
