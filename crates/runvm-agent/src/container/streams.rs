//! The guest end of process stdio streams (`runvm_protocol::stdio`): the host opens one vsock
//! stream per stdio stream of a process it is about to ask for, each starting with a header
//! naming a token and the stream; the listener parks them by token; creating the process
//! claims them (waiting a bounded time for late ones) and joins them to the process's pipes or
//! terminal with a pump per stream. No per-chunk protobuf and no round trip per chunk: output
//! is sent as it comes, as frames; back-pressure is vsock's credit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runvm_protocol::frame::{self, PREFIX};
use runvm_protocol::stdio::{
    Header, StreamKind, HEADER_LEN, MAX_FRAME, STDIO_VSOCK_PORT, TOKEN_LEN,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::Notify;

use super::process::Process;
use super::stdio::WriteError;
use crate::error::{AgentError, Result};

/// How long the host has to send a stream's header once connected.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long creating a process waits for streams the host announced but that have not
/// arrived yet (they are opened before the request, so normally they are already there).
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);
/// A parked stream no process claimed within this time is dropped.
const PARK_LIMIT: Duration = Duration::from_secs(60);

/// A byte stream from the host.
pub trait StreamIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> StreamIo for T {}

/// A boxed host stream.
pub type HostStream = Box<dyn StreamIo>;

/// Parked streams by token and kind, with when they arrived.
type Parked = HashMap<([u8; TOKEN_LEN], StreamKind), (HostStream, Instant)>;

/// Streams that arrived and wait for their process.
#[derive(Default)]
pub struct StreamRegistry {
    parked: Mutex<Parked>,
    arrived: Notify,
}

impl std::fmt::Debug for StreamRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.parked.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("StreamRegistry")
            .field("parked", &n)
            .finish()
    }
}

/// The host streams of one process, claimed.
#[derive(Default)]
pub struct Claimed {
    pub stdin: Option<HostStream>,
    pub stdout: Option<HostStream>,
    pub stderr: Option<HostStream>,
}

impl std::fmt::Debug for Claimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimed")
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .finish()
    }
}

impl StreamRegistry {
    pub fn new() -> Arc<StreamRegistry> {
        Arc::new(StreamRegistry::default())
    }

