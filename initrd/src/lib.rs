// Hand-written newc writer: the `cpio` crate (0.4) emits lowercase hex, only takes `&str` names and silently emits a corrupt entry on a short write, so it cannot give the exact, checked header bytes required here.
//! Reproducible Linux initramfs (newc cpio) archives.
//!
//! Describe the archive in memory with [`Archive`], then [`Archive::write`] or
//! [`Archive::write_to`] it. The same description and the same
//! [`WriteOptions`] always give the same bytes, whatever the host's inode
//! numbers, timestamps, owners or directory listing order. See the crate README
//! for the exact rules.
//!
//! ```
//! use kiln_initrd::{Archive, Compression, WriteOptions};
//!
//! # fn main() -> Result<(), kiln_initrd::Error> {
//! let mut archive = Archive::new();
//! archive
//!     .add_file("/init", 0o755, b"#!/bin/sh\nexec /bin/sh\n".to_vec())?
//!     .add_char_device("dev/console", 0o600, 5, 1)?
//!     .add_symlink("bin/sh", "busybox")?;
//! let mut out = Vec::new();
//! let report = archive.write(&mut out, &WriteOptions::new(1_700_000_000).compression(Compression::Gzip))?;
//! assert_eq!(report.compressed_bytes, out.len() as u64);
//! # Ok(()) }
//! ```

mod compress;
mod error;

// Compile-check the README's example.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub mod newc;
pub mod reader;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub use compress::{Compression, ZSTD_WINDOW_LOG};
pub use error::{Error, Result};

use compress::{Encoder, HashingWriter};
use newc::{Header, PATH_MAX};

/// Default zstd level (what the kernel's own build uses for initramfs).
pub const DEFAULT_ZSTD_LEVEL: i32 = 19;

/// Largest device major number the kernel's `dev_t` can hold.
pub const MAX_DEV_MAJOR: u32 = (1 << 12) - 1;
/// Largest device minor number the kernel's `dev_t` can hold.
pub const MAX_DEV_MINOR: u32 = (1 << 20) - 1;

/// Kind of device node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// Character device (`S_IFCHR`).
    Char,
    /// Block device (`S_IFBLK`).
    Block,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        data: Vec<u8>,
    },
    /// Read at write time; mode normalised from the host mode.
    HostFile {
        host: PathBuf,
        /// Refuse to follow a symlink at `host` (entries discovered by `add_tree`).
        nofollow: bool,
    },
    Symlink {
        target: String,
    },
    Device {
        kind: DeviceKind,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

/// In-memory description of an initramfs.
///
/// Paths are archive paths: UTF-8, `/`-separated, relative to the archive root. A
/// leading `/`, empty components and `.` components are ignored (`"/init"`,
/// `"init"` and `"./init"` are the same entry); `..` is rejected. Missing parent
/// directories are created implicitly with mode `0755`.
///
/// Adding a directory where a directory already exists just updates its mode; adding
/// anything else at an existing path is an [`Error::Duplicate`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Archive {
    entries: BTreeMap<String, Node>,
}

/// How to serialise an [`Archive`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteOptions {
    /// mtime stamped on every entry; pass `SOURCE_DATE_EPOCH`. Must fit in 32 bits.
    pub mtime: u64,
    /// Output compression. Default: [`Compression::Zstd`].
    pub compression: Compression,
    /// zstd level. Default: [`DEFAULT_ZSTD_LEVEL`] (19).
    pub zstd_level: i32,
    /// zstd worker threads. `0` (default) compresses in the calling thread. Any value
    /// `>= 1` uses libzstd's multithreaded streaming mode, whose output is
    /// deterministic and identical for every worker count >= 1, but differs from the
    /// single-threaded output: pick one setting per build and keep it.
    pub zstd_workers: u32,
}

impl WriteOptions {
    /// Options with the given mtime, zstd level 19, single-threaded.
    pub fn new(mtime: u64) -> Self {
        WriteOptions {
            mtime,
            compression: Compression::Zstd,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            zstd_workers: 0,
        }
    }

