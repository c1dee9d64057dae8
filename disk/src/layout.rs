//! The DAX image layout: one file that boots both as a virtio-blk disk and as
//! an NVDIMM with DAX.
//!
//! ```text
//! 0          MBR: partition 1 (0x83) from 3 MiB to the end     ← virtio-blk view (/dev/vda1)
//! 4 KiB      PFN info block: mode RAM, dataoff 2 MiB, align 2 MiB
//! 2 MiB      MBR: partition 1 (0x83) from 1 MiB to the end     ← nvdimm view: /dev/pmem0 starts
//!                                                                 here, so this is /dev/pmem0p1
//! 3 MiB      the filesystem (ext4 with 4 KiB blocks, or erofs)
//! end        a multiple of 2 MiB (else "pfn: resource end misaligned" and no /dev/pmem0)
//! ```
//!
//! A *labelled* image (for pseries, whose NVDIMMs are label-aware) is the
//! same up to its end, which is a multiple of 256 MiB (QEMU's pseries NVDIMM
//! block), and is followed by the 128 KiB namespace label area
//! ([`crate::nslabel`]) describing one namespace over all of it; the PFN
//! info block names that namespace as its parent.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::error::{Error, Result};
use crate::mbr::{Mbr, Partition, MBR_SIZE, TYPE_LINUX};
use crate::nslabel::{self, LABEL_AREA_SIZE as LABEL_AREA};
use crate::pfn::{PfnInfo, PfnMode, PFN_INFO_OFFSET, PFN_INFO_SIZE};

pub const MIB: u64 = 1 << 20;
/// Where the namespace's data (what /dev/pmem0 shows) starts.
pub const DATA_OFFSET: u64 = 2 * MIB;
/// Alignment of the data and of the image size (the kernel's subsection size,
/// and a huge page, so DAX can map 2 MiB pages).
pub const ALIGN: u64 = 2 * MIB;
/// Where the filesystem starts in the image.
pub const FS_OFFSET: u64 = 3 * MIB;
/// Where the filesystem starts as seen through /dev/pmem0.
pub const NVDIMM_PARTITION_OFFSET: u64 = FS_OFFSET - DATA_OFFSET;

/// A labelled image's size is a multiple of this (QEMU's pseries NVDIMM
/// block: the NVDIMM without its label area).
pub const LABELLED_ALIGN: u64 = 256 * MIB;

/// The size of an image; everything else follows from the constants above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    image_size: u64,
    labelled: bool,
}

impl Geometry {
    /// The smallest image holding `fs_len` bytes of filesystem.
    pub fn for_filesystem(fs_len: u64) -> Result<Geometry> {
        if fs_len == 0 {
            return Err(Error::BadSize {
                size: 0,
                reason: "an image needs a filesystem".into(),
            });
        }
        let image_size = FS_OFFSET
            .checked_add(fs_len)
            .and_then(|n| n.checked_next_multiple_of(ALIGN))
            .ok_or(Error::BadSize {
                size: fs_len,
                reason: "filesystem too large".into(),
            })?;
        // Both MBRs must be able to address the partition.
        Partition::linux(FS_OFFSET, image_size - FS_OFFSET)?;
        Ok(Geometry {
            image_size,
            labelled: false,
        })
    }

    /// The same filesystem in a labelled image (for a pseries NVDIMM): the
    /// size rounded up to [`LABELLED_ALIGN`], the label area after it.
    pub fn labelled(self) -> Result<Geometry> {
        let image_size = self
            .image_size
            .checked_next_multiple_of(LABELLED_ALIGN)
            .ok_or(Error::BadSize {
                size: self.image_size,
                reason: "image too large".into(),
            })?;
        Partition::linux(FS_OFFSET, image_size - FS_OFFSET)?;
        Ok(Geometry {
            image_size,
            labelled: true,
        })
    }

    /// The file's length: the image, plus the label area if labelled.
    pub fn file_size(&self) -> u64 {
        self.image_size + if self.labelled { LABEL_AREA as u64 } else { 0 }
    }

