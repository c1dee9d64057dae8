//! `cargo xtask test`: the workspace's unit tests, then the end-to-end tests
//! against a freshly built image booted in QEMU.

use crate::arch::{Arch, ArchSel};
use crate::ctx::Ctx;
use crate::image_spec::ImageSpec;
use crate::stage::image;
use crate::TestFlags;
use anyhow::Context;

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
/// The small container rootfs (Debian minbase) every arch runs containers
/// from, on a virtio-blk disk and over virtio-fs (host-shim/tests/arch_containers.rs).
const SHELL_RECIPE: &str = "shell";

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

/// Where a suite runs, among the arches of its image's loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arches {
    /// Every arch selected (`--arch`, default all the image has).
    Selected,
    /// The host's arch only: the container tests share the host's busybox as
    /// the container rootfs over virtio-fs, which crosses no arches (and
    /// virtiofsd does not byte-swap FUSE for big-endian s390x guests);
    /// kata_replay also needs x86_64 q35 (pcie-root-port, DIMM hot-plug).
    Host,
    /// These arches, if selected.
    Only(&'static [Arch]),
    /// The host's arch, or the one arch asked for: heavier flavours whose
    /// foreign-arch boots take minutes each under TCG.
    HostOrAsked,
}

/// What an environment variable of a suite is set to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Input {
    /// The manifest.json of the suite's image, built for the arch.
    Manifest,
    /// The workload container rootfs ([`WORKLOAD_RECIPE`]), built for the arch.
    WorkloadRootfs,
    /// The shell container rootfs ([`SHELL_RECIPE`]), built for the arch.
    ShellRootfs,
}

/// One `cargo test -- --ignored` run: the end-to-end and pipeline suites.
#[derive(Debug)]
struct Suite {
    /// Its name in messages (and in the error when it fails).
    name: &'static str,
    /// The image it boots (`None`: no image, run once after the images).
    image: Option<&'static str>,
    package: &'static str,
    /// `--test` targets; empty: every test target of the package.
    tests: &'static [&'static str],
    /// Only tests whose names contain this.
    filter: Option<&'static str>,
    env: &'static [(&'static str, Input)],
    arches: Arches,
    /// Pass `--nocapture` (suites whose progress lines are worth the log).
    nocapture: bool,
}

