//! Stage `disk`: a rootfs tree becomes `rootfs.img`, a filesystem (ext4 or
//! erofs) inside kiln-disk's DAX layout, so one file boots through nvdimm
//! (DAX) and through virtio-blk. No root, loop devices or containers:
//!
//! - ext4: `mke2fs -d` fills the filesystem from the tree, then one `debugfs`
//!   script sets what `-d` copies from the host and must not: owners, modes,
//!   device nodes and every timestamp (the host's ctime/atime are "now"). Its
//!   superblock write time is then set back to SOURCE_DATE_EPOCH, and
//!   `e2fsck -fn` must pass.
//! - erofs: `mkfs.erofs -T` (all times fixed), uncompressed and without tail
//!   packing, the data layout DAX can map.
//!
//! UUIDs and the hash seed derive from the image name and arch; the PFN uuid
//! and disk signature from the filesystem's bytes. Two builds are identical.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use kiln_disk::layout::{self, DiskIds, Geometry};
use kiln_disk::verity;
use kiln_manifest::{DaxRecord, RootfsRecord, VerityRecord};
use sha2::{Digest, Sha256};

use crate::arch::Arch;
use crate::cache::{write_atomic, Stamp};
use crate::cmd;
use crate::ctx::Ctx;
use crate::hash::KeyHasher;
use crate::image_spec::ImageSpec;
use crate::stage::rootfs::tree::{Kind, Tree};
use crate::stage::rootfs::{LazyTree, RootfsPlan};

pub const FILE: &str = "rootfs.img";
/// The record of the last build, kept beside the image for the manifest.
const RECORD: &str = ".rootfs-record.json";
/// ext4 journal size: the smallest mke2fs allows with 4 KiB blocks. The root
/// is mounted read-only; the journal only has to exist.
const JOURNAL_MIB: u64 = 4;

/// ext4 block size for `arch`'s images: the guest's page size, which DAX
/// needs ("unsupported blocksize for DAX" otherwise): 64 KiB on ppc64le,
/// whose kernel has 64 KiB pages, 4 KiB elsewhere.
fn ext4_block(arch: Arch) -> u64 {
    if arch == Arch::Ppc64le {
        64 << 10
    } else {
        4096
    }
}

/// An e2fsprogs configuration of our own, so the host's /etc/mke2fs.conf
/// cannot change the filesystem. The size classes mke2fs picks by itself
/// (floppy, small, big, huge) exist but change nothing.
const MKE2FS_CONF: &str = "[defaults]
\tbase_features = sparse_super,large_file,filetype,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
\tfloppy = {
\t}
\tsmall = {
\t}
\tbig = {
\t}
\thuge = {
\t}
";

/// Whether `arch`'s images carry NVDIMM namespace labels: ppc64le, whose
/// pseries NVDIMMs are label-aware (papr_scm), so the image is padded to
/// 256 MiB and its labels follow (kiln_disk::layout, labelled images).
fn labelled(arch: Arch) -> bool {
    arch == Arch::Ppc64le
}

#[derive(Debug, Clone)]
pub struct DiskArtifact {
    pub key: String,
    pub record: RootfsRecord,
}

