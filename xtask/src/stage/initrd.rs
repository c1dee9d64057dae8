//! Stage `initrd`: a reproducible newc cpio of a recipe's tree with the agent
//! in it, compressed as the image manifest says. Keyed by the agent's hash, the
//! recipe, the compression and SOURCE_DATE_EPOCH.

use kiln_initrd::{Archive, Compression, WriteOptions};

use crate::arch::Arch;
use crate::cache::Stamp;
use crate::ctx::Ctx;
use crate::hash::KeyHasher;
use crate::manifest::ImageManifest;
use crate::recipe::Recipe;
use crate::stage::agent::AgentArtifact;

pub const FILE: &str = "initrd.img";

#[derive(Debug, Clone)]
pub struct InitrdArtifact {
    pub key: String,
    pub recipe_sha256: String,
}

pub fn build(
    ctx: &Ctx,
    image: &ImageManifest,
    arch: Arch,
    agent: &AgentArtifact,
) -> anyhow::Result<InitrdArtifact> {
    let (recipe, recipe_path) = Recipe::load(ctx, &image.recipe)?;
    let recipe_sha256 = crate::hash::sha256_file(&recipe_path)?;
    let compression: Compression = image
        .compression
        .parse()
        .map_err(|e| anyhow::anyhow!("image {}: {e}", image.name))?;
    let key = KeyHasher::new("initrd")
        .str("arch", arch.name())
        .str("agent", &agent.sha256)
        .str("recipe", &recipe_sha256)
        .str("compression", compression.name())
        .str("source_date_epoch", &ctx.source_date_epoch.to_string())
        .str("initrd-crate", env!("CARGO_PKG_VERSION"))
        .finish();
    let dir = ctx.image_dir(&image.name, arch);
    let step = ctx.ui.stage(&format!("initrd {arch}"));
    let path = dir.join(FILE);
    if Stamp::fresh(&dir, "initrd", &key).is_some() {
        step.cached(&format!("{} KiB", std::fs::metadata(&path)?.len() / 1024));
        return Ok(InitrdArtifact { key, recipe_sha256 });
    }
    Stamp::invalidate(&dir, "initrd");
    let archive = archive_for(&recipe, agent)?;
    let opts = WriteOptions::new(ctx.source_date_epoch).compression(compression);
    std::fs::create_dir_all(&dir)?;
    let report = archive.write_to(&path, &opts)?;
    Stamp::record(&dir, "initrd", &key, &[FILE])?;
    step.done(&format!(
        "{} entries, {} KiB → {} KiB {}",
        report.entries,
        report.uncompressed_bytes / 1024,
        report.compressed_bytes / 1024,
        compression.name()
    ));
    Ok(InitrdArtifact { key, recipe_sha256 })
}

/// The recipe's tree as an archive; the agent goes where the recipe says.
pub fn archive_for(recipe: &Recipe, agent: &AgentArtifact) -> anyhow::Result<Archive> {
    let mut a = Archive::new();
    for d in &recipe.directories {
        a.add_dir(d, 0o755)?;
    }
    for n in &recipe.nodes {
        match n.kind.as_str() {
            "block" => a.add_block_device(&n.path, n.mode, n.major, n.minor)?,
            _ => a.add_char_device(&n.path, n.mode, n.major, n.minor)?,
        };
    }
    for f in &recipe.files {
        a.add_file(&f.path, f.mode, f.content.as_bytes().to_vec())?;
    }
    for s in &recipe.symlinks {
        a.add_symlink(&s.path, &s.target)?;
    }
    a.add_file(&recipe.agent_path, 0o755, std::fs::read(&agent.path)?)?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_tree_contains_agent_and_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let agent_path = dir.path().join("kiln-agent");
        std::fs::write(&agent_path, b"\x7fELF fake").unwrap();
        let agent = AgentArtifact {
            path: agent_path,
            sha256: String::new(),
            size: 9,
            key: String::new(),
        };
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../rootfs-recipes/minimal.toml"
        ))
        .unwrap();
        let recipe = Recipe::parse(&text, "minimal").unwrap();
        let archive = archive_for(&recipe, &agent).unwrap();
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
