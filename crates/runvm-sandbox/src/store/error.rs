use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::LockMode;
use crate::error::ErrorKind;
use crate::id::{ContainerId, SandboxId};

/// Errors of the state store. Each names the sandbox, container or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state root could be changed by others than root: records there decide what runvm
    /// kills and removes, so it is not used.
    #[error("state root {p}: {problem}; runvm keeps the records that decide what it kills and removes there, so it must be a folder owned by root and not writable by group or others (e.g. `chown root: {p} && chmod 0700 {p}`, or another --root)", p = path.display())]
    UnsafeRoot {
        /// The root.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// No such sandbox.
    #[error("sandbox {id} not found in {}", root.display())]
    SandboxNotFound {
        /// The id looked for.
        id: SandboxId,
        /// The store's root.
        root: PathBuf,
    },

    /// No such container in the sandbox.
    #[error("container {id} of sandbox {sandbox} not found ({})", path.display())]
    ContainerNotFound {
        /// Its sandbox.
        sandbox: SandboxId,
        /// The id looked for.
        id: ContainerId,
        /// Where it would be.
        path: PathBuf,
    },

    /// A sandbox with this id exists already; nothing was written.
    #[error("sandbox {id} exists already ({})", path.display())]
    SandboxExists {
        /// The id.
        id: SandboxId,
        /// Its folder.
        path: PathBuf,
    },

    /// A container with this id exists already in the sandbox; nothing was written.
    #[error("container {id} exists already in sandbox {sandbox} ({})", path.display())]
    ContainerExists {
        /// Its sandbox.
        sandbox: SandboxId,
        /// The id.
        id: ContainerId,
        /// Its folder.
        path: PathBuf,
    },

    /// A state file does not parse (the source gives line and column).
    #[error("cannot parse state file {}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },

    /// A state file names another sandbox or container than its folder does.
    #[error("state file {}: {field} is {found:?} but the folder says {expected:?}", path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The field: `id` or `sandbox_id`.
        field: &'static str,
        /// What the folder says.
        expected: String,
        /// What the file says.
        found: String,
    },

    /// A state file was written by a newer runvm, in a format this one must not rewrite.
    #[error("state file {} has format version {found}; this runvm reads versions up to {supported}", path.display())]
    NewerVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// The newest this runvm reads.
        supported: u32,
    },

    /// `try_lock_*`: another holder has the lock.
    #[error("sandbox {id} is busy: its {mode} lock ({}) is not available now", path.display())]
    LockBusy {
        /// The sandbox.
        id: SandboxId,
        /// Its lock file.
        path: PathBuf,
        /// The mode asked for.
        mode: LockMode,
    },

    /// `lock_*_timeout`: the lock did not come free in time.
    #[error("timed out after {} ms waiting for the {mode} lock of sandbox {id} ({})", timeout.as_millis(), path.display())]
    LockTimeout {
        /// The sandbox.
        id: SandboxId,
        /// Its lock file.
        path: PathBuf,
        /// The mode asked for.
        mode: LockMode,
        /// How long was waited.
        timeout: Duration,
    },

    /// A write was attempted without the sandbox's exclusive lock.
    #[error("{operation} of sandbox {id} needs its exclusive lock ({}), but {problem}", path.display())]
    LockNotHeld {
        /// What was attempted.
        operation: &'static str,
        /// The sandbox written.
        id: SandboxId,
        /// Its lock file.
        path: PathBuf,
        /// What is wrong with the lock given.
        problem: String,
    },

    /// Something is still mounted in the folder to remove; removing would reach through the
    /// mount into files that are not the sandbox's.
    #[error("cannot remove {}: still mounted under it: {}", dir.display(), list(mounts))]
    MountsRemain {
        /// The folder.
        dir: PathBuf,
        /// The mount points under it.
        mounts: Vec<PathBuf>,
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
        source: io::Error,
    },

    /// A record could not be encoded.
    #[error("cannot encode the record for {}", path.display())]
    Encode {
        /// The file it was for.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

fn list(paths: &[PathBuf]) -> String {
    let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    shown.join(", ")
}

impl StoreError {
    /// Whether this says the sandbox or container does not exist.
    pub fn is_not_found(&self) -> bool {
        self.kind() == ErrorKind::NotFound
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::SandboxNotFound { .. } | StoreError::ContainerNotFound { .. } => {
                ErrorKind::NotFound
            }
            StoreError::SandboxExists { .. } | StoreError::ContainerExists { .. } => {
                ErrorKind::AlreadyExists
            }
            // Another runvm holds the lock now; it may be free later.
            StoreError::LockBusy { .. } => ErrorKind::Unavailable,
            StoreError::LockTimeout { .. } => ErrorKind::DeadlineExceeded,
            // This runvm cannot handle the sandbox until a newer runvm is used.
            StoreError::NewerVersion { .. } => ErrorKind::FailedPrecondition,
            // Someone must unmount first.
            StoreError::MountsRemain { .. } => ErrorKind::FailedPrecondition,
            // The administrator must fix the root's owner or mode first.
            StoreError::UnsafeRoot { .. } => ErrorKind::FailedPrecondition,
            StoreError::Corrupt { .. }
            | StoreError::Mismatch { .. }
            | StoreError::LockNotHeld { .. }
            | StoreError::Io { .. }
            | StoreError::Encode { .. } => ErrorKind::Internal,
        }
    }
}
