use std::path::PathBuf;
use std::time::Duration;

use runvm_hypervisor::HypervisorError;

use crate::agent::AgentError;
use crate::config::ConfigError;
use crate::id::InvalidId;

/// Errors of sandbox operations.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A bad id.
    #[error(transparent)]
    InvalidId(#[from] InvalidId),

    /// The configuration is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// A sandbox with this id exists already.
    #[error("sandbox {id:?} exists already ({})", path.display())]
    AlreadyExists {
        /// The id.
        id: String,
        /// Its folder.
        path: PathBuf,
    },

    /// A program runvm needs was not found.
    #[error("{key} = {name:?}: program not found in /opt/runvm/bin or $PATH; {hint}")]
    MissingProgram {
        /// The config key naming it.
        key: &'static str,
        /// The configured value.
        name: String,
        /// How to get it.
        hint: &'static str,
    },

    /// The VM failed.
    #[error(transparent)]
    Hypervisor(HypervisorError),

    /// The VM died while the sandbox waited for it.
    #[error("the VM exited during boot: {source}\n--- last lines of the guest console ---\n{}", console.join("\n"))]
    VmDied {
        /// What the hypervisor saw.
        source: HypervisorError,
        /// The end of the guest console.
        console: Vec<String>,
    },

    /// The agent did not answer in time.
    #[error("the agent did not answer within {} ms (last attempt: {last_error})\n--- last lines of the guest console ---\n{}", timeout.as_millis(), console.join("\n"))]
    AgentTimeout {
        /// The boot timeout.
        timeout: Duration,
        /// The last connection error.
        last_error: String,
        /// The end of the guest console.
        console: Vec<String>,
    },

    /// An agent request failed.
    #[error(transparent)]
    Agent(#[from] AgentError),

    /// A file-system operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
