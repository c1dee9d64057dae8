//! Output compression and the byte-counting / hashing plumbing around it.

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Compression applied to the cpio stream.
///
/// All three are understood by the kernel's initramfs unpacker (given
/// `CONFIG_RD_GZIP` / `CONFIG_RD_ZSTD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Plain newc cpio.
    None,
    /// gzip (deflate) at level 9, header with no file name, mtime 0, OS byte 255.
    Gzip,
    /// zstd, level from [`crate::WriteOptions::zstd_level`] (default 19), window
    /// capped at 8 MiB.
    Zstd,
}

impl Compression {
    /// All variants, in the order of [`Compression::NAMES`].
    pub const ALL: [Compression; 3] = [Compression::None, Compression::Gzip, Compression::Zstd];
    /// The names accepted by `FromStr`.
    pub const NAMES: [&'static str; 3] = ["none", "gzip", "zstd"];

    /// The canonical name (`"none"`, `"gzip"` or `"zstd"`).
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Compression::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| Error::UnknownCompression(s.to_owned()))
    }
}

/// The zstd window log used for every frame: 2^23 = 8 MiB.
///
/// The kernel's own build compresses initramfs with `zstd -19`, whose window never
/// exceeds 8 MiB, and its initramfs path decompresses in streaming mode, which
/// allocates a buffer the size of the frame's window during early boot. Levels
/// 20..=22 would otherwise pick windows of 32..128 MiB. Long-distance matching is
/// left off for the same reason.
pub const ZSTD_WINDOW_LOG: u32 = 23;

/// gzip level: maximum compression (what the kernel's `gzip -n -f -9` uses).
const GZIP_LEVEL: u32 = 9;
/// gzip OS byte: 255 ("unknown"), flate2's default, pinned explicitly so the
/// header never depends on the build host.
const GZIP_OS_UNKNOWN: u8 = 255;

/// Counts bytes and feeds them into SHA-256 on their way to `inner`.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    pub(crate) fn finish(mut self) -> io::Result<(u64, String)> {
        self.inner.flush()?;
        Ok((self.count, hex::encode(self.hasher.finalize())))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        let written = buf.get(..n).unwrap_or(buf);
        self.hasher.update(written);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A compressor (or pass-through) that can be finished to recover its sink.
pub(crate) enum Encoder<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    pub(crate) fn new(
        sink: W,
        compression: Compression,
        zstd_level: i32,
        zstd_workers: u32,
    ) -> Result<Self> {
        Ok(match compression {
            Compression::None => Encoder::None(sink),
            Compression::Gzip => Encoder::Gzip(
                flate2::GzBuilder::new()
                    .mtime(0)
                    .operating_system(GZIP_OS_UNKNOWN)
                    .write(sink, flate2::Compression::new(GZIP_LEVEL)),
            ),
            Compression::Zstd => {
                let range = zstd::compression_level_range();
                if !range.contains(&zstd_level) {
                    return Err(Error::InvalidZstdLevel {
                        level: zstd_level,
                        min: *range.start(),
                        max: *range.end(),
                    });
                }
                let cfg = |what| move |source| Error::ZstdConfig { what, source };
                let mut enc = zstd::stream::write::Encoder::new(sink, zstd_level)
                    .map_err(cfg("creating encoder"))?;
                enc.window_log(ZSTD_WINDOW_LOG).map_err(cfg("window log"))?;
                enc.long_distance_matching(false)
                    .map_err(cfg("long-distance matching"))?;
                enc.include_checksum(true).map_err(cfg("checksum"))?;
                if zstd_workers > 0 {
                    enc.multithread(zstd_workers)
                        .map_err(cfg("worker threads"))?;
                }
                Encoder::Zstd(enc)
            }
        })
    }

    pub(crate) fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_str_round_trips_and_lists_valid_names() {
        for c in Compression::ALL {
            assert_eq!(c.name().parse::<Compression>().unwrap(), c);
            assert_eq!(c.to_string(), c.name());
        }
        let err = "xz".parse::<Compression>().unwrap_err().to_string();
        assert!(err.contains("\"xz\""), "{err}");
        for name in Compression::NAMES {
            assert!(err.contains(name), "{err}");
        }
        assert!("GZIP".parse::<Compression>().is_err());
    }
}
