//! A container process's stdio as the agent holds it: the agent's ends of the pipes (or the pty
//! master) that the pumps of `streams.rs` join to the host's stdio streams.
//!
//! There is no buffer in the agent: a read takes what the pipe holds, so a process writing
//! faster than the host reads blocks on its full pipe, which is the back-pressure. Output pipes
//! are enlarged to [`OUTPUT_PIPE_SIZE`] so that one read, sent as one frame, can carry that
//! much: under TCG each wake-up of the pump costs.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Mutex;

/// The capacity asked for the output pipes (the kernel's default limit for unprivileged
/// processes, `/proc/sys/fs/pipe-max-size`, is 1 MiB; the agent is root), as large as the
/// largest stdio frame (`runvm_protocol::stdio::MAX_FRAME`).
pub const OUTPUT_PIPE_SIZE: i32 = 1 << 20;
/// The EOF character written to a terminal when the host ends its stdin (VEOF, ^D).
const TTY_EOF: u8 = 0x04;

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Registers an owned fd with the runtime's reactor.
pub fn async_fd(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open, and always returns the same fd, for as long as it is
    // owned, i.e. for the whole life of the AsyncFd that owns it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// An output stream of a process (stdout, stderr or the terminal), sent to the host.
#[derive(Debug)]
pub struct OutputStream {
    fd: Mutex<Option<AsyncFd<OwnedFd>>>,
    eof: AtomicBool,
    tty: bool,
}

impl OutputStream {
    /// A stream that was not requested (or is merged into stdout): at EOF from the start.
    pub fn closed() -> Self {
        OutputStream {
            fd: Mutex::new(None),
            eof: AtomicBool::new(true),
            tty: false,
        }
    }

    /// The read end of a pipe, or a pty master (`tty`: EIO then means EOF).
    pub fn new(fd: OwnedFd, tty: bool) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(OutputStream {
            fd: Mutex::new(Some(async_fd(fd, Interest::READABLE)?)),
            eof: AtomicBool::new(false),
            tty,
        })
    }

    /// Whether EOF has been returned (nothing more will come).
    pub fn is_eof(&self) -> bool {
        self.eof.load(Ordering::Acquire)
    }

    /// Waits for data or EOF, then fills `buf` (not empty) with what the pipe holds now;
    /// returns the bytes read, 0 at EOF (and at every call after it). Cancel-safe.
    pub async fn read_into(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut guard = self.fd.lock().await;
        let Some(fd) = guard.as_ref() else {
            return Ok(0);
        };
        let mut filled = 0;
        while filled < buf.len() {
            let result = if filled == 0 {
                let mut ready = fd.readable().await?;
                match ready.try_io(|inner| read_fd(inner.as_raw_fd(), buf)) {
                    Ok(r) => r,
                    Err(_would_block) => continue,
                }
            } else {
                // Already have data: take more only if it is there now.
                read_fd(fd.as_raw_fd(), &mut buf[filled..])
            };
            match result {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(filled),
                // A pty master reads EIO once every slave is closed.
                Err(e) if self.tty && e.raw_os_error() == Some(libc::EIO) => break,
                Err(e) if filled == 0 => return Err(e),
                Err(_) => return Ok(filled),
            }
        }
        if filled > 0 {
            // The next read sees the EOF again.
            return Ok(filled);
        }
        *guard = None;
        self.eof.store(true, Ordering::Release);
        Ok(0)
    }

    /// Closes the agent's end (the writer gets EPIPE from now on) and marks the stream ended.
    pub async fn close(&self) {
        *self.fd.lock().await = None;
        self.eof.store(true, Ordering::Release);
    }
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    nix::unistd::read(fd, buf).map_err(io::Error::from)
}

/// The stdin of a process (a pipe's write end, or the pty master), fed from the host's stream.
#[derive(Debug)]
pub struct InputStream {
    fd: Mutex<Option<AsyncFd<OwnedFd>>>,
    tty: bool,
}

/// Why a write to stdin failed.
#[derive(Debug)]
pub enum WriteError {
    /// Stdin was closed before (the host's end frame).
    Closed,
    /// The process no longer reads its stdin (broken pipe) or another I/O error.
    Io(io::Error),
}