    /// Sets the output compression.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Sets the zstd level (validated against libzstd's range when writing).
    pub fn zstd_level(mut self, level: i32) -> Self {
        self.zstd_level = level;
        self
    }

    /// Sets the number of zstd worker threads (`0` = single-threaded).
    pub fn zstd_workers(mut self, workers: u32) -> Self {
        self.zstd_workers = workers;
        self
    }
}

/// What [`Archive::write`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReport {
    /// Entries written, excluding the `TRAILER!!!` entry.
    pub entries: u64,
    /// Size of the cpio stream before compression.
    pub uncompressed_bytes: u64,
    /// Size of the final output (equal to `uncompressed_bytes` without compression).
    pub compressed_bytes: u64,
    /// Lowercase hex SHA-256 of the final output.
    pub sha256_hex: String,
}

/// Normalises an archive path; `Ok(String::new())` means the root.
fn normalize(path: &str) -> Result<String> {
    let invalid = |reason| Error::InvalidPath {
        path: path.to_owned(),
        reason,
    };
    if path.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    let mut out = String::with_capacity(path.len());
    for comp in path.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err(invalid("`..` components are not allowed")),
            c => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c);
            }
        }
    }
    if out.len() >= PATH_MAX {
        return Err(invalid(
            "longer than the kernel's PATH_MAX (4096 bytes with NUL)",
        ));
    }
    Ok(out)
}

fn normalize_entry(path: &str) -> Result<String> {
    let p = normalize(path)?;
    if p.is_empty() {
        return Err(Error::InvalidPath {
            path: path.to_owned(),
            reason: "refers to the archive root, which is never emitted",
        });
    }
    Ok(p)
}

