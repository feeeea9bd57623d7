//! The runvm agent protocol, shared by the host (async ttrpc client) and the guest agent
//! (async ttrpc server).
//!
//! The service is defined in `protos/agent.proto`; this crate only re-exports what
//! `ttrpc-codegen` generates from it, plus the constants both sides must agree on.
//!
//! ```
//! use runvm_protocol::agent::VersionRequest;
//! let req = VersionRequest::new();
//! assert_eq!(req, VersionRequest::default());
//! ```

/// Protobuf messages of the agent API.
#[allow(warnings, clippy::all, clippy::pedantic, missing_debug_implementations)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// The ttrpc client (`AgentServiceClient`) and server trait (`AgentService`).
#[allow(warnings, clippy::all, clippy::pedantic, missing_debug_implementations)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub mod frame;
pub mod portfwd;
pub mod stdio;
pub mod telemetry;

pub use ttrpc;

/// The vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The host port the agent connects to once it listens, to say it is ready (one line,
/// `READY`). With vhost-device-vsock the host listens on the unix socket `<uds>_<port>`.
pub const READY_VSOCK_PORT: u32 = 1025;

/// Raised on an incompatible change of `agent.proto`; reported by `Version`. 2: the per-chunk
/// stdio RPCs are gone and stdio requires a stream token.
pub const API_VERSION: u32 = 2;

/// In the guest spec of a pod's container: `SANDBOX_CONTAINER_ID:TYPE,TYPE` — the namespaces
/// (of `ipc`, `uts`, `pid`) the agent makes it join, those of the pod sandbox container's init.
/// The host writes it, the agent reads it: one name for both.
pub const POD_NAMESPACES_ANNOTATION: &str = "io.runvm.pod-namespaces";
