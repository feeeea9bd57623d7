//! The shim's view of a container's processes: stdio relays between containerd's FIFOs (or
//! log files) and the process's stdio streams, and exit statuses that waiters watch.

use std::path::PathBuf;
use std::time::Duration;

use runvm_sandbox::process::{receive_output, send_input, FdStream, Streams};
use serde_json::Value;
use tokio::io::AsyncWrite;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How long a process's output may keep flowing after it exited (a daemonized child can hold
/// the pipe open forever).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A process's exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit status (128+N for signal N).
    pub status: u32,
    /// When, in ns since the Unix epoch.
    pub at_ns: u64,
}

/// Where containerd wants a process's stdio.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stdio {
    /// Stdin FIFO ("" for none).
    pub stdin: String,
    /// Stdout FIFO or `file://` URI ("" for none).
    pub stdout: String,
    /// Stderr FIFO or `file://` URI ("" for none).
    pub stderr: String,
    /// A terminal (stderr goes to stdout).
    pub terminal: bool,
}

/// One process: the init (exec id "") or an exec'd one.
#[derive(Debug)]
pub struct Proc {
    /// Its stdio.
    pub stdio: Stdio,
    /// The OCI process of an exec not yet started.
    pub spec: Option<Value>,
    /// Started in the guest.
    pub started: bool,
    /// Paused (init only).
    pub paused: bool,
    /// The exit, once known.
    pub exit: watch::Sender<Option<Exit>>,
    /// The stdin relay.
    pub stdin_task: Option<JoinHandle<()>>,
    /// Tells the stdin relay to end the process's stdin (CloseIO).
    pub stdin_close: Option<oneshot::Sender<()>>,
    /// The stdout and stderr relays.
    pub output_tasks: Vec<JoinHandle<()>>,
}

impl Proc {
    /// A process not yet started.
    pub fn new(stdio: Stdio, spec: Option<Value>) -> Proc {
        Proc {
            stdio,
            spec,
            started: false,
            paused: false,
            exit: watch::channel(None).0,
            stdin_task: None,
            stdin_close: None,
            output_tasks: Vec::new(),
        }
    }

    /// Its exit, once known.
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Starts relaying its stdio between containerd's FIFOs and `streams` (container `id`).
    pub fn start_io(&mut self, id: &str, streams: Streams) {
        let Streams {
            stdin,
            stdout,
            stderr,
        } = streams;
        for (stream, target) in [
            (stdout, self.stdio.stdout.clone()),
            (stderr, self.stdio.stderr.clone()),
        ] {
            if let Some(stream) = stream {
                self.output_tasks
                    .push(relay_output(id.to_string(), stream, target));
            }
        }
        if let Some(stream) = stdin {
            let (close, closed) = oneshot::channel::<()>();
            self.stdin_close = Some(close);
            let path = self.stdio.stdin.clone();
            let id = id.to_string();
            self.stdin_task = Some(tokio::spawn(async move {
                let closed = async {
                    let _ = closed.await;
                };
                tokio::pin!(closed);
                // Opening a FIFO for reading waits for its writer (containerd opens it).
                let opened = tokio::select! {
                    f = tokio::fs::File::open(&path) => Some(f),
                    () = &mut closed => None,
                };
                let result = match opened {
                    Some(Ok(input)) => send_input(input, stream, closed).await,
                    Some(Err(e)) => {
                        tracing::warn!(container = %id, path, error = %e, "opening stdin");
                        send_input(tokio::io::empty(), stream, std::future::pending()).await
                    }
                    None => send_input(tokio::io::empty(), stream, std::future::pending()).await,
                };
                if let Err(e) = result {
                    tracing::debug!(container = %id, error = %e, "stdin relay ended");
                }
            }));
        }
    }

    /// Ends the process's stdin (CloseIO): the relay sends what it has, then the end.
    pub fn close_stdin(&mut self) {
        if let Some(close) = self.stdin_close.take() {
            let _ = close.send(());
        }
    }

    /// Lets the output relays finish (bounded), then stops every relay.
    pub fn drain_io(&mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let outputs = std::mem::take(&mut self.output_tasks);
        let stdin = self.stdin_task.take();
        async move {
            for mut task in outputs {
                if tokio::time::timeout(DRAIN_TIMEOUT, &mut task)
                    .await
                    .is_err()
                {
                    task.abort();
                }
            }
            if let Some(task) = stdin {
                task.abort();
            }
        }
    }

    /// Stops every relay at once.
    pub fn abort_io(&mut self) {
        for t in self.output_tasks.drain(..) {
            t.abort();
        }
        if let Some(t) = self.stdin_task.take() {
            t.abort();
        }
    }
}

/// Opens where an output stream goes: a FIFO (waiting for its reader) or a `file://` URI.
async fn open_output(target: &str) -> std::io::Result<Box<dyn AsyncWrite + Unpin + Send>> {
    if let Some(path) = target.strip_prefix("file://") {
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(PathBuf::from(path))
            .await?;
        return Ok(Box::new(f));
    }
    if target.contains("://") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("log URI {target:?}: only FIFOs and file:// are supported"),
        ));
    }
    let f = tokio::fs::OpenOptions::new()
        .write(true)
        .open(target)
        .await?;
    Ok(Box::new(f))
}

fn relay_output(id: String, stream: FdStream, target: String) -> JoinHandle<()> {
    tokio::spawn(async move {
        let out = match open_output(&target).await {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!(container = %id, target, error = %e, "opening an output stream");
                return;
            }
        };
        if let Err(e) = receive_output(stream, out).await {
            tracing::debug!(container = %id, target, error = %e, "output relay ended");
        }
    })
}
