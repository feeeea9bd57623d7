//! The sandbox's side of the factory: take a VM, say it was adopted; and the commands' side
//! (status, stop).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{socket_path, FactoryError, FactoryStatus, Reply, Request};
use crate::id::SandboxId;
use crate::state::SandboxRecord;

/// How long connecting to the daemon may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the daemon may take to answer a request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the factory gave no VM: the sandbox boots its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// No daemon serves the root.
    NotRunning,
    /// The daemon answered without a VM (empty pool, another configuration).
    Refused(String),
    /// Talking to the daemon failed.
    Failed(String),
}

impl Miss {
    /// A short name for the timeline (`factory-miss:NAME`).
    pub fn phase(&self) -> String {
        match self {
            Miss::NotRunning => "factory-miss:down".into(),
            Miss::Refused(reason) => format!(
                "factory-miss:{}",
                reason.split(':').next().unwrap_or(reason).trim()
            ),
            Miss::Failed(_) => "factory-miss:error".into(),
        }
    }
}

impl fmt::Display for Miss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Miss::NotRunning => f.write_str("no factory runs for this state root"),
            Miss::Refused(reason) => write!(f, "the factory has no VM to give: {reason}"),
            Miss::Failed(reason) => write!(f, "asking the factory failed: {reason}"),
        }
    }
}

/// One connection to the daemon.
struct Connection {
    socket: PathBuf,
    stream: BufReader<UnixStream>,
}

impl Connection {
    async fn open(root: &Path) -> Result<Connection, FactoryError> {
        let socket = socket_path(root);
        let io = |source| FactoryError::Io {
            action: "connect to the factory at",
            path: socket.clone(),
            source,
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&socket))
            .await
            .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?
            .map_err(io)?;
        Ok(Connection {
            socket,
            stream: BufReader::new(stream),
        })
    }

    /// As [`Connection::open`]; `None` when no daemon serves `root` (no socket, or nobody
    /// listening on it).
    async fn open_if_running(root: &Path) -> Result<Option<Connection>, FactoryError> {
        match Connection::open(root).await {
            Ok(c) => Ok(Some(c)),
            Err(FactoryError::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn protocol(&self, problem: impl Into<String>) -> FactoryError {
        FactoryError::Protocol {
            socket: self.socket.clone(),
            problem: problem.into(),
        }
    }

    async fn send(&mut self, request: &Request) -> Result<(), FactoryError> {
        let mut line = serde_json::to_vec(request)
            .map_err(|e| self.protocol(format!("cannot encode a request: {e}")))?;
        line.push(b'\n');
        let socket = self.socket.clone();
        self.stream
            .get_mut()
            .write_all(&line)
            .await
            .map_err(|source| FactoryError::Io {
                action: "write to the factory at",
                path: socket,
                source,
            })
    }

    async fn receive(&mut self) -> Result<Reply, FactoryError> {
        let mut line = String::new();
        let read = tokio::time::timeout(REPLY_TIMEOUT, self.stream.read_line(&mut line)).await;
        match read {
            Err(_) => Err(self.protocol(format!("did not answer within {REPLY_TIMEOUT:?}"))),
            Ok(Err(source)) => Err(FactoryError::Io {
                action: "read from the factory at",
                path: self.socket.clone(),
                source,
            }),
            Ok(Ok(0)) => Err(self.protocol("closed the connection without an answer")),
            Ok(Ok(_)) => serde_json::from_str(&line)
                .map_err(|e| self.protocol(format!("sent an answer that does not parse: {e}"))),
        }
    }

    async fn call(&mut self, request: &Request) -> Result<Reply, FactoryError> {
        self.send(request).await?;
        self.receive().await
    }
}

/// A VM the daemon handed over, not adopted yet: until [`Handout::adopted`], the pool owns it
/// (dropping this closes the connection, and the daemon takes it back or ends it).
pub struct Handout {
    connection: Connection,
    vm: SandboxId,
    record: SandboxRecord,
}

impl fmt::Debug for Handout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handout").field("vm", &self.vm).finish()
    }
}

impl Handout {
    /// The pool VM's id.
    pub fn vm(&self) -> &SandboxId {
        &self.vm
    }

    /// Its pool record: the VM's processes, agent address and configuration.
    pub fn record(&self) -> &SandboxRecord {
        &self.record
    }

    /// Tells the daemon the sandbox's record names the VM now, so it drops its pool record.
    /// Call only once that record is saved: from then on the sandbox owns the VM whatever the
    /// answer (a daemon that misses this finds the record when it sweeps).
    pub async fn adopted(mut self) -> Result<(), FactoryError> {
        match self.connection.call(&Request::Adopted).await? {
            Reply::Ok => Ok(()),
            other => Err(self
                .connection
                .protocol(format!("answered {other:?} to `adopted`"))),
        }
    }
}

/// Asks the factory of state root `root` for a VM made from configuration `key` (see
/// [`super::vm_key`]) for sandbox `sandbox`.
pub async fn take(root: &Path, sandbox: &SandboxId, key: &str) -> Result<Handout, Miss> {
    let mut connection = match Connection::open_if_running(root).await {
        Ok(Some(c)) => c,
        Ok(None) => return Err(Miss::NotRunning),
        Err(e) => return Err(Miss::Failed(crate::ErrorChain(&e).to_string())),
    };
    let request = Request::Take {
        sandbox: sandbox.clone(),
        key: key.to_string(),
    };
    match connection.call(&request).await {
        Ok(Reply::Vm { id, record }) => Ok(Handout {
            connection,
            vm: id,
            record: *record,
        }),
        Ok(Reply::Miss { reason }) => Err(Miss::Refused(reason)),
        Ok(other) => Err(Miss::Failed(format!("unexpected answer {other:?}"))),
        Err(e) => Err(Miss::Failed(crate::ErrorChain(&e).to_string())),
    }
}

/// The running daemon's status; `None` when no daemon answers at `root`.
pub async fn status(root: &Path) -> Result<Option<FactoryStatus>, FactoryError> {
    let Some(mut connection) = Connection::open_if_running(root).await? else {
        return Ok(None);
    };
    match connection.call(&Request::Status).await? {
        Reply::Status(status) => Ok(Some(*status)),
        other => Err(connection.protocol(format!("answered {other:?} to `status`"))),
    }
}

/// Asks the running daemon to stop (it ends its VMs and exits). `false`: none answers.
pub async fn stop(root: &Path) -> Result<bool, FactoryError> {
    let Some(mut connection) = Connection::open_if_running(root).await? else {
        return Ok(false);
    };
    match connection.call(&Request::Stop).await? {
        Reply::Ok => Ok(true),
        other => Err(connection.protocol(format!("answered {other:?} to `stop`"))),
    }
}
