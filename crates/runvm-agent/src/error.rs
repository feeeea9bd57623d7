//! Errors the agent answers with: a ttrpc code and a message naming the bad value.

use std::fmt;

use ttrpc::Code;

/// An RPC failure: the ttrpc status code and a message for the host.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentError {
    pub code: Code,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, AgentError>;

impl AgentError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        AgentError {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::INVALID_ARGUMENT, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NOT_FOUND, message)
    }
    pub fn exists(message: impl Into<String>) -> Self {
        Self::new(Code::ALREADY_EXISTS, message)
    }
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(Code::FAILED_PRECONDITION, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::INTERNAL, message)
    }

    /// The same error with `context: ` put before its message.
    pub fn context(self, context: impl fmt::Display) -> Self {
        AgentError {
            code: self.code,
            message: format!("{context}: {}", self.message),
        }
    }
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code, e.message))
    }
}

/// Longest container or exec id.
pub const MAX_ID_LEN: usize = 128;

/// Checks a container or exec id: 1 to 128 characters of `[A-Za-z0-9_.-]`, without `..` (ids
/// name folders and cgroups in the guest).
pub fn validate_id(kind: &str, id: &str) -> Result<()> {
    let ok_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if id.is_empty() || id.len() > MAX_ID_LEN || !ok_chars || id.contains("..") {
        let shown: String = id.chars().take(MAX_ID_LEN + 8).collect();
        return Err(AgentError::invalid(format!(
            "invalid {kind} {shown:?}: expected 1 to {MAX_ID_LEN} characters of [A-Za-z0-9_.-] \
             without \"..\""
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        for good in ["a", "c1", "my-container_2.0", &"x".repeat(128)] {
            validate_id("container id", good).unwrap();
        }
        for bad in [
            "",
            "..",
            "a..b",
            "a/b",
            "a b",
            "é",
            &"x".repeat(129),
            "../etc",
        ] {
            let err = validate_id("container id", bad).unwrap_err();
            assert_eq!(err.code, Code::INVALID_ARGUMENT, "{bad}");
            assert!(err.message.contains("invalid container id"), "{err}");
        }
    }

    #[test]
    fn errors_become_rpc_statuses() {
        let e: ttrpc::Error = AgentError::not_found("container \"x\" not found").into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::NOT_FOUND);
                assert_eq!(s.message(), "container \"x\" not found");
            }
            other => panic!("{other:?}"),
        }
        let e = AgentError::internal("boom").context("creating c1");
        assert_eq!(e.message, "creating c1: boom");
    }
}