/// Builds `rootfs.img` unless the stamp says it is current. `tree` makes
/// the tree on demand (shared with the initrd stage).
pub fn build(
    ctx: &Ctx,
    image: &ImageSpec,
    arch: Arch,
    plan: &RootfsPlan,
    tree: &mut LazyTree,
) -> anyhow::Result<DiskArtifact> {
    let fs = image.rootfs.filesystem.as_str();
    let margin = image.rootfs.margin_mib << 20;
    let tool = match fs {
        "erofs" => "mkfs.erofs",
        _ => "mke2fs",
    };
    let tool_version = tool_version(tool)?;
    let key = KeyHasher::new("disk")
        .str("rootfs", &plan.key)
        .str("image", &image.name)
        .str("arch", arch.name())
        .str("filesystem", fs)
        .str("margin", &margin.to_string())
        .str(
            "verity",
            if image.rootfs.verity {
                "sha256-v1"
            } else {
                "off"
            },
        )
        .str("ext4_block", &ext4_block(arch).to_string())
        .str(
            "nvdimm_labels",
            if labelled(arch) {
                "nslabel-v1.1"
            } else {
                "none"
            },
        )
        .str("source_date_epoch", &ctx.source_date_epoch.to_string())
        .str("tool", &tool_version)
        .str("kiln-disk", env!("CARGO_PKG_VERSION"))
        // Bump when the way images are made changes (not only their inputs).
        .str("format", "4")
        .finish();
    let dir = ctx.image_dir(&image.name, arch);
    let step = ctx.ui.stage(&format!("rootfs.img {arch}"));
    let fresh = Stamp::fresh(&dir, "disk", &key).is_some();
    if fresh {
        ctx.remote_offer(&dir, "disk", &key);
    }
    if fresh || ctx.remote_fetch(&dir, "disk", &key) {
        let record: RootfsRecord =
            serde_json::from_str(&std::fs::read_to_string(dir.join(RECORD))?)?;
        step.cached(&format!("{} {} MiB", record.filesystem, image_mib(&dir)?));
        return Ok(DiskArtifact { key, record });
    }
    Stamp::invalidate(&dir, "disk");
    std::fs::create_dir_all(&dir)?;
    step.message("writing the tree");
    let tree = tree.get()?;
    let work = tempfile::Builder::new().prefix(".disk-").tempdir_in(&dir)?;
    let fs_img = work.path().join("fs.img");
    let ids = FsIds::derive(&image.name, arch);
    let content = match fs {
        "erofs" => {
            step.message("mkfs.erofs");
            make_erofs(ctx, arch, &tree, &fs_img, &ids)?;
            std::fs::metadata(&fs_img)?.len()
        }
        _ => {
            let block = ext4_block(arch);
            let content = tree.data_bytes(block)?;
            let inodes = tree.len() as u64 + tree.len() as u64 / 8 + 64;
            let geometry =
                Geometry::for_content(content + ext4_overhead(content, inodes, block), margin)?;
            step.message("mke2fs -d, debugfs, e2fsck");
            let log = ctx.log_path(&format!("rootfs-{arch}"));
            make_ext4(
                &log,
                ctx.source_date_epoch,
                &tree,
                &fs_img,
                (geometry.fs_region(), block),
                inodes,
                &ids,
            )?;
            content
        }
    };
    let seed: [u8; 32] = Sha256::digest(std::fs::read(&fs_img)?).into();
    let verity = if image.rootfs.verity {
        step.message("dm-verity hash tree");
        Some(append_verity(&fs_img, &seed)?)
    } else {
        None
    };
    let fs_len = std::fs::metadata(&fs_img)?.len();
    let (geometry, disk_ids) = if labelled(arch) {
        (
            Geometry::for_filesystem(fs_len)?.labelled()?,
            DiskIds::labelled_from_seed(&seed),
        )
    } else {
        (Geometry::for_filesystem(fs_len)?, DiskIds::from_seed(&seed))
    };
    let mut out = tempfile::NamedTempFile::new_in(&dir)?;
    let mut src = std::fs::File::open(&fs_img)?;
    layout::write_image(out.as_file_mut(), &mut src, fs_len, &geometry, &disk_ids)?;
    out.as_file().sync_all()?;
    // Readable like the other artifacts (temp files start as 0600).
    out.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;

    let path = dir.join(FILE);
    out.persist(&path)
        .with_context(|| format!("renaming into {}", path.display()))?;
    // Read back what was written: the layout the kernel will check.
    let facts = layout::inspect_file(&path)
        .with_context(|| format!("{} does not parse back as a DAX image", path.display()))?;
    let record = RootfsRecord {
        filesystem: fs.to_string(),
        fs_uuid: uuid_string(&ids.uuid),
        init: plan.init(),
        partition: 1,
        partition_offset: facts.fs_offset,
        partition_size: facts.fs_region,
        content_bytes: content,
        margin_bytes: if fs == "ext4" { margin } else { 0 },
        entries: tree.len() as u64,
        dax: DaxRecord {
            pfn_info_offset: kiln_disk::pfn::PFN_INFO_OFFSET,
            data_offset: facts.pfn.dataoff,
            align: u64::from(facts.pfn.align),
            mode: facts.pfn.mode.name().to_string(),
            nvdimm_partition_offset: facts.nvdimm_mbr.partitions[0].map_or(0, |p| p.start_bytes()),
            pfn_uuid: uuid_string(&facts.pfn.uuid),
        },
        verity,
    };
    let mut text = serde_json::to_string_pretty(&record)?;
    text.push('\n');
    write_atomic(&dir.join(RECORD), text.as_bytes())?;
    Stamp::record(&dir, "disk", &key, &[FILE, RECORD])?;
    ctx.remote_offer(&dir, "disk", &key);
    step.done(&format!(
        "{fs}, {} MiB ({} MiB content, {} entries)",
        facts.image_size >> 20,
        content >> 20,
        tree.len()
    ));
    Ok(DiskArtifact { key, record })
}

