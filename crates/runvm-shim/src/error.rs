//! The shim's errors and their ttrpc status codes.
//!
//! Every error that reaches containerd carries the code containerd reacts to (`NotFound`,
//! `AlreadyExists`, `FailedPrecondition`, `InvalidArgument`, ...) and a message that names
//! the container, process or file at fault, with the whole chain of causes.

use std::error::Error as _;

use containerd_shim::protos::ttrpc::{self, Code};
use runvm_sandbox::SandboxError;

/// Errors of the task service.
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
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The sandbox library failed.
    #[error("{context}: {source}")]
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

    /// The ttrpc status code for this error.
    pub fn code(&self) -> Code {
        match self {
            ShimError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ShimError::Io { .. } => Code::INTERNAL,
            ShimError::Sandbox { source, .. } => sandbox_code(source),
        }
    }

    /// The message with every cause, one after the other.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cause = self.source().and_then(|s| s.source());
        while let Some(c) = cause {
            let text = c.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            cause = c.source();
        }
        out
    }
}

/// The ttrpc code for a sandbox library error.
pub fn sandbox_code(e: &SandboxError) -> Code {
    if e.is_not_found() {
        return Code::NOT_FOUND;
    }
    match e {
        SandboxError::InvalidId(_) | SandboxError::Spec(_) | SandboxError::Config(_) => {
            Code::INVALID_ARGUMENT
        }
        SandboxError::AlreadyExists { .. } | SandboxError::ProcessExists { .. } => {
            Code::ALREADY_EXISTS
        }
        SandboxError::Transition { .. } | SandboxError::WrongState { .. } => {
            Code::FAILED_PRECONDITION
        }
        SandboxError::Agent(a) => match a.rpc_code() {
            Some("INVALID_ARGUMENT") => Code::INVALID_ARGUMENT,
            Some("ALREADY_EXISTS") => Code::ALREADY_EXISTS,
            Some("FAILED_PRECONDITION") => Code::FAILED_PRECONDITION,
            Some("UNIMPLEMENTED") => Code::UNIMPLEMENTED,
            Some("DEADLINE_EXCEEDED") => Code::DEADLINE_EXCEEDED,
            _ => Code::UNAVAILABLE,
        },
        SandboxError::MissingProgram { .. } => Code::FAILED_PRECONDITION,
        _ => Code::INTERNAL,
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
    use super::*;
    use runvm_sandbox::ContainerId;

    #[test]
    fn codes_follow_the_kind_of_error() {
        let bad = ContainerId::parse("../x").unwrap_err();
        let e = ShimError::Sandbox {
            context: "creating container ../x".into(),
            source: Box::new(bad.into()),
        };
        assert_eq!(e.code(), Code::INVALID_ARGUMENT);
        assert!(e.chain().starts_with("creating container ../x: "));
        assert_eq!(
            ShimError::NotFound("container c1 not found".into()).code(),
            Code::NOT_FOUND
        );
        let status = match ttrpc::Error::from(ShimError::AlreadyExists("task t1 exists".into())) {
            ttrpc::Error::RpcStatus(s) => s,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(status.code(), Code::ALREADY_EXISTS);
        assert_eq!(status.message(), "task t1 exists");
    }
}
