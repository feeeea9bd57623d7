//! A small typed async client for the QEMU Machine Protocol (QMP).
//!
//! runvm speaks QMP over `serde_json` itself instead of using the `qapi-qmp` crate: that crate's
//! types are generated for QEMU 9.1 and fail to parse replies from older QEMUs such as Debian's
//! 7.2. Only the few commands runvm needs are typed here; anything else can go through
//! [`QmpClient::execute`].
//!
//! # Protocol, as this client uses it
//!
//! QMP is line-delimited JSON over a unix socket. On connect QEMU sends a greeting
//! (`{"QMP": {"version": ..., "capabilities": [...]}}`); the client answers `qmp_capabilities`
//! to enter command mode. Every command is sent as `{"execute": NAME, "arguments": {...},
//! "id": N}` with a fresh `N`; QEMU answers `{"return": ..., "id": N}` or
//! `{"error": {"class": ..., "desc": ...}, "id": N}`. Asynchronous events
//! (`{"event": ..., "data": ..., "timestamp": ...}`) may arrive at any time, including between a
//! command and its reply; they are recorded in a bounded buffer (see [`QmpClient::events`]).
//!
//! # Reply matching
//!
//! Only one command is in flight at a time (every method takes `&mut self`). A reply whose `id`
//! differs from the in-flight command's is *skipped* (and logged), not treated as an error: it is
//! the late answer to an earlier command that timed out. A reply without an `id` is taken as the
//! answer to the in-flight command: QEMU omits the `id` only when it could not parse the request
//! at all, and then the error concerns the request just sent.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::time::Instant;

/// How long a command may take by default, from sending it to receiving its reply.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest line (in bytes, without its line terminator) accepted from QEMU. Longer lines
/// are refused with [`QmpError::LineTooLong`] as soon as the limit is passed, and skipped.
pub const MAX_LINE_LEN: usize = 1024 * 1024;

/// How many asynchronous events [`QmpClient`] keeps; older ones are dropped first.
pub const EVENT_BUFFER_CAPACITY: usize = 64;

/// How many characters of an unexpected line are quoted in an error.
const EXCERPT_CHARS: usize = 200;

/// The longest pause between two connection attempts in [`QmpClient::connect`].
const MAX_CONNECT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The QMP socket could not be connected to (it did not appear in time, or refused).
    #[error("cannot connect to the QMP socket {}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The last connection error.
        #[source]
        source: io::Error,
    },

    /// QEMU did not answer in time.
    #[error("QMP {command} timed out after {timeout:?}")]
    Timeout {
        /// The command (or `"greeting"` while connecting) that was waited for.
        command: &'static str,
        /// How long was waited.
        timeout: Duration,
    },

    /// Reading from or writing to the QMP socket failed.
    #[error("I/O error on the QMP socket during {command}")]
    Io {
        /// The command (or `"greeting"`) under way.
        command: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// QEMU closed the QMP socket before answering.
    #[error("QEMU closed the QMP socket while {command} was waiting for its reply")]
    Closed {
        /// The command (or `"greeting"`) that was waiting.
        command: &'static str,
    },

    /// QEMU sent a line that is not valid JSON.
    #[error("QEMU sent invalid JSON while {command} was waiting for its reply: {excerpt}")]
    Malformed {
        /// The command (or `"greeting"`) that was waiting.
        command: &'static str,
        /// The start of the line QEMU sent (at most about 200 characters).
        excerpt: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// QEMU sent valid JSON that is not what the protocol or the command calls for.
    #[error("unexpected QMP reply to {command} ({reason}): {excerpt}")]
    UnexpectedReply {
        /// The command (or `"greeting"`) that was waiting.
        command: &'static str,
        /// What is wrong with it.
        reason: String,
        /// The start of the line QEMU sent (at most about 200 characters).
        excerpt: String,
    },

    /// QEMU answered the command with an error.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Qemu {
        /// The command.
        command: &'static str,
        /// QEMU's error class, e.g. `GenericError` or `CommandNotFound`.
        class: String,
        /// QEMU's description of the error.
        desc: String,
    },

    /// QEMU sent a line longer than [`MAX_LINE_LEN`]; it was refused and is skipped.
    #[error(
        "QEMU sent a line longer than {limit} bytes while {command} was waiting for its reply"
    )]
    LineTooLong {
        /// The command (or `"greeting"`) that was waiting.
        command: &'static str,
        /// The limit in bytes.
        limit: usize,
    },

    /// An earlier command was interrupted (by its timeout or an error) while being written, so
    /// QEMU may have received half a request: the connection can no longer be used.
    #[error("cannot send {command}: an earlier QMP command was only partly sent")]
    Desynchronized {
        /// The command that was not sent.
        command: &'static str,
    },
}

