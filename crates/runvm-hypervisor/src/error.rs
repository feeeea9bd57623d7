use std::path::PathBuf;

use crate::qmp::QmpError;

/// Errors of the hypervisor layer. Messages name the value or program at fault and, where the
/// cause is outside runvm, include what that program said.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// A VM config value is out of range or inconsistent.
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),

    /// A VM process cannot be confined as configured (its user, its jail).
    #[error("cannot confine the VM: {what}: {reason}{}", if hint.is_empty() { String::new() } else { format!("; {hint}") })]
    Confinement {
        /// What could not be used (the user, a path of the jail).
        what: String,
        /// Why.
        reason: String,
        /// How to fix it (may be empty).
        hint: String,
    },

    /// A file the VM needs does not exist.
    #[error("{what} {} does not exist; {hint}", path.display())]
    MissingFile {
        /// What the file is (e.g. "guest kernel").
        what: &'static str,
        /// The path looked at.
        path: PathBuf,
        /// What to do about it.
        hint: String,
    },

    /// A program could not be found or started.
    #[error("cannot start {program} ({}){}", path.display(), if log.is_empty() { String::new() } else { format!(": {log}") })]
    Spawn {
        /// The program's role (e.g. "qemu", "virtiofsd").
        program: &'static str,
        /// The binary that was run.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
        /// What the child said before it failed (a jail step that failed names itself there).
        log: String,
    },

    /// A helper exited or failed to come up while the VM was starting.
    #[error("{program} failed at start ({status}): {stderr}")]
    HelperFailed {
        /// "virtiofsd" or "vhost-device-vsock".
        program: &'static str,
        /// Exit status, or "did not create its socket in time".
        status: String,
        /// The last lines it wrote to stderr.
        stderr: String,
    },

    /// A process of the VM was started but could not be recorded; it was stopped again.
    #[error("cannot record {program} (pid {pid}) in the sandbox's state")]
    RecordFailed {
        /// The program's role.
        program: &'static str,
        /// Its pid.
        pid: u32,
        /// Why recording failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// QEMU exited when it should be running.
    #[error("qemu exited ({status}): {stderr}")]
    QemuExited {
        /// Its exit status.
        status: String,
        /// The last lines it wrote to stderr.
        stderr: String,
    },

    /// The accelerator asked for cannot be used on this host.
    #[error("{0}")]
    AcceleratorUnavailable(String),

    /// The operation is not legal in the VM's current state.
    #[error("cannot {operation}: the VM is {state}")]
    InvalidState {
        /// What was asked.
        operation: &'static str,
        /// What the VM is.
        state: &'static str,
    },

    /// The backend cannot do this.
    #[error("cannot {operation} {id:?}: not supported by this hypervisor")]
    Unsupported {
        /// What was asked.
        operation: &'static str,
        /// The device concerned.
        id: String,
    },

    /// A resize the VM cannot take (past its maxima, or refused by QEMU); the VM is unchanged
    /// unless `reason` says otherwise.
    #[error("cannot resize the VM to {vcpus} vCPUs and {memory_mib} MiB: {reason}")]
    Resize {
        /// vCPUs asked for.
        vcpus: u32,
        /// RAM asked for, MiB.
        memory_mib: u32,
        /// Why, naming the bound.
        reason: String,
    },

    /// A network card operation was refused.
    #[error("network card {id:?}: {reason}")]
    NetDevice {
        /// The card's id.
        id: String,
        /// Why.
        reason: String,
    },

    /// The network namespace QEMU should join cannot be opened.
    #[error("cannot open network namespace {}", path.display())]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },

    /// The QEMU monitor failed.
    #[error("QEMU monitor")]
    Qmp(#[from] QmpError),

    /// A file-system operation on the VM's run folder failed.
    #[error("{action} {}", path.display())]
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