/// Appends the dm-verity tree to the filesystem image `fs_img`. The salt is
/// derived from the filesystem's sha256 (`seed`): no randomness, so two builds
/// of the same tree give the same root hash.
fn append_verity(fs_img: &Path, seed: &[u8; 32]) -> anyhow::Result<VerityRecord> {
    let salt: [u8; 32] = Sha256::new()
        .chain_update(b"kiln dm-verity salt\0")
        .chain_update(seed)
        .finalize()
        .into();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fs_img)?;
    let data_len = f.metadata()?.len();
    let tree = verity::append_tree(&mut f, data_len, salt)
        .with_context(|| format!("appending the dm-verity tree to {}", fs_img.display()))?;
    f.sync_all()?;
    Ok(VerityRecord {
        algorithm: "sha256".into(),
        format: 1,
        data_block_size: verity::BLOCK,
        hash_block_size: verity::BLOCK,
        data_blocks: tree.data_blocks,
        hash_start_block: tree.hash_start_block,
        hash_blocks: tree.hash_blocks,
        salt: hex::encode(tree.salt),
        root_hash: hex::encode(tree.root_hash),
    })
}

fn image_mib(dir: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(dir.join(FILE))?.len() >> 20)
}

fn tool_version(tool: &str) -> anyhow::Result<String> {
    // mke2fs -V and mkfs.erofs (no arguments) print their version on stderr.
    let out = duct::cmd!(tool, if tool == "mke2fs" { "-V" } else { "--help" })
        .stderr_to_stdout()
        .stdout_capture()
        .unchecked()
        .run()
        .with_context(|| {
            format!("{tool} is needed for rootfs images (`cargo xtask setup` installs e2fsprogs and erofs-utils)")
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find(|l| l.contains(tool) && l.chars().any(|c| c.is_ascii_digit()))
        .unwrap_or("")
        .trim()
        .to_string())
}

/// Metadata ext4 needs beyond the data blocks: inode tables, the journal,
/// bitmaps and group descriptors, extent blocks of large files.
fn ext4_overhead(content: u64, inodes: u64, block: u64) -> u64 {
    let groups = (content / block).div_ceil(8 * block).max(1);
    inodes * 256 + (JOURNAL_MIB << 20) + groups * 4 * block + content / 64 + (1 << 20)
}

/// Filesystem identity, fixed per image and arch.
struct FsIds {
    uuid: [u8; 16],
    hash_seed: [u8; 16],
}

impl FsIds {
    fn derive(image: &str, arch: Arch) -> FsIds {
        let one = |what: &str| -> [u8; 16] {
            let d = Sha256::digest(format!("kiln {what} {image} {}", arch.name()));
            let mut u = [0u8; 16];
            u.copy_from_slice(&d[..16]);
            u[6] = (u[6] & 0x0f) | 0x80; // RFC 9562 version 8
            u[8] = (u[8] & 0x3f) | 0x80;
            u
        };
        FsIds {
            uuid: one("fs-uuid"),
            hash_seed: one("ext4-hash-seed"),
        }
    }
}

fn uuid_string(u: &[u8; 16]) -> String {
    let h = hex::encode(u);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// `size` bytes in blocks of `block` bytes. A journal needs 1024 blocks at
/// least, 64 MiB with 64 KiB blocks: those filesystems (read-only roots) go
/// without one.
fn make_ext4(
    log: &Path,
    epoch: u64,
    tree: &Tree,
    out: &Path,
    (size, block): (u64, u64),
    inodes: u64,
    ids: &FsIds,
) -> anyhow::Result<()> {
    let work = out.parent().unwrap_or(Path::new("."));
    let conf = work.join("mke2fs.conf");
    std::fs::write(&conf, MKE2FS_CONF)?;
    let epoch_s = epoch.to_string();
    let args: Vec<String> = vec![
        "-q".into(),
        "-F".into(),
        "-t".into(),
        "ext4".into(),
        "-b".into(),
        block.to_string(),
        "-I".into(),
        "256".into(),
        "-N".into(),
        inodes.to_string(),
        "-m".into(),
        "0".into(),
        if block == 4096 { "-J" } else { "-O" }.into(),
        if block == 4096 {
            format!("size={JOURNAL_MIB}")
        } else {
            "^has_journal".into()
        },
        "-L".into(),
        "kiln-root".into(),
        "-U".into(),
        uuid_string(&ids.uuid),
        "-E".into(),
        format!(
            "hash_seed={},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard",
            uuid_string(&ids.hash_seed)
        ),
        "-d".into(),
        tree.dir().display().to_string(),
        out.display().to_string(),
        (size / block).to_string(),
    ];
    cmd::run_logged_to(
        log,
        "mke2fs -d",
        duct::cmd("mke2fs", &args)
            .env("MKE2FS_CONFIG", &conf)
            .env("E2FSPROGS_FAKE_TIME", &epoch_s)
            .env("SOURCE_DATE_EPOCH", &epoch_s)
            .env_remove("MKE2FS_DEVICE_SECTSIZE")
            .env_remove("MKE2FS_DEVICE_PHYS_SECTSIZE")
            .env_remove("MKE2FS_FIRST_META_BG"),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\n(if mke2fs ran out of space or inodes, raise `rootfs.margin_mib` in the image manifest)"
        )
    })?;
    let script = work.join("fixup.debugfs");
    std::fs::write(&script, debugfs_script(tree, epoch)?)?;
    let out_text = cmd::read(
        "debugfs",
        duct::cmd!("debugfs", "-w", "-f", &script, out).stderr_to_stdout(),
    )?;
    let problems: Vec<&str> = out_text
        .lines()
        // Echoed commands, the banner, and mknod's "Allocated inode: N".
        .filter(|l| {
            !(l.starts_with("debugfs") || l.starts_with("Allocated inode:") || l.trim().is_empty())
        })
        .collect();
    if !problems.is_empty() {
        anyhow::bail!(
            "debugfs could not apply the tree's metadata:\n    {}",
            problems
                .iter()
                .take(10)
                .copied()
                .collect::<Vec<_>>()
                .join("\n    ")
        );
    }
    kiln_disk::ext4::set_write_time_in_file(out, 0, epoch)?;
    cmd::run_logged_to(
        log,
        "e2fsck -fn (checking the new filesystem)",
        duct::cmd!("e2fsck", "-fn", out),
    )?;
    Ok(())
}

