//! Stage `image`: runs agent, kernel, rootfs (the recipe's tree), initrd and
//! disk (`rootfs.img`) for one image and arch, places the kernel next to the
//! initrd and writes `manifest.json`, the record of every artifact (size,
//! sha256), of every input's hash, of the rootfs image's layout and of the
//! Debian packages inside.
//!
//! Invariant: manifest.json holds no host path and no build time, so two
//! checkouts of one commit produce the same bytes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::arch::Arch;
use crate::cache::{copy_atomic, write_atomic, Stamp};
use crate::ctx::Ctx;
use crate::hash::{artifact_record, KeyHasher};
use kiln_manifest::{role, Manifest};

use crate::image_spec::ImageSpec;
use crate::stage::kernel::KernelRequest;
use crate::stage::rootfs::RootfsPlan;
use crate::stage::{agent, disk, initrd, kernel, rootfs, sbom};

pub const MANIFEST: &str = kiln_manifest::FILE;

pub fn build(
    ctx: &Ctx,
    image: &ImageSpec,
    arch: Arch,
    kernel_src: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    build_with(ctx, image, arch, kernel_src, true)
}

/// How much of an image [`build_tree_parts`] makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeParts {
    /// The initrd alone.
    Initrd,
    /// The initrd and `rootfs.img`.
    InitrdAndDisk,
}

/// The parts made from the recipe's tree (`cargo xtask build-initrd` and
/// `build-rootfs`), without placing a kernel or writing manifest.json. The
/// kernel is built only when the image asks for modules: nothing else in the
/// tree needs it.
pub fn build_tree_parts(
    ctx: &Ctx,
    image: &ImageSpec,
    arch: Arch,
    parts: TreeParts,
) -> anyhow::Result<()> {
    let agent = agent::build(ctx, arch)?;
    let plan = rootfs::plan(ctx, image, arch, &agent)?;
    let kernel = if image.rootfs.modules.is_empty() {
        None
    } else {
        Some(kernel::build(
            ctx,
            &KernelRequest::for_image(ctx, image, arch, None)?,
        )?)
    };
    tree_stages(ctx, image, arch, plan, kernel.as_ref(), parts)?;
    Ok(())
}

/// What the tree stages made.
struct Tree {
    plan: RootfsPlan,
    initrd: initrd::InitrdArtifact,
    disk: Option<disk::DiskArtifact>,
}

/// The one sequence after the plan: the kernel's modules into the plan, then
/// the initrd and (for [`TreeParts::InitrdAndDisk`]) the disk image from one
/// tree, written out only if one of them is stale.
fn tree_stages(
    ctx: &Ctx,
    image: &ImageSpec,
    arch: Arch,
    plan: RootfsPlan,
    kernel: Option<&kernel::KernelArtifact>,
    parts: TreeParts,
) -> anyhow::Result<Tree> {
    let plan = match kernel {
        Some(kernel) => plan.with_modules(image, kernel)?,
        None => plan,
    };
    let dir = ctx.image_dir(&image.name, arch);
    let mut tree = rootfs::LazyTree::new(&plan, &dir);
    let initrd = initrd::build(ctx, image, arch, &plan, &mut tree)?;
    let disk = match parts {
        TreeParts::InitrdAndDisk => Some(disk::build(ctx, image, arch, &plan, &mut tree)?),
        TreeParts::Initrd => None,
    };
    drop(tree);
    Ok(Tree { plan, initrd, disk })
}

