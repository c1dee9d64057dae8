//! A container's root filesystem as a virtio-blk disk: Kata's block-based
//! rootfs, for guests where a shared directory is not possible (see
//! [`virtio_fs_serves`]) or not wanted.
//!
//! The host directory is copied into a fresh ext4 image (`mke2fs -d`: no
//! root, no loop device), attached at a fixed guest address at boot, and
//! named to the agent as Kata's runtime names a hot-plugged disk: `blk` with
//! a PCI path, or `blk-ccw` with a CCW bus id on s390x. The image lives in
//! the run directory and goes with it; the container's writes stay there,
//! never in the host directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use kiln_manifest::Arch;

/// PCI slot on the root bus (or s390x device number) the disk is attached
/// at: clear of the hot-plug root ports (0x10..) and cold VFIO ports (0x18..).
pub const SLOT: u8 = 0x1e;

/// Free space left for the container's writes, beyond its files.
const HEADROOM: u64 = 64 << 20;

/// How a container gets its root filesystem from the host directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsVia {
    /// Shared over virtio-fs (Kata's default): writes reach the host directory.
    VirtioFs,
    /// Copied into an ext4 image on a virtio-blk disk.
    Block,
}

/// Whether virtiofsd on a `host` serves a `guest` kernel's FUSE requests.
/// FUSE passes them in the guest's ABI and virtiofsd translates nothing, so:
/// - byte order must match: s390x is big-endian, the others little-endian;
/// - open(2) flag values differ (Linux's uapi `asm/fcntl.h`): x86_64 and
///   s390x use the generic ones, powerpc and arm64 their own. A ppc64le
///   guest's O_LARGEFILE (0200000, which a 64-bit kernel always sets) is the
///   generic O_DIRECTORY, so every open of a file on an x86_64 host's share
///   fails with ENOTDIR. arm64's O_LARGEFILE is the generic O_NOFOLLOW
///   (harmless there), but its O_DIRECT (0200000) is O_DIRECTORY too: an
///   aarch64 guest's O_DIRECT opens on the share fail, everything else works.
pub fn virtio_fs_serves(host: Arch, guest: Arch) -> bool {
    let big = |a: Arch| a == Arch::S390x;
    let powerpc_flags = |a: Arch| a == Arch::Ppc64le;
    big(host) == big(guest) && powerpc_flags(host) == powerpc_flags(guest)
}

impl RootfsVia {
    /// `auto` picks virtio-fs where it serves this host's `arch` guests
    /// ([`virtio_fs_serves`]), else the block disk.
    pub fn parse(s: &str, arch: Arch) -> anyhow::Result<RootfsVia> {
        Ok(match s {
            "virtio-fs" => RootfsVia::VirtioFs,
            "block" => RootfsVia::Block,
            "auto" if virtio_fs_serves(Arch::host(), arch) => RootfsVia::VirtioFs,
            "auto" => RootfsVia::Block,
            other => anyhow::bail!(
                "--rootfs-via {other:?}: use auto, virtio-fs or block (a virtio-blk disk image of the rootfs)"
            ),
        })
    }
}

/// Where the guest finds the disk, as the agent's Storage names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDisk {
    /// `blk` (PCI path) or `blk-ccw` (CCW bus id).
    pub driver: &'static str,
    pub source: String,
}

/// The QEMU `-device` for the disk on drive `drive`, and its guest address.
pub fn attachment(arch: Arch, drive: &str) -> (String, GuestDisk) {
    match arch {
        Arch::S390x => (
            format!("virtio-blk-ccw,drive={drive},devno=fe.0.{SLOT:04x}"),
            GuestDisk {
                driver: "blk-ccw",
                source: format!("0.0.{SLOT:04x}"),
            },
        ),
        _ => {
            let bus = if arch == Arch::Ppc64le {
                "pci.0"
            } else {
                "pcie.0"
            };
            (
                format!("virtio-blk-pci,drive={drive},bus={bus},addr={SLOT:#x}"),
                GuestDisk {
                    driver: "blk",
                    source: format!("{SLOT:02x}"),
                },
            )
        }
    }
}

