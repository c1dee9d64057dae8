//! The one ext4 superblock edit a reproducible build needs: tools that touch
//! an image after `mke2fs` (debugfs) stamp the current time into `s_wtime`;
//! [`set_write_time`] puts a fixed time back and renews the superblock
//! checksum (crc32c, as `ext4_superblock_csum` computes it).

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// The superblock's offset from the start of the filesystem, and its size.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
pub const SUPERBLOCK_SIZE: usize = 1024;

const MAGIC: usize = 0x38;
const WTIME: usize = 0x30;
const FEATURE_RO_COMPAT: usize = 0x64;
const WTIME_HI: usize = 0x274;
const CHECKSUM: usize = 0x3FC;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

/// Sets `s_wtime` of a 1024-byte superblock to `time` and renews its checksum
/// when the filesystem has `metadata_csum`.
pub fn set_write_time(sb: &mut [u8], time: u64) -> Result<()> {
    if sb.len() < SUPERBLOCK_SIZE {
        return Err(Error::Truncated {
            what: "ext4 superblock",
            offset: SUPERBLOCK_OFFSET,
            need: SUPERBLOCK_SIZE as u64,
            have: sb.len() as u64,
        });
    }
    if sb[MAGIC..MAGIC + 2] != [0x53, 0xEF] {
        return Err(Error::BadSignature {
            what: "ext4 superblock",
            offset: SUPERBLOCK_OFFSET + MAGIC as u64,
            found: format!("{:02x}{:02x} (expected 53ef)", sb[MAGIC], sb[MAGIC + 1]),
        });
    }
    if time >> 40 != 0 {
        return Err(Error::BadField {
            what: "ext4 superblock",
            field: "s_wtime",
            value: time.to_string(),
            reason: "beyond the 40 bits ext4 stores".into(),
        });
    }
    sb[WTIME..WTIME + 4].copy_from_slice(&(time as u32).to_le_bytes());
    sb[WTIME_HI] = (time >> 32) as u8;
    let ro_compat = u32::from_le_bytes([
        sb[FEATURE_RO_COMPAT],
        sb[FEATURE_RO_COMPAT + 1],
        sb[FEATURE_RO_COMPAT + 2],
        sb[FEATURE_RO_COMPAT + 3],
    ]);
    if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
        let sum = crc32c(!0, &sb[..CHECKSUM]);
        sb[CHECKSUM..CHECKSUM + 4].copy_from_slice(&sum.to_le_bytes());
    }
    Ok(())
}

/// [`set_write_time`] on the filesystem that starts at byte `fs_offset` of `path`.
pub fn set_write_time_in_file(path: &Path, fs_offset: u64, time: u64) -> Result<()> {
    let what = || format!("updating the ext4 superblock of {}", path.display());
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(what(), e))?;
    let at = fs_offset + SUPERBLOCK_OFFSET;
    let mut sb = [0u8; SUPERBLOCK_SIZE];
    f.seek(SeekFrom::Start(at))
        .and_then(|_| f.read_exact(&mut sb))
        .map_err(|e| Error::io(what(), e))?;
    set_write_time(&mut sb, time)?;
    f.seek(SeekFrom::Start(at))
        .and_then(|_| f.write_all(&sb))
        .map_err(|e| Error::io(what(), e))?;
    Ok(())
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) continuing from
/// `crc`, without the final inversion: Linux's `crc32c(crc, data, len)`.
pub fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The catalogued CRC-32C check value is 0xE3069283 (with the final
        // inversion that ext4 does not apply).
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
    }

    fn fake_superblock(csum: bool) -> Vec<u8> {
        let mut sb = vec![0u8; SUPERBLOCK_SIZE];
        sb[MAGIC..MAGIC + 2].copy_from_slice(&[0x53, 0xEF]);
        if csum {
            sb[FEATURE_RO_COMPAT..FEATURE_RO_COMPAT + 4]
                .copy_from_slice(&RO_COMPAT_METADATA_CSUM.to_le_bytes());
        }
        sb[WTIME..WTIME + 4].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        sb
    }

    #[test]
    fn sets_time_and_checksum() {
        let mut sb = fake_superblock(true);
        set_write_time(&mut sb, 1_700_000_000).unwrap();
        assert_eq!(&sb[WTIME..WTIME + 4], &1_700_000_000u32.to_le_bytes());
        assert_eq!(sb[WTIME_HI], 0);
        let stored = u32::from_le_bytes([
            sb[CHECKSUM],
            sb[CHECKSUM + 1],
            sb[CHECKSUM + 2],
            sb[CHECKSUM + 3],
        ]);
        assert_eq!(stored, crc32c(!0, &sb[..CHECKSUM]));
        // Without metadata_csum the checksum field stays untouched.
        let mut sb = fake_superblock(false);
        set_write_time(&mut sb, 1 << 33).unwrap();
        assert_eq!(sb[WTIME_HI], 2);
        assert_eq!(&sb[CHECKSUM..], &[0, 0, 0, 0]);
    }

    #[test]
    fn refuses_what_is_not_ext4() {
        assert!(set_write_time(&mut [0u8; 10], 0).is_err());
        assert!(set_write_time(&mut [0u8; 1024], 0).is_err());
        assert!(set_write_time(&mut fake_superblock(true), 1 << 41).is_err());
    }

    /// Cross-check with e2fsprogs when it is installed (kiln's set-up installs
    /// it): e2fsck accepts the renewed checksum and dumpe2fs shows the time.
    #[test]
    fn e2fsprogs_agrees() {
        use std::process::Command;
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        let made = Command::new("mke2fs")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-O",
                "metadata_csum",
            ])
            .arg(&img)
            .arg("4M")
            .status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("mke2fs not available; skipping the e2fsprogs cross-check");
            return;
        }
        set_write_time_in_file(&img, 0, 1_234_567_890).unwrap();
        let fsck = Command::new("e2fsck")
            .args(["-fn"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let dump = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&img)
            .env("TZ", "UTC")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&dump.stdout);
        assert!(text.contains("Fri Feb 13 23:31:30 2009"), "{text}");
    }
}
