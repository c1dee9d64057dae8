//! `manifest.json`: what a built kiln image contains. `cargo xtask build-image`
//! writes it next to the artifacts; kiln-shim reads it before booting them.
//! This crate is the one definition of that file (its records, the artifact
//! role names) and of [`Arch`], the guest architectures both sides name.
//!
//! Invariant: a manifest holds no host path and no build time, so two
//! checkouts of one commit produce the same bytes. The field order of each
//! struct is the order in the file: do not reorder fields.
//!
//! A leaf: it depends on serde alone and knows nothing of the pipeline.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod arch;

pub use arch::Arch;

/// The file name of a manifest inside an image directory.
pub const FILE: &str = "manifest.json";

/// The format version this crate writes and reads (`kiln_manifest`).
pub const FORMAT: u32 = 1;

/// Artifact roles: the keys of [`Manifest::artifacts`].
pub mod role {
    /// The kernel's boot image (bzImage, Image or vmlinux).
    pub const KERNEL: &str = "kernel";
    /// The kernel's `.config`.
    pub const KERNEL_CONFIG: &str = "kernel_config";
    /// The initrd (agent as /init plus the recipe's tree).
    pub const INITRD: &str = "initrd";
    /// The static agent binary.
    pub const AGENT: &str = "agent";
    /// `rootfs.img`, the DAX-capable root filesystem image.
    pub const ROOTFS_IMAGE: &str = "rootfs_image";
    /// Every role, in the order the pipeline makes them.
    pub const ALL: [&str; 5] = [KERNEL, KERNEL_CONFIG, INITRD, AGENT, ROOTFS_IMAGE];
}

/// `manifest.json`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Format version ([`FORMAT`]).
    pub kiln_manifest: u32,
    pub image: String,
    pub arch: Arch,
    pub kernel_version: String,
    /// Patches applied to the kernel source, in order (name and sha256).
    #[serde(default)]
    pub kernel_patches: Vec<PatchRecord>,
    pub cmdline: String,
    #[serde(default)]
    pub source_date_epoch: u64,
    /// Role ([`role`]) → file record.
    pub artifacts: BTreeMap<String, ArtifactRecord>,
    /// Input name → content hash (stage keys and input files).
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// How `rootfs_image` is laid out and booted (filesystem, partition, DAX).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<RootfsRecord>,
    /// Debian packages in the image, with versions (empty for non-Debian recipes).
    #[serde(default)]
    pub packages: Vec<Package>,
    /// Kernel modules in the image (requested ones and their dependencies),
    /// in load order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_modules: Vec<ModuleRecord>,
}

impl Manifest {
    /// The artifact of `role`, if the image has one.
    pub fn artifact(&self, role: &str) -> Option<&ArtifactRecord> {
        self.artifacts.get(role)
    }
}

/// One file of an image.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRecord {
    /// File name, relative to the manifest's directory.
    pub file: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// One kernel patch, as applied to the kernel source.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PatchRecord {
    pub name: String,
    pub sha256: String,
}

/// One installed Debian package, as dpkg records it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// The licences its DEP-5 copyright file declares, as an SPDX expression
    /// (names without an SPDX id as `LicenseRef-Debian-…`); absent when the
    /// file is not machine-readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
}

/// One kernel module inside an image's initrd and rootfs.img.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ModuleRecord {
    pub name: String,
    /// Path inside the image, e.g. `lib/modules/6.12.57/kernel/net/llc/llc.ko`.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// Direct dependencies, by name.
    pub depends: Vec<String>,
}

/// What the manifest says about the rootfs image: enough for kiln-shim to
/// boot it (the filesystem for `root=`, PID 1, where the filesystem starts).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RootfsRecord {
    /// "ext4" or "erofs".
    pub filesystem: String,
    /// Filesystem UUID (fixed per image and arch).
    pub fs_uuid: String,
    /// `init=` for image boots, when the recipe's PID 1 is not /sbin/init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    /// Partition number of the filesystem in both partition tables.
    pub partition: u32,
    /// Byte offset of the filesystem in the image (virtio-blk: /dev/vda1).
    pub partition_offset: u64,
    pub partition_size: u64,
    /// Bytes the tree's contents take in blocks (ext4), or the filesystem's size (erofs).
    pub content_bytes: u64,
    /// Requested free space (ext4).
    pub margin_bytes: u64,
    /// Entries in the tree.
    pub entries: u64,
    pub dax: DaxRecord,
    /// The dm-verity hash tree after the filesystem, when the image has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<VerityRecord>,
}

/// A dm-verity hash tree (format 1, no superblock) stored in the rootfs
/// partition right after the filesystem: the facts the kernel's verity table
/// needs, so kiln-shim can pass them with `dm-mod.create=`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VerityRecord {
    /// "sha256".
    pub algorithm: String,
    /// dm-verity hash format version (1: the salt is hashed before each block).
    pub format: u32,
    pub data_block_size: u64,
    pub hash_block_size: u64,
    /// Blocks of filesystem covered: the whole filesystem.
    pub data_blocks: u64,
    /// Where the tree starts in the partition, in hash blocks (right after the data).
    pub hash_start_block: u64,
    pub hash_blocks: u64,
    /// Hex; derived from the filesystem's bytes, so rebuilds are identical.
    pub salt: String,
    /// Hex sha256 of the tree's top block: what the guest verifies against.
    pub root_hash: String,
}