/// Every suite `cargo xtask test` runs after the unit tests, in order.
const SUITES: &[Suite] = &[
    Suite {
        name: "boot",
        image: Some(E2E_IMAGE),
        package: "kiln-shim",
        tests: &["boot"],
        filter: None,
        env: &[("KILN_E2E_MANIFEST", Input::Manifest)],
        arches: Arches::Selected,
        nocapture: false,
    },
    Suite {
        name: "containers",
        image: Some(E2E_IMAGE),
        package: "kiln-shim",
        // kata_replay: a pod's life as Kata's runtimes drive the agent, with
        // vCPU and DIMM hot-plug.
        tests: &["run", "agent_vm", "seccomp", "kata_replay", "stress"],
        filter: None,
        env: &[("KILN_E2E_MANIFEST", Input::Manifest)],
        arches: Arches::Host,
        nocapture: false,
    },
    Suite {
        name: "guest VFIO (an emulated device behind a guest IOMMU)",
        image: Some(E2E_IMAGE),
        package: "kiln-shim",
        tests: &["vfio"],
        filter: None,
        env: &[
            ("KILN_E2E_MANIFEST", Input::Manifest),
            ("KILN_E2E_SHELL_ROOTFS", Input::ShellRootfs),
        ],
        // Every arch: PCIe root ports and a virtual IOMMU on x86_64 and
        // aarch64, a PHB of its own on ppc64le, a zPCI function on s390x
        // (kiln_shim::qemu::supports_guest_vfio).
        arches: Arches::Selected,
        nocapture: false,
    },
    Suite {
        name: "containers on every arch (rootfs disk and share)",
        image: Some(E2E_IMAGE),
        package: "kiln-shim",
        tests: &["arch_containers"],
        filter: None,
        env: &[
            ("KILN_E2E_MANIFEST", Input::Manifest),
            ("KILN_E2E_SHELL_ROOTFS", Input::ShellRootfs),
        ],
        arches: Arches::Selected,
        nocapture: true,
    },
    Suite {
        name: "workload",
        image: Some(E2E_IMAGE),
        package: "kiln-shim",
        tests: &["workload"],
        filter: None,
        env: &[
            ("KILN_E2E_MANIFEST", Input::Manifest),
            ("KILN_E2E_WORKLOAD_ROOTFS", Input::WorkloadRootfs),
        ],
        arches: Arches::Only(WORKLOAD_ARCHES),
        nocapture: true,
    },
    Suite {
        name: "minimal rootfs image",
        image: Some(E2E_IMAGE),
        package: "kiln-shim",
        tests: &["rootfs"],
        filter: Some("minimal_"),
        env: &[("KILN_E2E_MANIFEST", Input::Manifest)],
        arches: Arches::Selected,
        nocapture: true,
    },
    Suite {
        name: "erofs rootfs image",
        image: Some(E2E_EROFS_IMAGE),
        package: "kiln-shim",
        tests: &["rootfs"],
        filter: Some("erofs_"),
        env: &[("KILN_E2E_EROFS_MANIFEST", Input::Manifest)],
        arches: Arches::HostOrAsked,
        nocapture: true,
    },
    Suite {
        name: "debian (systemd; DAX on x86_64 and ppc64le)",
        image: Some(E2E_DEBIAN_IMAGE),
        package: "kiln-shim",
        tests: &["rootfs"],
        filter: Some("debian_"),
        env: &[
            ("KILN_E2E_DEBIAN_MANIFEST", Input::Manifest),
            ("KILN_E2E_SHELL_ROOTFS", Input::ShellRootfs),
        ],
        // Every arch boots it and runs a container (systemd to agent-ready
        // under TCG in CI, 8 Dec: x86_64 5.4 s and ppc64le 6.9 s from DAX,
        // aarch64 8.5 s and s390x 9.4 s from virtio-blk).
        arches: Arches::Selected,
        nocapture: true,
    },
    // Pipeline tests against real inputs (the kernel source the builds above
    // extracted): kernel patch series applied and rejected, the dev loop,
    // release and install.
    Suite {
        name: "pipeline",
        image: None,
        package: "xtask",
        tests: &[],
        filter: None,
        env: &[],
        arches: Arches::Selected,
        nocapture: false,
    },
];

impl Arches {
    /// Whether a suite with these arches runs on `arch` when `sel` was asked.
    fn admit(self, arch: Arch, sel: ArchSel) -> bool {
        match self {
            Arches::Selected => true,
            Arches::Host => arch == Arch::host(),
            Arches::Only(list) => list.contains(&arch),
            Arches::HostOrAsked => match sel {
                ArchSel::All => arch == Arch::host(),
                ArchSel::One(a) => arch == a,
            },
        }
    }
}

/// The images in the order their suites first appear in [`SUITES`].
fn images() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for name in SUITES.iter().filter_map(|s| s.image) {
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// The `cargo` arguments of `suite`.
fn cargo_args(suite: &Suite) -> Vec<&'static str> {
    let mut args = vec!["test", "--locked", "--package", suite.package];
    for t in suite.tests {
        args.extend(["--test", t]);
    }
    args.extend(["--", "--ignored", "--test-threads=1"]);
    if suite.nocapture {
        args.push("--nocapture");
    }
    args.extend(suite.filter);
    args
}

/// Runs `suite` through the tied command helper (killed with xtask), with
/// its environment from `input`; an error names the suite and the arch.
fn run_suite(
    ctx: &Ctx,
    suite: &Suite,
    arch: Option<Arch>,
    stress: bool,
    mut input: impl FnMut(Input) -> anyhow::Result<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let on = arch.map(|a| format!(" on {a}")).unwrap_or_default();
    ctx.ui.println(&format!(
        "== {} tests{on} (cargo {})",
        suite.name,
        cargo_args(suite).join(" ")
    ));
    // The suites are hermetic: a developer's KILN_CACHE_REMOTE must not turn a
    // build a test expects to run (a killed stage, the dev loop) into a pull,
    // nor KILN_INSECURE_REGISTRY the HTTPS registry test into plain HTTP.
    // The images the suites boot were built above, where the remote cache helps.
    let mut expr = duct::cmd("cargo", cargo_args(suite))
        .dir(&ctx.root)
        .env_remove("KILN_CACHE_REMOTE")
        .env_remove("KILN_CACHE_PUSH")
        .env_remove("KILN_INSECURE_REGISTRY")
        .env_remove("KILN_REGISTRY_CA");
    for (var, what) in suite.env {
        expr = expr.env(var, input(*what)?);
    }
    if stress {
        // Read by host-shim/tests/stress.rs.
        expr = expr.env("KILN_STRESS", "long");
    }
    let status = crate::cmd::tied(expr).unchecked().run()?;
    if !status.status.success() {
        anyhow::bail!("the {} tests failed{on} ({})", suite.name, status.status);
    }
    Ok(())
}

