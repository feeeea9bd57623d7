//! The runvm sandbox library: configuration, the agent seam, and sandboxes (one VM each).
//!
//! The front ends (the `runvm` CLI, the containerd shim) are thin layers over this crate.
//!
//! ```
//! use runvm_sandbox::{config::Config, SandboxId};
//! let config = Config::default();
//! assert!(config.validate().is_ok());
//! assert!(SandboxId::parse("../etc").is_err());
//! ```

pub mod agent;
pub mod check;
pub mod config;
pub mod container;
mod error;
pub mod factory;
pub mod guest_telemetry;
pub mod host_cgroup;
mod id;
pub mod network;
pub mod pod_config;
pub mod portfwd;
pub mod process;
pub mod regular_file;
pub mod run;
pub mod sandbox;
pub mod sizing;
pub mod standalone;
pub mod standin;
pub mod state;
pub mod store;
pub mod timeline;

pub use error::{ErrorChain, ErrorKind, SandboxError};
pub use id::{ContainerId, InvalidId, SandboxId};
pub use sandbox::{BootReport, BootTimings, Sandbox, SandboxSettings, SandboxStatus};
