//! The classic DOS master boot record: 512 bytes at the start of a disk with
//! four partition entries. Only LBA fields matter to Linux; CHS fields are
//! filled the conventional way (255 heads, 63 sectors, clamped to 1023/254/63).

use crate::error::{Error, Result};

/// Bytes per sector as MBR addresses count them.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the MBR structure.
pub const MBR_SIZE: usize = 512;
/// Partition type of a Linux filesystem.
pub const TYPE_LINUX: u8 = 0x83;

const DISK_SIGNATURE_OFFSET: usize = 440;
const TABLE_OFFSET: usize = 446;
const ENTRY_SIZE: usize = 16;
const BOOT_SIGNATURE: [u8; 2] = [0x55, 0xAA];

/// One primary partition entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// Status byte: 0x80 bootable, 0x00 not.
    pub bootable: bool,
    /// Partition type (0x83: Linux).
    pub kind: u8,
    /// First sector (512-byte units) relative to the start of the disk.
    pub first_lba: u32,
    /// Length in sectors.
    pub sectors: u32,
}

impl Partition {
    /// A Linux partition covering `len` bytes from byte offset `start`; both
    /// must be whole sectors and fit in 32-bit sector numbers.
    pub fn linux(start: u64, len: u64) -> Result<Partition> {
        let sectors_of = |bytes: u64, field: &'static str| -> Result<u32> {
            if bytes % SECTOR_SIZE != 0 {
                return Err(Error::BadField {
                    what: "MBR partition",
                    field,
                    value: bytes.to_string(),
                    reason: "not a multiple of 512 bytes".into(),
                });
            }
            u32::try_from(bytes / SECTOR_SIZE).map_err(|_| Error::BadSize {
                size: bytes,
                reason: format!("{field} beyond the 2 TiB an MBR can address"),
            })
        };
        let first_lba = sectors_of(start, "start")?;
        let sectors = sectors_of(len, "length")?;
        if sectors == 0 {
            return Err(Error::BadField {
                what: "MBR partition",
                field: "length",
                value: "0".into(),
                reason: "a partition needs at least one sector".into(),
            });
        }
        first_lba.checked_add(sectors).ok_or(Error::BadSize {
            size: start.saturating_add(len),
            reason: "partition end beyond the 2 TiB an MBR can address".into(),
        })?;
        Ok(Partition {
            bootable: false,
            kind: TYPE_LINUX,
            first_lba,
            sectors,
        })
    }

    /// Byte offset of the partition from the start of the disk.
    pub fn start_bytes(&self) -> u64 {
        u64::from(self.first_lba) * SECTOR_SIZE
    }

    /// Length in bytes.
    pub fn len_bytes(&self) -> u64 {
        u64::from(self.sectors) * SECTOR_SIZE
    }

    /// Byte offset just past the partition.
    pub fn end_bytes(&self) -> u64 {
        self.start_bytes() + self.len_bytes()
    }
}

/// A master boot record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mbr {
    /// The 32-bit disk signature at offset 440 (Linux shows it as the
    /// `PARTUUID` prefix, `xxxxxxxx-01`).
    pub disk_signature: u32,
    /// The four primary entries; `None` for an empty slot (type 0).
    pub partitions: [Option<Partition>; 4],
}

impl Mbr {
    /// An MBR with a single partition in slot 1.
    pub fn single(disk_signature: u32, partition: Partition) -> Mbr {
        Mbr {
            disk_signature,
            partitions: [Some(partition), None, None, None],
        }
    }

    /// The 512 bytes on disk (boot code area zero).
    pub fn to_bytes(&self) -> [u8; MBR_SIZE] {
        let mut b = [0u8; MBR_SIZE];
        b[DISK_SIGNATURE_OFFSET..DISK_SIGNATURE_OFFSET + 4]
            .copy_from_slice(&self.disk_signature.to_le_bytes());
        for (i, p) in self.partitions.iter().enumerate() {
            let Some(p) = p else { continue };
            let e = &mut b[TABLE_OFFSET + i * ENTRY_SIZE..TABLE_OFFSET + (i + 1) * ENTRY_SIZE];
            e[0] = if p.bootable { 0x80 } else { 0x00 };
            e[1..4].copy_from_slice(&chs(u64::from(p.first_lba)));
            e[4] = p.kind;
            let last = u64::from(p.first_lba) + u64::from(p.sectors) - 1;
            e[5..8].copy_from_slice(&chs(last));
            e[8..12].copy_from_slice(&p.first_lba.to_le_bytes());
            e[12..16].copy_from_slice(&p.sectors.to_le_bytes());
        }
        b[510..512].copy_from_slice(&BOOT_SIGNATURE);
        b
    }