/// [`build`], optionally without `rootfs.img`: `cargo xtask dev` boots from
/// the initrd and should not pay for a filesystem image it never uses.
pub fn build_with(
    ctx: &Ctx,
    image: &ImageSpec,
    arch: Arch,
    kernel_src: Option<PathBuf>,
    with_disk: bool,
) -> anyhow::Result<PathBuf> {
    let agent = agent::build(ctx, arch)?;
    // The recipe's base first: a missing Debian mirror should not wait for a kernel build.
    let plan = rootfs::plan(ctx, image, arch, &agent)?;
    let kernel = kernel::build(
        ctx,
        &KernelRequest::for_image(ctx, image, arch, kernel_src)?,
    )?;
    let parts = if with_disk {
        TreeParts::InitrdAndDisk
    } else {
        TreeParts::Initrd
    };
    let Tree { plan, initrd, disk } = tree_stages(ctx, image, arch, plan, Some(&kernel), parts)?;
    let dir = ctx.image_dir(&image.name, arch);
    let kernel_file = kernel_file_name(arch);

    // Place the kernel, its config and the agent beside the initrd (keyed, so an
    // unchanged kernel is not even copied again).
    let place_key = KeyHasher::new("place")
        .str("kernel", &kernel.key)
        .str("agent", &agent.sha256)
        .str("kernel_file", kernel_file)
        .finish();
    if Stamp::fresh(&dir, "place", &place_key).is_none() {
        Stamp::invalidate(&dir, "place");
        copy_atomic(&kernel.image, &dir.join(kernel_file))?;
        copy_atomic(&kernel.config, &dir.join("kernel.config"))?;
        copy_atomic(&agent.path, &dir.join(agent::BINARY))?;
        Stamp::record(
            &dir,
            "place",
            &place_key,
            &[kernel_file, "kernel.config", agent::BINARY],
        )?;
    }

    let image_manifest_sha = crate::hash::sha256_file(&ImageSpec::path(ctx, &image.name))?;
    let mut inputs = BTreeMap::new();
    inputs.insert("agent".to_string(), agent.key.clone());
    inputs.insert("kernel".to_string(), kernel.key.clone());
    inputs.insert("kernel_source".to_string(), kernel.source_sha256.clone());
    inputs.insert("initrd".to_string(), initrd.key.clone());
    inputs.insert("rootfs".to_string(), plan.key.clone());
    if let Some(disk) = &disk {
        inputs.insert("rootfs_image".to_string(), disk.key.clone());
    }
    if let Some(b) = &plan.bootstrap {
        inputs.insert("debian_bootstrap".to_string(), b.key.clone());
        inputs.insert("debian_base".to_string(), b.identity.clone());
    }
    inputs.insert(
        format!("image-manifests/{}.toml", image.name),
        image_manifest_sha,
    );
    inputs.insert(
        format!("rootfs-recipes/{}.toml", image.recipe),
        initrd.recipe_sha256.clone(),
    );

    let mut files = vec![
        (role::KERNEL, kernel_file),
        (role::KERNEL_CONFIG, "kernel.config"),
        (role::INITRD, initrd::FILE),
        (role::AGENT, agent::BINARY),
    ];
    if disk.is_some() {
        files.push((role::ROOTFS_IMAGE, disk::FILE));
    }
    let mut artifacts = BTreeMap::new();
    for (role, file) in files {
        artifacts.insert(role.to_string(), artifact_record(&dir, file)?);
    }

    let manifest = Manifest {
        kiln_manifest: kiln_manifest::FORMAT,
        image: image.name.clone(),
        arch,
        kernel_version: kernel.version.clone(),
        kernel_patches: kernel.patches.clone(),
        cmdline: image.cmdline(arch),
        source_date_epoch: ctx.source_date_epoch,
        artifacts,
        inputs,
        rootfs: disk.map(|d| d.record),
        packages: plan.packages().to_vec(),
        kernel_modules: plan.module_records()?,
    };
    let mut text = serde_json::to_string_pretty(&manifest)?;
    text.push('\n');
    let key = KeyHasher::new("manifest").str("content", &text).finish();
    let step = ctx.ui.stage(&format!("manifest {arch}"));
    let path = dir.join(MANIFEST);
    if Stamp::fresh(&dir, "manifest", &key).is_some() {
        step.cached(&ctx.rel(&path).display().to_string());
    } else {
        Stamp::invalidate(&dir, "manifest");
        write_atomic(&path, text.as_bytes())?;
        Stamp::record(&dir, "manifest", &key, &[MANIFEST])?;
        step.done(&ctx.rel(&path).display().to_string());
    }
    // The dev loop (no rootfs.img) boots and throws away: no SBOM for it.
    if with_disk {
        sbom::write(ctx, &dir, &manifest, &text)?;
    }
    Ok(path)
}

/// The kernel's file name inside an image directory.
pub fn kernel_file_name(arch: Arch) -> &'static str {
    match arch {
        Arch::Ppc64le => "vmlinux",
        _ => "vmlinuz",
    }
}
