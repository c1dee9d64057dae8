//! The NVDIMM PFN info block ("fsdax" namespace info block, `struct nd_pfn_sb`
//! in the kernel's drivers/nvdimm/pfn.h): 4096 bytes at offset 4 KiB of a pmem
//! namespace. When the kernel finds a valid one it sets the namespace up for
//! DAX, with the data (what /dev/pmemN shows) starting at `dataoff`.
//!
//! Facts from the kernel source (drivers/nvdimm/pfn_devs.c, `nd_pfn_validate`):
//! the signature must be `NVDIMM_PFN_INFO\0`; the checksum is `nd_fletcher64`
//! over all 4096 bytes with the checksum field zero; `parent_uuid` must equal
//! the namespace's uuid, which is all zeros for the label-less namespace QEMU's
//! `-device nvdimm` gives; mode must be RAM or PMEM; `dataoff` must be page
//! aligned and, with the namespace start, aligned to `align`; the namespace end
//! must be aligned to the subsection size (2 MiB), hence whole-2-MiB images.

use crate::error::{Error, Result};

/// Size of the info block.
pub const PFN_INFO_SIZE: usize = 4096;
/// Where the kernel looks for it, from the start of the namespace.
pub const PFN_INFO_OFFSET: u64 = 4096;
/// `PFN_SIG`.
pub const PFN_SIGNATURE: [u8; 16] = *b"NVDIMM_PFN_INFO\0";
/// What `nd_info_block_reserve()` keeps free before the data on 4 KiB-page kernels.
pub const INFO_BLOCK_RESERVE: u64 = 8192;

// Field offsets in struct nd_pfn_sb.
const SIGNATURE: usize = 0;
const UUID: usize = 16;
const PARENT_UUID: usize = 32;
const FLAGS: usize = 48;
const VERSION_MAJOR: usize = 52;
const VERSION_MINOR: usize = 54;
const DATAOFF: usize = 56;
const NPFNS: usize = 64;
const MODE: usize = 72;
const START_PAD: usize = 76;
const END_TRUNC: usize = 80;
const ALIGN: usize = 84;
const PAGE_SIZE: usize = 88;
const PAGE_STRUCT_SIZE: usize = 92;
const PADDING: usize = 94;
const CHECKSUM: usize = 4088;

/// Where the `struct page` array of the namespace lives (`enum nd_pfn_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PfnMode {
    /// 0: no memmap.
    None,
    /// 1: in system RAM. The image carries no memmap, so it can be read-only.
    Ram,
    /// 2: in the namespace itself, before `dataoff`.
    Pmem,
}

impl PfnMode {
    pub fn to_raw(self) -> u32 {
        match self {
            PfnMode::None => 0,
            PfnMode::Ram => 1,
            PfnMode::Pmem => 2,
        }
    }

    pub fn from_raw(v: u32) -> Option<PfnMode> {
        match v {
            0 => Some(PfnMode::None),
            1 => Some(PfnMode::Ram),
            2 => Some(PfnMode::Pmem),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PfnMode::None => "none",
            PfnMode::Ram => "ram",
            PfnMode::Pmem => "pmem",
        }
    }
}

/// The fields of an info block (padding is always zero and not kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PfnInfo {
    pub uuid: [u8; 16],
    pub parent_uuid: [u8; 16],
    pub flags: u32,
    pub version_major: u16,
    pub version_minor: u16,
    /// Start of the data, from the start of the namespace.
    pub dataoff: u64,
    /// Data pages.
    pub npfns: u64,
    pub mode: PfnMode,
    pub start_pad: u32,
    pub end_trunc: u32,
    pub align: u32,
    pub page_size: u32,
    pub page_struct_size: u16,
}

impl PfnInfo {
    /// An info block as `nd_pfn_init` writes one (version 1.4) for a namespace
    /// of `namespace_size` bytes with the memmap in RAM, data at `dataoff` and
    /// 4 KiB pages; `uuid` names the pfn device.
    pub fn ram_mode(
        uuid: [u8; 16],
        namespace_size: u64,
        dataoff: u64,
        align: u32,
    ) -> Result<PfnInfo> {
        const PAGE: u64 = 4096;
        if dataoff < INFO_BLOCK_RESERVE || dataoff % PAGE != 0 {
            return Err(Error::BadField {
                what: "PFN info block",
                field: "dataoff",
                value: dataoff.to_string(),
                reason: "must be a multiple of 4096 and at least 8192".into(),
            });
        }
        if namespace_size <= dataoff {
            return Err(Error::BadSize {
                size: namespace_size,
                reason: format!("namespace too small for data at offset {dataoff}"),
            });
        }
        Ok(PfnInfo {
            uuid,
            parent_uuid: [0; 16],
            flags: 0,
            version_major: 1,
            version_minor: 4,
            dataoff,
            npfns: (namespace_size - dataoff) / PAGE,
            mode: PfnMode::Ram,
            start_pad: 0,
            end_trunc: 0,
            align,
            page_size: PAGE as u32,
            // MAX_STRUCT_PAGE_SIZE: what nd_pfn_init records.
            page_struct_size: 64,
        })
    }