    fn map(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `stream` for the process that will claim `token`; a stream parked earlier under
    /// the same token and kind is replaced (dropped), as are streams parked too long.
    pub fn park(&self, header: Header, stream: HostStream) {
        let now = Instant::now();
        let mut map = self.map();
        map.retain(|_, (_, at)| now.duration_since(*at) < PARK_LIMIT);
        map.insert((header.token, header.kind), (stream, now));
        drop(map);
        self.arrived.notify_waiters();
    }

    fn take(&self, token: &[u8; TOKEN_LEN], kind: StreamKind) -> Option<HostStream> {
        self.map().remove(&(*token, kind)).map(|(s, _)| s)
    }

    /// Takes the streams `wanted` of `token`, waiting up to `timeout` for those not there yet.
    /// On error none is kept (they are dropped: the host sees its streams end).
    pub async fn claim(
        &self,
        token: &[u8],
        wanted: &[StreamKind],
        timeout: Duration,
    ) -> Result<Claimed> {
        let token: [u8; TOKEN_LEN] = token.try_into().map_err(|_| {
            AgentError::invalid(format!(
                "stdio stream token of {} bytes (valid: {TOKEN_LEN})",
                token.len()
            ))
        })?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut claimed = Claimed::default();
        for &kind in wanted {
            let stream = loop {
                let notified = self.arrived.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(s) = self.take(&token, kind) {
                    break s;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return Err(AgentError::precondition(format!(
                        "the host's {} stream did not arrive within {}s",
                        kind.as_str(),
                        timeout.as_secs()
                    )));
                }
            };
            match kind {
                StreamKind::Stdin => claimed.stdin = Some(stream),
                StreamKind::Stdout => claimed.stdout = Some(stream),
                StreamKind::Stderr => claimed.stderr = Some(stream),
            }
        }
        Ok(claimed)
    }
}

/// Serves stdio streams on vsock until the agent ends. A listener that cannot be made is
/// logged: a process asking for streams is then refused once its claim times out.
pub async fn serve_vsock(registry: Arc<StreamRegistry>) {
    crate::portfwd::accept_vsock(STDIO_VSOCK_PORT, "stdio streams", |stream| {
        let registry = Arc::clone(&registry);
        tokio::spawn(async move { receive(&registry, Box::new(stream)).await });
    })
    .await;
}

/// Reads a new stream's header and parks it; a stream with a bad or missing header is dropped.
pub async fn receive(registry: &StreamRegistry, mut stream: HostStream) {
    let mut buf = [0u8; HEADER_LEN];
    match tokio::time::timeout(HEADER_TIMEOUT, stream.read_exact(&mut buf)).await {
        Ok(Ok(_)) => match Header::decode(&buf) {
            Ok(header) => registry.park(header, stream),
            Err(e) => tracing::warn!(error = %e, "stdio stream refused"),
        },
        Ok(Err(e)) => tracing::debug!(error = %e, "stdio stream ended before its header"),
        Err(_) => tracing::warn!("stdio stream sent no header within 10s"),
    }
}

/// Joins claimed streams to a new process: stdout and stderr are sent as frames until their
/// pipe's end, stdin is written until the host's end frame (or the stream's end), then closed.
pub fn attach(process: &Arc<Process>, claimed: Claimed) {
    let Claimed {
        stdin,
        stdout,
        stderr,
    } = claimed;
    if let Some(s) = stdout {
        tokio::spawn(send_output(Arc::clone(process), StreamKind::Stdout, s));
    }
    if let Some(s) = stderr {
        tokio::spawn(send_output(Arc::clone(process), StreamKind::Stderr, s));
    }
    if let Some(s) = stdin {
        tokio::spawn(receive_input(Arc::clone(process), s));
    }
}

/// One output stream to the host. If the host goes away, the pipe is closed, so that the
/// process gets EPIPE instead of blocking forever on a pipe nobody reads. After the end frame
/// the stream is held until the host closes it: closing first from the guest could lose what
/// the vsock backend still holds for the host.
async fn send_output(process: Arc<Process>, kind: StreamKind, mut host: HostStream) {
    let output = match kind {
        StreamKind::Stderr => &process.io.stderr,
        _ => &process.io.stdout,
    };
    let mut buf = vec![0u8; PREFIX + MAX_FRAME];
    loop {
        let n = match output.read_into(&mut buf[PREFIX..]).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(exec = %process.exec_id, stream = kind.as_str(), error = %e, "cannot read the process's output");
                0
            }
        };
        if let Err(e) = frame::write_frame(&mut host, &mut buf, n).await {
            tracing::debug!(exec = %process.exec_id, stream = kind.as_str(), error = %e, "the host's stream ended; closing the pipe");
            output.close().await;
            return;
        }
        if n == 0 {
            break;
        }
    }
    let mut rest = [0u8; 64];
    while matches!(host.read(&mut rest).await, Ok(n) if n > 0) {}
}

/// The host's input to the process's stdin, until the end frame or the stream's end (both
/// close stdin: the process reads EOF).
async fn receive_input(process: Arc<Process>, mut host: HostStream) {
    let Some(stdin) = process.io.stdin.as_ref() else {
        return;
    };
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        match frame::read_frame(&mut host, &mut buf).await {
            Ok(Some(n)) => match stdin.write(&buf[..n]).await {
                Ok(_) => {}
                Err(WriteError::Closed) => return,
                Err(WriteError::Io(e)) => {
                    tracing::debug!(exec = %process.exec_id, error = %e, "the process no longer reads its stdin");
                    break;
                }
            },
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(exec = %process.exec_id, error = %e, "the host's stdin stream ended without its end");
                break;
            }
        }
    }
    if let Err(e) = stdin.close().await {
        tracing::debug!(exec = %process.exec_id, error = %e, "closing stdin");
    }
}

