//! The agent seam: what the host asks of the guest agent, in runvm's own types.
//!
//! [`TtrpcAgent`] speaks the protocol of `runvm-protocol` over vsock; [`MockAgent`] stands in for
//! it in unit tests. Replies come from the guest, which is untrusted: the ttrpc implementation
//! checks sizes and contents before anything reaches the caller.

mod mock;
mod ttrpc_client;

pub use mock::{MockAgent, MockAgentConnector, MockAgentState};
pub use ttrpc_client::{TtrpcAgent, TtrpcConnector};

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use runvm_hypervisor::AgentAddress;

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
        /// The ttrpc code name (e.g. "UNIMPLEMENTED", "NOT_FOUND").
        code: String,
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
        matches!(self, AgentError::Rpc { code, .. } if code == "UNIMPLEMENTED")
    }
}

/// What the sandbox asks of the guest agent.
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