/// The debugfs commands that give every inode its metadata from the index:
/// device nodes first made, then mode, owner and all four timestamps.
pub fn debugfs_script(tree: &Tree, epoch: u64) -> anyhow::Result<String> {
    let mut s = String::new();
    for (path, e) in tree.entries() {
        if path.contains(['"', '\n']) {
            anyhow::bail!("tree path `{path}` has a quote or newline, which debugfs cannot take");
        }
        let p = format!("\"/{path}\"");
        if e.kind.is_node() {
            // mknod takes a name in the current directory, not a path.
            let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
            writeln!(s, "cd \"/{dir}\"")?;
            match &e.kind {
                Kind::Char(ma, mi) => writeln!(s, "mknod \"{name}\" c {ma} {mi}")?,
                Kind::Block(ma, mi) => writeln!(s, "mknod \"{name}\" b {ma} {mi}")?,
                _ => writeln!(s, "mknod \"{name}\" p")?,
            }
            writeln!(s, "cd /")?;
        }
        writeln!(s, "sif {p} mode 0{:o}", e.kind.type_bits() | e.mode)?;
        writeln!(s, "sif {p} uid {}", e.uid)?;
        writeln!(s, "sif {p} gid {}", e.gid)?;
        for field in ["atime", "mtime", "ctime", "crtime"] {
            writeln!(s, "sif {p} {field} @{epoch}")?;
        }
    }
    Ok(s)
}