/// Checks a new process's stdio config before anything is made: streams are attached only
/// through a stream token, so asking for stdin, stdout or stderr without one is refused
/// (INVALID_ARGUMENT) instead of leaving the process writing to pipes nobody reads. A process
/// without a token asks for no stream and gets `/dev/null` as stdin, stdout and stderr (or, with
/// a terminal, a terminal nobody is attached to).
pub fn check_config(cfg: &runvm_protocol::agent::StdioConfig) -> Result<()> {
    let kinds = wanted(cfg.stdin, cfg.stdout, cfg.stderr, cfg.terminal);
    if cfg.stream_token.is_empty() && !kinds.is_empty() {
        let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        return Err(AgentError::invalid(format!(
            "stdio streams requested without a stream token: {} (stdio travels only on \
             the host's streams, runvm_protocol::stdio)",
            names.join(", ")
        )));
    }
    if !cfg.stream_token.is_empty() && cfg.stream_token.len() != TOKEN_LEN {
        return Err(AgentError::invalid(format!(
            "stdio stream token of {} bytes (valid: {TOKEN_LEN})",
            cfg.stream_token.len()
        )));
    }
    Ok(())
}

/// The streams a process's stdio config asks for.
pub fn wanted(stdin: bool, stdout: bool, stderr: bool, terminal: bool) -> Vec<StreamKind> {
    let mut kinds = Vec::new();
    if stdin {
        kinds.push(StreamKind::Stdin);
    }
    if stdout {
        kinds.push(StreamKind::Stdout);
    }
    if stderr && !terminal {
        kinds.push(StreamKind::Stderr);
    }
    kinds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::stdio;
    use crate::reaper::Reaper;
    use tokio::io::{duplex, AsyncWriteExt};

    fn header(kind: StreamKind) -> Header {
        Header {
            token: [9; TOKEN_LEN],
            kind,
        }
    }

    #[tokio::test]
    async fn a_stream_arriving_after_the_request_is_claimed() {
        let registry = StreamRegistry::new();
        let late = Arc::clone(&registry);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (a, _b) = duplex(16);
            late.park(header(StreamKind::Stdout), Box::new(a));
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let claimed = registry
            .claim(
                &[9; TOKEN_LEN],
                &[StreamKind::Stdout],
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert!(claimed.stdout.is_some() && claimed.stdin.is_none());
    }

    #[tokio::test]
    async fn a_missing_stream_fails_the_claim_naming_it_and_a_bad_token_is_refused() {
        let registry = StreamRegistry::new();
        let (a, _b) = duplex(16);
        registry.park(header(StreamKind::Stdout), Box::new(a));
        let err = registry
            .claim(
                &[9; TOKEN_LEN],
                &[StreamKind::Stdout, StreamKind::Stderr],
                Duration::from_millis(50),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("stderr"), "{err}");
        let err = registry
            .claim(&[1, 2, 3], &[StreamKind::Stdout], Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("3 bytes"), "{err}");
    }

    #[test]
    fn stdio_without_a_stream_token_is_refused_by_name_and_none_is_allowed() {
        use runvm_protocol::agent::StdioConfig;
        let cfg = |stdin, stdout, stderr, terminal, token: &[u8]| StdioConfig {
            stdin,
            stdout,
            stderr,
            terminal,
            stream_token: token.to_vec(),
            ..Default::default()
        };
        let err = check_config(&cfg(false, true, true, false, b"")).unwrap_err();
        assert_eq!(err.code, ttrpc::Code::INVALID_ARGUMENT);
        assert!(err.message.contains("stdout, stderr"), "{err}");
        let err = check_config(&cfg(true, false, false, true, b"")).unwrap_err();
        assert!(err.message.contains("stdin"), "{err}");
        // With a terminal, stderr is merged into stdout: asking for it alone attaches nothing.
        assert!(check_config(&cfg(false, false, true, true, b"")).is_ok());
        assert!(check_config(&cfg(false, false, false, false, b"")).is_ok());
        assert!(check_config(&cfg(false, false, false, true, b"")).is_ok());
        assert!(check_config(&cfg(true, true, true, false, &[9; TOKEN_LEN])).is_ok());
        let err = check_config(&cfg(false, true, false, false, &[9; 3])).unwrap_err();
        assert_eq!(err.code, ttrpc::Code::INVALID_ARGUMENT);
        assert!(err.message.contains("3 bytes"), "{err}");
    }

    #[tokio::test]
    async fn a_header_that_breaks_the_format_parks_nothing() {
        let registry = StreamRegistry::new();
        let (a, mut b) = duplex(64);
        b.write_all(b"GET / HTTP/1.1\r\n\r\nxxxxxxxx")
            .await
            .unwrap();
        receive(&registry, Box::new(a)).await;
        assert!(registry.map().is_empty());
        let (a, mut b) = duplex(64);
        b.write_all(&header(StreamKind::Stdin).encode())
            .await
            .unwrap();
        receive(&registry, Box::new(a)).await;
        assert_eq!(registry.map().len(), 1);
    }

    /// A process's pipes joined to framed host streams: output arrives byte-exact as frames
    /// then the end frame; the host's input reaches stdin and its end frame closes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attached_streams_carry_output_and_input_and_their_ends() {
        let (child, io) = stdio::pipes(true, true, true).unwrap();
        let reaper = Reaper::new();
        let process = Arc::new(Process::new(
            "e1".into(),
            1,
            reaper.watch(1, Instant::now()),
            io,
        ));
        let (out_agent, mut out_host) = duplex(1 << 16);
        let (err_agent, mut err_host) = duplex(1 << 16);
        let (in_agent, mut in_host) = duplex(1 << 16);
        attach(
            &process,
            Claimed {
                stdin: Some(Box::new(in_agent)),
                stdout: Some(Box::new(out_agent)),
                stderr: Some(Box::new(err_agent)),
            },
        );
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
        let stdio::ChildStdio {
            stdin: stdin_read,
            stdout,
            stderr,
        } = child;
        let writer = {
            let data = data.clone();
            std::thread::spawn(move || {
                let mut done = 0;
                while done < data.len() {
                    done += nix::unistd::write(&stdout, &data[done..]).unwrap();
                }
                nix::unistd::write(&stderr, b"warning").unwrap();
            })
        };
        let out = tokio::spawn(async move { read_all(&mut out_host).await });
        let err = tokio::spawn(async move { read_all(&mut err_host).await });
        tokio::task::spawn_blocking(move || writer.join().unwrap())
            .await
            .unwrap();
        let got = out.await.unwrap();
        assert!(
            got == data,
            "stdout differs ({} bytes of {})",
            got.len(),
            data.len()
        );
        assert_eq!(err.await.unwrap(), b"warning");

        let mut msg = vec![0u8; PREFIX + 5];
        msg[PREFIX..].copy_from_slice(b"hello");
        frame::write_frame(&mut in_host, &mut msg, 5).await.unwrap();
        let mut end = [0u8; PREFIX];
        frame::write_frame(&mut in_host, &mut end, 0).await.unwrap();
        let got = tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            let mut buf = [0u8; 64];
            loop {
                let n = nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&stdin_read), &mut buf)
                    .unwrap();
                if n == 0 {
                    break all;
                }
                all.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .unwrap();
        assert_eq!(got, b"hello");
    }

    async fn read_all(host: &mut tokio::io::DuplexStream) -> Vec<u8> {
        let mut buf = vec![0u8; MAX_FRAME];
        let mut got = Vec::new();
        while let Some(n) = frame::read_frame(host, &mut buf).await.unwrap() {
            got.extend_from_slice(&buf[..n]);
        }
        got
    }
}
