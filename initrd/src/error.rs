//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// Convenience alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while describing, writing or reading an archive.
///
/// Messages always name the archive path, host path or byte offset involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- describing the archive -------------------------------------------------
    /// An archive path was empty, referred to the root, contained `..` or a NUL byte,
    /// or was longer than the kernel accepts.
    #[error("invalid archive path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },

    /// A non-directory entry was added at a path that already exists (directories
    /// may be re-added; the last mode wins).
    #[error("archive path {path:?} already exists")]
    Duplicate { path: String },

    /// An entry was added below a path that exists but is not a directory.
    #[error("cannot add {path:?}: parent {parent:?} exists and is not a directory")]
    ParentNotDirectory { path: String, parent: String },

    /// Mode bits outside of the permission bits `0o7777` were given.
    #[error("archive path {path:?}: mode {mode:#o} has bits outside 0o7777 (give permission bits only; the file type is implied)")]
    InvalidMode { path: String, mode: u32 },

    /// A device number the kernel's `dev_t` cannot represent (major > 4095 or minor > 1048575).
    #[error("archive path {path:?}: device number {major}:{minor} out of range (major <= 4095, minor <= 1048575)")]
    InvalidDevice {
        path: String,
        major: u32,
        minor: u32,
    },

    /// A symlink target that is empty, contains NUL, or is longer than the kernel accepts.
    #[error("archive path {path:?}: invalid symlink target {target:?}: {reason}")]
    InvalidSymlinkTarget {
        path: String,
        target: String,
        reason: &'static str,
    },

    /// A host path (or a symlink target on the host) is not valid UTF-8; archive
    /// names must be UTF-8 so that they round-trip through [`crate::reader`].
    #[error("host path {path:?} is not valid UTF-8")]
    NonUtf8Path { path: PathBuf },

    /// The host tree contains something other than a regular file, directory or symlink.
    #[error("host path {path:?} is a {kind}; only regular files, directories and symlinks are supported")]
    UnsupportedFileType { path: PathBuf, kind: &'static str },

    /// An I/O error on a host path (reading the tree, a host file, or creating/renaming
    /// the output file).
    #[error("{op} {path:?}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    // ---- writing ----------------------------------------------------------------
    /// A value does not fit its 32-bit newc header field (e.g. a file larger than 4 GiB).
    #[error(
        "archive path {path:?}: {field} value {value} does not fit a 32-bit newc header field"
    )]
    FieldOverflow {
        path: String,
        field: &'static str,
        value: u64,
    },

    /// The archive mtime (SOURCE_DATE_EPOCH) does not fit the 32-bit newc mtime field.
    #[error("mtime {0} does not fit the 32-bit newc mtime field (max {max})", max = u32::MAX)]
    MtimeOverflow(u64),

    /// A host file changed size between `stat` and the end of reading it.
    #[error("host file {path:?} changed while being archived (size was {expected} bytes, read {actual})")]
    HostFileChanged {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    /// Writing the (compressed) output stream failed.
    #[error("writing archive output: {0}")]
    Output(#[source] io::Error),

    /// A compression name not understood by [`crate::Compression`]'s `FromStr`.
    #[error("unknown compression {0:?}; valid names are: none, gzip, zstd")]
    UnknownCompression(String),

    /// A zstd level outside the range supported by the linked libzstd.
    #[error("invalid zstd level {level}; valid levels are {min}..={max}")]
    InvalidZstdLevel { level: i32, min: i32, max: i32 },

    /// The zstd encoder rejected a parameter.
    #[error("configuring zstd encoder ({what}): {source}")]
    ZstdConfig {
        what: &'static str,
        #[source]
        source: io::Error,
    },

    // ---- reading ----------------------------------------------------------------
    /// The input ended in the middle of an entry (or before the `TRAILER!!!` entry).
    #[error(
        "offset {offset}: archive truncated in {what}: need {needed} bytes, {available} available"
    )]
    Truncated {
        offset: u64,
        what: &'static str,
        needed: u64,
        available: u64,
    },

    /// The header does not start with the newc magic `070701`.
    #[error("offset {offset}: bad cpio magic {found:?}, expected \"070701\" (newc)")]
    BadMagic { offset: u64, found: String },

    /// A header field is not 8 hexadecimal digits.
    #[error("offset {offset}: header field {field} is not 8 hex digits: {found:?}")]
    BadHeaderField {
        offset: u64,
        field: &'static str,
        found: String,
    },

    /// An entry name is malformed (zero length, missing NUL terminator, embedded NUL).
    #[error("offset {offset}: malformed entry name: {reason}")]
    BadName { offset: u64, reason: &'static str },

    /// An entry name is not valid UTF-8.
    #[error("offset {offset}: entry name is not valid UTF-8 ({lossy:?})")]
    NonUtf8Name { offset: u64, lossy: String },

    /// Alignment padding contains non-zero bytes.
    #[error("offset {offset}: non-zero byte in alignment padding")]
    BadPadding { offset: u64 },

    /// Non-zero bytes follow the `TRAILER!!!` entry.
    #[error("offset {offset}: unexpected non-zero data after the TRAILER!!! entry")]
    TrailingData { offset: u64 },

    /// The input is neither newc cpio, gzip nor zstd.
    #[error(
        "unrecognised archive format (first bytes {magic:02x?}); expected newc cpio, gzip or zstd"
    )]
    UnknownFormat { magic: Vec<u8> },

    /// The compressed stream is corrupt or truncated.
    #[error("decompressing {format}: {source}")]
    Decompress {
        format: &'static str,
        #[source]
        source: io::Error,
    },

    /// Decompression produced more than the allowed number of bytes.
    #[error("decompressed {format} data exceeds the limit of {limit} bytes")]
    TooLarge { format: &'static str, limit: u64 },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