impl VerityRecord {
    /// The verity target's arguments for data and tree on `dev`.
    pub fn table_args(&self, dev: &str) -> String {
        format!(
            "{} {dev} {dev} {} {} {} {} {} {} {}",
            self.format,
            self.data_block_size,
            self.hash_block_size,
            self.data_blocks,
            self.hash_start_block,
            self.algorithm,
            self.root_hash,
            self.salt
        )
    }

    /// 512-byte sectors the verity device has (the filesystem's size).
    pub fn data_sectors(&self) -> u64 {
        self.data_blocks * self.data_block_size / 512
    }
}

/// The nvdimm view of the image.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DaxRecord {
    pub pfn_info_offset: u64,
    /// Where /dev/pmem0 starts in the image.
    pub data_offset: u64,
    pub align: u64,
    /// "ram": the memmap lives in guest RAM, so the image can be read-only.
    pub mode: String,
    /// Where /dev/pmem0p1 starts inside /dev/pmem0.
    pub nvdimm_partition_offset: u64,
    pub pfn_uuid: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let file = |f: &str| ArtifactRecord {
            file: f.into(),
            size: 3,
            sha256: "ab".repeat(32),
        };
        Manifest {
            kiln_manifest: FORMAT,
            image: "minimal".into(),
            arch: Arch::Aarch64,
            kernel_version: "6.12.57".into(),
            kernel_patches: vec![PatchRecord {
                name: "0001-x.patch".into(),
                sha256: "cd".repeat(32),
            }],
            cmdline: "console=ttyAMA0 quiet".into(),
            source_date_epoch: 1,
            artifacts: role::ALL.iter().map(|r| (r.to_string(), file(r))).collect(),
            inputs: [("agent".to_string(), "k".to_string())].into(),
            rootfs: Some(RootfsRecord {
                filesystem: "ext4".into(),
                fs_uuid: "u".into(),
                init: None,
                partition: 1,
                partition_offset: 1 << 20,
                partition_size: 8 << 20,
                content_bytes: 4096,
                margin_bytes: 8 << 20,
                entries: 12,
                dax: DaxRecord {
                    pfn_info_offset: 4096,
                    data_offset: 2 << 20,
                    align: 2 << 20,
                    mode: "ram".into(),
                    nvdimm_partition_offset: 1 << 20,
                    pfn_uuid: "p".into(),
                },
                verity: Some(VerityRecord {
                    algorithm: "sha256".into(),
                    format: 1,
                    data_block_size: 4096,
                    hash_block_size: 4096,
                    data_blocks: 2048,
                    hash_start_block: 2048,
                    hash_blocks: 17,
                    salt: "5a".repeat(32),
                    root_hash: "ab".repeat(32),
                }),
            }),
            packages: vec![Package {
                name: "bash".into(),
                version: "5.2".into(),
                architecture: "arm64".into(),
                license: Some("GPL-3.0-or-later".into()),
            }],
            kernel_modules: vec![ModuleRecord {
                name: "llc".into(),
                path: "lib/modules/6.12.57/kernel/net/llc/llc.ko".into(),
                size: 9,
                sha256: "ef".repeat(32),
                depends: vec![],
            }],
        }
    }

    #[test]
    fn round_trips_through_json() {
        let m = sample();
        let text = serde_json::to_string_pretty(&m).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&text).unwrap(), m);
        assert!(text.contains("\"arch\": \"aarch64\""), "{text}");
    }

    #[test]
    fn field_order_is_the_file_order() {
        // Reordering fields would change every manifest.json's bytes.
        let text = serde_json::to_string(&sample()).unwrap();
        let at = |k: &str| text.find(&format!("\"{k}\":")).unwrap();
        let order = [
            "kiln_manifest",
            "image",
            "arch",
            "kernel_version",
            "kernel_patches",
            "cmdline",
            "source_date_epoch",
            "artifacts",
            "inputs",
            "rootfs",
            "packages",
            "kernel_modules",
        ];
        assert!(order.windows(2).all(|w| at(w[0]) < at(w[1])), "{text}");
    }

    #[test]
    fn optional_parts_are_left_out_and_default_when_read() {
        let mut m = sample();
        m.rootfs = None;
        m.kernel_modules.clear();
        let text = serde_json::to_string(&m).unwrap();
        assert!(!text.contains("\"rootfs\"") && !text.contains("kernel_modules"));
        // A minimal hand-written manifest (as tests and older images have) reads.
        let min = r#"{"kiln_manifest":1,"image":"i","arch":"x86_64","kernel_version":"6.12",
            "cmdline":"c","artifacts":{"kernel":{"file":"vmlinuz","size":1,"sha256":"00"}}}"#;
        let m: Manifest = serde_json::from_str(min).unwrap();
        assert_eq!(m.arch, Arch::X86_64);
        assert!(m.rootfs.is_none() && m.packages.is_empty() && m.kernel_patches.is_empty());
        assert_eq!(m.artifact(role::KERNEL).unwrap().file, "vmlinuz");
        assert!(m.artifact(role::ROOTFS_IMAGE).is_none());
    }

    #[test]
    fn unknown_arch_is_a_clear_error() {
        let bad = r#"{"kiln_manifest":1,"image":"i","arch":"mips","kernel_version":"6",
            "cmdline":"c","artifacts":{}}"#;
        let err = serde_json::from_str::<Manifest>(bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("mips"), "{err}");
    }
}
