//! kiln's build pipeline, run as `cargo xtask <task>`.
//!
//! `main` only parses flags and dispatches; each task lives in its own module
//! under `stage/` and turns typed inputs into artifacts plus a record for the
//! image manifest. Data flows one way: manifest + recipe in, artifacts out.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use xtask::arch::ArchSel;
use xtask::ctx::Ctx;
use xtask::image_spec::ImageSpec;
use xtask::stage::image::TreeParts;
use xtask::stage::kernel::KernelRequest;
use xtask::{stage, GlobalFlags, TestFlags};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build and test kiln guest images",
    version
)]
struct Cli {
    #[command(flatten)]
    global: GlobalFlags,
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install host needs (apt packages, rustup targets, vhost-device-vsock); idempotent.
    Setup(ArchFlag),
    /// Build the static guest agent for one architecture.
    BuildAgent(ArchFlag),
    /// Build a guest kernel from kernel-configs/ fragments.
    BuildKernel(KernelFlags),
    /// Print the requested/actual table for an image's kernel config without building,
    /// or (--compare) its difference from another kernel configuration.
    KernelCheck(KernelCheckFlags),
    /// Build the initrd of an image (needs the agent).
    BuildInitrd(ImageFlags),
    /// Build the initrd and rootfs.img of an image (needs the agent, not the kernel).
    BuildRootfs(ImageFlags),
    /// Build everything an image needs and write its manifest.json.
    BuildImage(ImageFlags),
    /// Build a container root filesystem from a recipe without an agent (e.g. `workload`).
    BuildContainerRootfs(ContainerFlags),
    /// Run unit tests and the end-to-end boot tests.
    Test(TestFlags),
    /// Build every image for every selected arch plus kiln-shim into target/kiln/dist/.
    Release(ReleaseArgs),
    /// Fetch a release pushed with `release --push` and verify every byte (into --dest).
    Pull(PullArgs),
    /// Install built artifacts into a staging root, as a distro package would.
    Install(stage::install::InstallFlags),
    /// Edit → boot loop for the agent: rebuild what changed, boot, smoke-test, keep the VM up.
    Dev(stage::dev::DevFlags),
    /// Measure sizes, boot times, packing throughput and rebuild times (figures, never pass/fail).
    Bench(stage::bench::BenchFlags),
    /// Run the cargo-fuzz targets under fuzz/ for a bounded time each (nightly + cargo-fuzz).
    Fuzz(FuzzArgs),
}

#[derive(Args, Clone, Debug)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Only these targets (default: all; see fuzz/fuzz_targets/).
    #[arg(long = "target", value_name = "NAME")]
    pub targets: Vec<String>,
}

#[derive(Args, Clone, Debug)]
pub struct ArchFlag {
    /// Target architecture: x86_64, aarch64, ppc64le, s390x or all.
    #[arg(long, default_value = "x86_64")]
    pub arch: ArchSel,
}

#[derive(Args, Clone, Debug)]
pub struct KernelFlags {
    #[arg(long, default_value = "x86_64")]
    pub arch: ArchSel,
    /// Image whose kernel fragments to use.
    #[arg(long, default_value = "minimal")]
    pub image: String,
    /// Kernel source: a tarball or an unpacked tree (default: Debian's linux-source-6.12).
    #[arg(long)]
    pub kernel_src: Option<PathBuf>,
    /// One more config fragment, applied after the image's (try an option
    /// before adding it to kernel-configs/). Repeat for several, in order.
    #[arg(long, value_name = "FILE")]
    pub fragment: Vec<PathBuf>,
}

#[derive(Args, Clone, Debug)]
pub struct KernelCheckFlags {
    #[command(flatten)]
    pub kernel: KernelFlags,
    /// Another configuration to compare with: a directory of *.conf fragments
    /// (e.g. Kata's tools/packaging/kernel/configs/fragments/x86_64) or a
    /// .config file (e.g. /boot/config-*). Repeat to merge several, in order.
    #[arg(long, value_name = "DIR|FILE")]
    pub compare: Vec<PathBuf>,
}

#[derive(Args, Clone, Debug)]
pub struct ImageFlags {
    #[arg(long, default_value = "x86_64")]
    pub arch: ArchSel,
    /// Image flavour: a file name (without .toml) in image-manifests/.
    #[arg(long, default_value = "minimal")]
    pub image: String,
    /// Kernel source: a tarball or an unpacked tree (default: Debian's linux-source-6.12).
    #[arg(long)]
    pub kernel_src: Option<PathBuf>,
}

#[derive(Args, Clone, Debug)]
pub struct ContainerFlags {
    #[arg(long, default_value = "x86_64")]
    pub arch: ArchSel,
    /// A file name (without .toml) in rootfs-recipes/.
    #[arg(long, default_value = "workload")]
    pub recipe: String,
}