    /// For a filesystem that is sized up front (ext4): `content` bytes plus
    /// `margin` bytes of free space, the image rounded up to 2 MiB.
    pub fn for_content(content: u64, margin: u64) -> Result<Geometry> {
        Self::for_filesystem(content.saturating_add(margin).max(1))
    }

    /// Image size without the label area (the namespace), a multiple of 2 MiB.
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// Bytes from [`FS_OFFSET`] to the end: the partition, and the most the
    /// filesystem may use.
    pub fn fs_region(&self) -> u64 {
        self.image_size - FS_OFFSET
    }
}

/// The identifiers written into the headers. Fixed per image so two builds
/// of the same content are identical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskIds {
    /// uuid of the pfn device (`nd_pfn_sb.uuid`).
    pub pfn_uuid: [u8; 16],
    /// uuid of the namespace the image fills (`nd_pfn_sb.parent_uuid`): zero
    /// on a label-less NVDIMM, the label's uuid on a labelled one (pseries),
    /// where the kernel ignores an info block naming another parent.
    pub namespace_uuid: [u8; 16],
    /// MBR disk signature (both MBRs; the partitions' PARTUUID prefix).
    pub disk_signature: u32,
}

impl DiskIds {
    /// Ids taken from 32 seed bytes (e.g. a sha256 of the content); the uuid
    /// is marked as an RFC 9562 version 8 (custom) uuid.
    pub fn from_seed(seed: &[u8; 32]) -> DiskIds {
        let mut pfn_uuid = [0u8; 16];
        pfn_uuid.copy_from_slice(&seed[..16]);
        pfn_uuid[6] = (pfn_uuid[6] & 0x0f) | 0x80;
        pfn_uuid[8] = (pfn_uuid[8] & 0x3f) | 0x80;
        let disk_signature = u32::from_le_bytes([seed[16], seed[17], seed[18], seed[19]]);
        DiskIds {
            pfn_uuid,
            namespace_uuid: [0; 16],
            disk_signature,
        }
    }

    /// The same ids for an image that fills the labelled namespace `uuid`.
    pub fn in_namespace(self, uuid: [u8; 16]) -> DiskIds {
        DiskIds {
            namespace_uuid: uuid,
            ..self
        }
    }

    /// [`DiskIds::from_seed`] for a labelled image: the namespace uuid from
    /// the seed's second half (a version 8 uuid too).
    pub fn labelled_from_seed(seed: &[u8; 32]) -> DiskIds {
        let mut ns = [0u8; 16];
        ns.copy_from_slice(&seed[16..]);
        ns[6] = (ns[6] & 0x0f) | 0x80;
        ns[8] = (ns[8] & 0x3f) | 0x80;
        Self::from_seed(seed).in_namespace(ns)
    }
}

/// The first [`FS_OFFSET`] bytes of an image: both MBRs and the info block.
pub fn headers(geometry: &Geometry, ids: &DiskIds) -> Result<Vec<u8>> {
    let mut out = vec![0u8; FS_OFFSET as usize];
    let outer = Mbr::single(
        ids.disk_signature,
        Partition::linux(FS_OFFSET, geometry.fs_region())?,
    );
    let inner = Mbr::single(
        ids.disk_signature,
        Partition::linux(NVDIMM_PARTITION_OFFSET, geometry.fs_region())?,
    );
    let mut pfn = PfnInfo::ram_mode(
        ids.pfn_uuid,
        geometry.image_size(),
        DATA_OFFSET,
        ALIGN as u32,
    )?;
    pfn.parent_uuid = ids.namespace_uuid;
    out[..MBR_SIZE].copy_from_slice(&outer.to_bytes());
    let p = PFN_INFO_OFFSET as usize;
    out[p..p + PFN_INFO_SIZE].copy_from_slice(&pfn.to_bytes());
    let d = DATA_OFFSET as usize;
    out[d..d + MBR_SIZE].copy_from_slice(&inner.to_bytes());
    Ok(out)
}

