//! Parsing newc archives back into entries (for tests and inspection tools).
//!
//! The reader works on an in-memory byte slice and never panics on hostile input:
//! every length is bounds-checked against the input before it is used, so a header
//! claiming a 4 GiB name or file simply yields [`Error::Truncated`]. Compressed
//! input (gzip or zstd, detected by magic) is decompressed first, up to a size limit.

use std::borrow::Cow;
use std::io::Read;

use crate::error::{Error, Result};
use crate::newc::{self, pad4, parse_hex, FIELD_NAMES, HEADER_LEN, MAGIC, TRAILER};
use crate::Compression;

/// Default cap on decompressed size used by [`read`]: 1 GiB.
pub const DEFAULT_MAX_DECOMPRESSED: u64 = 1 << 30;

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// What an entry is, from the `S_IFMT` bits of its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    Directory,
    File,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
    /// Unknown file type bits.
    Other(u32),
}

/// One parsed archive entry (the trailer is not returned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Byte offset of the header in the (decompressed) cpio stream.
    pub offset: u64,
    /// Name as stored (without the NUL).
    pub name: String,
    pub ino: u32,
    /// Full mode: file type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub check: u32,
    /// File contents, or the symlink target; empty for other kinds.
    pub data: Vec<u8>,
}

impl Entry {
    /// The entry type.
    pub fn kind(&self) -> EntryKind {
        match self.mode & newc::S_IFMT {
            newc::S_IFDIR => EntryKind::Directory,
            newc::S_IFREG => EntryKind::File,
            newc::S_IFLNK => EntryKind::Symlink,
            newc::S_IFCHR => EntryKind::CharDevice,
            newc::S_IFBLK => EntryKind::BlockDevice,
            newc::S_IFIFO => EntryKind::Fifo,
            newc::S_IFSOCK => EntryKind::Socket,
            other => EntryKind::Other(other),
        }
    }

    /// Permission bits (`mode & 0o7777`).
    pub fn permissions(&self) -> u32 {
        self.mode & 0o7777
    }
}

/// Identifies the format from the leading magic bytes; `None` if unrecognised.
pub fn detect(data: &[u8]) -> Option<Compression> {
    if data.starts_with(MAGIC) {
        Some(Compression::None)
    } else if data.starts_with(GZIP_MAGIC) {
        Some(Compression::Gzip)
    } else if data.starts_with(ZSTD_MAGIC) {
        Some(Compression::Zstd)
    } else {
        None
    }
}

/// Returns the raw cpio stream, decompressing gzip or zstd input (by magic) up
/// to `limit` bytes. Plain cpio is returned borrowed.
pub fn decompress(data: &[u8], limit: u64) -> Result<Cow<'_, [u8]>> {
    match detect(data) {
        Some(Compression::None) => Ok(Cow::Borrowed(data)),
        Some(Compression::Gzip) => {
            let dec = flate2::read::MultiGzDecoder::new(data);
            read_limited(dec, "gzip", limit).map(Cow::Owned)
        }
        Some(Compression::Zstd) => {
            let dec =
                zstd::stream::read::Decoder::new(data).map_err(|source| Error::Decompress {
                    format: "zstd",
                    source,
                })?;
            read_limited(dec, "zstd", limit).map(Cow::Owned)
        }
        None => Err(Error::UnknownFormat {
            magic: data.iter().take(6).copied().collect(),
        }),
    }
}

fn read_limited<R: Read>(reader: R, format: &'static str, limit: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|source| Error::Decompress { format, source })?;
    if out.len() as u64 > limit {
        return Err(Error::TooLarge { format, limit });
    }
    Ok(out)
}

/// Decompresses (if needed, up to [`DEFAULT_MAX_DECOMPRESSED`]) and parses an archive.
pub fn read(data: &[u8]) -> Result<Vec<Entry>> {
    read_with_limit(data, DEFAULT_MAX_DECOMPRESSED)
}

/// Like [`read`] with an explicit cap on the decompressed size.
pub fn read_with_limit(data: &[u8], limit: u64) -> Result<Vec<Entry>> {
    parse(&decompress(data, limit)?)
}

