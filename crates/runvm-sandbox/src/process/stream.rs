//! The host's end of a process's stdio streams: sockets to the agent (unix sockets of the
//! hybrid vsock device, or AF_VSOCK sockets), owned as file descriptors so that a stand-in
//! process can inherit them.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use runvm_protocol::stdio::{Header, StreamKind, TOKEN_LEN};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

use crate::agent::{Agent, AgentError, StdioSpec};

/// A connected socket driven by the runtime's reactor.
#[derive(Debug)]
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

impl FdStream {
    /// Takes a connected stream socket (made non-blocking here).
    pub fn new(fd: OwnedFd) -> io::Result<FdStream> {
        let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: an OwnedFd stays open, and is always the same fd, for as long as it is
        // owned, i.e. for the whole life of the AsyncFd that owns it.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| e.into_parts().1)?;
        Ok(FdStream { fd })
    }

    /// The socket, out of the reactor.
    pub fn into_fd(self) -> OwnedFd {
        self.fd.into_inner()
    }
}

fn io_result(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    io_result(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })
}

fn write_fd(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call;
    // MSG_NOSIGNAL: a closed peer is an EPIPE error, not a SIGPIPE.
    io_result(unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) })
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| read_fd(inner.as_raw_fd(), unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|inner| write_fd(inner.as_raw_fd(), buf)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: shutdown(2) on an owned, open socket.
        let r = unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOTCONN) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The host's ends of one process's stdio streams; `None` for a stream not attached.
#[derive(Debug, Default)]
pub struct Streams {
    /// To the process's stdin.
    pub stdin: Option<FdStream>,
    /// From its stdout (its terminal, with one).
    pub stdout: Option<FdStream>,
    /// From its stderr.
    pub stderr: Option<FdStream>,
}

/// A fresh random token.
fn new_token() -> Result<[u8; TOKEN_LEN], AgentError> {
    let mut token = [0u8; TOKEN_LEN];
    // SAFETY: getrandom(2) writes at most `token.len()` bytes into the valid buffer.
    let n = unsafe { libc::getrandom(token.as_mut_ptr().cast(), token.len(), 0) };
    if n != TOKEN_LEN as isize || token == [0u8; TOKEN_LEN] {
        return Err(AgentError::Transport {
            method: "stdio streams",
            reason: format!("cannot draw a stream token: {}", io::Error::last_os_error()),
        });
    }
    Ok(token)
}

impl Streams {
    /// Opens the streams `stdio` asks for (stderr not with a terminal) and puts their token in
    /// it: the process created with that `stdio` gets them.
    pub async fn open(agent: &dyn Agent, stdio: &mut StdioSpec) -> Result<Streams, AgentError> {
        let token = new_token()?;
        let open = |wanted: bool, kind: StreamKind| async move {
            if !wanted {
                return Ok(None);
            }
            let fd = agent.open_stdio(Header { token, kind }).await?;
            FdStream::new(fd)
                .map(Some)
                .map_err(|e| AgentError::Transport {
                    method: "stdio streams",
                    reason: format!("cannot use the {} stream: {e}", kind.as_str()),
                })
        };
        let (stdin, stdout, stderr) = tokio::try_join!(
            open(stdio.stdin, StreamKind::Stdin),
            open(stdio.stdout, StreamKind::Stdout),
            open(stdio.stderr && !stdio.terminal, StreamKind::Stderr),
        )?;
        stdio.stream_token = Some(token);
        Ok(Streams {
            stdin,
            stdout,
            stderr,
        })
    }

    /// The sockets (stdin, stdout, stderr), e.g. to hand to another process.
    pub fn into_fds(self) -> [Option<OwnedFd>; 3] {
        [
            self.stdin.map(FdStream::into_fd),
            self.stdout.map(FdStream::into_fd),
            self.stderr.map(FdStream::into_fd),
        ]
    }

    /// Streams over sockets from [`Streams::into_fds`].
    pub fn from_fds(fds: [Option<OwnedFd>; 3]) -> io::Result<Streams> {
        let [stdin, stdout, stderr] = fds;
        Ok(Streams {
            stdin: stdin.map(FdStream::new).transpose()?,
            stdout: stdout.map(FdStream::new).transpose()?,
            stderr: stderr.map(FdStream::new).transpose()?,
        })
    }
}