/// QEMU's version, as announced in the QMP greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub struct QemuVersion {
    /// Major version, e.g. 7 for 7.2.11.
    pub major: u32,
    /// Minor version, e.g. 2 for 7.2.11.
    pub minor: u32,
    /// Micro version, e.g. 11 for 7.2.11.
    pub micro: u32,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The run state of a VM, as reported by `query-status` (QEMU's `RunState`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(from = "String")]
pub enum VmRunState {
    /// `debug`: stopped by a debugger.
    Debug,
    /// `inmigrate`: waiting for an incoming migration.
    InMigrate,
    /// `internal-error`: stopped by an internal error (e.g. a KVM failure).
    InternalError,
    /// `io-error`: stopped by a disk I/O error.
    IoError,
    /// `paused`: stopped by `stop` (or `-S` after `cont` was never sent).
    Paused,
    /// `postmigrate`: stopped after an outgoing migration finished.
    PostMigrate,
    /// `prelaunch`: started with `-S` and not yet continued.
    Prelaunch,
    /// `finish-migrate`: stopped to finish an outgoing migration.
    FinishMigrate,
    /// `restore-vm`: stopped while loading a snapshot.
    RestoreVm,
    /// `running`: vCPUs are running.
    Running,
    /// `save-vm`: stopped while saving a snapshot.
    SaveVm,
    /// `shutdown`: the guest shut down and QEMU was told not to exit (`-no-shutdown`).
    Shutdown,
    /// `suspended`: the guest is suspended (ACPI S3).
    Suspended,
    /// `watchdog`: stopped by a watchdog action.
    Watchdog,
    /// `guest-panicked`: the guest panicked (pvpanic) and the panic action stops it.
    GuestPanicked,
    /// `colo`: COLO fault tolerance state.
    Colo,
    /// A state this client does not know, as QEMU spelt it.
    Other(String),
}

impl VmRunState {
    /// QEMU's name for this state (e.g. `"internal-error"`).
    pub fn as_str(&self) -> &str {
        match self {
            Self::Debug => "debug",
            Self::InMigrate => "inmigrate",
            Self::InternalError => "internal-error",
            Self::IoError => "io-error",
            Self::Paused => "paused",
            Self::PostMigrate => "postmigrate",
            Self::Prelaunch => "prelaunch",
            Self::FinishMigrate => "finish-migrate",
            Self::RestoreVm => "restore-vm",
            Self::Running => "running",
            Self::SaveVm => "save-vm",
            Self::Shutdown => "shutdown",
            Self::Suspended => "suspended",
            Self::Watchdog => "watchdog",
            Self::GuestPanicked => "guest-panicked",
            Self::Colo => "colo",
            Self::Other(name) => name,
        }
    }
}

impl From<&str> for VmRunState {
    fn from(name: &str) -> Self {
        match name {
            "debug" => Self::Debug,
            "inmigrate" => Self::InMigrate,
            "internal-error" => Self::InternalError,
            "io-error" => Self::IoError,
            "paused" => Self::Paused,
            "postmigrate" => Self::PostMigrate,
            "prelaunch" => Self::Prelaunch,
            "finish-migrate" => Self::FinishMigrate,
            "restore-vm" => Self::RestoreVm,
            "running" => Self::Running,
            "save-vm" => Self::SaveVm,
            "shutdown" => Self::Shutdown,
            "suspended" => Self::Suspended,
            "watchdog" => Self::Watchdog,
            "guest-panicked" => Self::GuestPanicked,
            "colo" => Self::Colo,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl From<String> for VmRunState {
    fn from(name: String) -> Self {
        match Self::from(name.as_str()) {
            Self::Other(_) => Self::Other(name),
            known => known,
        }
    }
}

impl fmt::Display for VmRunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When QEMU emitted an event (wall-clock time since the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct QmpTimestamp {
    /// Whole seconds.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// An asynchronous QMP event, e.g. `STOP`, `RESUME`, `SHUTDOWN`, `GUEST_PANICKED`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QmpEvent {
    /// The event's name.
    pub event: String,
    /// The event's data (`null` if it has none).
    #[serde(default)]
    pub data: Value,
    /// When it happened (`None` if QEMU did not say).
    #[serde(default)]
    pub timestamp: Option<QmpTimestamp>,
}

/// An async client for one QEMU's QMP socket.
///
/// One command is in flight at a time; each has a timeout ([`DEFAULT_COMMAND_TIMEOUT`] unless set
/// with [`with_command_timeout`](Self::with_command_timeout)). Events QEMU sends while a command
/// waits for its reply are kept (the last [`EVENT_BUFFER_CAPACITY`]) and can be read with
/// [`events`](Self::events) or [`take_events`](Self::take_events).
///
/// ```no_run
/// use std::path::Path;
/// use std::time::Duration;
///
/// use runvm_hypervisor::qmp::{QmpClient, QmpError, VmRunState};
///
/// # async fn demo() -> Result<(), QmpError> {
/// let mut qmp = QmpClient::connect(Path::new("/run/runvm/pod1/qmp.sock"), Duration::from_secs(10))
///     .await?
///     .with_command_timeout(Duration::from_secs(2));
/// println!("QEMU {}", qmp.version());
/// if qmp.query_status().await? == VmRunState::Running {
///     qmp.stop().await?;
/// }
/// qmp.quit().await?;
/// # Ok(())
/// # }
/// ```
pub struct QmpClient {
    path: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    version: QemuVersion,
    package: String,
    capabilities: Vec<String>,
    next_id: u64,
    command_timeout: Duration,
    events: VecDeque<QmpEvent>,
    /// The part of a line read so far (kept across cancelled reads).
    partial: Vec<u8>,
    /// Set while skipping the rest of an over-long line.
    discarding: bool,
    /// Set while a request is being written; still set if that write was interrupted.
    write_interrupted: bool,
}

impl fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmpClient")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("next_id", &self.next_id)
            .field("command_timeout", &self.command_timeout)
            .field("buffered_events", &self.events.len())
            .finish_non_exhaustive()
    }
}

/// What one read of a line gave.
enum Line {
    Data(Vec<u8>),
    Eof,
    TooLong,
}

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: GreetingVersion,
    #[serde(default)]
    capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct GreetingVersion {
    qemu: QemuVersion,
    #[serde(default)]
    package: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

impl QmpClient {
    /// Connects to QEMU's QMP socket at `path`, reads the greeting and enters command mode.
    ///
    /// QEMU creates the socket shortly after it starts, so a missing socket or a refused
    /// connection is retried until `timeout` elapses. The whole handshake (connecting, greeting,
    /// `qmp_capabilities`) must finish within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<QmpClient, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = connect_with_retry(path, deadline, timeout).await?;
        QmpClient::handshake(stream, path, deadline, timeout).await
    }

    /// [`connect`](Self::connect) over a stream already connected to QEMU's monitor (one end
    /// of a socket pair, for tests and the fuzz targets): reads the greeting and enters command
    /// mode within `timeout`. `path` only names the socket in errors.
    pub async fn from_stream(
        stream: UnixStream,
        path: &Path,
        timeout: Duration,
    ) -> Result<QmpClient, QmpError> {
        QmpClient::handshake(stream, path, Instant::now() + timeout, timeout).await
    }

    /// The greeting and `qmp_capabilities`, by `deadline` (`timeout` from the start).
    async fn handshake(
        stream: UnixStream,
        path: &Path,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<QmpClient, QmpError> {
        let (read, writer) = stream.into_split();
        let mut client = QmpClient {
            path: path.to_owned(),
            reader: BufReader::new(read),
            writer,
            version: QemuVersion {
                major: 0,
                minor: 0,
                micro: 0,
            },
            package: String::new(),
            capabilities: Vec::new(),
            next_id: 1,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            events: VecDeque::new(),
            partial: Vec::new(),
            discarding: false,
            write_interrupted: false,
        };

        let greeting = match tokio::time::timeout_at(deadline, client.read_greeting()).await {
            Ok(greeting) => greeting?,
            Err(_) => {
                return Err(QmpError::Timeout {
                    command: "greeting",
                    timeout,
                })
            }
        };
        client.version = greeting.qmp.version.qemu;
        client.package = greeting.qmp.version.package;
        client.capabilities = greeting.qmp.capabilities;
        tracing::debug!(
            path = %path.display(),
            version = %client.version,
            package = %client.package,
            "QMP greeting received"
        );

        let remaining = deadline.saturating_duration_since(Instant::now());
        match client.exchange("qmp_capabilities", None, remaining).await {
            Ok(_) => Ok(client),
            Err(QmpError::Timeout { command, .. }) => Err(QmpError::Timeout { command, timeout }),
            Err(e) => Err(e),
        }
    }

    /// Sets the timeout of each later command (default [`DEFAULT_COMMAND_TIMEOUT`]).
    #[must_use]
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// The timeout of each command.
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// QEMU's version, from the greeting.
    pub fn version(&self) -> QemuVersion {
        self.version
    }

    /// QEMU's package string from the greeting (e.g. `"Debian 1:7.2+dfsg-7+deb12u13"`; may be
    /// empty).
    pub fn package(&self) -> &str {
        &self.package
    }

    /// The QMP capabilities QEMU offered in its greeting (e.g. `["oob"]`). None is enabled.
    pub fn capabilities(&self) -> &[String] {
        &self.capabilities
    }

    /// The socket path this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded events, oldest first (at most [`EVENT_BUFFER_CAPACITY`]).
    pub fn events(&self) -> std::collections::vec_deque::Iter<'_, QmpEvent> {
        self.events.iter()
    }

    /// Removes and returns the recorded events, oldest first.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Whether an event named `name` (e.g. `"SHUTDOWN"`) is among the recorded events.
    ///
    /// Events removed by [`take_events`](Self::take_events), or dropped because more than
    /// [`EVENT_BUFFER_CAPACITY`] came after them, are no longer seen.
    pub fn saw_event(&self, name: &str) -> bool {
        self.events.iter().any(|e| e.event == name)
    }

    /// Runs `query-status` and returns the VM's run state.
    pub async fn query_status(&mut self) -> Result<VmRunState, QmpError> {
        #[derive(Deserialize)]
        struct StatusInfo {
            status: VmRunState,
        }
        let info: StatusInfo = self.execute("query-status", None).await?;
        Ok(info.status)
    }

    /// Runs `stop`: pauses the vCPUs.
    pub async fn stop(&mut self) -> Result<(), QmpError> {
        self.execute::<IgnoredAny>("stop", None).await?;
        Ok(())
    }

    /// Runs `cont`: resumes the vCPUs.
    pub async fn cont(&mut self) -> Result<(), QmpError> {
        self.execute::<IgnoredAny>("cont", None).await?;
        Ok(())
    }

    /// Runs `system_powerdown`: asks the guest to power off (ACPI power button). Returns once
    /// QEMU has passed the request on, not when the guest is off.
    pub async fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute::<IgnoredAny>("system_powerdown", None).await?;
        Ok(())
    }

    /// Runs `quit`: QEMU exits at once.
    ///
    /// QEMU may close the socket before or right after answering, so the socket closing once
    /// the request was sent counts as success.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute::<IgnoredAny>("quit", None).await {
            Ok(_) | Err(QmpError::Closed { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs any QMP command and deserializes its `return` value into `R`.
    ///
    /// `arguments`, if given, must be a JSON object. Use [`serde::de::IgnoredAny`] as `R` for
    /// commands that return `{}`. The command's timeout is [`command_timeout`](Self::command_timeout).
    pub async fn execute<R: DeserializeOwned>(
        &mut self,
        command: &'static str,
        arguments: Option<Value>,
    ) -> Result<R, QmpError> {
        let value = self
            .exchange(command, arguments, self.command_timeout)
            .await?;
        R::deserialize(&value).map_err(|e| QmpError::UnexpectedReply {
            command,
            reason: format!("cannot decode its return value: {e}"),
            excerpt: excerpt(value.to_string().as_bytes()),
        })
    }

    /// Sends `command` and waits (at most `timeout`) for its reply; returns the `return` value.
    async fn exchange(
        &mut self,
        command: &'static str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        if self.write_interrupted {
            return Err(QmpError::Desynchronized { command });
        }
        let id = self.next_id;
        self.next_id += 1;

        let mut request = serde_json::Map::new();
        request.insert("execute".to_owned(), Value::from(command));
        if let Some(arguments) = arguments {
            request.insert("arguments".to_owned(), arguments);
        }
        request.insert("id".to_owned(), Value::from(id));
        let mut line = Value::Object(request).to_string();
        line.push('\n');
        tracing::debug!(command, id, "sending QMP command");

        let exchange = async {
            self.write_interrupted = true;
            self.writer
                .write_all(line.as_bytes())
                .await
                .map_err(|source| QmpError::Io { command, source })?;
            self.write_interrupted = false;
            self.read_reply(command, id).await
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(QmpError::Timeout { command, timeout }),
        }
    }

    /// Reads the greeting, the first message QEMU sends.
    async fn read_greeting(&mut self) -> Result<Greeting, QmpError> {
        let command = "greeting";
        let line = self.next_message(command).await?;
        let value: Value = parse_json(command, &line)?;
        if value.get("QMP").is_none() {
            return Err(unexpected(command, "not a QMP greeting", &line));
        }
        Greeting::deserialize(&value)
            .map_err(|e| unexpected(command, &format!("bad QMP greeting: {e}"), &line))
    }

    /// Reads messages until the reply to request `id`, recording events on the way.
    async fn read_reply(&mut self, command: &'static str, id: u64) -> Result<Value, QmpError> {
        loop {
            let line = self.next_message(command).await?;
            let Value::Object(mut message) = parse_json(command, &line)? else {
                return Err(unexpected(command, "not a JSON object", &line));
            };

            if message.contains_key("event") {
                let event = QmpEvent::deserialize(Value::Object(message))
                    .map_err(|e| unexpected(command, &format!("bad event: {e}"), &line))?;
                self.record_event(event);
                continue;
            }

            if !message.contains_key("return") && !message.contains_key("error") {
                return Err(unexpected(
                    command,
                    "neither a return, an error nor an event",
                    &line,
                ));
            }
            match message.get("id") {
                Some(reply_id) if reply_id.as_u64() != Some(id) => {
                    tracing::debug!(command, id, %reply_id, "skipping QMP reply to another command");
                    continue;
                }
                _ => {}
            }

            if let Some(error) = message.remove("error") {
                let error = ErrorBody::deserialize(error)
                    .map_err(|e| unexpected(command, &format!("bad error reply: {e}"), &line))?;
                tracing::debug!(command, id, class = %error.class, desc = %error.desc, "QMP error");
                return Err(QmpError::Qemu {
                    command,
                    class: error.class,
                    desc: error.desc,
                });
            }
            return Ok(message.remove("return").unwrap_or(Value::Null));
        }
    }

    /// Reads the next non-blank line, mapping end of stream and read errors.
    async fn next_message(&mut self, command: &'static str) -> Result<Vec<u8>, QmpError> {
        loop {
            match self.read_line().await {
                Ok(Line::Data(line)) if line.iter().all(u8::is_ascii_whitespace) => continue,
                Ok(Line::Data(line)) => return Ok(line),
                Ok(Line::Eof) => return Err(QmpError::Closed { command }),
                Ok(Line::TooLong) => {
                    return Err(QmpError::LineTooLong {
                        command,
                        limit: MAX_LINE_LEN,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(QmpError::Closed { command })
                }
                Err(source) => return Err(QmpError::Io { command, source }),
            }
        }
    }

    /// Reads one `\n`-terminated line of at most [`MAX_LINE_LEN`] bytes.
    ///
    /// Cancel-safe: a partly read line is kept in `self.partial` for the next call.
    async fn read_line(&mut self) -> io::Result<Line> {
        loop {
            let (consumed, complete, too_long) = {
                let buf = self.reader.fill_buf().await?;
                if buf.is_empty() {
                    self.partial.clear();
                    return Ok(Line::Eof);
                }
                let newline = buf.iter().position(|&b| b == b'\n');
                let content = &buf[..newline.unwrap_or(buf.len())];
                let consumed = newline.map_or(buf.len(), |i| i + 1);
                let too_long =
                    !self.discarding && self.partial.len() + content.len() > MAX_LINE_LEN;
                if !self.discarding && !too_long {
                    self.partial.extend_from_slice(content);
                }
                (consumed, newline.is_some(), too_long)
            };
            self.reader.consume(consumed);

            if self.discarding {
                if complete {
                    self.discarding = false;
                }
                continue;
            }
            if too_long {
                self.partial.clear();
                self.discarding = !complete;
                return Ok(Line::TooLong);
            }
            if complete {
                return Ok(Line::Data(std::mem::take(&mut self.partial)));
            }
        }
    }

    fn record_event(&mut self, event: QmpEvent) {
        tracing::debug!(event = %event.event, data = %event.data, "QMP event");
        if self.events.len() == EVENT_BUFFER_CAPACITY {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }
}

/// Connects to `path`, retrying while it does not exist or refuses, until `deadline`.
async fn connect_with_retry(
    path: &Path,
    deadline: Instant,
    timeout: Duration,
) -> Result<UnixStream, QmpError> {
    let mut delay = Duration::from_millis(10);
    loop {
        let error = match tokio::time::timeout_at(deadline, UnixStream::connect(path)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => e,
            Err(_) => {
                return Err(QmpError::Timeout {
                    command: "connect",
                    timeout,
                })
            }
        };
        let retryable = matches!(
            error.kind(),
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
        );
        let now = Instant::now();
        if !retryable || now >= deadline {
            return Err(QmpError::Connect {
                path: path.to_owned(),
                source: error,
            });
        }
        tracing::debug!(path = %path.display(), %error, "QMP socket not ready, retrying");
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(MAX_CONNECT_RETRY_DELAY);
    }
}

fn parse_json(command: &'static str, line: &[u8]) -> Result<Value, QmpError> {
    serde_json::from_slice(line).map_err(|source| QmpError::Malformed {
        command,
        excerpt: excerpt(line),
        source,
    })
}

fn unexpected(command: &'static str, reason: &str, line: &[u8]) -> QmpError {
    QmpError::UnexpectedReply {
        command,
        reason: reason.to_owned(),
        excerpt: excerpt(line),
    }
}

/// The start of `bytes` as text: at most [`EXCERPT_CHARS`] characters (then `…`), control
/// characters escaped, surrounding whitespace trimmed.
fn excerpt(bytes: &[u8]) -> String {
    // Four bytes per character is enough for EXCERPT_CHARS characters of valid UTF-8.
    let head = &bytes[..bytes.len().min(EXCERPT_CHARS * 4 + 4)];
    let text = String::from_utf8_lossy(head);
    let text = text.trim();
    let mut out = String::new();
    let mut chars = text.chars();
    for c in chars.by_ref().take(EXCERPT_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if chars.next().is_some() || head.len() < bytes.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests;

mod devices;
pub use devices::HotpluggableCpu;
