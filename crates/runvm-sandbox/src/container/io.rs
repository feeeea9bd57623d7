//! Relaying a guest process's stdio to and from host streams.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::agent::{Agent, AgentError, ProcessRef};

/// Bytes asked for per read of the guest's output.
const READ_CHUNK: u32 = 1024 * 1024;
/// Bytes sent per write to the guest's stdin.
const WRITE_CHUNK: usize = 256 * 1024;
/// The first pause after a read that brought neither data nor EOF.
const EMPTY_READ_BACKOFF_FIRST: Duration = Duration::from_millis(1);
/// The longest pause between reads that bring neither data nor EOF.
const EMPTY_READ_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// stdout (the terminal, with a tty).
    Stdout,
    /// stderr.
    Stderr,
}

/// When the first byte of output passed: the host's monotonic clock and ns since the Unix epoch.
pub type FirstOutput = (Instant, u64);

/// A writer that records when the first byte passes through it, and tells a waiting party.
pub struct FirstWrite<W> {
    inner: W,
    first: Arc<OnceLock<FirstOutput>>,
    tell: Option<oneshot::Sender<FirstOutput>>,
}

impl<W> FirstWrite<W> {
    /// Wraps `inner`; the time of the first byte is kept in the returned cell and sent on the
    /// returned channel.
    pub fn new(
        inner: W,
    ) -> (
        Self,
        Arc<OnceLock<FirstOutput>>,
        oneshot::Receiver<FirstOutput>,
    ) {
        let first = Arc::new(OnceLock::new());
        let (tell, told) = oneshot::channel();
        let writer = FirstWrite {
            inner,
            first: Arc::clone(&first),
            tell: Some(tell),
        };
        (writer, first, told)
    }
}

impl<W> std::fmt::Debug for FirstWrite<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirstWrite")
            .field("first", &self.first.get())
            .finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for FirstWrite<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if !buf.is_empty() && self.first.get().is_none() {
            let at = *self
                .first
                .get_or_init(|| (Instant::now(), crate::state::unix_now_ns()));
            if let Some(tell) = self.tell.take() {
                let _ = tell.send(at);
            }
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Errors relaying stdio.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The host side failed. The message holds the I/O error, which is therefore not also
    /// its `source`.
    #[error("host stream: {0}")]
    Host(std::io::Error),
}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> Self {
        IoError::Host(e)
    }
}

/// Copies the process's `stream` to `out` until EOF; returns the bytes copied.
///
/// The agent's reads wait for data, so an answer with neither data nor EOF should not happen;
/// a guest that gives such answers at once is not allowed to make the host spin: after each
/// one the next read waits, 1 ms at first, doubling up to 100 ms, until data comes again.
pub async fn copy_output<W: AsyncWrite + Unpin>(
    agent: &dyn Agent,
    process: &ProcessRef,
    stream: OutputStream,
    out: &mut W,
) -> Result<u64, IoError> {
    let mut total = 0u64;
    let mut backoff = EMPTY_READ_BACKOFF_FIRST;
    loop {
        let chunk = match stream {
            OutputStream::Stdout => agent.read_stdout(process, READ_CHUNK).await?,
            OutputStream::Stderr => agent.read_stderr(process, READ_CHUNK).await?,
        };
        if chunk.eof {
            out.flush().await?;
            return Ok(total);
        }
        if chunk.data.is_empty() {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(EMPTY_READ_BACKOFF_MAX);
            continue;
        }
        backoff = EMPTY_READ_BACKOFF_FIRST;
        out.write_all(&chunk.data).await?;
        out.flush().await?;
        total += chunk.data.len() as u64;
    }
}

