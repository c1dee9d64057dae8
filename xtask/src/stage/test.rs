//! `cargo xtask test`: the workspace's unit tests, then the end-to-end tests
//! against a freshly built image booted in QEMU.

use crate::arch::{Arch, ArchSel};
use crate::ctx::Ctx;
use crate::manifest::ImageManifest;
use crate::stage::image;
use crate::TestFlags;

/// The image the end-to-end boot tests use.
const E2E_IMAGE: &str = "minimal";
/// The minimal recipe in an erofs rootfs image (DAX on erofs).
const E2E_EROFS_IMAGE: &str = "minimal-erofs";
/// The image the systemd/DAX end-to-end test boots from its rootfs image.
const E2E_DEBIAN_IMAGE: &str = "debian";
/// The container rootfs recipe of the workload test (fio, iptables, redis,
/// IPv6 over virtio-net, ...), and the arches it runs on. Measured (TCG, busy
/// 2-core machine, 6 Dec): x86_64 68 s, aarch64 74 s, each plus its rootfs
/// (104 s / 141 s cold, cached after). (virtio-fs needs a little-endian
/// guest: never s390x.)
const WORKLOAD_RECIPE: &str = "workload";
const WORKLOAD_ARCHES: &[Arch] = &[Arch::X86_64, Arch::Aarch64];

/// Wall time of each part of the run, printed when the run ends (also when
/// it fails), so a CI log shows where the minutes went.
struct Clock {
    parts: Vec<(String, std::time::Duration)>,
    current: Option<(String, std::time::Instant)>,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            parts: Vec::new(),
            current: None,
        }
    }

    fn part(&mut self, name: &str) {
        self.stop();
        self.current = Some((name.to_string(), std::time::Instant::now()));
    }

    fn stop(&mut self) {
        if let Some((n, t)) = self.current.take() {
            self.parts.push((n, t.elapsed()));
        }
    }
}

impl Drop for Clock {
    fn drop(&mut self) {
        self.stop();
        let total: f64 = self.parts.iter().map(|(_, d)| d.as_secs_f64()).sum();
        eprintln!("== test stage times ({total:.0} s in all)");
        for (n, d) in &self.parts {
            eprintln!("   {:>6.0} s  {n}", d.as_secs_f64());
        }
    }
}

pub fn run(ctx: &Ctx, flags: &TestFlags) -> anyhow::Result<()> {
    let mut clock = Clock::new();
    // Output goes straight to the terminal/CI log: the test runner's own summary
    // lines are what CI reads.
    clock.part("unit tests");
    ctx.ui.println("== unit tests (cargo test --workspace)");
    let status = duct::cmd!("cargo", "test", "--workspace", "--locked")
        .dir(&ctx.root)
        .unchecked()
        .run()?;
    if !status.status.success() {
        anyhow::bail!("unit tests failed");
    }
    if flags.stress {
        // Read by host-shim/tests/stress.rs in the cargo processes below.
        std::env::set_var("KILN_STRESS", "long");
    }
    if flags.unit_only {
        return Ok(());
    }
    let image = ImageManifest::load(ctx, E2E_IMAGE)?;
    let mut arches = flags.arch.arches_for(&image)?;
    // The host's arch first: its tests are the broadest, and fail fastest.
    arches.sort_by_key(|a| *a != Arch::host());
    for arch in &arches {
        clock.part(&format!(
            "{} {arch}: build and end-to-end tests",
            image.name
        ));
        e2e(ctx, &image, *arch)?;
    }
    // The heavier flavours on the host's arch (or the one arch asked for):
    // their foreign-arch boots take minutes each under TCG.
    let arches: Vec<Arch> = match flags.arch {
        ArchSel::All => vec![Arch::host()],
        ArchSel::One(a) => vec![a],
    };
    let erofs = ImageManifest::load(ctx, E2E_EROFS_IMAGE)?;
    for arch in arches.iter().filter(|a| erofs.arches.contains(a)) {
        clock.part(&format!("{} {arch}", erofs.name));
        ctx.ensure_setup(&[*arch])?;
        let manifest = image::build(ctx, &erofs, *arch, None)?;
        ctx.ui.println(&format!(
            "== end-to-end tests ({} on {arch}, booted from its rootfs image)",
            erofs.name
        ));
        rootfs_tests(ctx, "erofs_", "KILN_E2E_EROFS_MANIFEST", &manifest)?;
    }
    let debian = ImageManifest::load(ctx, E2E_DEBIAN_IMAGE)?;
    for arch in arches.iter().filter(|a| debian.arches.contains(a)) {
        clock.part(&format!("{} {arch}", debian.name));
        e2e_debian(ctx, &debian, *arch)?;
    }
    // Pipeline tests against real inputs (the kernel source the builds above
    // extracted): kernel patch series applied and rejected.
    clock.part("pipeline tests");
    ctx.ui
        .println("== pipeline tests against the real kernel source");
    let status = duct::cmd!(
        "cargo",
        "test",
        "--locked",
        "--package",
        "xtask",
        "--",
        "--ignored",
        "--test-threads=1"
    )
    .dir(&ctx.root)
    .unchecked()
    .run()?;
    if !status.status.success() {
        anyhow::bail!("pipeline tests failed");
    }
    clock.part("second checkout");
    checkouts_agree(ctx, &image)?;
    if flags.fuzz_seconds > 0 {
        clock.part("fuzzing");
        ctx.ui
            .println(&format!("== fuzzing ({} s per target)", flags.fuzz_seconds));
        crate::stage::fuzz::run(ctx, flags.fuzz_seconds, &[])?;
    }
    Ok(())
}

