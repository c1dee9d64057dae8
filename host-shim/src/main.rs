//! kiln-shim: the minimal host side of kiln. Boots kiln images with QEMU and
//! talks to kiln-agent over vsock. Not a containerd shim: a tool that proves
//! the guest side works and lets developers drive it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use kiln_manifest::Arch;
use kiln_shim::config::ShimConfig;
use kiln_shim::image::BootImage;
use kiln_shim::installed;
use kiln_shim::vm::{BootOptions, Vm};

#[derive(Parser)]
#[command(
    name = "kiln-shim",
    version,
    about = "Boot kiln guest images and talk to kiln-agent"
)]
struct Cli {
    /// Configuration file (TOML, Kata-style [hypervisor.qemu] keys).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log level for the shim itself.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot an image until its agent answers, print guest details, shut down.
    Boot(BootArgs),
    /// Run a process in a container of a VM started with `boot --stay`
    /// (by default the smoke container `dev`); exits with its status.
    Exec {
        /// Run directory of the VM (printed by `boot --stay`).
        #[arg(long)]
        vm: PathBuf,
        /// Container id.
        #[arg(long, default_value = kiln_shim::smoke::CONTAINER)]
        container: String,
        /// Give the process a terminal.
        #[arg(short = 't', long)]
        tty: bool,
        /// Extra environment variables (KEY=VALUE), repeatable.
        #[arg(short = 'e', long = "env")]
        env: Vec<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Call any agent RPC by name with a JSON request; prints the JSON answer.
    Agent {
        /// Run directory of a VM started with `boot --stay` (holds vm.vsock).
        #[arg(long, conflicts_with = "unix")]
        vm: Option<PathBuf>,
        /// Unix socket of an agent started with `--server-addr unix://PATH`.
        #[arg(long)]
        unix: Option<PathBuf>,
        /// RPC name, e.g. Check, GetGuestDetails, CreateContainer.
        rpc: String,
        /// Request as protobuf JSON (default `{}`).
        #[arg(default_value = "{}")]
        request: String,
    },
    /// Run a command in a container in a fresh VM; exits with its status.
    Run(RunArgs),
    /// Can this host run kiln VMs? Pass/fail per line with how to fix; exit 0 only when a VM can run.
    Check {
        /// Guest architecture to check for.
        #[arg(long, default_value_t = Arch::host())]
        arch: Arch,
        /// Probe KVM by booting this image's kernel (the reliable probe).
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Remove what killed shims left behind: processes, mounts, sockets, run dirs.
    Cleanup,
    /// Time exec round trips (ExecProcess + WaitProcess of `true`) in one
    /// container and read the agent's RSS and fds, idle and after (for `cargo xtask bench`).
    BenchExec {
        /// The image's manifest.json.
        #[arg(long)]
        image: PathBuf,
        /// A busybox root filesystem directory for the container.
        #[arg(long)]
        rootfs: PathBuf,
        /// How many execs to time.
        #[arg(long, default_value_t = 200)]
        count: usize,
        #[arg(long)]
        json: bool,
    },
    /// Print the effective configuration.
    Config,
}

#[derive(clap::Args)]
struct BootArgs {
    /// The image's manifest.json (from `cargo xtask build-image`); default:
    /// the installed minimal image (`<prefix>/share/kiln/minimal/manifest.json`).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Show the guest console on stdout.
    #[arg(long)]
    console: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Keep the VM running until Ctrl-C (talk to it with `kiln-shim agent --vm DIR ...`).
    #[arg(long)]
    stay: bool,
    /// Instead of waiting for the agent, wait until the guest console
    /// prints this text (for images without an agent, e.g. boot benchmarks).
    #[arg(long, conflicts_with = "stay")]
    until_console: Option<String>,
    /// Root filesystem: initrd, image (NVDIMM with DAX where possible, else
    /// virtio-blk), nvdimm (DAX or fail) or virtio-blk. Overrides
    /// hypervisor.qemu.rootfs.
    #[arg(long, value_name = "MODE")]
    rootfs: Option<String>,
    /// dm-verity for a rootfs image with a hash tree: auto (when the manifest
    /// records one), on (required) or off (DAX on an NVDIMM, unverified).
    /// Overrides hypervisor.qemu.rootfs_verity.
    #[arg(long, value_name = "MODE")]
    verity: Option<String>,
    /// Share this root filesystem directory over virtio-fs as container
    /// `dev`'s rootfs (Kata's layout), for `--smoke` and `kiln-shim exec`.
    #[arg(long, value_name = "DIR")]
    share: Option<PathBuf>,
    /// Once the agent answers, run the smoke sequence (Check,
    /// GetGuestDetails and, with --share, a container and an exec in it),
    /// timing each step; fail on the first step that fails.
    #[arg(long)]
    smoke: bool,
    /// Extra guest kernel parameters, after the image's and the
    /// configuration's (e.g. `agent.log=debug`).
    #[arg(long, value_name = "PARAMS", allow_hyphen_values = true)]
    kernel_params: Option<String>,
    /// The guest's network link: none, or user (a virtio-net NIC on QEMU's
    /// user-mode network, IPv4 and IPv6). Overrides hypervisor.qemu.network.
    #[arg(long, value_name = "MODE")]
    network: Option<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The image's manifest.json; default: the installed minimal image.
    #[arg(long)]
    image: Option<PathBuf>,
    /// An OCI bundle: config.json plus its root filesystem.
    #[arg(long, conflicts_with = "rootfs", required_unless_present = "rootfs")]
    bundle: Option<PathBuf>,
    /// A root filesystem directory; a default spec is generated.
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Give the container a terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Extra environment variables (KEY=VALUE), repeatable.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Show the guest console (on stdout, mixed with the container's output).
    #[arg(long)]
    console: bool,
    /// Hot-plug a disk image and mount it: FILE[:DEST[:FSTYPE]] (default /diskN, ext4).
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// How the rootfs reaches the guest: virtio-fs (shared: writes reach the
    /// host directory), block (copied into an ext4 image on a virtio-blk
    /// disk, Kata's block-based rootfs), or auto (block on s390x, whose
    /// big-endian guest virtiofsd cannot serve; else virtio-fs).
    #[arg(long, default_value = "auto", value_name = "auto|virtio-fs|block")]
    rootfs_via: String,
    /// Pass a host PCI device through with VFIO: vfio:ADDRESS (e.g.
    /// vfio:0000:01:00.0), /dev/vfio/GROUP, or vfio-gk:... to keep the
    /// guest kernel's driver. Repeatable; needs root and a host IOMMU.
    #[arg(long = "device", value_name = "DEVICE")]
    devices: Vec<String>,
    /// Pass a device through even though the host uses it (a mounted
    /// disk, an interface that is up).
    #[arg(long)]
    force: bool,
    /// Test/demo facility: attach an emulated QEMU PCI device (edu,
    /// e1000e, pci-testdev) and present it to the container as if it were
    /// host device ADDRESS passed through with VFIO: DRIVER@ADDRESS, e.g.
    /// edu@0000:ab:00.0. Needs no host IOMMU.
    #[arg(long = "emulated-vfio", value_name = "DRIVER@ADDRESS")]
    emulated_vfio: Vec<String>,
    /// The command (required with --rootfs; overrides the bundle's args).
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(format!("kiln_shim={}", cli.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli));
    // tokio's stdin reader is a blocking read nobody can cancel: dropping the
    // runtime would wait for it (a `run` on a terminal hung at exit until a
    // key was pressed). Everything that matters has finished by now.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Cleans up after shims that were killed; never fails the current command.
fn clean_stale() {
    let Ok(base) = kiln_shim::process::runtime_base() else {
        return; // the command itself will say why it has no run directory
    };
    match kiln_shim::state::cleanup_stale(&base) {
        Ok(r) if !r.removed_dirs.is_empty() => {
            tracing::info!(
                "cleaned up after killed shims: {} run dir(s), {} process(es)",
                r.removed_dirs.len(),
                r.killed.len()
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cleaning stale run directories: {e:#}"),
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let cfg = ShimConfig::load(installed::config(cli.config).as_deref())?;
    match cli.cmd {
        Cmd::Config => {
            print!("{}", toml::to_string_pretty(&cfg)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { arch, image, json } => {
            let image = image.map(|m| BootImage::load(&m)).transpose()?;
            let arch = image.as_ref().map(|i| i.manifest.arch).unwrap_or(arch);
            let kernel = image.as_ref().map(|i| i.kernel.as_path());
            let lines = kiln_shim::check::run(&cfg, arch, std::path::Path::new("/"), kernel);
            let ok = kiln_shim::check::can_run(&lines);
            if json {
                println!("{}", serde_json::json!({ "can_run": ok, "checks": lines }));
            } else {
                kiln_shim::check::print(&lines);
                println!(
                    "{}",
                    if ok {
                        "a VM can run on this host"
                    } else {
                        "no VM can run on this host: fix the FAIL lines"
                    }
                );
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::BenchExec {
            image,
            rootfs,
            count,
            json,
        } => {
            clean_stale();
            let image = BootImage::load(&image)?;
            let r = kiln_shim::bench_exec::run(&cfg, &image, &rootfs, count).await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{r:#?}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cleanup => {
            let r = kiln_shim::state::cleanup_stale(&kiln_shim::process::runtime_base()?)?;
            for (name, pid) in &r.killed {
                println!("killed {name} (pid {pid})");
            }
            for m in &r.unmounted {
                println!("unmounted {}", m.display());
            }
            for d in &r.restored {
                println!("gave {d} back to its driver (was bound to vfio-pci)");
            }
            for d in &r.removed_dirs {
                println!("removed {}", d.display());
            }
            if r.removed_dirs.is_empty() {
                println!("nothing to clean");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run(args) => run_container(&cfg, args).await,
        Cmd::Exec {
            vm,
            container,
            tty,
            env,
            command,
        } => {
            let status = kiln_shim::exec::exec(
                &cfg,
                kiln_shim::exec::ExecRequest {
                    run_dir: &vm,
                    container: &container,
                    command: &command,
                    env: &env,
                    tty,
                },
            )
            .await?;
            Ok(ExitCode::from(status.clamp(0, 255) as u8))
        }
        Cmd::Agent {
            vm,
            unix,
            rpc,
            request,
        } => {
            let method = kiln_shim::rpc_cli::resolve(&rpc)?;
            let stream = match (vm, unix) {
                (Some(dir), None) => {
                    refuse_while_rings_are_set_up(&dir)?;
                    kiln_shim::vsock::connect(&dir.join("vm.vsock"), cfg.agent.port).await?
                }
                (None, Some(path)) => tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(|e| anyhow::anyhow!("connecting to {}: {e}", path.display()))?,
                _ => anyhow::bail!(
                    "say where the agent is: --vm RUN_DIR (from `boot --stay`) or --unix SOCKET"
                ),
            };
            let client =
                ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::new(stream));
            println!(
                "{}",
                method.call(&client, &request, cfg.rpc_timeout()).await?
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Boot(args) => boot(cfg, args).await,
    }
}

/// SIGINT, listened for from the start of a boot: `tokio::signal::ctrl_c()`
/// installs its handler only when first polled, so a Ctrl-C (or `cargo xtask
/// dev` stopping its VM) that came between two awaits took the default action
/// and killed the shim with its run directory and mounts left behind. Once
/// this exists, a SIGINT waits for the next `recv`, which tears the VM down.
fn listen_for_sigint() -> anyhow::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| anyhow::anyhow!("listening for SIGINT: {e}"))
}

/// `kiln-shim boot`.
async fn boot(cfg: ShimConfig, args: BootArgs) -> anyhow::Result<ExitCode> {
    let mut sigint = listen_for_sigint()?;
    let BootArgs {
        image,
        console,
        json,
        stay,
        until_console,
        rootfs,
        verity,
        share,
        smoke,
        kernel_params,
        network,
    } = args;
    clean_stale();
    let mut cfg = cfg.clone();
    if let Some(mode) = network {
        kiln_shim::config::check_network_mode("--network", &mode)?;
        cfg.hypervisor.qemu.network = mode;
    }
    if let Some(extra) = kernel_params {
        let q = &mut cfg.hypervisor.qemu;
        q.kernel_params = format!("{} {}", q.kernel_params.trim(), extra.trim())
            .trim()
            .to_string();
    }
    let share = share
        .map(|d| {
            d.canonicalize().map_err(|e| {
                anyhow::anyhow!(
                    "--share {}: {e}; give a root filesystem directory",
                    d.display()
                )
            })
        })
        .transpose()?;
    let image = BootImage::load(&installed::image(image)?)?;
    if let Some(marker) = until_console {
        return boot_until_console(&cfg, &image, rootfs, verity, &marker, json, &mut sigint).await;
    }
    let mut vm = Vm::launch(
        &image,
        &cfg,
        &BootOptions {
            console,
            rootfs,
            verity,
            share_rootfs: share
                .as_ref()
                .map(|d| (kiln_shim::smoke::CONTAINER.to_string(), d.clone())),
            ..Default::default()
        },
    )?;
    // Ctrl-C drops the VM (and with it QEMU, the backend and the run dir).
    let ready = tokio::select! {
        r = vm.wait_ready(&cfg) => r?,
        _ = sigint.recv() => anyhow::bail!("interrupted"),
    };
    let version = ready.client.version().await?;
    let details = ready.client.guest_details().await?;
    let secs = ready.elapsed.as_secs_f64();
    // Right after agent-ready, before any smoke step: what the idle guest
    // holds (`cargo xtask bench --kernel-cost` reads it from the JSON).
    let memory = if json {
        kiln_shim::bench_exec::GuestMemory::read(&ready.client)
            .await
            .map_err(|e| tracing::warn!("guest memory: {e:#}"))
            .ok()
    } else {
        None
    };
    let smoke_steps = if smoke {
        tokio::select! {
            r = kiln_shim::smoke::run(&ready.client, share.is_some()) => r?,
            _ = sigint.recv() => anyhow::bail!("interrupted"),
        }
    } else {
        Vec::new()
    };
    let report = BootReport {
        image: &image,
        vm: &vm,
        version: &version,
        details: &details,
        secs,
        memory,
        smoke_steps: &smoke_steps,
        run_dir: stay.then(|| vm.run_dir.path().display().to_string()),
    };
    report.print(json);
    if stay {
        eprintln!(
            "VM running; run directory {}\n  try: kiln-shim agent --vm {} GetGuestDetails{}\nCtrl-C stops it.",
            vm.run_dir.path().display(),
            vm.run_dir.path().display(),
            if smoke && share.is_some() {
                format!("\n       kiln-shim exec --vm {} -t -- sh", vm.run_dir.path().display())
            } else {
                String::new()
            }
        );
        tokio::select! {
            _ = sigint.recv() => {}
            _ = vm.wait_exit() => eprintln!("the VM exited"),
        }
    }
    vm.shutdown();
    Ok(ExitCode::SUCCESS)
}

/// `kiln-shim run`.
async fn run_container(cfg: &ShimConfig, args: RunArgs) -> anyhow::Result<ExitCode> {
    let RunArgs {
        image,
        bundle,
        rootfs,
        tty,
        env,
        console,
        disks,
        rootfs_via,
        devices,
        force,
        emulated_vfio,
        command,
    } = args;
    let mut vfio = kiln_shim::vfio::VfioOptions {
        host: devices
            .iter()
            .map(|d| kiln_shim::vfio::parse_device_arg(d))
            .collect::<anyhow::Result<_>>()?,
        emulated: emulated_vfio
            .iter()
            .map(|d| kiln_shim::vfio::parse_emulated(d))
            .collect::<anyhow::Result<_>>()?,
        force,
        viommu: false,
    };
    let disks = disks
        .iter()
        .enumerate()
        .map(|(i, d)| kiln_shim::run::DiskSpec::parse(d, i))
        .collect::<anyhow::Result<Vec<_>>>()?;
    clean_stale();
    let image = BootImage::load(&installed::image(image)?)?;
    let (spec, rootfs) = kiln_shim::spec::container_source(
        bundle.as_deref(),
        rootfs.as_deref(),
        &command,
        &env,
        tty,
    )?;
    // A bundle's /dev/vfio/<group> devices are groups to pass through.
    vfio.add_spec_groups(&spec);
    if !rootfs.is_dir() {
        anyhow::bail!(
            "the container's root filesystem {} is not a directory",
            rootfs.display()
        );
    }
    let image_arch = image.manifest.arch;
    let req = kiln_shim::run::RunRequest {
        image,
        spec,
        rootfs: rootfs.canonicalize()?,
        container_id: kiln_shim::run::new_container_id(),
        console,
        disks,
        rootfs_via: kiln_shim::rootfs_disk::RootfsVia::parse(&rootfs_via, image_arch)?,
        vfio,
    };
    let status = kiln_shim::run::run(cfg, req).await?;
    Ok(ExitCode::from(status.clamp(0, 255) as u8))
}

/// `boot --until-console`: launch, wait for `marker` on the console, report the time.
async fn boot_until_console(
    cfg: &ShimConfig,
    image: &BootImage,
    rootfs: Option<String>,
    verity: Option<String>,
    marker: &str,
    json: bool,
    sigint: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<ExitCode> {
    let opts = BootOptions {
        rootfs,
        verity,
        ..Default::default()
    };
    let mut vm = Vm::launch(image, cfg, &opts)?;
    let t = tokio::select! {
        r = vm.wait_console(marker, cfg.boot_timeout()) => r?,
        _ = sigint.recv() => anyhow::bail!("interrupted"),
    };
    if json {
        println!(
            "{}",
            serde_json::json!({ "image": image.manifest.image, "console_marker_seconds": t.as_secs_f64() })
        );
    } else {
        println!(
            "console showed {marker:?} {:.2} s after QEMU launch",
            t.as_secs_f64()
        );
    }
    vm.shutdown();
    Ok(ExitCode::SUCCESS)
}

/// What `boot` prints once the agent answered.
struct BootReport<'a> {
    image: &'a BootImage,
    vm: &'a Vm,
    version: &'a kiln_protocol::health::VersionCheckResponse,
    details: &'a kiln_protocol::agent::GuestDetailsResponse,
    secs: f64,
    memory: Option<kiln_shim::bench_exec::GuestMemory>,
    smoke_steps: &'a [kiln_shim::smoke::Step],
    run_dir: Option<String>,
}

impl BootReport<'_> {
    fn print(&self, json: bool) {
        if json {
            let out = serde_json::json!({
                "image": self.image.manifest.image,
                "arch": self.image.manifest.arch,
                "accel": self.vm.accel_note,
                "agent_ready_seconds": self.secs,
                "guest_memory_total_bytes": self.memory.map(|m| m.total_bytes),
                "guest_memory_used_bytes": self.memory.map(|m| m.used_bytes()),
                "agent_version": self.version.agent_version,
                "init_daemon": self.details.agent_details.init_daemon,
                "mem_block_size_bytes": self.details.mem_block_size_bytes,
                "support_mem_hotplug_probe": self.details.support_mem_hotplug_probe,
                "supports_seccomp": self.details.agent_details.supports_seccomp,
                "rootfs": self.vm.rootfs_note.as_deref().unwrap_or("initrd"),
                "run_dir": self.run_dir,
                "smoke": self.smoke_steps,
            });
            println!("{out}");
        } else {
            println!(
                "image:            {} ({}, kernel {})",
                self.image.manifest.image,
                self.image.manifest.arch,
                self.image.manifest.kernel_version
            );
            println!("accelerator:      {}", self.vm.accel_note);
            println!(
                "root filesystem:  {}",
                self.vm.rootfs_note.as_deref().unwrap_or("initrd")
            );
            println!(
                "agent version:    {} (init: {})",
                self.version.agent_version, self.details.agent_details.init_daemon
            );
            println!(
                "memory block:     {} bytes",
                self.details.mem_block_size_bytes
            );
            println!(
                "hotplug probe:    {}",
                self.details.support_mem_hotplug_probe
            );
            println!(
                "seccomp:          {}",
                self.details.agent_details.supports_seccomp
            );
            println!("agent ready in:   {:.2} s from QEMU launch", self.secs);
            for s in self.smoke_steps {
                println!("smoke {:<22}{:>8.1} ms  {}", s.step, s.ms, s.detail);
            }
        }
    }
}

/// A connection while the guest is still setting up its vsock rings would
/// leave the VM's backend deaf for good (see `vsock::BackendRings`).
fn refuse_while_rings_are_set_up(dir: &std::path::Path) -> anyhow::Result<()> {
    let Ok(state) = kiln_shim::state::RunState::load(dir) else {
        return Ok(());
    };
    let backend = state
        .children
        .iter()
        .find(|c| c.name == "vhost-device-vsock");
    if let Some(child) = backend {
        let rings = kiln_shim::vsock::backend_rings(std::path::Path::new("/proc"), child.pid);
        if rings == Some(kiln_shim::vsock::BackendRings::NotReady) {
            anyhow::bail!(
                "the guest in {} has not set up its vsock rings yet; connecting now would stop \
                 its vsock backend for good: wait until `boot --stay` prints that the agent is ready",
                dir.display()
            );
        }
    }
    Ok(())
}