#[derive(Args, Clone, Debug)]
pub struct ReleaseArgs {
    #[arg(long, default_value = "all")]
    pub arch: String,
    /// Build twice (two clones, different umask/TZ/locale/path, fresh cache) and compare.
    #[arg(long)]
    pub verify_reproducible: bool,
    /// Sign SHA256SUMS and provenance.intoto.json with this OpenSSH private
    /// key (no passphrase), as `ssh-keygen -Y sign -n kiln-release` does:
    /// writes `<file>.sig` beside each. Verify with `ssh-keygen -Y verify`.
    #[arg(long, value_name = "KEY", conflicts_with = "verify_reproducible")]
    pub sign_key: Option<std::path::PathBuf>,
    /// Then publish dist/ as one OCI image index (a manifest per arch) under
    /// this tag, e.g. oci://registry.example/kiln:0.1.0.
    #[arg(
        long,
        value_name = "oci://HOST[:PORT]/REPO:TAG",
        conflicts_with = "verify_reproducible"
    )]
    pub push: Option<String>,
}

#[derive(Args, Clone, Debug)]
pub struct PullArgs {
    /// The release: oci://HOST[:PORT]/REPO@sha256:… (or :TAG).
    pub source: String,
    /// Directory to write the tarballs, SHA256SUMS, release.json and signatures into.
    #[arg(long)]
    pub dest: PathBuf,
    /// Only this arch's tarball (default: every arch in the release).
    #[arg(long)]
    pub arch: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = Ctx::new(&cli.global).and_then(|ctx| {
        let r = run(&ctx, cli.task);
        if let Some(remote) = &ctx.remote {
            let (pulled, pushed) = remote.traffic();
            if pulled + pushed > 0 {
                ctx.ui.println(&format!(
                    "remote cache: this run pulled {} KiB and pushed {} KiB",
                    pulled / 1024,
                    pushed / 1024
                ));
            }
        }
        r
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(ctx: &Ctx, task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup(f) => stage::setup::run(ctx, &f.arch.arches(), stage::setup::Mode::Install),
        Task::BuildAgent(f) => {
            for arch in f.arch.arches() {
                ctx.ensure_setup(&[arch])?;
                stage::agent::build(ctx, arch)?;
            }
            Ok(())
        }
        Task::BuildKernel(f) => {
            for arch in f.arch.arches() {
                ctx.ensure_setup(&[arch])?;
                let image = ImageSpec::load(ctx, &f.image)?;
                let req = KernelRequest::for_image(ctx, &image, arch, f.kernel_src.clone())?
                    .with_extra_fragments(&f.fragment)?;
                stage::kernel::build(ctx, &req)?;
            }
            Ok(())
        }
        Task::KernelCheck(KernelCheckFlags { kernel: f, compare }) => {
            for arch in f.arch.arches() {
                ctx.ensure_setup(&[arch])?;
                let image = ImageSpec::load(ctx, &f.image)?;
                let req = KernelRequest::for_image(ctx, &image, arch, f.kernel_src.clone())?
                    .with_extra_fragments(&f.fragment)?;
                if compare.is_empty() {
                    stage::kernel::check(ctx, &req)?;
                } else {
                    stage::kernel::compare_with(ctx, &req, &compare)?;
                }
            }
            Ok(())
        }
        Task::BuildRootfs(f) => {
            let image = ImageSpec::load(ctx, &f.image)?;
            for arch in image.select_arches(f.arch)? {
                ctx.ensure_setup(&[arch])?;
                stage::image::build_tree_parts(ctx, &image, arch, TreeParts::InitrdAndDisk)?;
            }
            Ok(())
        }
        Task::BuildInitrd(f) => {
            for arch in f.arch.arches() {
                ctx.ensure_setup(&[arch])?;
                let image = ImageSpec::load(ctx, &f.image)?;
                stage::image::build_tree_parts(ctx, &image, arch, TreeParts::Initrd)?;
            }
            Ok(())
        }
        Task::BuildImage(f) => {
            let image = ImageSpec::load(ctx, &f.image)?;
            for arch in image.select_arches(f.arch)? {
                ctx.ensure_setup(&[arch])?;
                stage::image::build(ctx, &image, arch, f.kernel_src.clone())?;
            }
            Ok(())
        }
        Task::BuildContainerRootfs(f) => {
            for arch in f.arch.arches() {
                ctx.ensure_setup(&[arch])?;
                let built = stage::container::build(ctx, &f.recipe, arch)?;
                println!("{}", built.dir.display());
            }
            Ok(())
        }
        Task::Test(f) => stage::test::run(ctx, &f),
        Task::Release(f) => {
            let sel: ArchSel = f.arch.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            if f.verify_reproducible {
                stage::release::verify_reproducible(ctx, &f.arch)
            } else {
                let dist = stage::release::run(ctx, sel, f.sign_key.as_deref())?;
                if let Some(target) = &f.push {
                    stage::distribute::push(
                        ctx,
                        &dist,
                        &sel.arches(),
                        target,
                        ctx.insecure_registry,
                    )?;
                }
                Ok(())
            }
        }
        Task::Pull(f) => {
            let arch = match &f.arch {
                Some(a) => match a.parse().map_err(|e: String| anyhow::anyhow!(e))? {
                    ArchSel::One(a) => Some(a),
                    ArchSel::All => None,
                },
                None => None,
            };
            stage::distribute::pull(ctx, &f.source, &f.dest, arch, ctx.insecure_registry)
                .map(|_| ())
        }
        Task::Install(f) => stage::install::run(ctx, &f),
        Task::Dev(f) => stage::dev::run(ctx, &f),
        Task::Fuzz(f) => stage::fuzz::run(ctx, f.seconds.max(1), &f.targets),
        Task::Bench(f) => stage::bench::run(ctx, &f),
    }
}
