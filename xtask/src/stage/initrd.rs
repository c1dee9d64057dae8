//! Stage `initrd`: a reproducible newc cpio of the recipe's tree (see stage
//! `rootfs`), compressed as the image manifest says. Keyed by the tree's key
//! (recipe, agent, Debian base...), the compression and SOURCE_DATE_EPOCH.

use kiln_initrd::{Compression, WriteOptions};

use crate::arch::Arch;
use crate::cache::Stamp;
use crate::ctx::Ctx;
use crate::hash::KeyHasher;
use crate::image_spec::ImageSpec;
use crate::stage::rootfs::{self, LazyTree, RootfsPlan};

pub const FILE: &str = "initrd.img";

#[derive(Debug, Clone)]
pub struct InitrdArtifact {
    pub key: String,
    pub recipe_sha256: String,
}

pub fn build(
    ctx: &Ctx,
    image: &ImageSpec,
    arch: Arch,
    plan: &RootfsPlan,
    tree: &mut LazyTree,
) -> anyhow::Result<InitrdArtifact> {
    let recipe_sha256 = plan.recipe_sha256.clone();
    let compression: Compression = image
        .compression
        .parse()
        .map_err(|e| anyhow::anyhow!("image {}: {e}", image.name))?;
    let key = KeyHasher::new("initrd")
        .str("arch", arch.name())
        .str("rootfs", &plan.key)
        .str("compression", compression.name())
        .str(
            "compression_level",
            &format!("{:?}", image.compression_level),
        )
        .str("source_date_epoch", &ctx.source_date_epoch.to_string())
        .str("xtask", &crate::hash::xtask_self_hash(&ctx.root))
        .finish();
    let dir = ctx.image_dir(&image.name, arch);
    let step = ctx.ui.stage(&format!("initrd {arch}"));
    let path = dir.join(FILE);
    let fresh = Stamp::fresh(&dir, "initrd", &key).is_some();
    if fresh {
        ctx.remote_offer(&dir, "initrd", &key);
    }
    if fresh || ctx.remote_fetch(&dir, "initrd", &key) {
        step.cached(&format!("{} KiB", std::fs::metadata(&path)?.len() / 1024));
        return Ok(InitrdArtifact { key, recipe_sha256 });
    }
    Stamp::invalidate(&dir, "initrd");
    step.message("writing the tree");
    let archive = rootfs::archive_of(&*tree.get()?)?;
    step.message(&format!(
        "{} entries, {}",
        archive.len(),
        compression.name()
    ));
    let mut opts = WriteOptions::new(ctx.source_date_epoch).compression(compression);
    if let Some(level) = image.compression_level {
        opts = opts.zstd_level(level);
    }
    std::fs::create_dir_all(&dir)?;
    let report = archive.write_to(&path, &opts)?;
    Stamp::record(&dir, "initrd", &key, &[FILE])?;
    ctx.remote_offer(&dir, "initrd", &key);
    step.done(&format!(
        "{} entries, {} KiB → {} KiB {}",
        report.entries,
        report.uncompressed_bytes / 1024,
        report.compressed_bytes / 1024,
        compression.name()
    ));
    Ok(InitrdArtifact { key, recipe_sha256 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::rootfs::tree::Tree;

    #[test]
    fn recipe_tree_contains_agent_and_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = Tree::empty(&dir.path().join("root")).unwrap();
        t.add_file("init", 0o755, b"\x7fELF fake").unwrap();
        t.add_node("dev/console", rootfs::tree::Kind::Char(5, 1), 0o600)
            .unwrap();
        let archive = rootfs::archive_of(&t).unwrap();
        let mut bytes = Vec::new();
        archive
            .write(&mut bytes, &WriteOptions::new(1_700_000_000))
            .unwrap();
        let entries = kiln_initrd::reader::read(&bytes).unwrap();
        let init = entries.iter().find(|e| e.name == "init").expect("init");
        assert_eq!(init.data, b"\x7fELF fake");
        assert_eq!(init.permissions(), 0o755);
        let console = entries
            .iter()
            .find(|e| e.name == "dev/console")
            .expect("console");
        assert_eq!((console.rdev_major, console.rdev_minor), (5, 1));
        assert!(entries
            .iter()
            .all(|e| e.mtime == 1_700_000_000 && e.uid == 0 && e.gid == 0));
    }
}
