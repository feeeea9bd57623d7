//! The agent seam: what the host asks of the guest agent, in runvm's own types.
//!
//! [`TtrpcAgent`] speaks the protocol of `runvm-protocol` over vsock; [`MockAgent`] stands in for
//! it in unit tests. Replies come from the guest, which is untrusted: the ttrpc implementation
//! checks sizes and contents before anything reaches the caller.

mod convert;
mod guest_metrics;
mod mock;
mod network;
mod telemetry;
mod ttrpc_client;
mod types;

pub use guest_metrics::{ContainerUsage, GuestCpuTime, GuestMetrics};
pub use mock::{MockAgent, MockAgentConnector, MockAgentState, MockContainer, MockProcess};
pub use network::{Interface, IpNet, Neighbor, Route};
pub use telemetry::{
    GuestLogLevel, GuestLogRecord, GuestTelemetry, TelemetryRequest,
    MAX_RECORDS as MAX_TELEMETRY_RECORDS, MAX_WAIT as MAX_TELEMETRY_WAIT,
};
pub(crate) use ttrpc_client::describe as describe_address;
pub use ttrpc_client::{open_vsock_stream, TtrpcAgent, TtrpcConnector, VsockIo};
pub use types::{
    ContainerStats, CpuStats, CreateContainer, ExitStatus, GuestProcess, MemoryStats, NetworkStats,
    ProcessRef, StdioSpec, Storage,
};

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use runvm_hypervisor::AgentAddress;

use crate::error::ErrorKind;

/// The agent's version report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentVersion {
    /// The runvm-agent crate version.
    pub agent_version: String,
    /// The guest kernel's release (`uname -r`).
    pub kernel_release: String,
    /// The protocol revision.
    pub api_version: u32,
}

/// Guest-side times of the boot, microseconds since the guest kernel started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestBootTimes {
    /// The kernel ran init.
    pub init_entered_us: u64,
    /// Kernel modules loaded.
    pub modules_loaded_us: u64,
    /// The agent listened.
    pub agent_listening_us: u64,
    /// The guest clock when the guest made this report (0 if it did not say).
    pub now_us: u64,
}

/// What the guest reports of itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestDetails {
    /// Memory hotplug block size, bytes (0 if unknown).
    pub mem_block_size_bytes: u64,
    /// Online CPUs.
    pub cpu_count: u32,
    /// Total memory, bytes.
    pub mem_total_bytes: u64,
    /// Available memory, bytes.
    pub mem_available_bytes: u64,
    /// The guest boot timeline.
    pub boot_times: GuestBootTimes,
}

/// What the guest reports after onlining hot-added vCPUs and memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OnlinedCpuMem {
    /// CPUs online.
    pub online_cpus: u32,
    /// Memory blocks the agent onlined (the kernel onlines most itself).
    pub onlined_memory_blocks: u32,
    /// MemTotal, bytes.
    pub mem_total_bytes: u64,
}

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The channel to the agent could not be opened.
    #[error("cannot connect to the agent at {address}: {reason}")]
    Connect {
        /// The address tried.
        address: String,
        /// Why.
        reason: String,
    },
    /// A request took longer than allowed.
    #[error("agent request {method} timed out after {} ms", timeout.as_millis())]
    Timeout {
        /// The RPC.
        method: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The agent answered with an error status.
    #[error("agent request {method} failed: {code}: {message}")]
    Rpc {
        /// The RPC.
        method: &'static str,
        /// The status code.
        code: RpcCode,
        /// The agent's message (bounded).
        message: String,
    },
    /// The channel broke.
    #[error("agent request {method}: connection lost: {reason}")]
    Transport {
        /// The RPC.
        method: &'static str,
        /// Why.
        reason: String,
    },
    /// The agent's reply broke the protocol's limits; it is not passed on.
    #[error("agent reply to {method} rejected: {reason}")]
    InvalidReply {
        /// The RPC.
        method: &'static str,
        /// What was wrong.
        reason: String,
    },
}

impl AgentError {
    /// The agent is reachable but does not implement the request.
    pub fn is_unimplemented(&self) -> bool {
        self.rpc_code() == Some(RpcCode::Unimplemented)
    }

    /// The status code when the agent answered with an error status.
    pub fn rpc_code(&self) -> Option<RpcCode> {
        match self {
            AgentError::Rpc { code, .. } => Some(*code),
            AgentError::Connect { .. }
            | AgentError::Timeout { .. }
            | AgentError::Transport { .. }
            | AgentError::InvalidReply { .. } => None,
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AgentError::Connect { .. } => ErrorKind::Unavailable,
            AgentError::Timeout { .. } => ErrorKind::DeadlineExceeded,
            AgentError::Rpc { code, .. } => code.kind(),
            AgentError::Transport { .. } => ErrorKind::Unavailable,
            // The guest broke the protocol: not something the caller can fix or retry.
            AgentError::InvalidReply { .. } => ErrorKind::Internal,
        }
    }
}

