//! The crate's error type.

/// Convenience alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while laying out, writing or parsing an image.
///
/// Parse errors name the structure and the byte offset or field involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Input shorter than the structure being parsed.
    #[error("{what}: need {need} bytes at offset {offset:#x}, the input has {have}")]
    Truncated {
        what: &'static str,
        offset: u64,
        need: u64,
        have: u64,
    },
    /// A magic number or signature does not match.
    #[error("{what} at offset {offset:#x}: bad signature {found}")]
    BadSignature {
        what: &'static str,
        offset: u64,
        found: String,
    },
    /// The stored checksum differs from the computed one.
    #[error("{what} at offset {offset:#x}: checksum {stored:#018x} does not match the computed {computed:#018x}")]
    BadChecksum {
        what: &'static str,
        offset: u64,
        stored: u64,
        computed: u64,
    },
    /// A field has a value the format (or this layout) does not allow.
    #[error("{what}: field `{field}` is {value}: {reason}")]
    BadField {
        what: &'static str,
        field: &'static str,
        value: String,
        reason: String,
    },
    /// A size that does not fit the format (too large for 32-bit sector counts, overflow...).
    #[error("size {size} bytes: {reason}")]
    BadSize { size: u64, reason: String },
    /// Reading or writing the image.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
