//! `cargo xtask test`: the workspace's unit tests, then the end-to-end tests
//! against a freshly built image booted in QEMU.

use crate::arch::Arch;
use crate::ctx::Ctx;
use crate::manifest::ImageManifest;
use crate::stage::image;
use crate::TestFlags;

/// The image the end-to-end boot tests use.
const E2E_IMAGE: &str = "minimal";
/// The image the systemd/DAX end-to-end test boots from its rootfs image.
const E2E_DEBIAN_IMAGE: &str = "debian";

pub fn run(ctx: &Ctx, flags: &TestFlags) -> anyhow::Result<()> {
    // Output goes straight to the terminal/CI log: the test runner's own summary
    // lines are what CI reads.
    ctx.ui.println("== unit tests (cargo test --workspace)");
    let status = duct::cmd!("cargo", "test", "--workspace", "--locked")
        .dir(&ctx.root)
        .unchecked()
        .run()?;
    if !status.status.success() {
        anyhow::bail!("unit tests failed");
    }
    if flags.unit_only {
        return Ok(());
    }
    let image = ImageManifest::load(ctx, E2E_IMAGE)?;
    let arches = flags.arch.arches_for(&image)?;
    for arch in &arches {
        e2e(ctx, &image, *arch)?;
    }
    let debian = ImageManifest::load(ctx, E2E_DEBIAN_IMAGE)?;
    for arch in arches.iter().filter(|a| debian.arches.contains(a)) {
        e2e_debian(ctx, &debian, *arch)?;
    }
    // Pipeline tests against real inputs (the kernel source the builds above
    // extracted): kernel patch series applied and rejected.
    ctx.ui.println("== pipeline tests against the real kernel source");
    let status = duct::cmd!("cargo", "test", "--locked", "--package", "xtask", "--", "--ignored", "--test-threads=1")
        .dir(&ctx.root)
        .unchecked()
        .run()?;
    if !status.status.success() {
        anyhow::bail!("pipeline tests failed");
    }
    Ok(())
}

fn e2e(ctx: &Ctx, image: &ImageManifest, arch: Arch) -> anyhow::Result<()> {
    ctx.ensure_setup(&[arch])?;
    let manifest = image::build(ctx, image, arch, None)?;
    // The pipeline is incremental: a second build with nothing changed runs no stage.
    ctx.ui.take_outcomes();
    let again = image::build(ctx, image, arch, None)?;
    let ran: Vec<String> = ctx
        .ui
        .take_outcomes()
        .into_iter()
        .filter(|(_, ran)| *ran)
        .map(|(s, _)| s)
        .collect();
    if again != manifest || !ran.is_empty() {
        anyhow::bail!(
            "a second build of {} with nothing changed re-ran stages: {ran:?}",
            image.name
        );
    }
    ctx.ui
        .println("incremental check: a second build with nothing changed ran no stage");
    ctx.ui.println(&format!(
        "== end-to-end tests ({} on {arch}, booted in QEMU)",
        image.name
    ));
    let status = duct::cmd!(
        "cargo",
        "test",
        "--locked",
        "--package",
        "kiln-shim",
        "--test",
        "boot",
        "--test",
        "run",
        "--",
        "--ignored",
        "--test-threads=1"
    )
    .dir(&ctx.root)
    .env("KILN_E2E_MANIFEST", &manifest)
    .unchecked()
    .run()?;
    if !status.status.success() {
        anyhow::bail!("end-to-end tests failed for {arch}");
    }
    ctx.ui.println(&format!(
        "== end-to-end tests ({} on {arch}, booted from its rootfs image)",
        image.name
    ));
    rootfs_tests(ctx, "minimal_", "KILN_E2E_MANIFEST", &manifest)
        .map_err(|e| anyhow::anyhow!("{e:#} ({arch})"))
}

/// The Debian image (systemd, the agent as a service) booted from its rootfs
/// image: DAX proven inside the guest on x86_64.
fn e2e_debian(ctx: &Ctx, image: &ImageManifest, arch: Arch) -> anyhow::Result<()> {
    ctx.ensure_setup(&[arch])?;
    let manifest = image::build(ctx, image, arch, None)?;
    ctx.ui.println(&format!(
        "== end-to-end tests ({} on {arch}, systemd from its rootfs image)",
        image.name
    ));
    rootfs_tests(ctx, "debian_", "KILN_E2E_DEBIAN_MANIFEST", &manifest)
        .map_err(|e| anyhow::anyhow!("{e:#} ({arch})"))
}

/// host-shim's `rootfs` tests whose names start with `filter`.
fn rootfs_tests(ctx: &Ctx, filter: &str, var: &str, manifest: &std::path::Path) -> anyhow::Result<()> {
    let status = duct::cmd!(
        "cargo",
        "test",
        "--locked",
        "--package",
        "kiln-shim",
        "--test",
        "rootfs",
        "--",
        "--ignored",
        "--test-threads=1",
        "--nocapture",
        filter
    )
    .dir(&ctx.root)
    .env(var, manifest)
    .unchecked()
    .run()?;
    if !status.status.success() {
        anyhow::bail!("rootfs end-to-end tests `{filter}*` failed");
    }
    Ok(())
}
