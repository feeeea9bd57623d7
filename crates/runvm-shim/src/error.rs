//! The shim's errors and their ttrpc status codes.
//!
//! Every error that reaches containerd carries the code containerd reacts to (`NotFound`,
//! `AlreadyExists`, `FailedPrecondition`, `InvalidArgument`, ...) and a message that names
//! the container, process or file at fault, with the whole chain of causes. The code comes from
//! the error's [`ErrorKind`], turned into a ttrpc code in one place ([`kind_code`]).

use containerd_shim::protos::ttrpc::{self, Code};
use runvm_sandbox::{ErrorChain, ErrorKind, SandboxError};

/// Errors of the task service. Each message leaves its `source` out; [`ShimError::chain`]
/// adds the causes.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The request is malformed (bad id, bad spec, bad option).
    #[error("{0}")]
    InvalidArgument(String),
    /// The container or process does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The container or process exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is in the wrong state for the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// runvm does not do this (yet).
    #[error("{0}")]
    Unimplemented(String),
    /// Something on the host failed (files, mounts, FIFOs).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The sandbox library failed.
    #[error("{context}")]
    Sandbox {
        /// What the shim was doing.
        context: String,
        /// The cause (boxed: sandbox errors are large).
        source: Box<SandboxError>,
    },
}

impl ShimError {
    /// Wraps a sandbox error with what the shim was doing.
    pub fn sandbox(context: impl Into<String>) -> impl FnOnce(SandboxError) -> ShimError {
        let context = context.into();
        move |source| ShimError::Sandbox {
            context,
            source: Box::new(source),
        }
    }

    /// Wraps a host I/O error with what the shim was doing.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ShimError {
        let what = what.into();
        move |source| ShimError::Io { what, source }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ShimError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            ShimError::NotFound(_) => ErrorKind::NotFound,
            ShimError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            ShimError::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            ShimError::Unimplemented(_) => ErrorKind::Unimplemented,
            ShimError::Io { .. } => ErrorKind::Internal,
            ShimError::Sandbox { source, .. } => source.kind(),
        }
    }

    /// The ttrpc status code for this error.
    pub fn code(&self) -> Code {
        kind_code(self.kind())
    }

    /// The message with every cause, each once, joined by `": "`.
    pub fn chain(&self) -> String {
        ErrorChain(self).to_string()
    }
}

/// The ttrpc code containerd gets for each kind of failure.
pub fn kind_code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::NotFound => Code::NOT_FOUND,
        ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
        ErrorKind::InvalidArgument => Code::INVALID_ARGUMENT,
        ErrorKind::FailedPrecondition => Code::FAILED_PRECONDITION,
        ErrorKind::Unavailable => Code::UNAVAILABLE,
        ErrorKind::DeadlineExceeded => Code::DEADLINE_EXCEEDED,
        ErrorKind::Unimplemented => Code::UNIMPLEMENTED,
        ErrorKind::Internal => Code::INTERNAL,
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> ttrpc::Error {
        let code = e.code();
        let message = e.chain();
        tracing::warn!(?code, error = %message, "request failed");
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
    }
}

