use std::path::PathBuf;
use std::time::Duration;

use runvm_hypervisor::HypervisorError;

use crate::agent::AgentError;
use crate::config::ConfigError;
use crate::container::share::ShareError;
use crate::container::spec::SpecError;
use crate::id::InvalidId;
use crate::state::{InvalidTransition, State};
use crate::store::StoreError;

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

    /// The persisted state could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),

    /// Pod networking failed.
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),

    /// The OCI bundle is unusable.
    #[error(transparent)]
    Spec(#[from] SpecError),

    /// A host path could not be shared with the guest.
    #[error(transparent)]
    Share(#[from] ShareError),

    /// A state change that the lifecycle does not allow.
    #[error("{what}: {source}")]
    Transition {
        /// "sandbox ID" or "container ID".
        what: String,
        /// The refused change.
        source: InvalidTransition,
    },

    /// The operation needs another state.
    #[error("{what} is {state}: cannot {operation}{hint}")]
    WrongState {
        /// "sandbox ID" or "container ID".
        what: String,
        /// Its state.
        state: State,
        /// What was asked.
        operation: &'static str,
        /// What would make it possible.
        hint: &'static str,
    },

    /// No such process.
    #[error("container {container} has no process {exec_id:?}")]
    ProcessNotFound {
        /// The container.
        container: String,
        /// The exec id asked for.
        exec_id: String,
    },

    /// A process with this exec id exists already.
    #[error("container {container} has a process {exec_id:?} already")]
    ProcessExists {
        /// The container.
        container: String,
        /// The exec id.
        exec_id: String,
    },

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

impl From<HypervisorError> for SandboxError {
    fn from(e: HypervisorError) -> Self {
        SandboxError::Hypervisor(e)
    }
}

impl SandboxError {
    /// The thing asked for does not exist (sandbox, container, process).
    pub fn is_not_found(&self) -> bool {
        match self {
            SandboxError::Store(e) => e.is_not_found(),
            SandboxError::ProcessNotFound { .. } => true,
            SandboxError::Agent(e) => e.rpc_code() == Some("NOT_FOUND"),
            _ => false,
        }
    }
}