/// Writes a complete image to `out`: headers, `fs_len` bytes read from `fs`,
/// then zeros up to the image size. `out` is extended with `set_len`, so the
/// zero tail costs no disk space.
pub fn write_image(
    out: &mut File,
    fs: &mut impl Read,
    fs_len: u64,
    geometry: &Geometry,
    ids: &DiskIds,
) -> Result<()> {
    if fs_len > geometry.fs_region() {
        return Err(Error::BadSize {
            size: fs_len,
            reason: format!(
                "filesystem larger than the image's {} byte partition",
                geometry.fs_region()
            ),
        });
    }
    let head = headers(geometry, ids)?;
    out.set_len(0)
        .map_err(|e| Error::io("truncating the image", e))?;
    out.write_all(&head)
        .map_err(|e| Error::io("writing the image headers", e))?;
    let copied = std::io::copy(&mut fs.take(fs_len), out)
        .map_err(|e| Error::io("copying the filesystem into the image", e))?;
    if copied != fs_len {
        return Err(Error::BadSize {
            size: copied,
            reason: format!("the filesystem ended early (expected {fs_len} bytes)"),
        });
    }
    out.set_len(geometry.image_size())
        .map_err(|e| Error::io("extending the image", e))?;
    out.seek(SeekFrom::End(0))
        .map_err(|e| Error::io("seeking in the image", e))?;
    if geometry.labelled {
        if ids.namespace_uuid == [0; 16] {
            return Err(Error::BadSize {
                size: geometry.image_size(),
                reason: "a labelled image needs a namespace uuid (DiskIds::labelled_from_seed)"
                    .into(),
            });
        }
        let labels = nslabel::label_area(
            &ids.namespace_uuid,
            geometry.image_size(),
            nslabel::papr_cookie(&nslabel::KILN_DIMM_UUID),
        )?;
        out.write_all(&labels)
            .map_err(|e| Error::io("writing the namespace labels", e))?;
    }
    Ok(())
}

/// Everything [`inspect`] found and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    /// Without the label area: the namespace's size.
    pub image_size: u64,
    /// A labelled image (pseries): the label area follows `image_size`.
    pub labelled: bool,
    /// The MBR at 0 (virtio-blk view).
    pub mbr: Mbr,
    /// The PFN info block at 4 KiB.
    pub pfn: PfnInfo,
    /// The MBR at `pfn.dataoff` (nvdimm view).
    pub nvdimm_mbr: Mbr,
    /// Byte offset of the filesystem in the image.
    pub fs_offset: u64,
    /// Length of the filesystem partition.
    pub fs_region: u64,
}