/// Shorthand for the task service's results.
pub type Result<T> = std::result::Result<T, ShimError>;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use runvm_sandbox::agent::{AgentError, RpcCode};
    use runvm_sandbox::state::State;
    use runvm_sandbox::store::{LockMode, StoreError};
    use runvm_sandbox::{ContainerId, SandboxId};

    fn wrapped(e: impl Into<SandboxError>) -> ShimError {
        ShimError::sandbox("creating container c1")(e.into())
    }

    #[test]
    fn each_kind_has_its_code() {
        let table = [
            (ErrorKind::NotFound, Code::NOT_FOUND),
            (ErrorKind::AlreadyExists, Code::ALREADY_EXISTS),
            (ErrorKind::InvalidArgument, Code::INVALID_ARGUMENT),
            (ErrorKind::FailedPrecondition, Code::FAILED_PRECONDITION),
            (ErrorKind::Unavailable, Code::UNAVAILABLE),
            (ErrorKind::DeadlineExceeded, Code::DEADLINE_EXCEEDED),
            (ErrorKind::Unimplemented, Code::UNIMPLEMENTED),
            (ErrorKind::Internal, Code::INTERNAL),
        ];
        for (kind, code) in table {
            assert_eq!(kind_code(kind), code, "{kind:?}");
        }
    }

    #[test]
    fn codes_follow_the_kind_of_error() {
        let sb = SandboxId::parse("sb1").unwrap();
        let c1 = ContainerId::parse("c1").unwrap();
        let table = [
            (
                wrapped(ContainerId::parse("../x").unwrap_err()),
                Code::INVALID_ARGUMENT,
            ),
            (
                wrapped(StoreError::ContainerExists {
                    sandbox: sb.clone(),
                    id: c1.clone(),
                    path: "/run/runvm/sb1/c1".into(),
                }),
                Code::ALREADY_EXISTS,
            ),
            (
                wrapped(StoreError::ContainerNotFound {
                    sandbox: sb.clone(),
                    id: c1,
                    path: "/run/runvm/sb1/c1".into(),
                }),
                Code::NOT_FOUND,
            ),
            (
                wrapped(StoreError::LockTimeout {
                    id: sb.clone(),
                    path: "/run/runvm/sb1/lock".into(),
                    mode: LockMode::Exclusive,
                    timeout: Duration::from_secs(5),
                }),
                Code::DEADLINE_EXCEEDED,
            ),
            (
                wrapped(StoreError::LockBusy {
                    id: sb,
                    path: "/run/runvm/sb1/lock".into(),
                    mode: LockMode::Shared,
                }),
                Code::UNAVAILABLE,
            ),
            (
                wrapped(SandboxError::WrongState {
                    what: "container c1".into(),
                    state: State::Stopped,
                    operation: "exec in it",
                    hint: "",
                }),
                Code::FAILED_PRECONDITION,
            ),
            (
                wrapped(AgentError::Rpc {
                    method: "CreateContainer",
                    code: RpcCode::Unimplemented,
                    message: "later".into(),
                }),
                Code::UNIMPLEMENTED,
            ),
            (
                ShimError::io("opening the FIFO")(std::io::Error::other("gone")),
                Code::INTERNAL,
            ),
            (
                ShimError::NotFound("container c1 not found".into()),
                Code::NOT_FOUND,
            ),
            (
                ShimError::Unimplemented("checkpoint".into()),
                Code::UNIMPLEMENTED,
            ),
        ];
        for (e, code) in table {
            assert_eq!(e.code(), code, "{e:?}");
        }
        let status = match ttrpc::Error::from(ShimError::AlreadyExists("task t1 exists".into())) {
            ttrpc::Error::RpcStatus(s) => s,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(status.code(), Code::ALREADY_EXISTS);
        assert_eq!(status.message(), "task t1 exists");
    }

    #[test]
    fn the_chain_prints_each_cause_once() {
        let e = wrapped(ContainerId::parse("../x").unwrap_err());
        let text = e.chain();
        assert!(
            text.starts_with("creating container c1: invalid id \"../x\": "),
            "{text}"
        );
        assert_eq!(text.matches("invalid id").count(), 1, "{text}");

        let e = wrapped(StoreError::Io {
            action: "read",
            path: "/run/runvm/sb1/state.json".into(),
            source: std::io::Error::other("disk on fire"),
        });
        assert_eq!(
            e.chain(),
            "creating container c1: cannot read /run/runvm/sb1/state.json: disk on fire"
        );

        let e = ShimError::io("creating /run/x")(std::io::Error::other("read-only"));
        assert_eq!(e.to_string(), "creating /run/x");
        assert_eq!(e.chain(), "creating /run/x: read-only");
    }
}