    /// The 4096 bytes on disk, checksum included.
    pub fn to_bytes(&self) -> [u8; PFN_INFO_SIZE] {
        let mut b = [0u8; PFN_INFO_SIZE];
        b[SIGNATURE..SIGNATURE + 16].copy_from_slice(&PFN_SIGNATURE);
        b[UUID..UUID + 16].copy_from_slice(&self.uuid);
        b[PARENT_UUID..PARENT_UUID + 16].copy_from_slice(&self.parent_uuid);
        b[FLAGS..FLAGS + 4].copy_from_slice(&self.flags.to_le_bytes());
        b[VERSION_MAJOR..VERSION_MAJOR + 2].copy_from_slice(&self.version_major.to_le_bytes());
        b[VERSION_MINOR..VERSION_MINOR + 2].copy_from_slice(&self.version_minor.to_le_bytes());
        b[DATAOFF..DATAOFF + 8].copy_from_slice(&self.dataoff.to_le_bytes());
        b[NPFNS..NPFNS + 8].copy_from_slice(&self.npfns.to_le_bytes());
        b[MODE..MODE + 4].copy_from_slice(&self.mode.to_raw().to_le_bytes());
        b[START_PAD..START_PAD + 4].copy_from_slice(&self.start_pad.to_le_bytes());
        b[END_TRUNC..END_TRUNC + 4].copy_from_slice(&self.end_trunc.to_le_bytes());
        b[ALIGN..ALIGN + 4].copy_from_slice(&self.align.to_le_bytes());
        b[PAGE_SIZE..PAGE_SIZE + 4].copy_from_slice(&self.page_size.to_le_bytes());
        b[PAGE_STRUCT_SIZE..PAGE_STRUCT_SIZE + 2]
            .copy_from_slice(&self.page_struct_size.to_le_bytes());
        let sum = fletcher64(&b);
        b[CHECKSUM..].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parses and verifies an info block (signature, checksum, mode, zero
    /// padding). `bytes` is the block itself, i.e. the 4096 bytes found at
    /// [`PFN_INFO_OFFSET`]. Never panics.
    pub fn parse(bytes: &[u8]) -> Result<PfnInfo> {
        let b = bytes.get(..PFN_INFO_SIZE).ok_or(Error::Truncated {
            what: "PFN info block",
            offset: PFN_INFO_OFFSET,
            need: PFN_INFO_SIZE as u64,
            have: bytes.len() as u64,
        })?;
        if b[SIGNATURE..SIGNATURE + 16] != PFN_SIGNATURE {
            return Err(Error::BadSignature {
                what: "PFN info block",
                offset: PFN_INFO_OFFSET,
                found: format!("{:?}", String::from_utf8_lossy(&b[..16])),
            });
        }
        let stored = le64(b, CHECKSUM);
        let computed = checksum(b);
        if stored != computed {
            return Err(Error::BadChecksum {
                what: "PFN info block",
                offset: PFN_INFO_OFFSET,
                stored,
                computed,
            });
        }
        let raw_mode = le32(b, MODE);
        let mode = PfnMode::from_raw(raw_mode).ok_or_else(|| Error::BadField {
            what: "PFN info block",
            field: "mode",
            value: raw_mode.to_string(),
            reason: "not one of 0 (none), 1 (ram), 2 (pmem)".into(),
        })?;
        if b[PADDING..CHECKSUM].iter().any(|&x| x != 0) {
            return Err(Error::BadField {
                what: "PFN info block",
                field: "padding",
                value: "non-zero".into(),
                reason: "version 1.3 and later guarantee zero padding".into(),
            });
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[UUID..UUID + 16]);
        let mut parent_uuid = [0u8; 16];
        parent_uuid.copy_from_slice(&b[PARENT_UUID..PARENT_UUID + 16]);
        Ok(PfnInfo {
            uuid,
            parent_uuid,
            flags: le32(b, FLAGS),
            version_major: le16(b, VERSION_MAJOR),
            version_minor: le16(b, VERSION_MINOR),
            dataoff: le64(b, DATAOFF),
            npfns: le64(b, NPFNS),
            mode,
            start_pad: le32(b, START_PAD),
            end_trunc: le32(b, END_TRUNC),
            align: le32(b, ALIGN),
            page_size: le32(b, PAGE_SIZE),
            page_struct_size: le16(b, PAGE_STRUCT_SIZE),
        })
    }
}

/// `nd_fletcher64(addr, len, le=true)` from drivers/nvdimm/core.c: 32-bit
/// little-endian words, a wrapping 32-bit running sum and a 64-bit sum of
/// sums; the result is `sum_of_sums << 32 | sum`. Trailing bytes that do not
/// make a whole word are ignored, as in the kernel.
pub fn fletcher64(bytes: &[u8]) -> u64 {
    let mut lo: u32 = 0;
    let mut hi: u64 = 0;
    for w in bytes.chunks_exact(4) {
        lo = lo.wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        hi = hi.wrapping_add(u64::from(lo));
    }
    (hi << 32) | u64::from(lo)
}

/// `nd_sb_checksum`: fletcher64 of the block with its checksum field zero.
fn checksum(block: &[u8]) -> u64 {
    let mut copy = [0u8; PFN_INFO_SIZE];
    let n = block.len().min(PFN_INFO_SIZE);
    copy[..n].copy_from_slice(&block[..n]);
    copy[CHECKSUM..].fill(0);
    fletcher64(&copy)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn fletcher64_matches_the_kernel_definition() {
        assert_eq!(fletcher64(&[]), 0);
        // Words 1, 2, 3: sums 1, 3, 6; sums of sums 1, 4, 10.
        let words: Vec<u8> = [1u32, 2, 3].iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(fletcher64(&words), (10 << 32) | 6);
        // The 32-bit sum wraps, the 64-bit one carries on.
        let words: Vec<u8> = [u32::MAX, 2].iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(fletcher64(&words), ((u64::from(u32::MAX) + 1) << 32) | 1);
        // A trailing partial word is ignored (len / sizeof(u32) words).
        assert_eq!(fletcher64(&[1, 0, 0, 0, 9, 9]), (1 << 32) | 1);
    }

    #[test]
    fn round_trips_and_verifies() {
        let uuid = [7u8; 16];
        let info = PfnInfo::ram_mode(uuid, 64 * MIB, 2 * MIB, 2 * MIB as u32).unwrap();
        let bytes = info.to_bytes();
        assert_eq!(&bytes[..16], b"NVDIMM_PFN_INFO\0");
        assert_eq!(bytes.len(), 4096);
        let back = PfnInfo::parse(&bytes).unwrap();
        assert_eq!(back, info);
        assert_eq!(back.mode, PfnMode::Ram);
        assert_eq!(back.dataoff, 2 * MIB);
        assert_eq!(back.align, 2 * MIB as u32);
        assert_eq!(back.npfns, 62 * MIB / 4096);
        assert_eq!((back.version_major, back.version_minor), (1, 4));
        assert_eq!(
            back.parent_uuid, [0; 16],
            "label-less namespaces have a null uuid"
        );
        // The stored checksum is fletcher64 over the block with the field zeroed.
        let mut zeroed = bytes;
        zeroed[CHECKSUM..].fill(0);
        assert_eq!(le64(&bytes, CHECKSUM), fletcher64(&zeroed));
    }

    #[test]
    fn detects_corruption() {
        let info = PfnInfo::ram_mode([1; 16], 8 * MIB, 2 * MIB, 2 * MIB as u32).unwrap();
        let good = info.to_bytes();
        let mut b = good;
        b[DATAOFF] ^= 1;
        assert!(matches!(PfnInfo::parse(&b), Err(Error::BadChecksum { .. })));
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            PfnInfo::parse(&b),
            Err(Error::BadSignature { .. })
        ));
        assert!(matches!(
            PfnInfo::parse(&good[..100]),
            Err(Error::Truncated { .. })
        ));
        // A bad mode with a correct checksum is still refused.
        let mut b = good;
        b[MODE] = 9;
        let sum = checksum(&b);
        b[CHECKSUM..].copy_from_slice(&sum.to_le_bytes());
        assert!(matches!(
            PfnInfo::parse(&b),
            Err(Error::BadField { field: "mode", .. })
        ));
    }

    #[test]
    fn hostile_input_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..500 {
            let mut buf = vec![0u8; i * 9 % 4200];
            for byte in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
            if buf.len() >= 16 {
                buf[..16].copy_from_slice(&PFN_SIGNATURE);
            }
            let _ = PfnInfo::parse(&buf);
        }
    }

    #[test]
    fn rejects_impossible_layouts() {
        assert!(PfnInfo::ram_mode([0; 16], 8 * MIB, 4096, 4096).is_err());
        assert!(PfnInfo::ram_mode([0; 16], 2 * MIB, 2 * MIB, 4096).is_err());
        assert!(PfnInfo::ram_mode([0; 16], 8 * MIB, 2 * MIB + 1, 4096).is_err());
    }
}