fn check_mode(path: &str, mode: u32) -> Result<()> {
    if mode & !0o7777 != 0 {
        return Err(Error::InvalidMode {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Host file modes are normalised: `0755` if any execute bit is set, else `0644`.
pub fn normalize_host_mode(host_mode: u32) -> u32 {
    if host_mode & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

fn file_type_name(ft: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_symlink() {
        "symlink"
    } else {
        "unknown file type"
    }
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries (including implicit parent directories, excluding the trailer).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if nothing has been added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The normalised entry paths, in archive (bytewise-sorted) order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// True if `path` (after normalisation) is in the archive.
    pub fn contains(&self, path: &str) -> bool {
        normalize(path).is_ok_and(|p| self.entries.contains_key(&p))
    }

    fn insert(&mut self, path: String, node: Node) -> Result<()> {
        // Validate everything before mutating so a failed add changes nothing.
        let mut missing = Vec::new();
        for (i, _) in path.match_indices('/') {
            let parent = &path[..i];
            match self.entries.get(parent) {
                Some(Node::Dir { .. }) => {}
                Some(_) => {
                    return Err(Error::ParentNotDirectory {
                        parent: parent.to_owned(),
                        path,
                    })
                }
                None => missing.push(parent.to_owned()),
            }
        }
        match (self.entries.get(&path), &node) {
            (None, _) | (Some(Node::Dir { .. }), Node::Dir { .. }) => {}
            (Some(_), _) => return Err(Error::Duplicate { path }),
        }
        for parent in missing {
            self.entries.insert(parent, Node::Dir { mode: 0o755 });
        }
        self.entries.insert(path, node);
        Ok(())
    }

    /// Adds a directory with permission bits `mode` (e.g. `0o755`). Re-adding an
    /// existing directory updates its mode.
    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<&mut Self> {
        let p = normalize_entry(path)?;
        check_mode(&p, mode)?;
        self.insert(p, Node::Dir { mode })?;
        Ok(self)
    }

    /// Adds a regular file with the given contents and permission bits (kept as given).
    pub fn add_file(
        &mut self,
        path: &str,
        mode: u32,
        contents: impl Into<Vec<u8>>,
    ) -> Result<&mut Self> {
        let p = normalize_entry(path)?;
        check_mode(&p, mode)?;
        let data = contents.into();
        if u32::try_from(data.len()).is_err() {
            return Err(Error::FieldOverflow {
                path: p,
                field: "filesize",
                value: data.len() as u64,
            });
        }
        self.insert(p, Node::File { mode, data })?;
        Ok(self)
    }

    /// Adds a regular file whose contents are read from `host_path` when the archive
    /// is written. Its mode is normalised from the host mode at that time (`0755` if
    /// any execute bit is set, else `0644`). A symlink at `host_path` is followed.
    pub fn add_host_file(
        &mut self,
        path: &str,
        host_path: impl Into<PathBuf>,
    ) -> Result<&mut Self> {
        let p = normalize_entry(path)?;
        self.insert(
            p,
            Node::HostFile {
                host: host_path.into(),
                nofollow: false,
            },
        )?;
        Ok(self)
    }

    /// Adds a symbolic link pointing at `target` (stored verbatim, mode `0777`).
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        let p = normalize_entry(path)?;
        let bad = |reason| Error::InvalidSymlinkTarget {
            path: p.clone(),
            target: target.to_owned(),
            reason,
        };
        if target.is_empty() {
            return Err(bad("empty"));
        }
        if target.contains('\0') {
            return Err(bad("contains a NUL byte"));
        }
        if target.len() >= PATH_MAX {
            return Err(bad("longer than the kernel's PATH_MAX"));
        }
        self.insert(
            p,
            Node::Symlink {
                target: target.to_owned(),
            },
        )?;
        Ok(self)
    }

    /// Adds a device node of the given kind and number.
    pub fn add_device(
        &mut self,
        path: &str,
        kind: DeviceKind,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self> {
        let p = normalize_entry(path)?;
        check_mode(&p, mode)?;
        if major > MAX_DEV_MAJOR || minor > MAX_DEV_MINOR {
            return Err(Error::InvalidDevice {
                path: p,
                major,
                minor,
            });
        }
        self.insert(
            p,
            Node::Device {
                kind,
                mode,
                major,
                minor,
            },
        )?;
        Ok(self)
    }

    /// Adds a character device node (e.g. `dev/console`, 5:1).
    pub fn add_char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self> {
        self.add_device(path, DeviceKind::Char, mode, major, minor)
    }

    /// Adds a block device node.
    pub fn add_block_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self> {
        self.add_device(path, DeviceKind::Block, mode, major, minor)
    }

    /// Adds the contents of host directory `host_dir` below `dest_prefix` (`""` or
    /// `"/"` for the archive root).
    ///
    /// Nothing is followed: symlinks are stored as symlinks (dangling ones too).
    /// Only regular files, directories and symlinks are accepted; anything else is an
    /// [`Error::UnsupportedFileType`]. Directories get mode `0755`, files `0755` or
    /// `0644` (see [`normalize_host_mode`]); file contents are read at write time.
    /// `host_dir` itself may be a symlink to a directory. On error the archive is
    /// left unchanged.
    pub fn add_tree(&mut self, host_dir: impl AsRef<Path>, dest_prefix: &str) -> Result<&mut Self> {
        let host_dir = host_dir.as_ref();
        let meta =
            fs::metadata(host_dir).map_err(|e| Error::io("reading metadata of", host_dir, e))?;
        if !meta.is_dir() {
            return Err(Error::UnsupportedFileType {
                path: host_dir.to_owned(),
                kind: "non-directory (add_tree needs a directory)",
            });
        }
        let prefix = normalize(dest_prefix)?;
        let mut staged = self.clone();
        if !prefix.is_empty() {
            staged.insert(prefix.clone(), Node::Dir { mode: 0o755 })?;
        }
        staged.walk(host_dir, &prefix)?;
        *self = staged;
        Ok(self)
    }

    fn walk(&mut self, dir: &Path, dest: &str) -> Result<()> {
        let mut names = fs::read_dir(dir)
            .and_then(|rd| {
                rd.map(|e| e.map(|e| e.file_name()))
                    .collect::<io::Result<Vec<_>>>()
            })
            .map_err(|e| Error::io("reading directory", dir, e))?;
        names.sort();
        for name in names {
            let host = dir.join(&name);
            let Some(name) = name.to_str() else {
                return Err(Error::NonUtf8Path { path: host });
            };
            let dest_path = if dest.is_empty() {
                name.to_owned()
            } else {
                format!("{dest}/{name}")
            };
            let dest_path = normalize_entry(&dest_path)?;
            let meta = fs::symlink_metadata(&host)
                .map_err(|e| Error::io("reading metadata of", &host, e))?;
            let ft = meta.file_type();
            if ft.is_symlink() {
                let target =
                    fs::read_link(&host).map_err(|e| Error::io("reading symlink", &host, e))?;
                let Some(target) = target.to_str() else {
                    return Err(Error::NonUtf8Path { path: target });
                };
                self.add_symlink(&dest_path, target)?;
            } else if ft.is_dir() {
                self.insert(dest_path.clone(), Node::Dir { mode: 0o755 })?;
                self.walk(&host, &dest_path)?;
            } else if ft.is_file() {
                self.insert(
                    dest_path,
                    Node::HostFile {
                        host,
                        nofollow: true,
                    },
                )?;
            } else {
                return Err(Error::UnsupportedFileType {
                    path: host,
                    kind: file_type_name(ft),
                });
            }
        }
        Ok(())
    }

    /// Writes the archive to `out` and reports sizes and the SHA-256 of the output.
    ///
    /// `out` is written in many small pieces; wrap files in a [`BufWriter`].
    pub fn write<W: Write + ?Sized>(
        &self,
        out: &mut W,
        opts: &WriteOptions,
    ) -> Result<WriteReport> {
        let mtime = u32::try_from(opts.mtime).map_err(|_| Error::MtimeOverflow(opts.mtime))?;
        let hashing = HashingWriter::new(out);
        let mut encoder = Encoder::new(
            hashing,
            opts.compression,
            opts.zstd_level,
            opts.zstd_workers,
        )?;
        // cpio headers are ~110-byte writes; feeding them to the compressor one
        // by one costs a deflate/zstd call each. Batch them first.
        let (entries, uncompressed_bytes) = {
            let mut batched = BufWriter::with_capacity(1 << 18, &mut encoder);
            let r = self.write_cpio(&mut batched, mtime)?;
            batched.flush().map_err(Error::Output)?;
            r
        };
        let hashing = encoder.finish().map_err(Error::Output)?;
        let (compressed_bytes, sha256_hex) = hashing.finish().map_err(Error::Output)?;
        Ok(WriteReport {
            entries,
            uncompressed_bytes,
            compressed_bytes,
            sha256_hex,
        })
    }

    /// Writes the archive atomically to `path`: into a temporary file in the same
    /// directory, fsynced, made mode `0644`, then renamed over `path` (and the
    /// directory fsynced). On error `path` is untouched and the temporary file removed.
    pub fn write_to(&self, path: impl AsRef<Path>, opts: &WriteOptions) -> Result<WriteReport> {
        let path = path.as_ref();
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::NamedTempFile::new_in(dir)
            .map_err(|e| Error::io("creating temporary file in", dir, e))?;
        let report = {
            let mut buffered = BufWriter::with_capacity(1 << 16, tmp.as_file_mut());
            let report = self.write(&mut buffered, opts)?;
            buffered.flush().map_err(Error::Output)?;
            report
        };
        let file = tmp.as_file();
        file.set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io("setting permissions of", tmp.path(), e))?;
        file.sync_all()
            .map_err(|e| Error::io("syncing", tmp.path(), e))?;
        tmp.persist(path)
            .map_err(|e| Error::io("renaming temporary file onto", path, e.error))?;
        // Make the rename itself durable. Best effort: some filesystems refuse
        // fsync on a directory, and the data is already in place.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(report)
    }

    /// Serialises the uncompressed cpio stream; returns (entries, bytes).
    fn write_cpio<W: Write>(&self, w: &mut W, mtime: u32) -> Result<(u64, u64)> {
        let mut w = CountingWriter { inner: w, count: 0 };
        let mut hdr_buf = Vec::with_capacity(newc::HEADER_LEN + 256);
        let mut ino: u32 = 0;
        for (path, node) in &self.entries {
            ino = ino.checked_add(1).ok_or_else(|| Error::FieldOverflow {
                path: path.clone(),
                field: "ino",
                value: u64::from(u32::MAX) + 1,
            })?;
            let mut header = Header {
                ino,
                mtime,
                nlink: 1,
                ..Header::default()
            };
            match node {
                Node::Dir { mode } => {
                    header.mode = newc::S_IFDIR | mode;
                    header.nlink = 2;
                    emit(&mut w, &mut hdr_buf, &header, path, &[])?;
                }
                Node::File { mode, data } => {
                    header.mode = newc::S_IFREG | mode;
                    header.filesize = field_u32(path, "filesize", data.len() as u64)?;
                    emit(&mut w, &mut hdr_buf, &header, path, data)?;
                }
                Node::Symlink { target } => {
                    header.mode = newc::S_IFLNK | 0o777;
                    header.filesize = field_u32(path, "filesize", target.len() as u64)?;
                    emit(&mut w, &mut hdr_buf, &header, path, target.as_bytes())?;
                }
                Node::Device {
                    kind,
                    mode,
                    major,
                    minor,
                } => {
                    header.mode = match kind {
                        DeviceKind::Char => newc::S_IFCHR,
                        DeviceKind::Block => newc::S_IFBLK,
                    } | mode;
                    header.rdevmajor = *major;
                    header.rdevminor = *minor;
                    emit(&mut w, &mut hdr_buf, &header, path, &[])?;
                }
                Node::HostFile { host, nofollow } => {
                    emit_host_file(&mut w, &mut hdr_buf, header, path, host, *nofollow)?;
                }
            }
        }
        let trailer = Header {
            nlink: 1,
            ..Header::default()
        };
        emit(&mut w, &mut hdr_buf, &trailer, newc::TRAILER, &[])?;
        Ok((u64::from(ino), w.count))
    }
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> CountingWriter<W> {
    fn put(&mut self, buf: &[u8]) -> Result<()> {
        self.inner.write_all(buf).map_err(Error::Output)?;
        self.count += buf.len() as u64;
        Ok(())
    }

    fn pad_data(&mut self, len: u64) -> Result<()> {
        let pad = (4 - (len % 4)) % 4;
        self.put(&[0u8; 3][..pad as usize])
    }
}

fn field_u32(path: &str, field: &'static str, value: u64) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::FieldOverflow {
        path: path.to_owned(),
        field,
        value,
    })
}

fn emit<W: Write>(
    w: &mut CountingWriter<W>,
    buf: &mut Vec<u8>,
    header: &Header,
    name: &str,
    data: &[u8],
) -> Result<()> {
    header.encode_with_name(name.as_bytes(), buf);
    w.put(buf)?;
    w.put(data)?;
    w.pad_data(data.len() as u64)
}

fn emit_host_file<W: Write>(
    w: &mut CountingWriter<W>,
    buf: &mut Vec<u8>,
    mut header: Header,
    path: &str,
    host: &Path,
    nofollow: bool,
) -> Result<()> {
    let mut opts = fs::OpenOptions::new();
    // O_NONBLOCK: opening a FIFO that replaced a file must not hang (it is then
    // rejected as not a regular file); it has no effect on regular-file reads.
    let mut flags = libc::O_NONBLOCK;
    if nofollow {
        flags |= libc::O_NOFOLLOW;
    }
    opts.read(true).custom_flags(flags);
    let mut file = opts
        .open(host)
        .map_err(|e| Error::io("opening host file", host, e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io("reading metadata of", host, e))?;
    if !meta.is_file() {
        return Err(Error::UnsupportedFileType {
            path: host.to_owned(),
            kind: file_type_name(meta.file_type()),
        });
    }
    let size = meta.len();
    header.mode = newc::S_IFREG | normalize_host_mode(meta.permissions().mode());
    header.filesize = field_u32(path, "filesize", size)?;
    header.encode_with_name(path.as_bytes(), buf);
    w.put(buf)?;

    let mut chunk = vec![0u8; 1 << 16];
    let mut copied: u64 = 0;
    loop {
        let n = match file.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("reading host file", host, e)),
        };
        if n == 0 {
            break;
        }
        let new_total = copied + n as u64;
        if new_total > size {
            return Err(Error::HostFileChanged {
                path: host.to_owned(),
                expected: size,
                actual: new_total,
            });
        }
        w.put(&chunk[..n])?;
        copied = new_total;
    }
    if copied != size {
        return Err(Error::HostFileChanged {
            path: host.to_owned(),
            expected: size,
            actual: copied,
        });
    }
    w.pad_data(size)
}

/// The archive `data` (plain or compressed, by its magic) with the cpio stream
/// unchanged and `opts.compression` applied, as [`Archive::write`] would have
/// written it: one image's initrd in each compression, to compare them (`cargo
/// xtask bench --initrd-cost`) without rebuilding the tree.
pub fn recompress(data: &[u8], opts: &WriteOptions) -> Result<Vec<u8>> {
    let cpio = reader::decompress(data, reader::DEFAULT_MAX_DECOMPRESSED)?;
    let mut encoder = Encoder::new(
        Vec::with_capacity(cpio.len() / 2),
        opts.compression,
        opts.zstd_level,
        opts.zstd_workers,
    )?;
    encoder.write_all(&cpio).map_err(Error::Output)?;
    // Archive::write flushes once before finishing (a sync point in gzip).
    encoder.flush().map_err(Error::Output)?;
    encoder.finish().map_err(Error::Output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_paths() {
        assert_eq!(normalize("/init").unwrap(), "init");
        assert_eq!(normalize("./a//b/./c/").unwrap(), "a/b/c");
        assert_eq!(normalize("/").unwrap(), "");
        assert!(normalize("a/../b").is_err());
        assert!(normalize("a\0b").is_err());
        assert!(normalize_entry("").is_err());
        assert!(normalize_entry("/.").is_err());
        assert!(normalize_entry(&"x".repeat(PATH_MAX)).is_err());
        assert!(normalize_entry(&"x".repeat(PATH_MAX - 1)).is_ok());
    }

    #[test]
    fn host_mode_normalisation() {
        assert_eq!(normalize_host_mode(0o100700), 0o755);
        assert_eq!(normalize_host_mode(0o100744), 0o755);
        assert_eq!(normalize_host_mode(0o100001), 0o755);
        assert_eq!(normalize_host_mode(0o104755), 0o755);
        assert_eq!(normalize_host_mode(0o100600), 0o644);
        assert_eq!(normalize_host_mode(0o100666), 0o644);
        assert_eq!(normalize_host_mode(0o100000), 0o644);
    }

    #[test]
    fn failed_add_changes_nothing() {
        let mut a = Archive::new();
        a.add_file("f", 0o644, b"x".to_vec()).unwrap();
        let before = a.clone();
        assert!(matches!(
            a.add_file("f/g/h", 0o644, Vec::new()),
            Err(Error::ParentNotDirectory { .. })
        ));
        assert!(matches!(
            a.add_dir("f", 0o755),
            Err(Error::Duplicate { .. })
        ));
        assert!(matches!(
            a.add_dir("d", 0o1_0755),
            Err(Error::InvalidMode { .. })
        ));
        assert_eq!(a, before);
    }

    #[test]
    fn recompress_keeps_the_cpio_and_matches_a_direct_write() {
        let mut a = Archive::new();
        a.add_dir("bin", 0o755).unwrap();
        a.add_file("bin/x", 0o755, vec![7u8; 100_000]).unwrap();
        let write = |c| {
            let mut out = Vec::new();
            a.write(&mut out, &WriteOptions::new(1).compression(c))
                .unwrap();
            out
        };
        let gzip = write(Compression::Gzip);
        for c in Compression::ALL {
            let again = recompress(&gzip, &WriteOptions::new(1).compression(c)).unwrap();
            assert_eq!(reader::detect(&again), Some(c));
            assert_eq!(again, write(c), "{c}: not what Archive::write makes");
        }
        assert!(recompress(b"not an archive", &WriteOptions::new(1)).is_err());
    }
}
