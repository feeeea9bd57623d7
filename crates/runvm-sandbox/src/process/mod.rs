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
    pub async fn relay<I, O, E>(&self, stdin: I, stdout: O, stderr: E) -> Result<Relayed, IoError>
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

/// Copies one output stream's frames to `out` until the end frame; returns the bytes. The
/// stream ending without its end frame (the VM or the agent went away) is an error.
pub async fn receive_output<W: AsyncWrite + Unpin>(
    mut stream: FdStream,
    mut out: W,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; MAX_FRAME];
    let mut total = 0;
    while let Some(n) = frame::read_frame(&mut stream, &mut buf).await? {
        out.write_all(&buf[..n]).await?;
        out.flush().await?;
        total += n as u64;
    }
    Ok(total)
}

/// Sends `input` to the process's stdin stream until `input` ends or `close` completes (e.g.
/// containerd's CloseIO), then the end frame (the process reads EOF); returns the bytes sent.
pub async fn send_input<R, F>(mut input: R, mut stream: FdStream, close: F) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    F: std::future::Future<Output = ()>,
{
    use tokio::io::AsyncReadExt;
    tokio::pin!(close);
    let mut buf = vec![0u8; frame::PREFIX + INPUT_CHUNK];
    let mut total = 0u64;
    let mut closing = false;
    loop {
        let n = if closing {
            // Closed (containerd's CloseIO comes right after its client wrote its last bytes
            // and closed the FIFO): what is still readable goes first, then the end.
            match tokio::time::timeout(CLOSE_DRAIN, input.read(&mut buf[frame::PREFIX..])).await {
                Ok(r) => r?,
                Err(_) => 0,
            }
        } else {
            tokio::select! {
                r = input.read(&mut buf[frame::PREFIX..]) => r?,
                () = &mut close => {
                    closing = true;
                    continue;
                }
            }
        };
        frame::write_frame(&mut stream, &mut buf, n).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// After a close, how long the input may take to yield what is still readable.
const CLOSE_DRAIN: std::time::Duration = std::time::Duration::from_millis(200);

/// Bytes read from the host's input per frame.
const INPUT_CHUNK: usize = 256 * 1024;

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
            // Input ending early is normal (stdin is /dev/null, or the caller closed it).
            match send_input(stdin, to, std::future::pending()).await {
                Ok(n) => tracing::debug!(bytes = n, "stdin relayed to its end"),
                Err(e) => tracing::debug!(error = %e, "stdin relay ended"),
            }
        });
    }
    let (stdout, stderr) = tokio::try_join!(
        async {
            match from_stdout {
                Some(s) => receive_output(s, stdout).await,
                None => Ok(0),
            }
        },
        async {
            match from_stderr {
                Some(s) => receive_output(s, stderr).await,
                None => Ok(0),
            }
        },
    )?;
    Ok(Relayed { stdout, stderr })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use runvm_hypervisor::AgentAddress;

    use super::*;
    use crate::agent::{AgentConnector, CreateContainer, MockAgentConnector, StdioSpec};

    /// A connected mock agent with container "c1" created with `stdio` (streams opened), its
    /// init scripted to write `stdout` and `stderr`.
    async fn created(
        connector: &MockAgentConnector,
        stdio: StdioSpec,
        stdout: &[u8],
        stderr: &[u8],
    ) -> (Arc<dyn Agent>, Streams) {
        let addr = AgentAddress::Vsock { cid: 3, port: 1024 };
        let agent: Arc<dyn Agent> = connector
            .connect(&addr, Duration::from_secs(1))
            .await
            .unwrap()
            .into();
        let mut stdio = stdio;
        let streams = Streams::open(&*agent, &mut stdio).await.unwrap();
        agent
            .create_container(CreateContainer {
                container_id: "c1".into(),
                sandbox_id: "s".into(),
                spec: serde_json::json!({}),
                storages: vec![],
                stdio,
            })
            .await
            .unwrap();
        {
            let state = connector.state();
            let mut s = state.lock().unwrap();
            let p = s.processes.entry(ProcessRef::init("c1")).or_default();
            p.stdout = stdout.to_vec();
            p.stderr = stderr.to_vec();
        }
        (agent, streams)
    }

    #[tokio::test]
    async fn relay_carries_output_byte_exact_and_input_to_its_end() {
        let connector = MockAgentConnector::new();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (agent, streams) = created(&connector, StdioSpec::attached(false), &big, b"oops").await;
        agent.start_container("c1").await.unwrap();
        let process = Process::new(agent, ProcessRef::init("c1"), None, Some(streams));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let relayed = process
            .relay(std::io::Cursor::new(b"typed".to_vec()), &mut out, &mut err)
            .await
            .unwrap();
        assert_eq!(relayed.stdout, big.len() as u64);
        assert!(out == big, "stdout differs");
        assert_eq!(err, b"oops");
        // The stdin relay runs on: wait for the mock to see its end.
        for _ in 0..100 {
            if connector.state().lock().unwrap().processes[&ProcessRef::init("c1")].stdin_closed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let p = connector.state().lock().unwrap().processes[&ProcessRef::init("c1")].clone();
        assert_eq!(p.stdin, b"typed");
        assert!(p.stdin_closed);
        // Relaying twice is refused: one owner of the streams.
        assert!(process
            .relay(tokio::io::empty(), tokio::io::sink(), tokio::io::sink())
            .await
            .is_err());
    }

    #[tokio::test]
    async fn input_still_readable_when_stdin_is_closed_goes_before_the_end() {
        use tokio::io::AsyncWriteExt;
        // containerd's client writes its last bytes, closes the FIFO and sends CloseIO at
        // once: the close may be seen before the bytes were read.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let stream = FdStream::new(std::os::fd::OwnedFd::from(ours)).unwrap();
        let (input, mut writer) = tokio::io::duplex(64);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            writer.write_all(b"last words\n").await.unwrap();
        });
        let sent = send_input(input, stream, std::future::ready(()))
            .await
            .unwrap();
        assert_eq!(sent, 11);
        let mut peer = FdStream::new(std::os::fd::OwnedFd::from(theirs)).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        let n = frame::read_frame(&mut peer, &mut buf).await.unwrap();
        assert_eq!(n, Some(11));
        assert_eq!(&buf[..11], b"last words\n");
        assert_eq!(frame::read_frame(&mut peer, &mut buf).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_terminal_has_no_stderr_stream() {
        let connector = MockAgentConnector::new();
        let (_agent, streams) = created(&connector, StdioSpec::attached(true), b"", b"").await;
        assert!(streams.stdin.is_some() && streams.stdout.is_some() && streams.stderr.is_none());
    }

    /// One handle, two tasks: one relays the output while the other signals the process and
    /// waits for its exit.
    #[tokio::test]
    async fn a_process_handle_serves_two_tasks_at_once() {
        let connector = MockAgentConnector::new();
        let (agent, streams) = created(&connector, StdioSpec::attached(false), b"hi\n", b"").await;
        agent.start_container("c1").await.unwrap();
        let process = Arc::new(Process::new(
            agent,
            ProcessRef::init("c1"),
            None,
            Some(streams),
        ));
        let relaying = {
            let p = Arc::clone(&process);
            tokio::spawn(async move {
                let mut out = Vec::new();
                p.relay(tokio::io::empty(), &mut out, tokio::io::sink())
                    .await
                    .unwrap();
                out
            })
        };
        let signalling = {
            let p = Arc::clone(&process);
            tokio::spawn(async move {
                p.signal(15, false).await.unwrap();
                p.wait().await.unwrap()
            })
        };
        assert_eq!(relaying.await.unwrap(), b"hi\n");
        assert_eq!(signalling.await.unwrap().code, 128 + 15);
    }

    #[tokio::test]
    async fn an_output_stream_cut_before_its_end_is_an_error() {
        let connector = MockAgentConnector::new();
        let (_agent, streams) = created(&connector, StdioSpec::attached(false), b"", b"").await;
        // The guest's ends go away without an end frame (the VM died).
        connector.state().lock().unwrap().stdio_streams.clear();
        let err = relay(
            streams,
            tokio::io::empty(),
            tokio::io::sink(),
            tokio::io::sink(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("host stream"), "{err}");
    }
}
