//! The agent's RPC error: a ttrpc status code plus a message that says what
//! failed, with which value, and what to do about it.
//!
//! Handlers return `Result<T, AgentError>`; the conversion to a ttrpc status
//! happens once, at the RPC boundary in `rpc.rs`.

use std::fmt;

/// Which ttrpc status an error maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    DeadlineExceeded,
    /// A documented bound (`agent.run_size`, a size limit) was reached.
    ResourceExhausted,
    Unimplemented,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentError {
    pub kind: ErrorKind,
    pub message: String,
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AgentError {}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

impl AgentError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        AgentError {
            kind,
            message: message.into(),
        }
    }

    /// Prefixes the message with what was being done.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    pub fn code(&self) -> ttrpc::Code {
        match self.kind {
            ErrorKind::InvalidArgument => ttrpc::Code::INVALID_ARGUMENT,
            ErrorKind::NotFound => ttrpc::Code::NOT_FOUND,
            ErrorKind::AlreadyExists => ttrpc::Code::ALREADY_EXISTS,
            ErrorKind::FailedPrecondition => ttrpc::Code::FAILED_PRECONDITION,
            ErrorKind::DeadlineExceeded => ttrpc::Code::DEADLINE_EXCEEDED,
            ErrorKind::ResourceExhausted => ttrpc::Code::RESOURCE_EXHAUSTED,
            ErrorKind::Unimplemented => ttrpc::Code::UNIMPLEMENTED,
            ErrorKind::Internal => ttrpc::Code::INTERNAL,
        }
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.message))
    }
}

/// A refused seccomp profile is the request's fault.
impl From<kiln_seccomp::Error> for AgentError {
    fn from(e: kiln_seccomp::Error) -> Self {
        invalid(e.message)
    }
}

pub fn invalid(msg: impl Into<String>) -> AgentError {
    AgentError::new(ErrorKind::InvalidArgument, msg)
}

pub fn not_found(msg: impl Into<String>) -> AgentError {
    AgentError::new(ErrorKind::NotFound, msg)
}

pub fn exists(msg: impl Into<String>) -> AgentError {
    AgentError::new(ErrorKind::AlreadyExists, msg)
}

pub fn precondition(msg: impl Into<String>) -> AgentError {
    AgentError::new(ErrorKind::FailedPrecondition, msg)
}

pub fn internal(msg: impl Into<String>) -> AgentError {
    AgentError::new(ErrorKind::Internal, msg)
}

pub fn exhausted(msg: impl Into<String>) -> AgentError {
    AgentError::new(ErrorKind::ResourceExhausted, msg)
}

pub fn timeout(msg: impl Into<String>) -> AgentError {
    AgentError::new(ErrorKind::DeadlineExceeded, msg)
}

/// An OS error while doing `what` (e.g. "mounting /dev/vda on /run/x").
pub fn os(what: impl fmt::Display, e: impl fmt::Display) -> AgentError {
    internal(format!("{what}: {e}"))
}

/// Longest container, exec or sandbox id accepted.
pub const MAX_ID_LEN: usize = 128;

/// Checks an id that becomes a path component (bundle dir, cgroup name):
/// `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most [`MAX_ID_LEN`] bytes. This rejects
/// `..`, `/`, NUL and the empty string.
pub fn check_id(what: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        let shown: String = id.chars().take(64).collect();
        Err(invalid(format!(
            "invalid {what} {shown:?}: use 1 to {MAX_ID_LEN} characters from [A-Za-z0-9_.-], starting with a letter or digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_a_directory_are_rejected() {
        for bad in [
            "",
            "../x",
            "a/b",
            ".",
            "..",
            ".hidden",
            "-x",
            "a\0b",
            "é",
            &"a".repeat(129),
        ] {
            let e = check_id("container id", bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{bad:?}");
        }
        for good in ["c1", "abc-DEF_0.9", &"a".repeat(128)] {
            check_id("container id", good).unwrap();
        }
    }

    #[test]
    fn maps_to_ttrpc_codes() {
        let e: ttrpc::Error = not_found("no container c1").into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::NOT_FOUND);
                assert_eq!(s.message(), "no container c1");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(invalid("x").context("CopyFile").message, "CopyFile: x");
    }
}