pub fn run(ctx: &Ctx, flags: &TestFlags) -> anyhow::Result<()> {
    let mut clock = Clock::new();
    // Output goes straight to the terminal/CI log: the test runner's own summary
    // lines are what CI reads.
    clock.part("unit tests");
    ctx.ui.println("== unit tests (cargo test --workspace)");
    let status =
        crate::cmd::tied(duct::cmd!("cargo", "test", "--workspace", "--locked").dir(&ctx.root))
            .unchecked()
            .run()?;
    if !status.status.success() {
        anyhow::bail!("unit tests (cargo test --workspace) failed");
    }
    if flags.unit_only {
        return Ok(());
    }
    for name in images() {
        let image = ImageSpec::load(ctx, name)?;
        let suites: Vec<&Suite> = SUITES.iter().filter(|s| s.image == Some(name)).collect();
        // The main image must have the arch asked for; the others run where they can.
        let candidates = if name == E2E_IMAGE {
            image.select_arches(flags.arch)?
        } else {
            image.arches.clone()
        };
        let mut arches: Vec<Arch> = candidates
            .into_iter()
            .filter(|a| suites.iter().any(|s| s.arches.admit(*a, flags.arch)))
            .collect();
        // The host's arch first: its tests are the broadest, and fail fastest.
        arches.sort_by_key(|a| *a != Arch::host());
        for arch in arches {
            clock.part(&format!(
                "{} {arch}: build and end-to-end tests",
                image.name
            ));
            ctx.ensure_setup(&[arch])?;
            let manifest = if name == E2E_IMAGE {
                // The main image also proves the pipeline incremental.
                build_twice(ctx, &image, arch)?
            } else {
                image::build(ctx, &image, arch, None)?
            };
            sbom_is_valid(ctx, &manifest)?;
            verity_is_valid(ctx, &manifest)?;
            let skipped: Vec<&str> = suites
                .iter()
                .filter(|s| !s.arches.admit(arch, flags.arch))
                .map(|s| s.name)
                .collect();
            if !skipped.is_empty() && arch != Arch::host() {
                ctx.ui.println(&format!(
                    "note: {} tests need a {} guest (or are not yet in its budget); {arch} runs the others",
                    skipped.join(", "),
                    Arch::host()
                ));
            }
            for suite in suites.iter().filter(|s| s.arches.admit(arch, flags.arch)) {
                run_suite(ctx, suite, Some(arch), flags.stress, |what| match what {
                    Input::Manifest => Ok(manifest.clone()),
                    Input::WorkloadRootfs => container_rootfs(ctx, WORKLOAD_RECIPE, arch),
                    Input::ShellRootfs => container_rootfs(ctx, SHELL_RECIPE, arch),
                })?;
            }
        }
    }
    for suite in SUITES.iter().filter(|s| s.image.is_none()) {
        clock.part(&format!("{} tests", suite.name));
        run_suite(ctx, suite, None, flags.stress, |what| {
            anyhow::bail!("the {} suite has no image to give {what:?}", suite.name)
        })?;
    }
    clock.part("second checkout");
    let image = ImageSpec::load(ctx, E2E_IMAGE)?;
    checkouts_agree(ctx, &image, &image.select_arches(flags.arch)?)?;
    if flags.fuzz_seconds > 0 {
        clock.part("fuzzing");
        ctx.ui
            .println(&format!("== fuzzing ({} s per target)", flags.fuzz_seconds));
        crate::stage::fuzz::run(ctx, flags.fuzz_seconds, &[])?;
    }
    Ok(())
}