/// Parses and cross-checks an image's headers: `head` holds at least the
/// first `DATA_OFFSET + 512` bytes, `image_size` is the file's length. Checks
/// what the kernel checks (signature, checksum, mode, alignment, size) and that
/// both partition tables point at the same bytes. Never panics.
pub fn inspect(head: &[u8], file_size: u64) -> Result<ImageFacts> {
    let bad = |field: &'static str, value: String, reason: String| Error::BadField {
        what: "DAX image",
        field,
        value,
        reason,
    };
    // A PFN block naming a parent namespace marks a labelled image.
    let p = PFN_INFO_OFFSET as usize;
    let parsed_pfn = PfnInfo::parse(head.get(p..).unwrap_or(&[]));
    let labelled = parsed_pfn
        .as_ref()
        .is_ok_and(|pfn| pfn.parent_uuid != [0; 16]);
    let image_size = if labelled {
        let size = file_size.saturating_sub(LABEL_AREA as u64);
        if size == 0 || size % LABELLED_ALIGN != 0 {
            return Err(bad(
                "size",
                file_size.to_string(),
                "a labelled image is a multiple of 256 MiB followed by its 128 KiB label area"
                    .into(),
            ));
        }
        size
    } else {
        file_size
    };
    if image_size % ALIGN != 0 {
        return Err(bad(
            "size",
            image_size.to_string(),
            "not a multiple of 2 MiB: the kernel refuses the namespace (\"resource end misaligned\")".into(),
        ));
    }
    let mbr = Mbr::parse(head)?;
    let outer = only_linux_partition(&mbr, "MBR at 0")?;
    let pfn = parsed_pfn?;
    if pfn.mode != PfnMode::Ram {
        return Err(bad(
            "pfn.mode",
            pfn.mode.name().into(),
            "a read-only image must keep its memmap in RAM (mode 1)".into(),
        ));
    }
    let align = u64::from(pfn.align);
    if !align.is_power_of_two() || align < 4096 {
        return Err(bad(
            "pfn.align",
            align.to_string(),
            "must be a power of two of at least 4096".into(),
        ));
    }
    if pfn.dataoff % align != 0 || pfn.dataoff % 4096 != 0 || pfn.dataoff >= image_size {
        return Err(bad(
            "pfn.dataoff",
            pfn.dataoff.to_string(),
            format!("must be aligned to {align} and inside the {image_size} byte image"),
        ));
    }
    if pfn.start_pad != 0 || pfn.end_trunc != 0 {
        return Err(bad(
            "pfn.start_pad/end_trunc",
            "non-zero".into(),
            "the namespace is the whole image: no padding".into(),
        ));
    }
    let d = usize::try_from(pfn.dataoff).unwrap_or(usize::MAX);
    let inner_bytes = head.get(d..).ok_or(Error::Truncated {
        what: "nvdimm MBR",
        offset: pfn.dataoff,
        need: MBR_SIZE as u64,
        have: head.len() as u64,
    })?;
    let nvdimm_mbr = Mbr::parse(inner_bytes)?;
    let inner = only_linux_partition(&nvdimm_mbr, "MBR at the PFN data offset")?;
    if inner.start_bytes() + pfn.dataoff != outer.start_bytes()
        || inner.len_bytes() != outer.len_bytes()
    {
        return Err(bad(
            "partitions",
            format!(
                "{}+{} vs {}+{}",
                inner.start_bytes() + pfn.dataoff,
                inner.len_bytes(),
                outer.start_bytes(),
                outer.len_bytes()
            ),
            "the nvdimm and virtio-blk views must address the same bytes".into(),
        ));
    }
    if outer.end_bytes() > image_size || outer.start_bytes() < pfn.dataoff + MBR_SIZE as u64 {
        return Err(bad(
            "partition",
            format!("{}..{}", outer.start_bytes(), outer.end_bytes()),
            format!("must lie after the nvdimm MBR and inside the {image_size} byte image"),
        ));
    }
    Ok(ImageFacts {
        image_size,
        labelled,
        fs_offset: outer.start_bytes(),
        fs_region: outer.len_bytes(),
        mbr,
        pfn,
        nvdimm_mbr,
    })
}

/// [`inspect`] on a file.
pub fn inspect_file(path: &Path) -> Result<ImageFacts> {
    let what = || format!("reading {}", path.display());
    let f = File::open(path).map_err(|e| Error::io(what(), e))?;
    let size = f.metadata().map_err(|e| Error::io(what(), e))?.len();
    let mut head = Vec::new();
    (&f).take(FS_OFFSET)
        .read_to_end(&mut head)
        .map_err(|e| Error::io(what(), e))?;
    let facts = inspect(&head, size)?;
    if facts.labelled {
        let mut tail = Vec::new();
        let mut f = f;
        f.seek(SeekFrom::Start(facts.image_size))
            .map_err(|e| Error::io(what(), e))?;
        f.read_to_end(&mut tail).map_err(|e| Error::io(what(), e))?;
        nslabel::check_namespace(&tail, &facts.pfn.parent_uuid, facts.image_size)?;
    }
    Ok(facts)
}

