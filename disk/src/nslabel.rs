//! NVDIMM namespace labels: the label storage area a label-aware DIMM (a
//! pseries `spapr-nvdimm`, whose guest driver papr_scm always sets
//! NDD_LABELING) must hold before the guest shows any namespace on it.
//!
//! kiln writes the smallest valid area, in the v1.1 format the kernel reads
//! (drivers/nvdimm/label.h): two index blocks, then one 128-byte pmem label
//! in slot 0 describing a single namespace over the whole DIMM. v1.1 labels
//! carry no checksum and no type or abstraction GUID, so whether the
//! namespace is fsdax is decided, as for label-less NVDIMMs, by the PFN info
//! block at its start ([`crate::pfn`]).
//!
//! ```text
//! 0     index block 0 (seq 1)  ┐ 256 bytes each: header, then one bit per
//! 256   index block 1 (seq 2)  ┘ slot, 1 = free (slot 0 in use)
//! 512   label slot 0: uuid, isetcookie, dpa 0, rawsize = the DIMM's size
//! ...   free slots (zero)
//! ```

use crate::error::{Error, Result};
use crate::pfn::{fletcher64, le64};

/// The smallest label area QEMU's pseries accepts (`label-size`), and what
/// kiln uses.
pub const LABEL_AREA_SIZE: usize = 128 << 10;
/// v1.1 label size.
const LABEL_SIZE: usize = 128;
/// Index blocks are padded to this (NSINDEX_ALIGN).
const INDEX_ALIGN: usize = 256;
const INDEX_SIGNATURE: [u8; 16] = *b"NAMESPACE_INDEX\0";
/// `struct nd_namespace_index` before its free bitmap.
const INDEX_HEADER: usize = 72;

// Field offsets in an index block.
const I_SEQ: usize = 20;
const I_MYOFF: usize = 24;
const I_MYSIZE: usize = 32;
const I_OTHEROFF: usize = 40;
const I_LABELOFF: usize = 48;
const I_NSLOT: usize = 56;
const I_MAJOR: usize = 60;
const I_MINOR: usize = 62;
const I_CHECKSUM: usize = 64;

// Field offsets in a v1.1 namespace label.
const L_UUID: usize = 0;
const L_NLABEL: usize = 84;
const L_ISETCOOKIE: usize = 88;
const L_DPA: usize = 104;
const L_RAWSIZE: usize = 112;
const L_SLOT: usize = 120;

/// Geometry of an area of `config_size` bytes, as the kernel derives it
/// (`nvdimm_num_label_slots`, `sizeof_namespace_index`): index block size
/// and number of label slots.
fn geometry(config_size: usize) -> (usize, usize) {
    let index_size =
        |nslot: usize| (INDEX_HEADER + nslot.div_ceil(8)).next_multiple_of(INDEX_ALIGN);
    let index = index_size(config_size / LABEL_SIZE);
    let nslot = (config_size - 2 * index) / LABEL_SIZE;
    (index_size(nslot), nslot)
}

/// The uuid of kiln's pseries NVDIMMs (`spapr-nvdimm,uuid=`, the guest's
/// `ibm,unit-guid`), with the last byte set to the DIMM's index. Its first
/// half makes the cookie every kiln label carries ([`papr_cookie`]).
pub const KILN_DIMM_UUID: [u8; 16] = *b"kiln-nvdimm-0000";

/// The interleave-set cookie a v1.1 pmem label must carry on a pseries
/// DIMM with `dimm_uuid` (QEMU's `spapr-nvdimm,uuid=`, the guest's
/// `ibm,unit-guid`): papr_scm's `cookie1`, the uuid's first 8 bytes read
/// little-endian.
pub fn papr_cookie(dimm_uuid: &[u8; 16]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&dimm_uuid[..8]);
    u64::from_le_bytes(b)
}