/// Builds the image again, for every arch this run tested, from a second
/// checkout of HEAD in another directory and requires every artifact
/// (agent, kernel, initrd, rootfs.img) and the manifest to be byte-identical.
/// The agent, initrd and rootfs.img are rebuilt from nothing there (a new
/// target dir); the kernel comes from the shared content-keyed cache.
/// Only meaningful for a clean tree (CI's fresh clone); skipped, saying so, when
/// the tree has uncommitted changes.
fn checkouts_agree(ctx: &Ctx, image: &ImageSpec, arches: &[Arch]) -> anyhow::Result<()> {
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
    let mut report = Vec::new();
    for &arch in arches {
        crate::cmd::run_logged(
            ctx,
            "test-repro",
            &format!("build-image {arch} in the second checkout"),
            duct::cmd!(
                "cargo",
                "xtask",
                "--no-setup",
                "build-image",
                "--image",
                &image.name,
                "--arch",
                arch.name()
            )
            .dir(&other)
            .env("SOURCE_DATE_EPOCH", ctx.source_date_epoch.to_string())
            // From nothing means from nothing: no stage result from a remote cache.
            .env("KILN_CACHE_REMOTE", ""),
        )?;
        let mine = ctx.image_dir(&image.name, arch);
        let theirs = other
            .join("target/kiln")
            .join(&image.name)
            .join(arch.name());
        let built: kiln_manifest::Manifest =
            serde_json::from_str(&std::fs::read_to_string(mine.join(image::MANIFEST))?)?;
        let mut files: Vec<String> = built.artifacts.values().map(|a| a.file.clone()).collect();
        files.push(image::MANIFEST.to_string());
        files.push(crate::stage::sbom::FILE.to_string());
        let mut differ = Vec::new();
        for f in &files {
            if crate::hash::sha256_file(&mine.join(f))?
                != crate::hash::sha256_file(&theirs.join(f))?
            {
                differ.push(f.clone());
            }
        }
        if !differ.is_empty() {
            anyhow::bail!("two checkouts of one commit built different {differ:?} for {arch} (see target/kiln/logs/test-repro.log)");
        }
        report.push(format!("{arch}: {}", files.join(", ")));
    }
    ctx.ui.println(&format!(
        "reproducible across checkouts, identical: {}",
        report.join("; ")
    ));
    if arches.contains(&Arch::host()) {
        clone_builds_from_registry(ctx, image, &other, Arch::host())?;
    }
    Ok(())
}

/// The second clone once more, now as a new machine: an empty kiln cache, new
/// outputs, and a loopback registry seeded from this checkout. It must take
/// every stage from the registry (no kernel compiled, none even unpacked) and
/// give the same bytes as this checkout.
fn clone_builds_from_registry(
    ctx: &Ctx,
    image: &ImageSpec,
    other: &std::path::Path,
    arch: Arch,
) -> anyhow::Result<()> {
    ctx.ui.println(&format!(
        "== remote stage cache: the second clone builds {arch} from a registry, with an empty kiln cache"
    ));
    let registry = crate::local_registry::LocalRegistry::start(None)?;
    let url = registry.url();
    let epoch = ctx.source_date_epoch.to_string();
    let build = |dir: &std::path::Path, push: bool| {
        let mut args = vec![
            "xtask",
            "--no-setup",
            "--insecure-registry",
            "--cache-remote",
            &url,
        ];
        if push {
            args.push("--cache-push");
        }
        args.extend(["build-image", "--image", &image.name, "--arch", arch.name()]);
        duct::cmd("cargo", args)
            .dir(dir)
            .env("SOURCE_DATE_EPOCH", &epoch)
            .env_remove("KILN_CACHE_REMOTE")
            .stderr_to_stdout()
    };
    // This checkout has every stage cached: seeding only pushes.
    crate::cmd::read("seeding the loopback registry", build(&ctx.root, true))?;
    let cache = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let start = std::time::Instant::now();
    let said = crate::cmd::read(
        "build-image in the second clone against the registry",
        build(other, false)
            .env("KILN_CACHE_DIR", cache.path())
            .env("KILN_OUT_DIR", out.path()),
    )?;
    let took = start.elapsed().as_secs_f64();
    let pulled = ["agent", "kernel", "initrd", "disk"]
        .iter()
        .all(|s| crate::remote_cache::said(&said, s, crate::remote_cache::Said::Pulled));
    if !pulled || said.contains("make ") || cache.path().join("kernel/src").exists() {
        anyhow::bail!("the second clone did not take every stage from the registry:\n{said}");
    }
    let mine = ctx.image_dir(&image.name, arch);
    let theirs = out.path().join(&image.name).join(arch.name());
    let mut differ = Vec::new();
    for entry in std::fs::read_dir(&mine)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue; // stamps: the registry build wrote its own
        }
        if std::fs::read(mine.join(&*name))?
            != std::fs::read(theirs.join(&*name)).unwrap_or_default()
        {
            differ.push(name.into_owned());
        }
    }
    if !differ.is_empty() {
        anyhow::bail!("built from the registry, {differ:?} differ from this checkout's for {arch}");
    }
    ctx.ui.println(&format!(
        "the second clone, empty kiln cache, warm registry: {} in {took:.1} s, every artifact identical",
        image.name
    ));
    Ok(())
}

