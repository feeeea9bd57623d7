use std::error::Error;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use runvm_hypervisor::qmp::QmpError;
use runvm_hypervisor::HypervisorError;

use crate::agent::AgentError;
use crate::config::ConfigError;
use crate::container::share::ShareError;
use crate::container::spec::SpecError;
use crate::id::{InvalidId, SandboxId};
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

    /// The sandbox's configuration annotations or size were refused.
    #[error(transparent)]
    PodConfig(#[from] crate::pod_config::PodConfigError),

    /// The sandbox's host cgroup (`linux.cgroupsPath`, `linux.resources`).
    #[error(transparent)]
    HostCgroup(#[from] crate::host_cgroup::HostCgroupError),

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

    /// The VM died while the sandbox waited for it. The message holds what the hypervisor saw
    /// (with its causes) before the console lines, so it is not also a `source`.
    #[error("the VM exited during boot: {}\n--- last lines of the guest console ---\n{}", ErrorChain(cause), console.join("\n"))]
    VmDied {
        /// What the hypervisor saw.
        cause: HypervisorError,
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

    /// An OCI hook failed (createRuntime, prestart); the container was undone.
    #[error(transparent)]
    Hook(#[from] crate::container::hooks::HookError),

    /// A host path could not be shared with the guest.
    #[error(transparent)]
    Share(#[from] ShareError),

    /// A state change that the lifecycle does not allow (the source says which).
    #[error("{what}")]
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

    /// The VM the factory handed over could not be made the sandbox's (the sandbox and the VM
    /// are gone again; the caller may boot a VM of its own).
    #[error("the factory's VM {vm} could not be adopted")]
    FactoryVm {
        /// The factory VM's id.
        vm: SandboxId,
        /// Why.
        #[source]
        source: Box<SandboxError>,
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
    /// The thing asked for does not exist (sandbox, container, process, network device).
    pub fn is_not_found(&self) -> bool {
        self.kind() == ErrorKind::NotFound
    }

    /// What kind of failure this is; the shim maps it to a ttrpc code.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SandboxError::InvalidId(_)
            | SandboxError::Config(_)
            | SandboxError::PodConfig(_)
            | SandboxError::Spec(_) => ErrorKind::InvalidArgument,
            SandboxError::AlreadyExists { .. } | SandboxError::ProcessExists { .. } => {
                ErrorKind::AlreadyExists
            }
            // The host lacks what runvm needs: set it up, then try again.
            SandboxError::MissingProgram { .. } => ErrorKind::FailedPrecondition,
            SandboxError::Hypervisor(e) => hypervisor_kind(e),
            SandboxError::VmDied { .. } => ErrorKind::Internal,
            SandboxError::AgentTimeout { .. } => ErrorKind::DeadlineExceeded,
            SandboxError::Agent(e) => e.kind(),
            SandboxError::Store(e) => e.kind(),
            SandboxError::Network(e) => e.kind(),
            SandboxError::Share(_) => ErrorKind::Internal,
            // The hook's program refused; what it said is in the message.
            SandboxError::Hook(_) => ErrorKind::FailedPrecondition,
            SandboxError::Transition { .. } | SandboxError::WrongState { .. } => {
                ErrorKind::FailedPrecondition
            }
            SandboxError::ProcessNotFound { .. } => ErrorKind::NotFound,
            SandboxError::Io { .. } => ErrorKind::Internal,
            SandboxError::FactoryVm { source, .. } => source.kind(),
            SandboxError::HostCgroup(crate::host_cgroup::HostCgroupError::Io { .. }) => {
                ErrorKind::Internal
            }
            SandboxError::HostCgroup(_) => ErrorKind::InvalidArgument,
        }
    }
}

/// What kind of failure an error is, whichever layer raised it: the few distinctions a caller
/// acts on (retry, report the id as missing, refuse the request, ...). Each error type
/// classifies its variants in one exhaustive `kind()`; the shim turns a kind into a ttrpc code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The sandbox, container or process does not exist.
    NotFound,
    /// The sandbox, container or process exists already.
    AlreadyExists,
    /// The request is malformed: a bad id, spec, configuration or option.
    InvalidArgument,
    /// The object or the host is not in the state the request needs (a wrong lifecycle state,
    /// a missing program, something still mounted).
    FailedPrecondition,
    /// Not possible now, may succeed if tried again (a lock held by another, the agent
    /// unreachable).
    Unavailable,
    /// A time limit passed (waiting for a lock, for the agent).
    DeadlineExceeded,
    /// runvm (or its agent, or the hypervisor backend) does not do this.
    Unimplemented,
    /// Anything else: I/O, a broken state file, a failed VM, a protocol violation.
    Internal,
}

/// The kind of a hypervisor error (the hypervisor crate knows nothing of kinds).
fn hypervisor_kind(e: &HypervisorError) -> ErrorKind {
    match e {
        HypervisorError::InvalidConfig(_) => ErrorKind::InvalidArgument,
        // The host is not set up (no guest image, no KVM): fix it, then try again.
        HypervisorError::MissingFile { .. }
        | HypervisorError::AcceleratorUnavailable(_)
        | HypervisorError::Confinement { .. } => ErrorKind::FailedPrecondition,
        HypervisorError::InvalidState { .. } => ErrorKind::FailedPrecondition,
        // A card id in use, no free hotplug port, no such card, not released in time.
        HypervisorError::NetDevice { .. } => ErrorKind::FailedPrecondition,
        HypervisorError::Unsupported { .. } => ErrorKind::Unimplemented,
        // Past the VM's maxima (the sandbox refuses those first, by configuration key).
        HypervisorError::Resize { .. } => ErrorKind::InvalidArgument,
        HypervisorError::Qmp(q) => qmp_kind(q),
        HypervisorError::Spawn { .. }
        | HypervisorError::HelperFailed { .. }
        | HypervisorError::QemuExited { .. }
        | HypervisorError::RecordFailed { .. }
        | HypervisorError::Netns { .. }
        | HypervisorError::Io { .. } => ErrorKind::Internal,
    }
}

/// The kind of a QEMU monitor error.
fn qmp_kind(e: &QmpError) -> ErrorKind {
    match e {
        QmpError::Timeout { .. } => ErrorKind::DeadlineExceeded,
        QmpError::Connect { .. }
        | QmpError::Io { .. }
        | QmpError::Closed { .. }
        | QmpError::Malformed { .. }
        | QmpError::UnexpectedReply { .. }
        | QmpError::Qemu { .. }
        | QmpError::LineTooLong { .. }
        | QmpError::Desynchronized { .. } => ErrorKind::Internal,
    }
}

/// Displays an error and each of its causes, once each, joined by `": "` (what `anyhow`'s
/// `{:#}` prints). Every error's `Display` leaves its `source` out, so nothing repeats.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