/// The status code of an agent reply that failed: the gRPC code set without `OK`.
///
/// Converted once from the ttrpc code where replies arrive ([`TtrpcAgent`]); callers match on
/// it, never on its name. It displays as the gRPC name (`NOT_FOUND`, `UNIMPLEMENTED`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RpcCode {
    /// The operation was cancelled.
    Cancelled,
    /// An unknown error (also: a failed status that claims `OK`).
    Unknown,
    /// The request is malformed, whatever the state of the guest.
    InvalidArgument,
    /// The deadline passed before the operation completed.
    DeadlineExceeded,
    /// The container or process does not exist in the guest.
    NotFound,
    /// The container or process exists already.
    AlreadyExists,
    /// The caller may not do this.
    PermissionDenied,
    /// A resource (memory, processes, ...) is exhausted.
    ResourceExhausted,
    /// The guest is not in the state the operation needs.
    FailedPrecondition,
    /// The operation was aborted (a conflict).
    Aborted,
    /// A value lies outside its valid range.
    OutOfRange,
    /// The agent does not implement the request.
    Unimplemented,
    /// The agent failed.
    Internal,
    /// The agent cannot serve now.
    Unavailable,
    /// Data was lost or corrupted.
    DataLoss,
    /// The caller is not authenticated.
    Unauthenticated,
}

impl RpcCode {
    /// The gRPC name of the code (`NOT_FOUND`, `UNIMPLEMENTED`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RpcCode::Cancelled => "CANCELLED",
            RpcCode::Unknown => "UNKNOWN",
            RpcCode::InvalidArgument => "INVALID_ARGUMENT",
            RpcCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            RpcCode::NotFound => "NOT_FOUND",
            RpcCode::AlreadyExists => "ALREADY_EXISTS",
            RpcCode::PermissionDenied => "PERMISSION_DENIED",
            RpcCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
            RpcCode::FailedPrecondition => "FAILED_PRECONDITION",
            RpcCode::Aborted => "ABORTED",
            RpcCode::OutOfRange => "OUT_OF_RANGE",
            RpcCode::Unimplemented => "UNIMPLEMENTED",
            RpcCode::Internal => "INTERNAL",
            RpcCode::Unavailable => "UNAVAILABLE",
            RpcCode::DataLoss => "DATA_LOSS",
            RpcCode::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// The kind of failure the agent reports. runvm's agent sends `INVALID_ARGUMENT`,
    /// `NOT_FOUND`, `ALREADY_EXISTS`, `FAILED_PRECONDITION`, `INTERNAL` and `UNIMPLEMENTED`; the
    /// others come from the ttrpc layer or from a foreign agent.
    pub fn kind(self) -> ErrorKind {
        match self {
            RpcCode::InvalidArgument | RpcCode::OutOfRange => ErrorKind::InvalidArgument,
            RpcCode::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            RpcCode::NotFound => ErrorKind::NotFound,
            RpcCode::AlreadyExists => ErrorKind::AlreadyExists,
            RpcCode::FailedPrecondition => ErrorKind::FailedPrecondition,
            RpcCode::Unimplemented => ErrorKind::Unimplemented,
            // Transient: trying again later may succeed.
            RpcCode::Cancelled
            | RpcCode::Aborted
            | RpcCode::ResourceExhausted
            | RpcCode::Unavailable => ErrorKind::Unavailable,
            RpcCode::Unknown
            | RpcCode::PermissionDenied
            | RpcCode::Internal
            | RpcCode::DataLoss
            | RpcCode::Unauthenticated => ErrorKind::Internal,
        }
    }
}