/// Builds `image` for `arch`, then again: the pipeline is incremental, so the
/// second build with nothing changed must run no stage.
fn build_twice(ctx: &Ctx, image: &ImageSpec, arch: Arch) -> anyhow::Result<std::path::PathBuf> {
    let manifest = image::build(ctx, image, arch, None)?;
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
    Ok(manifest)
}

/// Validates the image's `sbom.spdx.json` (beside `manifest`) with the
/// independent validator (PyPI's spdx-tools), not only kiln's own writer.
fn sbom_is_valid(ctx: &Ctx, manifest: &std::path::Path) -> anyhow::Result<()> {
    let tool = crate::stage::setup::spdx_validator(ctx)?;
    let sbom = manifest.with_file_name(crate::stage::sbom::FILE);
    let out = crate::cmd::tied(duct::cmd!(&tool, "-i", &sbom))
        .stderr_to_stdout()
        .stdout_capture()
        .unchecked()
        .run()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("invalid") {
        anyhow::bail!(
            "{} is not valid SPDX 2.3 ({}):\n{text}",
            ctx.rel(&sbom).display(),
            crate::stage::setup::SPDX_TOOLS
        );
    }
    ctx.ui.println(&format!(
        "sbom: {} is valid SPDX 2.3 ({})",
        ctx.rel(&sbom).display(),
        crate::stage::setup::SPDX_TOOLS
    ));
    Ok(())
}

/// Checks the image's dm-verity tree (when it has one) with cryptsetup's
/// `veritysetup verify`, an independent reader of the format, against the
/// root hash in manifest.json; then flips one data byte in the copy and
/// requires veritysetup to refuse it, so a check that passes everything
/// cannot pass here.
fn verity_is_valid(ctx: &Ctx, manifest: &std::path::Path) -> anyhow::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let m: kiln_manifest::Manifest = serde_json::from_str(&std::fs::read_to_string(manifest)?)?;
    let Some(layout) = m.rootfs.as_ref() else {
        return Ok(());
    };
    let Some(v) = layout.verity.as_ref() else {
        return Ok(());
    };
    let img = manifest.with_file_name(crate::stage::disk::FILE);
    // The partition's data and tree, as the guest sees /dev/vda1.
    let len = (v.hash_start_block + v.hash_blocks) * v.hash_block_size;
    let work = tempfile::tempdir()?;
    let part = work.path().join("partition");
    let mut src = std::fs::File::open(&img)?;
    src.seek(SeekFrom::Start(layout.partition_offset))?;
    let mut out = std::fs::File::create(&part)?;
    let copied = std::io::copy(&mut src.take(len), &mut out)?;
    anyhow::ensure!(
        copied == len,
        "{} is shorter than its verity tree",
        img.display()
    );
    let verify = |what: &str| -> anyhow::Result<(bool, String)> {
        let out = crate::cmd::tied(duct::cmd!(
            "veritysetup",
            "verify",
            "--no-superblock",
            format!("--format={}", v.format),
            format!("--hash={}", v.algorithm),
            format!("--data-block-size={}", v.data_block_size),
            format!("--hash-block-size={}", v.hash_block_size),
            format!("--data-blocks={}", v.data_blocks),
            format!("--hash-offset={}", v.hash_start_block * v.hash_block_size),
            format!("--salt={}", v.salt),
            &part,
            &part,
            &v.root_hash
        ))
        .stderr_to_stdout()
        .stdout_capture()
        .unchecked()
        .run()
        .with_context(|| {
            format!("running veritysetup on {what} (`cargo xtask setup` installs cryptsetup-bin)")
        })?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    };
    let (ok, text) = verify("the image")?;
    anyhow::ensure!(
        ok,
        "{}: veritysetup verify rejects the dm-verity tree recorded in manifest.json (root hash {}): {text}",
        ctx.rel(&img).display(),
        v.root_hash
    );
    kiln_testsupport::tamper::flip_byte(&part, v.data_blocks / 2 * v.data_block_size + 17, 0x40)?;
    let (ok, _) = verify("a tampered copy")?;
    anyhow::ensure!(
        !ok,
        "veritysetup verify accepted a copy with a flipped data byte: the check proves nothing"
    );
    ctx.ui.println(&format!(
        "verity: {} verified by veritysetup (root hash {}, {} data + {} hash blocks); a flipped byte is refused",
        ctx.rel(&img).display(),
        v.root_hash,
        v.data_blocks,
        v.hash_blocks
    ));
    Ok(())
}