/// Bytes the ext4 image needs for `dir`: every file in whole 4 KiB blocks,
/// a block per directory, symlink and inode table entry, a quarter more for
/// ext4's own metadata, plus [`HEADROOM`]; and the inode count.
pub fn size_for(dir: &Path) -> anyhow::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta =
            std::fs::symlink_metadata(&p).with_context(|| format!("reading {}", p.display()))?;
        inodes += 1;
        bytes += meta.size().div_ceil(4096) * 4096 + 4096;
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).with_context(|| format!("listing {}", p.display()))? {
                stack.push(e?.path());
            }
        }
    }
    let size = (bytes + bytes / 4 + HEADROOM).div_ceil(1 << 20) << 20;
    Ok((size, inodes + inodes / 2 + 1024))
}

/// Writes an ext4 image of `dir` to `out` (through a temp name, so a
/// failure leaves nothing behind). Owners, modes and links come across as
/// they are on the host.
pub fn make_ext4(dir: &Path, out: &Path) -> anyhow::Result<u64> {
    if !dir.is_dir() {
        anyhow::bail!("container rootfs {} is not a directory", dir.display());
    }
    let (size, inodes) = size_for(dir)?;
    let part: PathBuf = out.with_extension("part");
    let _ = std::fs::remove_file(&part);
    let made = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
        .args(["-N", &inodes.to_string(), "-d"])
        .arg(dir)
        .arg(&part)
        .arg(format!("{}k", size / 1024))
        .output();
    let made = match made {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e).context(
                "running mke2fs for the container's rootfs disk: install e2fsprogs (1.43 or later, for -d)",
            );
        }
    };
    if !made.status.success() {
        let _ = std::fs::remove_file(&part);
        anyhow::bail!(
            "mke2fs -d {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&made.stderr).trim()
        );
    }
    std::fs::rename(&part, out)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_the_share_only_where_virtiofsd_serves_the_guest() {
        use Arch::*;
        assert!(virtio_fs_serves(X86_64, Aarch64) && virtio_fs_serves(Aarch64, X86_64));
        assert!(virtio_fs_serves(Ppc64le, Ppc64le) && virtio_fs_serves(S390x, S390x));
        assert!(!virtio_fs_serves(X86_64, S390x), "byte order");
        assert!(!virtio_fs_serves(X86_64, Ppc64le), "open(2) flag values");
        assert!(!virtio_fs_serves(Ppc64le, Aarch64));
        let auto = |a| RootfsVia::parse("auto", a).unwrap();
        assert_eq!(auto(Arch::host()), RootfsVia::VirtioFs);
        if Arch::host() == X86_64 {
            assert_eq!(
                (auto(S390x), auto(Ppc64le)),
                (RootfsVia::Block, RootfsVia::Block)
            );
        }
        let virtio_fs = RootfsVia::parse("virtio-fs", S390x).unwrap();
        assert_eq!(virtio_fs, RootfsVia::VirtioFs, "asked for, it is tried");
        assert_eq!(RootfsVia::parse("block", X86_64).unwrap(), RootfsVia::Block);
        let e = RootfsVia::parse("9p", Arch::X86_64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("auto, virtio-fs or block"), "{e}");
    }

    #[test]
    fn each_arch_gets_katas_name_for_the_disk() {
        let (dev, at) = attachment(Arch::S390x, "d");
        assert_eq!(dev, "virtio-blk-ccw,drive=d,devno=fe.0.001e");
        assert_eq!((at.driver, at.source.as_str()), ("blk-ccw", "0.0.001e"));
        let (dev, at) = attachment(Arch::Ppc64le, "d");
        assert_eq!(dev, "virtio-blk-pci,drive=d,bus=pci.0,addr=0x1e");
        assert_eq!((at.driver, at.source.as_str()), ("blk", "1e"));
        let (dev, _) = attachment(Arch::Aarch64, "d");
        assert!(dev.contains("bus=pcie.0,addr=0x1e"), "{dev}");
    }

    #[test]
    fn the_image_holds_the_tree_and_room_to_write() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/hello"), vec![7u8; 100_000]).unwrap();
        std::os::unix::fs::symlink("hello", tree.join("bin/hi")).unwrap();
        let out = dir.path().join("rootfs.img");
        let size = make_ext4(&tree, &out).unwrap();
        assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
        assert!(size >= HEADROOM, "{size}");
        assert!(!out.with_extension("part").exists());
        // debugfs reads the image back without mounting it.
        let listed = Command::new("debugfs")
            .args(["-R", "ls -l /bin"])
            .arg(&out)
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout);
        assert!(
            listed.contains("hello") && listed.contains("100000"),
            "{listed}"
        );
        assert!(listed.contains("hi"), "{listed}");

        let e = make_ext4(&dir.path().join("missing"), &out).unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
    }
}