/// A label area of [`LABEL_AREA_SIZE`] bytes with one pmem namespace
/// `ns_uuid` of `size` bytes from the DIMM's start, for a DIMM whose
/// interleave-set cookie is `cookie`.
pub fn label_area(ns_uuid: &[u8; 16], size: u64, cookie: u64) -> Result<Vec<u8>> {
    if size == 0 {
        return Err(Error::BadSize {
            size,
            reason: "a namespace label needs a non-empty namespace".into(),
        });
    }
    let (index_size, nslot) = geometry(LABEL_AREA_SIZE);
    let mut area = vec![0u8; LABEL_AREA_SIZE];
    for (i, seq) in [(0usize, 1u32), (1, 2)] {
        let b = &mut area[i * index_size..(i + 1) * index_size];
        b[..16].copy_from_slice(&INDEX_SIGNATURE);
        b[I_SEQ..I_SEQ + 4].copy_from_slice(&seq.to_le_bytes());
        b[I_MYOFF..I_MYOFF + 8].copy_from_slice(&((i * index_size) as u64).to_le_bytes());
        b[I_MYSIZE..I_MYSIZE + 8].copy_from_slice(&(index_size as u64).to_le_bytes());
        let other = (1 - i) * index_size;
        b[I_OTHEROFF..I_OTHEROFF + 8].copy_from_slice(&(other as u64).to_le_bytes());
        b[I_LABELOFF..I_LABELOFF + 8].copy_from_slice(&((2 * index_size) as u64).to_le_bytes());
        b[I_NSLOT..I_NSLOT + 4].copy_from_slice(&(nslot as u32).to_le_bytes());
        b[I_MAJOR..I_MAJOR + 2].copy_from_slice(&1u16.to_le_bytes());
        b[I_MINOR..I_MINOR + 2].copy_from_slice(&1u16.to_le_bytes());
        // Free bitmap: every slot free but slot 0; bits past nslot stay 0.
        let free = &mut b[INDEX_HEADER..];
        for slot in 1..nslot {
            free[slot / 8] |= 1 << (slot % 8);
        }
        let sum = index_checksum(b);
        b[I_CHECKSUM..I_CHECKSUM + 8].copy_from_slice(&sum.to_le_bytes());
    }
    let l = &mut area[2 * index_size..2 * index_size + LABEL_SIZE];
    l[L_UUID..L_UUID + 16].copy_from_slice(ns_uuid);
    l[L_NLABEL..L_NLABEL + 2].copy_from_slice(&1u16.to_le_bytes());
    l[L_ISETCOOKIE..L_ISETCOOKIE + 8].copy_from_slice(&cookie.to_le_bytes());
    l[L_DPA..L_DPA + 8].copy_from_slice(&0u64.to_le_bytes());
    l[L_RAWSIZE..L_RAWSIZE + 8].copy_from_slice(&size.to_le_bytes());
    l[L_SLOT..L_SLOT + 4].copy_from_slice(&0u32.to_le_bytes());
    Ok(area)
}

/// Checks that `area` (a label area, as [`label_area`] writes it) describes
/// namespace `ns_uuid` of `size` bytes from the DIMM's start, with the cookie
/// of [`KILN_DIMM_UUID`]: what the kernel will find on the DIMM. Never panics.
pub fn check_namespace(area: &[u8], ns_uuid: &[u8; 16], size: u64) -> Result<()> {
    let bad = |field: &'static str, reason: String| Error::BadField {
        what: "namespace label area",
        field,
        value: format!("{} bytes", area.len()),
        reason,
    };
    if area.len() != LABEL_AREA_SIZE {
        return Err(bad("size", format!("must be {LABEL_AREA_SIZE} bytes")));
    }
    let (index_size, _) = geometry(LABEL_AREA_SIZE);
    for i in 0..2 {
        let b = &area[i * index_size..(i + 1) * index_size];
        if b[..16] != INDEX_SIGNATURE || index_checksum(b) != le64(b, I_CHECKSUM) {
            return Err(bad("index", format!("index block {i} is not valid")));
        }
    }
    let l = &area[2 * index_size..2 * index_size + LABEL_SIZE];
    if l[L_UUID..L_UUID + 16] != ns_uuid[..]
        || le64(l, L_RAWSIZE) != size
        || le64(l, L_DPA) != 0
        || le64(l, L_ISETCOOKIE) != papr_cookie(&KILN_DIMM_UUID)
    {
        return Err(bad(
            "label",
            format!(
                "slot 0 must describe namespace {} of {size} bytes at 0 with kiln's cookie",
                ns_uuid
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ),
        ));
    }
    Ok(())
}