/// The workload test's container rootfs (fio, iptables, nft, redis, swap,
/// hugetlbfs, mqueue) for `arch`, built or found in the cache.
fn container_rootfs(ctx: &Ctx, recipe: &str, arch: Arch) -> anyhow::Result<std::path::PathBuf> {
    let started = std::time::Instant::now();
    let rootfs = crate::stage::container::build(ctx, recipe, arch)?;
    ctx.ui.println(&format!(
        "{recipe} container rootfs {} ready after {:.0} s",
        ctx.rel(&rootfs.dir).display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(rootfs.dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every end-to-end test file of host-shim is in a suite (nested_vfio
    /// runs inside a VM of its own: host-shim/tests/nested_vfio.sh), and
    /// every suite's test target exists.
    #[test]
    fn suites_cover_every_end_to_end_test_file() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../host-shim/tests");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".rs").map(str::to_string)
            })
            .filter(|n| n != "nested_vfio")
            .collect();
        files.sort();
        let mut listed: Vec<String> = SUITES
            .iter()
            .filter(|s| s.package == "kiln-shim")
            .flat_map(|s| s.tests.iter().map(|t| t.to_string()))
            .collect();
        listed.sort();
        listed.dedup();
        assert_eq!(files, listed);
    }

    /// What runs where, for the default `--arch` (all) on an x86_64 host:
    /// the same runs as before the table.
    #[test]
    fn plan_on_an_x86_64_host() {
        if Arch::host() != Arch::X86_64 {
            return;
        }
        let plan = |arch: Arch| -> Vec<&str> {
            SUITES
                .iter()
                .filter(|s| s.image.is_some() && s.arches.admit(arch, ArchSel::All))
                .map(|s| s.name)
                .collect()
        };
        const VFIO: &str = "guest VFIO (an emulated device behind a guest IOMMU)";
        const EVERY_ARCH: &str = "containers on every arch (rootfs disk and share)";
        const DEBIAN: &str = "debian (systemd; DAX on x86_64 and ppc64le)";
        assert_eq!(
            plan(Arch::X86_64),
            [
                "boot",
                "containers",
                VFIO,
                EVERY_ARCH,
                "workload",
                "minimal rootfs image",
                "erofs rootfs image",
                DEBIAN
            ]
        );
        assert_eq!(
            plan(Arch::Aarch64),
            [
                "boot",
                VFIO,
                EVERY_ARCH,
                "workload",
                "minimal rootfs image",
                DEBIAN
            ]
        );
        for arch in [Arch::Ppc64le, Arch::S390x] {
            assert_eq!(
                plan(arch),
                ["boot", VFIO, EVERY_ARCH, "minimal rootfs image", DEBIAN]
            );
        }
        assert_eq!(images(), [E2E_IMAGE, E2E_EROFS_IMAGE, E2E_DEBIAN_IMAGE]);
        let pipeline = SUITES.iter().find(|s| s.image.is_none()).unwrap();
        assert_eq!(
            cargo_args(pipeline),
            [
                "test",
                "--locked",
                "--package",
                "xtask",
                "--",
                "--ignored",
                "--test-threads=1"
            ]
        );
        let rootfs = SUITES.iter().find(|s| s.filter == Some("erofs_")).unwrap();
        assert_eq!(
            cargo_args(rootfs).join(" "),
            "test --locked --package kiln-shim --test rootfs -- --ignored --test-threads=1 --nocapture erofs_"
        );
    }
}