fn make_erofs(ctx: &Ctx, arch: Arch, tree: &Tree, out: &Path, ids: &FsIds) -> anyhow::Result<()> {
    let mut args: Vec<String> = vec![
        format!("-T{}", ctx.source_date_epoch),
        format!("-U{}", uuid_string(&ids.uuid)),
        // DAX maps only plain (not tail-packed, not compressed) file data.
        "-Enoinline_data".into(),
        // No host extended attributes (SELinux labels and such) in the image.
        "-x-1".into(),
    ];
    if !crate::stage::rootfs::tree::is_root() {
        // Without root the tree on disk cannot carry its owners; erofs images
        // are then root-owned throughout (ext4 images get owners from the index).
        ctx.ui
            .println("note: not root, so the erofs image has every file owned by root");
        args.push("--all-root".into());
    }
    args.push(out.display().to_string());
    args.push(tree.dir().display().to_string());
    cmd::run_logged(
        ctx,
        &format!("rootfs-{arch}"),
        "mkfs.erofs",
        duct::cmd("mkfs.erofs", &args).env("SOURCE_DATE_EPOCH", ctx.source_date_epoch.to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debugfs_script_sets_everything_from_the_index() {
        let d = tempfile::tempdir().unwrap();
        let mut t = Tree::empty(&d.path().join("root")).unwrap();
        t.add_file("usr/bin/passwd", 0o4755, b"x").unwrap();
        t.add_node("dev/null", Kind::Char(1, 3), 0o666).unwrap();
        t.add_symlink("bin", "usr/bin").unwrap();
        let s = debugfs_script(&t, 1_700_000_000).unwrap();
        assert!(s.contains("sif \"/\" mode 040755\n"), "{s}");
        assert!(
            s.contains("cd \"/dev\"\nmknod \"null\" c 1 3\ncd /\nsif \"/dev/null\" mode 020666\n"),
            "{s}"
        );
        assert!(s.contains("sif \"/usr/bin/passwd\" mode 0104755\n"), "{s}");
        assert!(s.contains("sif \"/bin\" mode 0120777\n"), "{s}");
        assert!(s.contains("sif \"/bin\" crtime @1700000000\n"), "{s}");
        t.add_file("bad\"name", 0o644, b"").unwrap();
        assert!(debugfs_script(&t, 0).is_err());
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = FsIds::derive("debian", Arch::X86_64);
        let b = FsIds::derive("debian", Arch::X86_64);
        let c = FsIds::derive("debian", Arch::S390x);
        assert_eq!(a.uuid, b.uuid);
        assert_ne!(a.uuid, c.uuid);
        assert_ne!(a.uuid, a.hash_seed);
        let s = uuid_string(&a.uuid);
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "8", "version 8: {s}");
    }

    /// The whole ext4 path with the real tools (installed by setup; the test
    /// says so and passes when they are missing).
    #[test]
    fn ext4_image_from_a_tree_is_reproducible_and_carries_the_index() {
        if cmd::which("mke2fs").is_none() || cmd::which("debugfs").is_none() {
            eprintln!("e2fsprogs missing; skipping");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let mut imgs = Vec::new();
        for i in 0..2 {
            let mut t = Tree::empty(&d.path().join(format!("root{i}"))).unwrap();
            t.add_file("etc/shadow", 0o640, b"root:*:").unwrap();
            t.add_file(
                "etc/system-systemd\\x2dcryptsetup.slice",
                0o644,
                b"odd name",
            )
            .unwrap();
            t.add_node("dev/console", Kind::Char(5, 1), 0o600).unwrap();
            t.add_symlink("sbin", "usr/sbin").unwrap();
            // Different host times on each round: they must not show.
            std::thread::sleep(std::time::Duration::from_millis(1100));
            let out = d.path().join(format!("fs{i}.img"));
            let log = d.path().join("log");
            make_ext4(
                &log,
                1_700_000_000,
                &t,
                &out,
                (16 << 20, 4096),
                64,
                &FsIds::derive("t", Arch::X86_64),
            )
            .unwrap();
            imgs.push(std::fs::read(&out).unwrap());
        }
        assert!(imgs[0] == imgs[1], "two builds differ");
        let stat = cmd::read(
            "debugfs stat",
            duct::cmd!(
                "debugfs",
                "-R",
                "stat /dev/console",
                d.path().join("fs0.img")
            )
            .stderr_null(),
        )
        .unwrap();
        assert!(
            stat.contains("Type: character special") && stat.contains("Mode:  0600"),
            "{stat}"
        );
        assert!(stat.contains("ctime: 0x6553f100"), "{stat}");
    }
}
