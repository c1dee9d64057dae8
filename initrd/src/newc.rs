//! Low-level newc ("070701") header layout shared by the writer and the reader.
//!
//! Layout (all fields 8 ASCII hex digits after the 6-byte magic, 110 bytes total):
//! magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
//! rdevmajor, rdevminor, namesize, check; then the NUL-terminated name padded so
//! that header+name is a multiple of 4, then the data padded to a multiple of 4.

/// The newc magic.
pub const MAGIC: &[u8; 6] = b"070701";
/// Size of a newc header in bytes.
pub const HEADER_LEN: usize = 110;
/// Name of the end-of-archive entry.
pub const TRAILER: &str = "TRAILER!!!";
/// The kernel refuses names and symlink targets longer than `PATH_MAX` (including the NUL).
pub const PATH_MAX: usize = 4096;

/// File type bits (`S_IFMT` and friends), as stored in the mode field.
pub const S_IFMT: u32 = 0o170000;
pub const S_IFSOCK: u32 = 0o140000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFIFO: u32 = 0o010000;

/// Names of the 13 hex fields, in order, for error messages.
pub const FIELD_NAMES: [&str; 13] = [
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
];

/// Number of zero bytes needed to bring `len` up to a multiple of 4.
pub const fn pad4(len: usize) -> usize {
    (4 - (len % 4)) % 4
}

/// Header values for one entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub ino: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub filesize: u32,
    pub devmajor: u32,
    pub devminor: u32,
    pub rdevmajor: u32,
    pub rdevminor: u32,
    pub namesize: u32,
    pub check: u32,
}

impl Header {
    fn fields(&self) -> [u32; 13] {
        [
            self.ino,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.mtime,
            self.filesize,
            self.devmajor,
            self.devminor,
            self.rdevmajor,
            self.rdevminor,
            self.namesize,
            self.check,
        ]
    }

    /// Encodes the header, followed by `name`, its NUL and the alignment padding.
    ///
    /// `self.namesize` is ignored and computed from `name` (the caller has already
    /// checked that it fits).
    pub fn encode_with_name(&self, name: &[u8], out: &mut Vec<u8>) {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let namesize = name.len() + 1;
        let mut fields = self.fields();
        // Callers validate name length (<= PATH_MAX), so this cannot truncate.
        fields[11] = u32::try_from(namesize).unwrap_or(u32::MAX);
        out.clear();
        out.extend_from_slice(MAGIC);
        for v in fields {
            for shift in (0..8).rev() {
                out.push(HEX[((v >> (shift * 4)) & 0xF) as usize]);
            }
        }
        out.extend_from_slice(name);
        out.push(0);
        out.resize(out.len() + pad4(HEADER_LEN + namesize), 0);
    }
}

/// Parses one 8-digit hex field (upper or lower case).
pub fn parse_hex(field: &[u8]) -> Option<u32> {
    if field.len() != 8 {
        return None;
    }
    let mut v: u32 = 0;
    for &c in field {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | u32::from(d);
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_uppercase_hex_and_aligned() {
        let h = Header {
            ino: 0xABCDEF01,
            mode: S_IFREG | 0o644,
            ..Header::default()
        };
        let mut out = Vec::new();
        for name_len in 0..10 {
            let name = vec![b'x'; name_len];
            h.encode_with_name(&name, &mut out);
            assert_eq!(out.len() % 4, 0);
            assert!(out.len() > HEADER_LEN + name_len);
            assert!(out.len() < HEADER_LEN + name_len + 1 + 4);
        }
        assert_eq!(&out[0..6], b"070701");
        assert_eq!(&out[6..14], b"ABCDEF01");
        assert_eq!(&out[14..22], b"000081A4");
        let hdr = &out[..HEADER_LEN];
        assert!(!hdr.iter().any(|c| c.is_ascii_lowercase()));
    }

    #[test]
    fn parse_hex_accepts_both_cases_only() {
        assert_eq!(parse_hex(b"000081a4"), Some(0o100644));
        assert_eq!(parse_hex(b"000081A4"), Some(0o100644));
        assert_eq!(parse_hex(b"FFFFFFFF"), Some(u32::MAX));
        assert_eq!(parse_hex(b"0000000g"), None);
        assert_eq!(parse_hex(b"+0000001"), None);
        assert_eq!(parse_hex(b"0001"), None);
    }

    #[test]
    fn pad4_values() {
        assert_eq!(pad4(0), 0);
        assert_eq!(pad4(1), 3);
        assert_eq!(pad4(2), 2);
        assert_eq!(pad4(3), 1);
        assert_eq!(pad4(4), 0);
    }
}
