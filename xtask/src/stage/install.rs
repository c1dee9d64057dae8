//! `cargo xtask install --destdir D [--prefix /usr]`: what a distro package
//! contains, from built artifacts, into a staging root. Nothing outside D is
//! touched; nothing is built that a packager did not ask for.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use kiln_manifest::Manifest;

use crate::arch::Arch;
use crate::ctx::Ctx;
use crate::stage::{image, release, sbom};

/// `cargo xtask install`.
#[derive(Args, Clone, Debug)]
pub struct InstallFlags {
    /// Staging root (DESTDIR).
    #[arg(long)]
    pub destdir: PathBuf,
    #[arg(long, default_value = "/usr")]
    pub prefix: PathBuf,
    /// Which arch's artifacts (default: the build machine's).
    #[arg(long, default_value_t = Arch::host())]
    pub arch: Arch,
}

pub fn run(ctx: &Ctx, f: &InstallFlags) -> anyhow::Result<()> {
    if !f.prefix.is_absolute() {
        anyhow::bail!(
            "--prefix {} must be absolute (e.g. /usr)",
            f.prefix.display()
        );
    }
    let root = f
        .destdir
        .join(f.prefix.strip_prefix("/").unwrap_or(&f.prefix));
    let step = ctx.ui.stage("install");
    let mut count = 0;
    for img in release::all_images(ctx)?
        .iter()
        .filter(|i| i.arches.contains(&f.arch))
    {
        let manifest_path = image::build(ctx, img, f.arch, None)?;
        let built: Manifest = serde_json::from_str(&std::fs::read_to_string(&manifest_path)?)?;
        let dir = manifest_path.parent().context("manifest has a directory")?;
        let dest = root.join("share/kiln").join(&img.name);
        place(&manifest_path, &dest.join(image::MANIFEST), 0o644)?;
        place(&dir.join(sbom::FILE), &dest.join(sbom::FILE), 0o644)?;
        for art in built.artifacts.values() {
            let mode = if art.file == "kiln-agent" {
                0o755
            } else {
                0o644
            };
            place(&dir.join(&art.file), &dest.join(&art.file), mode)?;
            count += 1;
        }
    }
    let shim = release::build_shim(ctx, f.arch)?;
    place(&shim, &root.join("bin/kiln-shim"), 0o755)?;
    let config = root.join("share/kiln/configuration.toml");
    place_bytes(release::default_shim_config().as_bytes(), &config, 0o644)?;
    place(
        &ctx.root.join("README.md"),
        &root.join("share/doc/kiln/README.md"),
        0o644,
    )?;
    step.done(&format!(
        "{count} image artifacts, kiln-shim, configuration into {}",
        f.destdir.display()
    ));
    Ok(())
}

fn place(src: &Path, dest: &Path, mode: u32) -> anyhow::Result<()> {
    let bytes = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    place_bytes(&bytes, dest, mode)
}

fn place_bytes(bytes: &[u8], dest: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    crate::cache::write_atomic(dest, bytes)?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}