/// An index block's checksum: fletcher64 of the block with its checksum
/// field zero, as `__nd_label_validate` computes it.
fn index_checksum(block: &[u8]) -> u64 {
    let mut zeroed = block.to_vec();
    zeroed[I_CHECKSUM..I_CHECKSUM + 8].fill(0);
    fletcher64(&zeroed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's numbers for a 128 KiB area of 128-byte labels: 256-byte
    /// index blocks and 1020 slots.
    #[test]
    fn geometry_matches_the_kernels() {
        assert_eq!(geometry(LABEL_AREA_SIZE), (256, 1020));
    }

    /// Each index block passes the kernel's checks: signature, checksum over
    /// the block with the checksum zero, offsets, version 1.1, slot 0 in use.
    #[test]
    fn index_blocks_validate_as_the_kernel_does() {
        let area = label_area(&[0xab; 16], 256 << 20, 0x1122_3344_5566_7788).unwrap();
        for i in 0..2 {
            let b = &area[i * 256..(i + 1) * 256];
            assert_eq!(&b[..16], b"NAMESPACE_INDEX\0");
            assert_eq!(index_checksum(b), le64(b, I_CHECKSUM), "index {i}");
            assert_eq!(le64(b, I_MYOFF), (i * 256) as u64);
            assert_eq!(le64(b, I_OTHEROFF), ((1 - i) * 256) as u64);
            assert_eq!(le64(b, I_LABELOFF), 512);
            assert_eq!(&b[I_MAJOR..I_MINOR + 2], &[1, 0, 1, 0]);
            assert_eq!(b[INDEX_HEADER] & 1, 0, "slot 0 in use");
            assert_eq!(b[INDEX_HEADER] & 2, 2, "slot 1 free");
            // 1020 slots: the last 4 bits of the 128-byte bitmap stay 0.
            assert_eq!(b[INDEX_HEADER + 127], 0x0f);
        }
        let seq = |i: usize| area[i * 256 + I_SEQ];
        assert_eq!((seq(0), seq(1)), (1, 2), "index 1 is the newer");
        let l = &area[512..640];
        assert_eq!(&l[..16], &[0xab; 16]);
        assert_eq!(le64(l, L_ISETCOOKIE), 0x1122_3344_5566_7788);
        assert_eq!(le64(l, L_RAWSIZE), 256 << 20);
        assert!(area[640..].iter().all(|b| *b == 0));
    }

    #[test]
    fn cookie_is_the_uuids_first_half_little_endian() {
        // uuid 6b3c2d0a-8f4e-4c1a-9a7b-1d2e3f405162, as a guest showed it.
        let uuid = [
            0x6b, 0x3c, 0x2d, 0x0a, 0x8f, 0x4e, 0x4c, 0x1a, 0x9a, 0x7b, 0x1d, 0x2e, 0x3f, 0x40,
            0x51, 0x62,
        ];
        assert_eq!(papr_cookie(&uuid), 0x1a4c_4e8f_0a2d_3c6b);
    }

    #[test]
    fn written_areas_check_and_others_do_not() {
        let cookie = papr_cookie(&KILN_DIMM_UUID);
        let area = label_area(&[3; 16], 256 << 20, cookie).unwrap();
        check_namespace(&area, &[3; 16], 256 << 20).unwrap();
        assert!(check_namespace(&area, &[4; 16], 256 << 20).is_err());
        assert!(check_namespace(&area, &[3; 16], 512 << 20).is_err());
        assert!(check_namespace(&area[1..], &[3; 16], 256 << 20).is_err());
        let mut broken = area.clone();
        broken[100] ^= 1;
        assert!(check_namespace(&broken, &[3; 16], 256 << 20).is_err());
        let other = label_area(&[3; 16], 256 << 20, cookie + 1).unwrap();
        assert!(check_namespace(&other, &[3; 16], 256 << 20).is_err());
    }

    #[test]
    fn an_empty_namespace_is_refused() {
        assert!(label_area(&[1; 16], 0, 1).is_err());
    }
}