fn only_linux_partition(mbr: &Mbr, which: &'static str) -> Result<Partition> {
    let used: Vec<&Partition> = mbr.partitions.iter().flatten().collect();
    match used.as_slice() {
        [p] if p.kind == TYPE_LINUX && mbr.partitions[0].is_some() => Ok(**p),
        _ => Err(Error::BadField {
            what: which,
            field: "partitions",
            value: format!("{used:?}"),
            reason: "expected exactly one Linux (0x83) partition in slot 1".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> DiskIds {
        DiskIds::from_seed(&[0x5a; 32])
    }

    #[test]
    fn geometry_rounds_to_2_mib_and_keeps_the_margin() {
        let g = Geometry::for_filesystem(1).unwrap();
        assert_eq!(g.image_size(), 4 * MIB);
        assert_eq!(g.fs_region(), MIB);
        let g = Geometry::for_content(10 * MIB, 4 * MIB).unwrap();
        assert_eq!(g.image_size() % ALIGN, 0);
        assert!(g.fs_region() >= 14 * MIB);
        assert_eq!(g.image_size(), 18 * MIB, "3 + 14 = 17, rounded up to 18");
        assert!(Geometry::for_filesystem(0).is_err());
        assert!(Geometry::for_filesystem(u64::MAX - 10).is_err());
        assert!(
            Geometry::for_filesystem(3 << 40).is_err(),
            "MBRs stop at 2 TiB"
        );
    }

    /// A labelled image (pseries): 256 MiB, the label area after it, the
    /// PFN block's parent the labels' namespace; it reads back as such
    /// (nslabel's tests refuse labels of another namespace).
    #[test]
    fn labelled_image_round_trip() {
        let g = Geometry::for_filesystem(5 * MIB)
            .unwrap()
            .labelled()
            .unwrap();
        assert_eq!(g.image_size(), LABELLED_ALIGN);
        assert_eq!(g.file_size(), LABELLED_ALIGN + (128 << 10));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut f = File::create(&path).unwrap();
        let seed = [0x33; 32];
        let ids = DiskIds::labelled_from_seed(&seed);
        assert_ne!(ids.namespace_uuid, [0; 16]);
        assert_eq!(ids.namespace_uuid[6] >> 4, 8);
        write_image(&mut f, &mut std::io::repeat(1), 5 * MIB, &g, &ids).unwrap();
        drop(f);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), g.file_size());
        let facts = inspect_file(&path).unwrap();
        assert!(facts.labelled);
        assert_eq!(facts.image_size, LABELLED_ALIGN);
        assert_eq!(facts.pfn.parent_uuid, ids.namespace_uuid);
        assert_eq!(facts.fs_offset, FS_OFFSET);
        // Without a namespace uuid a labelled image cannot be written.
        let mut f = File::create(&path).unwrap();
        assert!(write_image(&mut f, &mut std::io::repeat(1), 5 * MIB, &g, &ids_plain()).is_err());
    }

    fn ids_plain() -> DiskIds {
        DiskIds::from_seed(&[0x33; 32])
    }

    #[test]
    fn uuid_from_seed_is_version_8() {
        let i = ids();
        assert_eq!(i.pfn_uuid[6] >> 4, 8);
        assert_eq!(i.pfn_uuid[8] >> 6, 0b10);
        assert_eq!(DiskIds::from_seed(&[0x5a; 32]), i, "deterministic");
    }

    #[test]
    fn headers_parse_back_with_the_documented_layout() {
        let g = Geometry::for_content(20 * MIB, 0).unwrap();
        let head = headers(&g, &ids()).unwrap();
        assert_eq!(head.len() as u64, FS_OFFSET);
        let facts = inspect(&head, g.image_size()).unwrap();
        assert_eq!(facts.fs_offset, 3 * MIB);
        assert_eq!(facts.fs_region, g.image_size() - 3 * MIB);
        assert_eq!(facts.pfn.dataoff, 2 * MIB);
        assert_eq!(facts.pfn.align, 2 * MIB as u32);
        assert_eq!(facts.pfn.mode, PfnMode::Ram);
        assert_eq!(facts.pfn.npfns, (g.image_size() - 2 * MIB) / 4096);
        assert_eq!(facts.pfn.uuid, ids().pfn_uuid);
        let outer = facts.mbr.partitions[0].unwrap();
        let inner = facts.nvdimm_mbr.partitions[0].unwrap();
        assert_eq!((outer.kind, inner.kind), (0x83, 0x83));
        assert_eq!(outer.first_lba, 6144, "3 MiB in sectors");
        assert_eq!(inner.first_lba, 2048, "1 MiB after the data offset");
        assert_eq!(outer.end_bytes(), g.image_size());
        assert_eq!(
            inner.end_bytes() + DATA_OFFSET,
            g.image_size(),
            "p1 ends where pmem0 ends"
        );
        assert_eq!(facts.mbr.disk_signature, ids().disk_signature);
        // Nothing else in the first 3 MiB: the kernel reads the block at 4 KiB,
        // the rest must stay zero (no stale data between the structures).
        assert!(head[512..4096].iter().all(|&b| b == 0));
        assert!(head[8192..2 * MIB as usize].iter().all(|&b| b == 0));
        assert!(head[2 * MIB as usize + 512..].iter().all(|&b| b == 0));
    }

    #[test]
    fn inspect_refuses_broken_images() {
        let g = Geometry::for_content(8 * MIB, 0).unwrap();
        let head = headers(&g, &ids()).unwrap();
        let err = inspect(&head, g.image_size() + 4096)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 MiB"), "{err}");
        let mut h = head.clone();
        h[4096 + 60] ^= 0xff; // dataoff, checksum now wrong
        assert!(matches!(
            inspect(&h, g.image_size()),
            Err(Error::BadChecksum { .. })
        ));
        let mut h = head.clone();
        h[2 * MIB as usize + 510] = 0;
        assert!(matches!(
            inspect(&h, g.image_size()),
            Err(Error::BadSignature { .. })
        ));
        // Views disagree: move the inner partition by one sector.
        let mut h = head.clone();
        let at = 2 * MIB as usize + 446 + 8;
        h[at..at + 4].copy_from_slice(&2049u32.to_le_bytes());
        let err = inspect(&h, g.image_size()).unwrap_err().to_string();
        assert!(err.contains("same bytes"), "{err}");
        // Short or empty input is an error, not a panic.
        assert!(inspect(&head[..5000], g.image_size()).is_err());
        assert!(inspect(&[], g.image_size()).is_err());
    }

    #[test]
    fn hostile_headers_never_panic() {
        let g = Geometry::for_content(8 * MIB, 0).unwrap();
        let good = headers(&g, &ids()).unwrap();
        let mut x: u64 = 42;
        for round in 0..300 {
            let mut h = good.clone();
            for _ in 0..8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = match round % 3 {
                    0 => (x % 512) as usize,
                    1 => 4096 + (x % 4096) as usize,
                    _ => 2 * MIB as usize + (x % 512) as usize,
                };
                h[at] = (x >> 32) as u8;
            }
            let _ = inspect(&h, g.image_size());
            let _ = inspect(&h, x % (1 << 40));
        }
    }

    #[test]
    fn writes_a_file_with_the_filesystem_at_3_mib() {
        let dir = tempfile::tempdir().unwrap();
        let fs: Vec<u8> = (0..(3 * MIB + 123)).map(|i| (i % 251) as u8).collect();
        let g = Geometry::for_filesystem(fs.len() as u64).unwrap();
        let path = dir.path().join("root.img");
        let mut f = File::create(&path).unwrap();
        write_image(&mut f, &mut fs.as_slice(), fs.len() as u64, &g, &ids()).unwrap();
        drop(f);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, g.image_size());
        assert_eq!(bytes.len() as u64 % ALIGN, 0);
        assert_eq!(
            &bytes[3 * MIB as usize..3 * MIB as usize + fs.len()],
            &fs[..]
        );
        assert!(bytes[3 * MIB as usize + fs.len()..].iter().all(|&b| b == 0));
        let facts = inspect_file(&path).unwrap();
        assert_eq!(facts.image_size, g.image_size());
        // Too much filesystem for the geometry, or too little data: errors.
        let mut f = File::create(&path).unwrap();
        let small = Geometry::for_filesystem(MIB).unwrap();
        assert!(write_image(&mut f, &mut fs.as_slice(), fs.len() as u64, &small, &ids()).is_err());
        assert!(write_image(&mut f, &mut &fs[..10], fs.len() as u64, &g, &ids()).is_err());
    }
}
