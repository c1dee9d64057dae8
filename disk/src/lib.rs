//! kiln-disk: disk image layouts for VM root filesystems, written from the
//! on-disk formats' facts and parsed back by the same crate.
//!
//! - [`mbr`]: a DOS master boot record with primary partitions.
//! - [`pfn`]: the NVDIMM PFN info block that makes a pmem namespace DAX-capable.
//! - [`layout`]: the image layout that boots as virtio-blk *and* as an NVDIMM
//!   with DAX (MBR, PFN info block, a second MBR at 2 MiB, filesystem at 3 MiB).
//! - [`nslabel`]: the namespace label area a label-aware (pseries) NVDIMM needs.
//! - [`verity`]: dm-verity hash trees appended to a filesystem, and their check.
//! - [`ext4`]: the one superblock edit reproducible builds need (a fixed
//!   write time, with the checksum renewed).
//!
//! The crate makes no filesystems and knows nothing about build pipelines: it
//! writes the bytes around a filesystem image and checks them. Parsers never
//! panic on hostile input.
//!
//! ```
//! use kiln_disk::layout::{self, DiskIds, Geometry};
//! let geometry = Geometry::for_content(10 << 20, 4 << 20)?;  // content + margin
//! let head = layout::headers(&geometry, &DiskIds::from_seed(&[7; 32]))?;
//! let facts = layout::inspect(&head, geometry.image_size())?;
//! assert_eq!(facts.fs_offset, 3 << 20);
//! # Ok::<(), kiln_disk::Error>(())
//! ```

mod error;
pub mod ext4;
pub mod layout;
pub mod mbr;
pub mod nslabel;
pub mod pfn;
pub mod verity;

pub use error::{Error, Result};
