//! A process in a container as the host drives it: one handle, used by the CLI's stand-in
//! (`run`, `create`, `exec`) and by the shim, that relays its stdio over the process's own
//! vsock streams (`runvm_protocol::stdio`), waits for its exit and records it, signals it and
//! resizes its terminal. [`Sandbox::process`](crate::Sandbox::process) gives one.
//!
//! The end of an output stream (its end frame: every holder of the pipe closed it) and the
//! process's exit ([`Process::wait`]) are distinct events; a relay ends with the former.

mod stream;

use std::sync::{Arc, Mutex};

use runvm_protocol::frame;
use runvm_protocol::stdio::MAX_FRAME;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

pub use stream::{FdStream, Streams};

use crate::agent::{Agent, AgentError, ExitStatus, ProcessRef};
use crate::container::io::IoError;
use crate::error::SandboxError;
use crate::id::{ContainerId, SandboxId};
use crate::store::Store;

/// Where a process's exit is recorded: its container's record (the init's exit stops it).
#[derive(Debug, Clone)]
pub struct ExitRecorder {
    pub(crate) store: Store,
    pub(crate) sandbox: SandboxId,
    pub(crate) container: ContainerId,
}

/// Bytes a relay carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    /// From the process's stdout.
    pub stdout: u64,
    /// From its stderr.
    pub stderr: u64,
}

/// A process of a container (its init, or an exec'd one).
#[derive(Debug)]
pub struct Process {
    agent: Arc<dyn Agent>,
    process: ProcessRef,
    exits: Option<ExitRecorder>,
    streams: Mutex<Option<Streams>>,
}

impl Process {
    /// The process `process` of the sandbox whose agent is `agent`; `exits` says where its exit
    /// is recorded (`None`: the caller records it), `streams` are its stdio streams if this
    /// handle relays them.
    pub fn new(
        agent: Arc<dyn Agent>,
        process: ProcessRef,
        exits: Option<ExitRecorder>,
        streams: Option<Streams>,
    ) -> Process {
        Process {
            agent,
            process,
            exits,
            streams: Mutex::new(streams),
        }
    }

    /// Which process.
    pub fn process_ref(&self) -> &ProcessRef {
        &self.process
    }

    /// Waits for the exit and records it (if this handle records exits).
    pub async fn wait(&self) -> Result<ExitStatus, SandboxError> {
        let status = self.agent.wait_process(&self.process).await?;
        if let Some(r) = &self.exits {
            crate::sandbox::record_exit_in(
                &r.store,
                &r.sandbox,
                &r.container,
                &self.process.exec_id,
                status,
            )?;
        }
        Ok(status)
    }

    /// Sends `signal` to the process, or with `all` to every process of its container.
    pub async fn signal(&self, signal: i32, all: bool) -> Result<(), AgentError> {
        self.agent.signal_process(&self.process, signal, all).await
    }

    /// Sets the window size of its terminal.
    pub async fn resize(&self, rows: u32, cols: u32) -> Result<(), AgentError> {
        self.agent.resize_tty(&self.process, rows, cols).await
    }

    /// Takes the stdio streams out of the handle (to relay them elsewhere, or to hand them to
    /// another process); `None` once taken.
    pub fn take_streams(&self) -> Option<Streams> {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Relays the process's stdio: `stdin` to it (in the background: input may never end; its
    /// end closes the process's stdin), its stdout and stderr to `stdout` and `stderr` until
    /// both ended. Streams not attached are skipped; a relay without streams (already taken)
    /// is an error.
    pub async fn relay<I, O, E>(
        &self,
        stdin: I,
        stdout: O,
        stderr: E,
    ) -> Result<Relayed, IoError>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin + Send,
        E: AsyncWrite + Unpin + Send,
    {
        let streams = self.take_streams().ok_or_else(|| {
            IoError::Host(std::io::Error::other(format!(
                "the stdio of {} is already being relayed",
                self.process
            )))
        })?;
        relay(streams, stdin, stdout, stderr).await
    }
}

/// Copies one output stream's frames to `out` until the end frame; returns the bytes.
async fn receive<W: AsyncWrite + Unpin>(
    stream: Option<FdStream>,
    mut out: W,
) -> std::io::Result<u64> {
    let Some(mut stream) = stream else {
        return Ok(0);
    };
    let mut buf = vec![0u8; MAX_FRAME];
    let mut total = 0;
    while let Some(n) = frame::read_frame(&mut stream, &mut buf).await? {
        out.write_all(&buf[..n]).await?;
        out.flush().await?;
        total += n as u64;
    }
    Ok(total)
}

/// [`Process::relay`] over streams held elsewhere (a stand-in that inherited them).
pub async fn relay<I, O, E>(
    streams: Streams,
    stdin: I,
    stdout: O,
    stderr: E,
) -> Result<Relayed, IoError>
where
    I: AsyncRead + Unpin + Send + 'static,
    O: AsyncWrite + Unpin + Send,
    E: AsyncWrite + Unpin + Send,
{
    let Streams {
        stdin: to_process,
        stdout: from_stdout,
        stderr: from_stderr,
    } = streams;
    if let Some(to) = to_process {
        tokio::spawn(async move {
            // Input ending early is normal (stdin is /dev/null, or the caller closed it); the
            // process's end of the stream stays until it is dropped here.
            match frame::send(stdin, to, MAX_FRAME).await {
                Ok(n) => tracing::debug!(bytes = n, "stdin relayed to its end"),
                Err(e) => tracing::debug!(error = %e, "stdin relay ended"),
            }
        });
    }
    let (stdout, stderr) = tokio::try_join!(receive(from_stdout, stdout), receive(from_stderr, stderr))?;
    Ok(Relayed { stdout, stderr })
}