/// Builds the image again from a second checkout of HEAD in another directory
/// and requires the initrd, agent, kernel and manifest to be byte-identical.
/// Only meaningful for a clean tree (CI's fresh clone); skipped, saying so, when
/// the tree has uncommitted changes.
fn checkouts_agree(ctx: &Ctx, image: &ImageManifest) -> anyhow::Result<()> {
    let dirty = crate::cmd::read(
        "git status",
        duct::cmd!("git", "-C", &ctx.root, "status", "--porcelain"),
    )?;
    if !dirty.is_empty() {
        ctx.ui.println(
            "== reproducibility across checkouts: not checked, the tree has uncommitted changes",
        );
        return Ok(());
    }
    ctx.ui
        .println("== reproducibility across checkouts (second clone of HEAD, other path)");
    let base = tempfile::Builder::new()
        .prefix("kiln-second-checkout-")
        .tempdir()?;
    let other = base.path().join("kiln");
    crate::cmd::run_logged(
        ctx,
        "test-repro",
        "git clone",
        duct::cmd!("git", "clone", "--quiet", &ctx.root, &other),
    )?;
    crate::cmd::run_logged(
        ctx,
        "test-repro",
        "build-image in the second checkout",
        duct::cmd!(
            "cargo",
            "xtask",
            "--no-setup",
            "build-image",
            "--image",
            &image.name,
            "--arch",
            "x86_64"
        )
        .dir(&other)
        .env("SOURCE_DATE_EPOCH", ctx.source_date_epoch.to_string()),
    )?;
    let mine = ctx.image_dir(&image.name, Arch::X86_64);
    let theirs = other.join("target/kiln").join(&image.name).join("x86_64");
    let built: crate::manifest::BuiltManifest =
        serde_json::from_str(&std::fs::read_to_string(mine.join(image::MANIFEST))?)?;
    let mut files: Vec<String> = built.artifacts.values().map(|a| a.file.clone()).collect();
    files.push(image::MANIFEST.to_string());
    let mut differ = Vec::new();
    for f in &files {
        if crate::hash::sha256_file(&mine.join(f))? != crate::hash::sha256_file(&theirs.join(f))? {
            differ.push(f.clone());
        }
    }
    if !differ.is_empty() {
        anyhow::bail!("two checkouts of one commit built different {differ:?} (see target/kiln/logs/test-repro.log)");
    }
    ctx.ui.println(&format!(
        "reproducible across checkouts: {} identical",
        files.join(", ")
    ));
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
    let mut args = vec![
        "test",
        "--locked",
        "--package",
        "kiln-shim",
        "--test",
        "boot",
    ];
    if arch == Arch::host() {
        // vfio: x86_64 q35 only (intel-iommu, pcie-root-port), like the host.
        args.extend([
            "--test", "run", "--test", "agent_vm", "--test", "vfio", "--test", "seccomp",
        ]);
        // kata_replay: a pod's life as Kata's runtimes drive the agent, with
        // vCPU and DIMM hot-plug (x86_64 q35 only).
        args.extend(["--test", "kata_replay"]);
        args.extend(["--test", "stress"]);
    } else {
        // The container tests share the host's busybox as the container rootfs
        // over virtio-fs; neither crosses arches (and virtiofsd does not
        // byte-swap FUSE for big-endian s390x guests).
        ctx.ui.println(&format!(
            "note: container tests (run, agent_vm, kata_replay) need a {} guest; {arch} runs the boot tests only",
            Arch::host()
        ));
    }
    args.extend(["--", "--ignored", "--test-threads=1"]);
    let status = duct::cmd("cargo", &args)
        .dir(&ctx.root)
        .env("KILN_E2E_MANIFEST", &manifest)
        .unchecked()
        .run()?;
    if !status.status.success() {
        anyhow::bail!("end-to-end tests failed for {arch}");
    }
    if WORKLOAD_ARCHES.contains(&arch) {
        workload_test(ctx, arch, &manifest)?;
    }
    ctx.ui.println(&format!(
        "== end-to-end tests ({} on {arch}, booted from its rootfs image)",
        image.name
    ));
    rootfs_tests(ctx, "minimal_", "KILN_E2E_MANIFEST", &manifest)
        .map_err(|e| anyhow::anyhow!("{e:#} ({arch})"))
}

/// Real programs (fio, iptables, nft, redis, swap, hugetlbfs, mqueue) from the
/// workload container rootfs, in one VM booted from `manifest`.
fn workload_test(ctx: &Ctx, arch: Arch, manifest: &std::path::Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let rootfs = crate::stage::container::build(ctx, WORKLOAD_RECIPE, arch)?;
    ctx.ui.println(&format!(
        "== end-to-end workload test on {arch} (container rootfs {}, ready after {:.0} s)",
        ctx.rel(&rootfs.dir).display(),
        started.elapsed().as_secs_f64()
    ));
    let status = duct::cmd!(
        "cargo",
        "test",
        "--locked",
        "--package",
        "kiln-shim",
        "--test",
        "workload",
        "--",
        "--ignored",
        "--test-threads=1",
        "--nocapture"
    )
    .dir(&ctx.root)
    .env("KILN_E2E_MANIFEST", manifest)
    .env("KILN_E2E_WORKLOAD_ROOTFS", &rootfs.dir)
    .unchecked()
    .run()?;
    if !status.status.success() {
        anyhow::bail!("the workload end-to-end test failed on {arch}");
    }
    ctx.ui.println(&format!(
        "workload test on {arch}: passed in {:.0} s (rootfs included)",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
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
fn rootfs_tests(
    ctx: &Ctx,
    filter: &str,
    var: &str,
    manifest: &std::path::Path,
) -> anyhow::Result<()> {
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
