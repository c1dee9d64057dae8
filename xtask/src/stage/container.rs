//! Stage `container-rootfs`: a container root filesystem (not a guest image)
//! from a recipe without an agent: the Debian base from mmdebstrap (the same
//! cached bootstrap as images, foreign arches unpacked and post-processed),
//! the recipe's removals and files, and its `programs` compiled static with
//! Debian's (cross) gcc. The end-to-end workload test shares the resulting
//! directory with the guest over virtio-fs.
//!
//! Output: `target/kiln/containers/<recipe>/<arch>/rootfs/` plus
//! `packages.json`, rebuilt when the key (recipe, bootstrap, program sources,
//! compiler) changes. Consumers copy the tree before writing into it.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::arch::{Arch, CrossTools};
use crate::cache::{write_atomic, Stamp};
use crate::cmd;
use crate::ctx::Ctx;
use crate::hash::KeyHasher;
use crate::recipe::Recipe;
use crate::stage::rootfs::{debian, postinst, tree::Tree};
use crate::ui::Step;

const STAMP: &str = "container-rootfs";
const STAGE_VERSION: &str = "container-rootfs-1";
pub const TREE: &str = "rootfs";

/// A built container rootfs.
#[derive(Debug, Clone)]
pub struct ContainerRootfs {
    /// The tree (read it, or copy it before writing).
    pub dir: PathBuf,
    pub packages: Vec<kiln_manifest::Package>,
    pub key: String,
}

/// Builds (or finds) the container rootfs of `recipe_name` for `arch`.
pub fn build(ctx: &Ctx, recipe_name: &str, arch: Arch) -> anyhow::Result<ContainerRootfs> {
    let (recipe, recipe_path) = Recipe::load(ctx, recipe_name)?;
    if !recipe.agent_path.is_empty() {
        anyhow::bail!(
            "recipe `{recipe_name}` has `agent_path`: it describes a guest image (cargo xtask build-image); \
             a container rootfs recipe leaves it out"
        );
    }
    let Some(section) = &recipe.debian else {
        anyhow::bail!("recipe `{recipe_name}`: a container rootfs needs a [debian] section");
    };
    let bootstrap = debian::bootstrap(ctx, section, &[], arch)?;
    let step = ctx
        .ui
        .stage(&format!("container-rootfs {recipe_name} {arch}"));
    let gcc = gcc_for(arch);
    let mut key = KeyHasher::new("container-rootfs");
    key.str("version", STAGE_VERSION)
        .str("arch", arch.name())
        .file("recipe", &recipe_path)?
        .str("bootstrap", &bootstrap.identity);
    if !recipe.programs.is_empty() {
        let version = cmd::read(&format!("{gcc} --version"), duct::cmd!(&gcc, "--version"))
            .with_context(|| {
                format!(
                    "recipe `{recipe_name}` key `programs` needs {gcc}{}",
                    arch.cross_gcc_package()
                        .map(|p| format!(
                            " (apt-get install {p} {})",
                            arch.cross_c_program_libc_package().unwrap_or("")
                        ))
                        .unwrap_or_default()
                )
            })?;
        key.str("gcc", version.lines().next().unwrap_or(""));
        for p in &recipe.programs {
            key.str("program", &p.path)
                .file("source", &ctx.root.join(&p.source))?;
        }
    }
    let key = key.finish();
    let out = ctx
        .out
        .join("containers")
        .join(recipe_name)
        .join(arch.name());
    let dir = out.join(TREE);
    if Stamp::fresh(&out, STAMP, &key).is_some() && dir.is_dir() {
        step.cached(&format!("{}", ctx.rel(&dir).display()));
        return Ok(ContainerRootfs {
            dir,
            packages: bootstrap.packages,
            key,
        });
    }
    Stamp::invalidate(&out, STAMP);
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let staging = out.join(".rootfs-new");
    remove_tree(&staging)?;
    step.message("unpacking the Debian base");
    let mut t = Tree::from_tar(&staging, &bootstrap.tarball)
        .with_context(|| format!("unpacking {}", bootstrap.tarball.display()))?;
    if bootstrap.extracted {
        postinst::apply(&mut t, bootstrap.epoch)
            .context("post-install steps of the extracted Debian tree")?;
    }
    fill_tree(ctx, &recipe, recipe_name, arch, &step, &mut t)?;
    t.finish_modes()?;
    drop(t);
    remove_tree(&dir)?;
    fs::rename(&staging, &dir)
        .with_context(|| format!("moving {} to {}", staging.display(), dir.display()))?;
    write_atomic(
        &out.join(debian::PACKAGES),
        serde_json::to_string_pretty(&bootstrap.packages)?.as_bytes(),
    )?;
    Stamp::record(&out, STAMP, &key, &[debian::PACKAGES])?;
    step.done(&format!(
        "{} ({} packages)",
        ctx.rel(&dir).display(),
        bootstrap.packages.len()
    ));
    Ok(ContainerRootfs {
        dir,
        packages: bootstrap.packages,
        key,
    })
}

/// The recipe's edits on the unpacked base, then its `programs` compiled
/// statically with the arch's gcc.
fn fill_tree(
    ctx: &Ctx,
    recipe: &Recipe,
    recipe_name: &str,
    arch: Arch,
    step: &Step,
    t: &mut Tree,
) -> anyhow::Result<()> {
    let gcc = gcc_for(arch);
    let what = |k: &str, p: &str| format!("recipe `{recipe_name}`, key `{k}`: `{p}`");
    for p in &recipe.remove {
        t.remove(p).with_context(|| what("remove", p))?;
    }
    for p in &recipe.empty_dirs {
        t.empty_dir(p).with_context(|| what("empty_dirs", p))?;
    }
    for d in &recipe.directories {
        t.add_dir(d, 0o755)
            .with_context(|| what("directories", d))?;
    }
    for f in &recipe.files {
        t.add_file(&f.path, f.mode, f.content.as_bytes())
            .with_context(|| what("files", &f.path))?;
    }
    for s in &recipe.symlinks {
        t.add_symlink(&s.path, &s.target)
            .with_context(|| what("symlinks", &s.path))?;
    }
    let build = tempfile::tempdir()?;
    for p in &recipe.programs {
        step.message(&format!("{gcc} -static {}", p.source));
        let bin = build.path().join("program");
        cmd::run_logged(
            ctx,
            &format!("container-rootfs-{recipe_name}-{arch}"),
            &format!("{gcc} -static {}", p.source),
            duct::cmd!(
                &gcc,
                "-static",
                "-O2",
                "-Wall",
                "-o",
                &bin,
                ctx.root.join(&p.source),
                "-lrt"
            )
            .env("LC_ALL", "C"),
        )
        .with_context(|| what("programs", &p.source))?;
        let bytes = fs::read(&bin)?;
        crate::elf::require_static(&p.path, &bytes, arch)?;
        t.add_file(&p.path, 0o755, &bytes)
            .with_context(|| what("programs", &p.path))?;
    }
    Ok(())
}

fn gcc_for(arch: Arch) -> String {
    format!("{}gcc", arch.cross_prefix().unwrap_or(""))
}

/// Removes a tree that may hold read-only directories (Debian's have some).
fn remove_tree(dir: &Path) -> anyhow::Result<()> {
    if fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    // Make every directory writable first; rm -rf as the builder would.
    cmd::read(
        &format!("chmod -R u+w {}", dir.display()),
        duct::cmd!("chmod", "-R", "u+w", dir),
    )?;
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}