    /// Parses the first 512 bytes of `bytes`. Never panics; any input that is
    /// not a well-formed MBR is an error naming the offending field.
    pub fn parse(bytes: &[u8]) -> Result<Mbr> {
        let b = bytes.get(..MBR_SIZE).ok_or(Error::Truncated {
            what: "MBR",
            offset: 0,
            need: MBR_SIZE as u64,
            have: bytes.len() as u64,
        })?;
        if b[510..512] != BOOT_SIGNATURE {
            return Err(Error::BadSignature {
                what: "MBR",
                offset: 510,
                found: format!("{:02x}{:02x} (expected 55aa)", b[510], b[511]),
            });
        }
        let le32 = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut partitions = [None; 4];
        for (i, slot) in partitions.iter_mut().enumerate() {
            let at = TABLE_OFFSET + i * ENTRY_SIZE;
            let kind = b[at + 4];
            if kind == 0 {
                continue;
            }
            let bootable = match b[at] {
                0x00 => false,
                0x80 => true,
                other => {
                    return Err(Error::BadField {
                        what: "MBR partition entry",
                        field: "status",
                        value: format!("{other:#04x}"),
                        reason: format!("entry {} must be 0x00 or 0x80", i + 1),
                    })
                }
            };
            let p = Partition {
                bootable,
                kind,
                first_lba: le32(at + 8),
                sectors: le32(at + 12),
            };
            if p.sectors == 0 {
                return Err(Error::BadField {
                    what: "MBR partition entry",
                    field: "sectors",
                    value: "0".into(),
                    reason: format!("entry {} has a type but no sectors", i + 1),
                });
            }
            *slot = Some(p);
        }
        Ok(Mbr {
            disk_signature: le32(DISK_SIGNATURE_OFFSET),
            partitions,
        })
    }
}

/// CHS address of `lba` in the conventional 255-head, 63-sector geometry,
/// clamped to the largest encodable address (as partitioning tools do).
fn chs(lba: u64) -> [u8; 3] {
    const HEADS: u64 = 255;
    const SECTORS: u64 = 63;
    let (mut c, mut h, mut s) = (
        lba / (HEADS * SECTORS),
        (lba / SECTORS) % HEADS,
        lba % SECTORS + 1,
    );
    if c > 1023 {
        (c, h, s) = (1023, 254, 63);
    }
    [h as u8, (s as u8 & 0x3f) | ((c >> 2) as u8 & 0xc0), c as u8]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_one_partition() {
        let p = Partition::linux(3 << 20, 61 << 20).unwrap();
        let mbr = Mbr::single(0xdead_beef, p);
        let bytes = mbr.to_bytes();
        assert_eq!(&bytes[510..], &[0x55, 0xAA]);
        assert_eq!(bytes[446 + 4], 0x83);
        assert_eq!(&bytes[446 + 8..446 + 12], &6144u32.to_le_bytes());
        let back = Mbr::parse(&bytes).unwrap();
        assert_eq!(back, mbr);
        let p = back.partitions[0].unwrap();
        assert_eq!(p.start_bytes(), 3 << 20);
        assert_eq!(p.end_bytes(), 64 << 20);
        assert!(back.partitions[1..].iter().all(Option::is_none));
    }

    #[test]
    fn chs_is_conventional_and_clamped() {
        // LBA 2048 (1 MiB): cylinder 0, head 32, sector 33, as fdisk writes it.
        assert_eq!(chs(2048), [32, 33, 0]);
        assert_eq!(chs(0), [0, 1, 0]);
        assert_eq!(chs(u64::from(u32::MAX)), [254, 0xff, 0xff]);
    }

    #[test]
    fn rejects_bad_partitions() {
        assert!(Partition::linux(100, 4096).is_err(), "unaligned start");
        assert!(Partition::linux(0, 0).is_err(), "empty");
        assert!(Partition::linux(0, 3 << 40).is_err(), "beyond 2 TiB");
    }

    #[test]
    fn parse_rejects_garbage_without_panicking() {
        assert!(matches!(
            Mbr::parse(&[0u8; 100]),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(
            Mbr::parse(&[0u8; 512]),
            Err(Error::BadSignature { .. })
        ));
        let mut b = Mbr::single(1, Partition::linux(512, 512).unwrap()).to_bytes();
        b[446] = 0x42;
        assert!(matches!(
            Mbr::parse(&b),
            Err(Error::BadField {
                field: "status",
                ..
            })
        ));
        // Every byte pattern of a small pseudo-random sweep parses or errors; none panics.
        let mut x: u32 = 0x1234_5678;
        for _ in 0..2000 {
            let mut buf = [0u8; 512];
            for byte in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *byte = x as u8;
            }
            buf[510] = 0x55;
            buf[511] = 0xAA;
            let _ = Mbr::parse(&buf);
        }
    }
}