impl std::fmt::Display for RpcCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the sandbox asks of the guest agent.
///
/// Calls that wait for the guest to do something (`wait_process`, `oom_event`) block until it
/// happens; drop the future to give up. All others
/// are bounded by the agent's request timeout.
#[async_trait]
pub trait Agent: Send + Sync + Debug {
    /// Health check: Ok when the agent serves.
    async fn check(&self) -> Result<(), AgentError>;
    /// The agent's and the guest kernel's versions.
    async fn version(&self) -> Result<AgentVersion, AgentError>;
    /// CPU, memory and boot timeline of the guest.
    async fn guest_details(&self) -> Result<GuestDetails, AgentError>;
    /// Asks the guest to sync and power off. The VM exits shortly after the reply.
    async fn shutdown(&self) -> Result<(), AgentError>;
    /// Onlines hot-added vCPUs (waiting up to `wait` for `cpus` to be online) and memory
    /// blocks, after the VM was resized.
    async fn online_cpu_mem(&self, cpus: u32, wait: Duration) -> Result<OnlinedCpuMem, AgentError>;
    /// Sets the guest's wall clock to `now` (the host's, taken as the request is sent).
    async fn set_guest_time(&self, now: std::time::SystemTime) -> Result<(), AgentError>;
    /// The guest's own view of its use (memory, CPU, load, containers, network), for the
    /// node monitor. An older agent answers `UNIMPLEMENTED`.
    async fn guest_metrics(&self) -> Result<GuestMetrics, AgentError>;
    /// Takes the agent's queued log records and finished spans, waiting up to `request.wait`
    /// while none are queued; from then on the agent queues records from `request.level`.
    /// An older agent answers `UNIMPLEMENTED`.
    async fn read_telemetry(&self, request: TelemetryRequest)
        -> Result<GuestTelemetry, AgentError>;

    /// Creates a container; its init process waits for `start_container`.
    async fn create_container(&self, request: CreateContainer) -> Result<(), AgentError>;
    /// Starts a created container's init process.
    async fn start_container(&self, container_id: &str) -> Result<(), AgentError>;
    /// Kills what still runs in the container (SIGTERM, `timeout_secs`, SIGKILL) and removes it.
    async fn remove_container(
        &self,
        container_id: &str,
        timeout_secs: u32,
    ) -> Result<(), AgentError>;
    /// Freezes every process of the container.
    async fn pause_container(&self, container_id: &str) -> Result<(), AgentError>;
    /// Thaws the container.
    async fn resume_container(&self, container_id: &str) -> Result<(), AgentError>;
    /// Applies OCI `linux.resources` to the container.
    async fn update_container(
        &self,
        container_id: &str,
        resources: &serde_json::Value,
    ) -> Result<(), AgentError>;
    /// Resource usage of the container.
    async fn stats_container(&self, container_id: &str) -> Result<ContainerStats, AgentError>;
    /// The processes of the container.
    async fn list_processes(&self, container_id: &str) -> Result<Vec<GuestProcess>, AgentError>;

    /// Starts `process` (an OCI `process` object) in a running container as `exec_id`.
    async fn exec_process(
        &self,
        process: &ProcessRef,
        spec: &serde_json::Value,
        stdio: StdioSpec,
    ) -> Result<(), AgentError>;
    /// Sends `signal` to the process, or with `all` to every process of its container.
    async fn signal_process(
        &self,
        process: &ProcessRef,
        signal: i32,
        all: bool,
    ) -> Result<(), AgentError>;
    /// Waits for the process to exit.
    async fn wait_process(&self, process: &ProcessRef) -> Result<ExitStatus, AgentError>;
    /// Sets the window size of the process's terminal.
    async fn resize_tty(
        &self,
        process: &ProcessRef,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError>;
    /// Waits until a container is OOM-killed; returns its id.
    async fn oom_event(&self) -> Result<String, AgentError>;
    /// Opens a stdio stream to the agent (`runvm_protocol::stdio`) and sends `header`: a
    /// socket, non-blocking, for the process that will name the header's token.
    async fn open_stdio(
        &self,
        header: runvm_protocol::stdio::Header,
    ) -> Result<std::os::fd::OwnedFd, AgentError>;

    /// Configures the guest device with `interface.mac`: name, MTU, exactly these addresses,
    /// up. All or nothing: on error the device is as before. Returns the device as it is then.
    async fn update_interface(&self, interface: &Interface) -> Result<Interface, AgentError>;
    /// The guest's devices (loopback aside) with their addresses.
    async fn list_interfaces(&self) -> Result<Vec<Interface>, AgentError>;
    /// Makes the guest's main routing table exactly `routes`. All or nothing. Returns the table.
    async fn update_routes(&self, routes: &[Route]) -> Result<Vec<Route>, AgentError>;
    /// The guest's main routing table.
    async fn list_routes(&self) -> Result<Vec<Route>, AgentError>;
    /// Adds permanent neighbour entries.
    async fn add_neighbors(&self, neighbors: &[Neighbor]) -> Result<(), AgentError>;
}

/// Opens agent connections; the sandbox retries it while the guest boots.
#[async_trait]
pub trait AgentConnector: Send + Sync + Debug {
    /// Connects to the agent at `address`, giving up after `timeout`.
    async fn connect(
        &self,
        address: &AgentAddress,
        timeout: Duration,
    ) -> Result<Box<dyn Agent>, AgentError>;
}
