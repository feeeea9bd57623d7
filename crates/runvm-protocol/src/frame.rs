//! Frames: how runvm's vsock byte streams (port forwarding, process stdio) say where a
//! direction ends. A frame is a 4-byte big-endian length and that many bytes; a frame of length
//! 0 says the sender will send nothing more. The framing is needed because vhost-device-vsock
//! (hybrid vsock) turns the end of a host unix stream into a full shutdown of the guest's
//! socket, and ignores a guest's shutdown while it still holds data for the host: the stream
//! itself cannot say "this direction is done" reliably. The end of a stream without an end
//! frame is an abort (`UnexpectedEof`).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes of a frame's length prefix.
pub const PREFIX: usize = 4;

/// A frame longer than the receiver accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame of {len} bytes (the limit is {max})")]
pub struct FrameTooLong {
    /// The length the frame announced.
    pub len: u32,
    /// The most this receiver accepts.
    pub max: usize,
}

impl From<FrameTooLong> for std::io::Error {
    fn from(e: FrameTooLong) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// Sends `buf[PREFIX..PREFIX + n]` as one frame (the first [`PREFIX`] bytes of `buf` are
/// overwritten with the length), in one write; `n == 0` sends the end frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut [u8],
    n: usize,
) -> std::io::Result<()> {
    let len = u32::try_from(n).map_err(|_| FrameTooLong {
        len: u32::MAX,
        max: u32::MAX as usize,
    })?;
    buf[..PREFIX].copy_from_slice(&len.to_be_bytes());
    w.write_all(&buf[..PREFIX + n]).await?;
    if n == 0 {
        w.flush().await?;
    }
    Ok(())
}

/// Reads one frame into `buf` (at most `buf.len()` bytes accepted); `None` for the end frame.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> std::io::Result<Option<usize>> {
    let mut len = [0u8; PREFIX];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len);
    let n = usize::try_from(len).unwrap_or(usize::MAX);
    if n > buf.len() {
        return Err(FrameTooLong {
            len,
            max: buf.len(),
        }
        .into());
    }
    if n == 0 {
        return Ok(None);
    }
    r.read_exact(&mut buf[..n]).await?;
    Ok(Some(n))
}

/// Reads the plain stream into frames of at most `max` bytes until it ends, then sends the end
/// frame. Returns the bytes sent.
pub async fn send<R, W>(mut plain: R, mut framed: W, max: usize) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; PREFIX + max];
    let mut total = 0u64;
    loop {
        let n = plain.read(&mut buf[PREFIX..]).await?;
        write_frame(&mut framed, &mut buf, n).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Writes frames (at most `max` bytes each) to the plain stream until the end frame, then
/// half-closes it. Returns the bytes received.
pub async fn receive<R, W>(mut framed: R, mut plain: W, max: usize) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; max];
    let mut total = 0u64;
    while let Some(n) = read_frame(&mut framed, &mut buf).await? {
        plain.write_all(&buf[..n]).await?;
        total += n as u64;
    }
    plain.shutdown().await?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn send_then_receive_copies_exactly_and_ends_with_the_end_frame() {
        let (mut app, plain) = duplex(4096);
        let (framed_w, framed_r) = duplex(4096);
        let (out, mut sink) = duplex(1 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            app.write_all(&sent).await.unwrap();
            app.shutdown().await.unwrap();
        });
        let tx = tokio::spawn(send(plain, framed_w, 1000));
        let rx = tokio::spawn(receive(framed_r, out, 1000));
        let mut got = Vec::new();
        sink.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(tx.await.unwrap().unwrap(), 300_000);
        assert_eq!(rx.await.unwrap().unwrap(), 300_000);
        assert!(got == data, "other bytes came out than went in");
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_refused_naming_both_sizes() {
        let (mut w, mut r) = duplex(64);
        w.write_all(&1001u32.to_be_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1000];
        let err = read_frame(&mut r, &mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("1001") && err.to_string().contains("1000"));
    }

    #[tokio::test]
    async fn a_stream_ending_inside_a_frame_is_an_abort() {
        let (mut w, r) = duplex(64);
        w.write_all(&[0, 0, 0, 3, b'a']).await.unwrap();
        drop(w);
        let (out, _sink) = duplex(64);
        let err = receive(r, out, 16).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