/// Copies `input` to the process's stdin until `input` ends, then closes the stdin; returns the
/// bytes copied.
pub async fn copy_input<R: AsyncRead + Unpin>(
    agent: &dyn Agent,
    process: &ProcessRef,
    input: &mut R,
) -> Result<u64, IoError> {
    let mut buf = vec![0u8; WRITE_CHUNK];
    let mut total = 0u64;
    loop {
        let n = input.read(&mut buf).await?;
        if n == 0 {
            agent.close_stdin(process).await?;
            return Ok(total);
        }
        let mut sent = 0;
        while sent < n {
            let taken = agent.write_stdin(process, &buf[sent..n]).await?;
            if taken == 0 {
                return Err(IoError::Agent(AgentError::InvalidReply {
                    method: "WriteStdin",
                    reason: "the agent took no bytes".into(),
                }));
            }
            sent += taken;
        }
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{AgentConnector, CreateContainer, MockAgentConnector, StdioSpec};
    use runvm_hypervisor::AgentAddress;

    async fn started(connector: &MockAgentConnector) -> Box<dyn Agent> {
        let addr = AgentAddress::Vsock { cid: 3, port: 1024 };
        let agent = connector
            .connect(&addr, Duration::from_secs(1))
            .await
            .unwrap();
        agent
            .create_container(CreateContainer {
                container_id: "c1".into(),
                sandbox_id: "s".into(),
                spec: serde_json::json!({}),
                storages: vec![],
                stdio: StdioSpec::default(),
            })
            .await
            .unwrap();
        agent.start_container("c1").await.unwrap();
        agent
    }

    #[tokio::test]
    async fn output_is_copied_until_eof() {
        let connector = MockAgentConnector::new();
        let agent = started(&connector).await;
        let p = ProcessRef::init("c1");
        let big: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        connector
            .state()
            .lock()
            .unwrap()
            .processes
            .get_mut(&p)
            .unwrap()
            .stdout = big.clone();
        let mut out = Vec::new();
        let n = copy_output(&*agent, &p, OutputStream::Stdout, &mut out)
            .await
            .unwrap();
        assert_eq!(n, big.len() as u64);
        assert_eq!(out, big);
    }

    /// Reads made by the copy within `period`, against a guest answering every read at once
    /// with no data and no EOF.
    async fn reads_against_an_empty_answering_guest(period: Duration) -> usize {
        let connector = MockAgentConnector::new();
        let agent = started(&connector).await;
        let p = ProcessRef::init("c1");
        connector
            .state()
            .lock()
            .unwrap()
            .processes
            .get_mut(&p)
            .unwrap()
            .empty_reads = u64::MAX;
        let mut out = Vec::new();
        let copy = copy_output(&*agent, &p, OutputStream::Stdout, &mut out);
        assert!(tokio::time::timeout(period, copy).await.is_err());
        assert!(out.is_empty());
        let state = connector.state();
        let s = state.lock().unwrap();
        s.calls.iter().filter(|c| *c == "read_stdout").count()
    }

    #[tokio::test]
    async fn empty_reads_back_off_instead_of_spinning() {
        // 1, 2, 4, ..., 64 ms, then 100 ms: about 11 reads in 500 ms (millions without).
        let reads = reads_against_an_empty_answering_guest(Duration::from_millis(500)).await;
        assert!((2..=20).contains(&reads), "{reads} reads in 500 ms");
    }

    #[tokio::test]
    async fn data_after_empty_reads_is_copied_and_resets_the_backoff() {
        let connector = MockAgentConnector::new();
        let agent = started(&connector).await;
        let p = ProcessRef::init("c1");
        {
            let state = connector.state();
            let mut s = state.lock().unwrap();
            let proc_ = s.processes.get_mut(&p).unwrap();
            proc_.empty_reads = 5;
            proc_.stdout = b"hello".to_vec();
        }
        let mut out = Vec::new();
        let started = Instant::now();
        let n = copy_output(&*agent, &p, OutputStream::Stdout, &mut out)
            .await
            .unwrap();
        assert_eq!(n, 5);
        assert_eq!(out, b"hello");
        // 1 + 2 + 4 + 8 + 16 ms of pauses, not more.
        assert!(started.elapsed() >= Duration::from_millis(31));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn input_is_sent_then_stdin_closed() {
        let connector = MockAgentConnector::new();
        let agent = started(&connector).await;
        let p = ProcessRef::init("c1");
        let data = vec![7u8; 600_000];
        let n = copy_input(&*agent, &p, &mut &data[..]).await.unwrap();
        assert_eq!(n, data.len() as u64);
        let state = connector.state();
        let s = state.lock().unwrap();
        let proc_ = &s.processes[&p];
        assert_eq!(proc_.stdin, data);
        assert!(proc_.stdin_closed);
    }
}