impl InputStream {
    pub fn new(fd: OwnedFd, tty: bool) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(InputStream {
            fd: Mutex::new(Some(async_fd(fd, Interest::WRITABLE)?)),
            tty,
        })
    }

    /// Writes all of `data`, waiting while the pipe is full. Returns the bytes written: fewer
    /// than `data.len()` only when the reader went away part way.
    pub async fn write(&self, data: &[u8]) -> Result<usize, WriteError> {
        let guard = self.fd.lock().await;
        let Some(fd) = guard.as_ref() else {
            return Err(WriteError::Closed);
        };
        let mut written = 0;
        while written < data.len() {
            let mut ready = fd.writable().await.map_err(WriteError::Io)?;
            match ready.try_io(|inner| {
                nix::unistd::write(inner.get_ref(), &data[written..]).map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => written += n,
                Ok(Err(e)) if written > 0 => {
                    tracing::debug!(error = %e, written, "stdin write stopped part way");
                    break;
                }
                Ok(Err(e)) => return Err(WriteError::Io(e)),
                Err(_would_block) => continue,
            }
        }
        Ok(written)
    }

    /// Closes stdin: the pipe's write end is closed (the process reads EOF); on a terminal the
    /// EOF character is sent instead, since closing the master would hang the terminal up.
    pub async fn close(&self) -> io::Result<()> {
        let mut guard = self.fd.lock().await;
        if self.tty {
            if let Some(fd) = guard.as_ref() {
                let mut ready = fd.writable().await?;
                loop {
                    match ready.try_io(|inner| {
                        nix::unistd::write(inner.get_ref(), &[TTY_EOF]).map_err(io::Error::from)
                    }) {
                        Ok(r) => {
                            r?;
                            break;
                        }
                        Err(_would_block) => ready = fd.writable().await?,
                    }
                }
            }
        }
        *guard = None;
        Ok(())
    }
}

/// The fds a new process gets as 0, 1 and 2.
#[derive(Debug)]
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The agent's side of a process's stdio.
#[derive(Debug)]
pub struct ProcessIo {
    pub stdin: Option<InputStream>,
    pub stdout: OutputStream,
    pub stderr: OutputStream,
    /// The pty master, for window resizes.
    pub tty: Option<OwnedFd>,
}

fn dev_null() -> io::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}