/// Bounds-checked slice `data[start..start + len]`.
fn take<'a>(data: &'a [u8], start: usize, len: usize, what: &'static str) -> Result<&'a [u8]> {
    let available = data.len().saturating_sub(start);
    start
        .checked_add(len)
        .and_then(|end| data.get(start..end))
        .ok_or(Error::Truncated {
            offset: start as u64,
            what,
            needed: len as u64,
            available: available as u64,
        })
}

fn check_zero(bytes: &[u8], offset: usize) -> Result<()> {
    match bytes.iter().position(|&b| b != 0) {
        Some(i) => Err(Error::BadPadding {
            offset: (offset + i) as u64,
        }),
        None => Ok(()),
    }
}

/// Parses an uncompressed newc stream up to and including `TRAILER!!!`.
///
/// Strict: every entry (the trailer included) must be complete with its alignment
/// padding, padding must be zero, and only zero bytes may follow the trailer. So
/// any proper prefix of a valid archive is an error.
pub fn parse(data: &[u8]) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut pos: usize = 0;
    loop {
        let header = take(data, pos, HEADER_LEN, "header")?;
        if &header[..6] != MAGIC {
            return Err(Error::BadMagic {
                offset: pos as u64,
                found: String::from_utf8_lossy(&header[..6]).into_owned(),
            });
        }
        let mut f = [0u32; 13];
        for (i, slot) in f.iter_mut().enumerate() {
            let start = 6 + 8 * i;
            let raw = &header[start..start + 8];
            *slot = parse_hex(raw).ok_or_else(|| Error::BadHeaderField {
                offset: (pos + start) as u64,
                field: FIELD_NAMES[i],
                found: String::from_utf8_lossy(raw).into_owned(),
            })?;
        }
        let [ino, mode, uid, gid, nlink, mtime, filesize, dev_major, dev_minor, rdev_major, rdev_minor, namesize, check] =
            f;

        let name_off = pos + HEADER_LEN;
        if namesize == 0 {
            return Err(Error::BadName {
                offset: name_off as u64,
                reason: "namesize is 0 (no room for the NUL terminator)",
            });
        }
        let namesize = namesize as usize;
        let name_raw = take(data, name_off, namesize, "entry name")?;
        let (last, name_bytes) = name_raw.split_last().ok_or(Error::BadName {
            offset: name_off as u64,
            reason: "empty name field",
        })?;
        if *last != 0 {
            return Err(Error::BadName {
                offset: name_off as u64,
                reason: "name is not NUL-terminated",
            });
        }
        if name_bytes.contains(&0) {
            return Err(Error::BadName {
                offset: name_off as u64,
                reason: "name contains an embedded NUL",
            });
        }
        let name = std::str::from_utf8(name_bytes).map_err(|_| Error::NonUtf8Name {
            offset: name_off as u64,
            lossy: String::from_utf8_lossy(name_bytes).into_owned(),
        })?;
        let pad_off = name_off + namesize;
        let name_pad = take(data, pad_off, pad4(HEADER_LEN + namesize), "name padding")?;
        check_zero(name_pad, pad_off)?;

        let data_off = pad_off + name_pad.len();
        let filesize = filesize as usize;
        let body = take(data, data_off, filesize, "file data")?;
        let body_pad_off = data_off + filesize;
        let body_pad = take(data, body_pad_off, pad4(filesize), "data padding")?;
        check_zero(body_pad, body_pad_off)?;
        let next = body_pad_off + body_pad.len();

        if name == TRAILER {
            let rest = &data[next..];
            if let Some(i) = rest.iter().position(|&b| b != 0) {
                return Err(Error::TrailingData {
                    offset: (next + i) as u64,
                });
            }
            return Ok(entries);
        }
        entries.push(Entry {
            offset: pos as u64,
            name: name.to_owned(),
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            dev_major,
            dev_minor,
            rdev_major,
            rdev_minor,
            check,
            data: body.to_vec(),
        });
        pos = next;
    }
}