/// `/dev/null` three times, for a process whose stdio is a terminal (the helper's own).
pub fn null_stdio() -> io::Result<ChildStdio> {
    Ok(ChildStdio {
        stdin: dev_null()?,
        stdout: dev_null()?,
        stderr: dev_null()?,
    })
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Pipes for the requested streams (`/dev/null` for the others).
pub fn pipes(stdin: bool, stdout: bool, stderr: bool) -> io::Result<(ChildStdio, ProcessIo)> {
    let (child_in, agent_in) = if stdin {
        let (r, w) = pipe()?;
        (r, Some(InputStream::new(w, false)?))
    } else {
        (dev_null()?, None)
    };
    let output = |wanted: bool| -> io::Result<(OwnedFd, OutputStream)> {
        if wanted {
            let (r, w) = pipe()?;
            // A smaller pipe still works, only with more round trips.
            if let Err(e) = fcntl(w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(OUTPUT_PIPE_SIZE)) {
                tracing::debug!(error = %e, "cannot enlarge an output pipe");
            }
            Ok((w, OutputStream::new(r, false)?))
        } else {
            Ok((dev_null()?, OutputStream::closed()))
        }
    };
    let (child_out, agent_out) = output(stdout)?;
    let (child_err, agent_err) = output(stderr)?;
    Ok((
        ChildStdio {
            stdin: child_in,
            stdout: child_out,
            stderr: child_err,
        },
        ProcessIo {
            stdin: agent_in,
            stdout: agent_out,
            stderr: agent_err,
            tty: None,
        },
    ))
}

impl ProcessIo {
    /// The agent's side of a terminal: output from the master, stdin (if requested) to it.
    pub fn from_tty(master: OwnedFd, stdin: bool) -> io::Result<ProcessIo> {
        let input = if stdin {
            Some(InputStream::new(master.try_clone()?, true)?)
        } else {
            None
        };
        let resize = master.try_clone()?;
        Ok(ProcessIo {
            stdin: input,
            stdout: OutputStream::new(master, true)?,
            stderr: OutputStream::closed(),
            tty: Some(resize),
        })
    }

    /// Whether every output stream has reached EOF.
    pub fn drained(&self) -> bool {
        self.stdout.is_eof() && self.stderr.is_eof()
    }
}

/// Sets a terminal's window size.
pub fn set_window_size(tty: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which is valid for the call;
    // the fd is owned and open.
    let r = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A unix socket that receives a pty master from libcontainer (its console socket).
#[derive(Debug)]
pub struct ConsoleSocket {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    /// Listens on a new socket in `dir` (short names: sun_path holds 108 bytes).
    pub fn bind(dir: &Path) -> io::Result<ConsoleSocket> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        Ok(ConsoleSocket { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts the container's connection and takes the pty master it sends.
    pub async fn receive(self, timeout: Duration) -> io::Result<OwnedFd> {
        let received = tokio::time::timeout(timeout, async {
            let (stream, _) = self.listener.accept().await?;
            loop {
                stream.readable().await?;
                match stream.try_io(Interest::READABLE, || receive_fd(stream.as_raw_fd())) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => return other,
                }
            }
        })
        .await;
        match received {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no terminal received on the console socket",
            )),
        }
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Receives one fd sent with SCM_RIGHTS on `sock`.
fn receive_fd(sock: RawFd) -> io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut buf = [0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut received: Vec<OwnedFd> = Vec::new();
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed this fd in our table for us; nothing else
                // owns it.
                received.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if received.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the console socket peer sent no file descriptor",
        ));
    }
    Ok(received.swap_remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At most `len` bytes (not 0) from `out`, and whether it is at EOF.
    async fn read(out: &OutputStream, len: usize) -> (Vec<u8>, bool) {
        let mut buf = vec![0u8; len];
        let n = out.read_into(&mut buf).await.unwrap();
        buf.truncate(n);
        (buf, n == 0)
    }

    fn write_all(fd: &OwnedFd, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            done += nix::unistd::write(fd, &data[done..]).unwrap();
        }
    }

    #[tokio::test]
    async fn reads_return_at_most_len_then_eof_forever() {
        let (r, w) = pipe().unwrap();
        let out = OutputStream::new(r, false).unwrap();
        write_all(&w, b"abcdef");
        assert_eq!(read(&out, 2).await, (b"ab".to_vec(), false));
        assert_eq!(read(&out, 100).await, (b"cdef".to_vec(), false));
        assert!(!out.is_eof());
        drop(w);
        assert_eq!(read(&out, 10).await, (Vec::new(), true));
        assert!(out.is_eof());
        assert_eq!(read(&out, 10).await, (Vec::new(), true));
    }

    #[tokio::test]
    async fn data_written_before_close_comes_before_eof() {
        let (r, w) = pipe().unwrap();
        let out = OutputStream::new(r, false).unwrap();
        write_all(&w, b"last words");
        drop(w);
        assert_eq!(read(&out, 4096).await, (b"last words".to_vec(), false));
        assert_eq!(read(&out, 4096).await, (Vec::new(), true));
    }

    #[tokio::test]
    async fn a_read_waits_for_data_and_fills_at_most_its_buffer() {
        const FRAME: usize = 1 << 20;
        let (r, w) = pipe().unwrap();
        // Room for more than a frame in the pipe, so the buffer is what stops the read.
        fcntl(w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(2 << 20)).ok();
        let out = std::sync::Arc::new(OutputStream::new(r, false).unwrap());
        let reader = tokio::spawn({
            let out = out.clone();
            async move { read(&out, FRAME).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !reader.is_finished(),
            "read must block while the pipe is empty"
        );
        let size = nix::fcntl::fcntl(w.as_raw_fd(), FcntlArg::F_GETPIPE_SZ).unwrap() as usize;
        let data = vec![7u8; size.min(FRAME + 4096)];
        write_all(&w, &data);
        let (got, eof) = reader.await.unwrap();
        assert!(!eof && !got.is_empty() && got.len() <= FRAME);
    }

    #[tokio::test]
    async fn a_cancelled_read_loses_nothing() {
        let (r, w) = pipe().unwrap();
        let out = OutputStream::new(r, false).unwrap();
        let timed_out = tokio::time::timeout(Duration::from_millis(20), read(&out, 10)).await;
        assert!(timed_out.is_err());
        write_all(&w, b"xyz");
        assert_eq!(read(&out, 10).await, (b"xyz".to_vec(), false));
    }

    #[tokio::test]
    async fn unrequested_stream_is_at_eof() {
        let out = OutputStream::closed();
        assert!(out.is_eof());
        assert_eq!(read(&out, 1).await, (Vec::new(), true));
    }

    #[tokio::test]
    async fn stdin_writes_block_on_a_full_pipe_and_close_gives_eof() {
        let (r, w) = pipe().unwrap();
        let input = std::sync::Arc::new(InputStream::new(w, false).unwrap());
        let size = fcntl(r.as_raw_fd(), FcntlArg::F_GETPIPE_SZ).unwrap() as usize;
        let data = vec![1u8; size * 2];
        let writer = tokio::spawn({
            let input = input.clone();
            async move { input.write(&data).await.map_err(|e| format!("{e:?}")) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "a full pipe must block the writer");
        // Read on another thread: this runtime has one, which the writer needs.
        let reader = std::thread::spawn(move || {
            let mut got = 0;
            let mut buf = vec![0u8; 65536];
            while got < size * 2 {
                got += nix::unistd::read(r.as_raw_fd(), &mut buf).unwrap();
            }
            r
        });
        assert_eq!(writer.await.unwrap().unwrap(), size * 2);
        let r = reader.join().unwrap();
        input.close().await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(nix::unistd::read(r.as_raw_fd(), &mut buf).unwrap(), 0);
        assert!(matches!(input.write(b"x").await, Err(WriteError::Closed)));
    }

    #[tokio::test]
    async fn stdin_of_a_gone_reader_is_an_error() {
        let (r, w) = pipe().unwrap();
        let input = InputStream::new(w, false).unwrap();
        drop(r);
        assert!(matches!(input.write(b"x").await, Err(WriteError::Io(_))));
    }

    #[tokio::test]
    async fn pipes_give_null_for_unrequested_streams() {
        let (child, io) = pipes(false, true, false).unwrap();
        assert!(io.stdin.is_none() && io.stderr.is_eof() && !io.stdout.is_eof());
        write_all(&child.stdout, b"hi");
        drop(child);
        assert_eq!(read(&io.stdout, 4096).await, (b"hi".to_vec(), false));
        assert_eq!(read(&io.stdout, 4096).await, (Vec::new(), true));
        assert!(io.drained());
    }
}
