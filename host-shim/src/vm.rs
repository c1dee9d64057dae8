//! One VM's life: run directory, vsock backend, QEMU, and the agent connection.
//! Dropping a `Vm` tears everything down in reverse order.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::client::AgentClient;
use crate::config::ShimConfig;
use crate::image::BootImage;
use crate::process::{BindMount, ChildGuard, RunDir};
use crate::qemu::{self, HostKvm, QemuLaunch};
use crate::qmp::QmpClient;
use crate::state::RunState;
use crate::virtiofs::VirtioFs;
use crate::vsock::{BackendRings, VsockBackend};

#[derive(Default)]
pub struct BootOptions {
    /// Guest console to our stdout instead of a log file.
    pub console: bool,
    /// Container rootfs to share with the guest over virtio-fs (tag
    /// `kataShared`): (container id, host directory). It appears in the guest
    /// as `<share mount point>/<id>/rootfs`, Kata's layout.
    pub share_rootfs: Option<(String, PathBuf)>,
    /// Container rootfs to copy into an ext4 image and attach as a
    /// virtio-blk disk instead (`crate::rootfs_disk`): the host directory.
    pub rootfs_disk: Option<PathBuf>,
    /// Overrides `hypervisor.qemu.rootfs` ("initrd", "image", "nvdimm",
    /// "virtio-blk"), e.g. from `kiln-shim boot --rootfs`.
    pub rootfs: Option<String>,
    /// Overrides `hypervisor.qemu.rootfs_verity` ("auto", "on", "off"),
    /// e.g. from `kiln-shim boot --verity`.
    pub verity: Option<String>,
    /// Devices to pass through with VFIO, attached at boot.
    pub vfio: crate::vfio::VfioOptions,
}

pub struct Vm {
    // Field order is drop order: QEMU first, then its backends, then the directory.
    qemu: ChildGuard,
    /// Host devices bound to vfio-pci: given back once QEMU has let go.
    _vfio: Option<crate::vfio::VfioBinding>,
    vsock: VsockBackend,
    virtiofs: Option<VirtioFs>,
    /// Bind mounts into the shared directory; detached before the run dir goes.
    _mounts: Vec<BindMount>,
    pub run_dir: RunDir,
    pub console_log: Option<PathBuf>,
    pub qmp_socket: PathBuf,
    pub launched: Instant,
    pub accel_note: String,
    /// How the root filesystem was attached (None: the initrd).
    pub rootfs_note: Option<String>,
    /// Hot-plug capacity: root ports exist only on PCIe machines.
    hotplug_ports: u32,
    iothread: Option<String>,
    /// Devices passed through at boot, with their guest PCI paths.
    pub passed: Vec<crate::vfio::PassedDevice>,
    /// Where the guest finds the container's rootfs disk, if one was attached.
    pub container_disk: Option<crate::rootfs_disk::GuestDisk>,
    /// The virtio-fs share's host directory and the guest id map on it (0: none).
    share: Option<(PathBuf, u32)>,
}

/// A disk hot-plugged through QMP, and where the guest finds it.
#[derive(Debug, Clone)]
pub struct HotpluggedDisk {
    pub id: String,
    /// Kata-style guest PCI path, e.g. `10/00`.
    pub pci_path: String,
}

/// The first console line where dm-verity reports a corrupted block (the
/// kernel's "device-mapper: verity: 254:0: data block 7 is corrupted"): the
/// reason a verified root failed, which the panic after it would bury.
fn verity_failure(console: &Path) -> Option<String> {
    let text = std::fs::read(console).ok()?;
    String::from_utf8_lossy(&text)
        .lines()
        .find(|l| l.contains("verity") && l.contains("corrupted"))
        .map(|l| l.trim().to_string())
}

/// Time from QEMU launch to the agent's first `SERVING` answer.
pub struct Ready {
    pub client: AgentClient,
    pub elapsed: Duration,
}

impl Vm {
    pub fn launch(image: &BootImage, cfg: &ShimConfig, opts: &BootOptions) -> anyhow::Result<Vm> {
        // Decide (and check) the root device before anything is started.
        let (rootfs_key, rootfs_mode) = match &opts.rootfs {
            Some(m) => ("--rootfs", m.as_str()),
            None => (
                "hypervisor.qemu.rootfs",
                cfg.hypervisor.qemu.rootfs.as_str(),
            ),
        };
        let machine = match cfg.hypervisor.qemu.machine_type.as_str() {
            "" => qemu::profile(image.manifest.arch).machine.to_string(),
            m => m.to_string(),
        };
        let rootfs_choice = qemu::choose_rootfs_device(
            rootfs_key,
            rootfs_mode,
            image.manifest.arch,
            &machine,
            &cfg.hypervisor.qemu.firmware,
        )?;
        let rootfs_image = match &rootfs_choice {
            Some(_) => Some(image.rootfs_image()?),
            None => None,
        };
        let (verity_key, verity_mode) = match &opts.verity {
            Some(m) => ("--verity", m.as_str()),
            None => (
                "hypervisor.qemu.rootfs_verity",
                cfg.hypervisor.qemu.rootfs_verity.as_str(),
            ),
        };
        crate::config::check_verity_mode(verity_key, verity_mode)?;
        let verity = match (&rootfs_image, verity_mode) {
            (None, _) | (_, "off") => None,
            (Some(img), "on") => Some(img.layout.verity.clone().with_context(|| {
                format!(
                    "{verity_key} = \"on\", but image `{}` has no dm-verity tree: set `verity = true` under [rootfs] in image-manifests/{}.toml and rebuild",
                    image.manifest.image, image.manifest.image
                )
            })?),
            (Some(img), _) => img.layout.verity.clone(),
        };
        let rootfs_note = rootfs_choice.as_ref().map(|(device, why)| match &verity {
            None => why.clone(),
            Some(v) if *device == qemu::RootfsDevice::Nvdimm => format!(
                "{why}; DAX off: the root is verified by dm-verity (root hash {}), which cannot map DAX \
                 (set rootfs_verity = \"off\" for DAX without verification)",
                v.root_hash
            ),
            Some(v) => format!("{why}; verified by dm-verity (root hash {})", v.root_hash),
        });
        if let Some(note) = &rootfs_note {
            tracing::info!("{note}");
        }
        let run_dir = RunDir::create()?;
        let dir = run_dir.path().to_path_buf();
        let backend_log = File::create(dir.join("vsock.log"))?;
        let mut state = RunState::new(&dir);
        let vsock = VsockBackend::start(&cfg.vsock_backend(), &dir, backend_log)?;
        state.add("vhost-device-vsock", vsock.guard.pid())?;
        let q = &cfg.hypervisor.qemu;
        let mut mounts = Vec::new();
        let mut share = None;
        let virtiofs = match (&opts.share_rootfs, q.shared_fs.as_str()) {
            (Some((id, rootfs)), "virtio-fs") => {
                let shared = dir.join("shared");
                let target = shared.join(id).join("rootfs");
                let base = effective_id_map_base(q.virtio_fs_id_map_base);
                let mut daemon_args = q.virtio_fs_extra_args.clone();
                if base != 0 {
                    let n = crate::id_shift::shift_tree(rootfs, base).with_context(|| {
                        format!(
                            "re-owning {} into host ids {base}.. for the guest's id map \
                             (hypervisor.qemu.virtio_fs_id_map_base; 0 turns the map off)",
                            rootfs.display()
                        )
                    })?;
                    tracing::info!("{}: {n} entries re-owned into host ids {base}..", rootfs.display());
                    daemon_args.extend(crate::virtiofs::id_map_args(base));
                }
                state.add_mount(&target)?;
                mounts.push(BindMount::new(rootfs, &target)?);
                if base != 0 {
                    // The shim's own directories in the share, in the range too.
                    for d in [shared.as_path(), &shared.join(id)] {
                        std::os::unix::fs::lchown(d, Some(base), Some(base))?;
                    }
                }
                let fs = VirtioFs::start(Path::new(&q.virtio_fs_daemon), &daemon_args, &shared, &dir)?;
                state.add("virtiofsd", fs.guard.pid())?;
                share = Some((shared, base));
                Some(fs)
            }
            (Some(_), other) => anyhow::bail!(
                "a shared directory was asked for but hypervisor.qemu.shared_fs = \"{other}\"; set it to \"virtio-fs\""
            ),
            (None, _) => None,
        };

        let arch = image.manifest.arch;
        let container_image = dir.join("container-rootfs.img");
        let container_disk = match &opts.rootfs_disk {
            Some(tree) => {
                let size = crate::rootfs_disk::make_ext4(tree, &container_image)?;
                tracing::info!(
                    "container rootfs {} copied into a {} MiB ext4 disk",
                    tree.display(),
                    size >> 20
                );
                Some(crate::rootfs_disk::attachment(arch, "kiln_ctr_rootfs").1)
            }
            None => None,
        };

        let (vfio, passed) = passthrough(&opts.vfio, arch, &mut state)?;
        let viommu = opts.vfio.viommu
            || passed
                .iter()
                .any(|d| d.mode == crate::vfio::GuestMode::Vfio);

        let (accel, accel_note) = qemu::choose_accel(
            &cfg.hypervisor.qemu.accel,
            arch,
            &HostKvm::probe(std::path::Path::new("/")),
        );
        tracing::info!("{accel_note}");
        let console_log = (!opts.console).then(|| dir.join("console.log"));
        let qmp = dir.join("qmp.sock");
        let launch = QemuLaunch {
            arch,
            accel,
            config: &cfg.hypervisor.qemu,
            kernel: &image.kernel,
            initrd: &image.initrd,
            cmdline: &image.manifest.cmdline,
            vhost_vsock_socket: &vsock.vhost_socket,
            qmp_socket: &qmp,
            console_log: console_log.as_deref(),
            virtiofs_socket: virtiofs.as_ref().map(|v| v.socket.as_path()),
            rootfs: rootfs_choice
                .as_ref()
                .zip(rootfs_image.as_ref())
                .map(|((device, _), img)| qemu::RootfsDisk {
                    device: *device,
                    path: &img.path,
                    size: img.size,
                    filesystem: &img.layout.filesystem,
                    init: img.layout.init.as_deref(),
                    verity: verity.as_ref(),
                }),
            passthrough: &passed,
            viommu,
            network: crate::config::check_network_mode(
                "hypervisor.qemu.network",
                &cfg.hypervisor.qemu.network,
            )?,
            container_disk: container_disk.as_ref().map(|_| container_image.as_path()),
        };
        let hotplug_ports = if qemu::has_pcie_root_ports(arch, &launch.machine()?) {
            cfg.hypervisor.qemu.hotplug_root_ports
        } else {
            0
        };
        let iothread = (q.enable_iothreads && q.indep_iothreads > 0).then(|| qemu::iothread_id(0));
        let qemu_log = File::create(dir.join("qemu.log"))?;
        let mut cmd = Command::new(launch.binary()?);
        cmd.args(launch.args()?).stderr(qemu_log);
        if !opts.console {
            cmd.stdout(File::create(dir.join("qemu.out"))?);
        }
        let launched = Instant::now();
        let qemu = ChildGuard::spawn("qemu", &mut cmd)?;
        state.add("qemu", qemu.pid())?;
        Ok(Vm {
            qemu,
            _vfio: vfio,
            vsock,
            virtiofs,
            _mounts: mounts,
            run_dir,
            console_log,
            qmp_socket: qmp,
            launched,
            accel_note,
            rootfs_note,
            hotplug_ports,
            iothread,
            passed,
            container_disk,
            share,
        })
    }

    /// Hands `path`, which a runtime put into this VM's virtio-fs share after
    /// launch (Kata's ShareRootFilesystem and ShareFile flows: a container's
    /// `<cid>/rootfs`, a configMap, a file), to the guest: with the id map on,
    /// it is re-owned into the guest's range as the launch rootfs was, so guest
    /// root can write it and cannot make it setuid root on the host. Returns
    /// how many entries changed; a path outside the share is an error.
    pub fn hand_to_guest(&self, path: &Path) -> anyhow::Result<u64> {
        let Some((shared, base)) = &self.share else {
            anyhow::bail!(
                "this VM has no virtio-fs share to hand {} to",
                path.display()
            );
        };
        let real = entry_in_share(path, shared)?;
        if *base == 0 {
            return Ok(0);
        }
        crate::id_shift::shift_entry(&real, *base)
            .with_context(|| format!("re-owning {} into host ids {base}..", real.display()))
    }

    /// Waits until the agent answers `Check`, or fails naming why: QEMU died,
    /// the backend died, or the deadline passed (with the console's last lines).
    pub async fn wait_ready(&mut self, cfg: &ShimConfig) -> anyhow::Result<Ready> {
        let deadline = self.launched + cfg.boot_timeout();
        let port = cfg.agent.port;
        let mut last_err = String::from("no attempt yet");
        // Connect only once the backend serves both rings: a connection
        // while QEMU is still setting them up ends vhost-device-vsock's
        // worker thread for good (see `vsock::BackendRings`).
        let mut serving = false;
        loop {
            if let Some(status) = self.qemu.exited() {
                anyhow::bail!(
                    "QEMU exited ({status}) before the agent answered{}",
                    self.diagnostics()
                );
            }
            if let Some(why) = self.dead_helper() {
                anyhow::bail!("before the agent answered: {why}{}", self.diagnostics());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the agent did not answer within {:?} (last attempt: {last_err}){}",
                    cfg.boot_timeout(),
                    self.diagnostics()
                );
            }
            if !serving {
                match self.vsock.rings() {
                    Some(BackendRings::Serving) => {
                        tracing::debug!(
                            "vsock rings set up after {:.2} s",
                            self.launched.elapsed().as_secs_f64()
                        );
                        serving = true;
                    }
                    Some(BackendRings::NotReady) => {
                        last_err = "the guest's vsock driver has not set up its rings yet".into();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    // WorkerGone is reported by dead_helper above; None means
                    // the process just went, which the next round reports.
                    _ => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            match self.try_check(port, cfg.rpc_timeout(), deadline).await {
                Ok(client) => {
                    return Ok(Ready {
                        client,
                        elapsed: self.launched.elapsed(),
                    })
                }
                Err(e) => last_err = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One connection attempt. Before the guest's vsock driver is up, the
    /// backend holds the CONNECT until it can deliver it, so the attempt is
    /// kept open (up to 10 s) rather than abandoned and repeated: piling up
    /// abandoned requests has left vhost-device-vsock answering none of them
    /// after a slow boot. Returns early, with an error, when a helper dies.
    async fn try_check(
        &mut self,
        port: u32,
        rpc_timeout: Duration,
        deadline: Instant,
    ) -> anyhow::Result<AgentClient> {
        let uds = self.vsock.uds_path.clone();
        let attempt = crate::vsock::connect(&uds, port);
        tokio::pin!(attempt);
        let give_up = (Instant::now() + Duration::from_secs(10)).min(deadline);
        let stream = loop {
            tokio::select! {
                r = &mut attempt => break r?,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if self.dead_helper().is_some() {
                        anyhow::bail!("a helper process exited");
                    }
                    if Instant::now() >= give_up {
                        anyhow::bail!("vsock connect got no answer within 10 s");
                    }
                }
            }
        };
        let client = AgentClient::from_stream(stream, rpc_timeout);
        let status = client.check().await?;
        if status != kiln_protocol::health::health_check_response::ServingStatus::SERVING {
            anyhow::bail!("agent health is {status:?}");
        }
        Ok(client)
    }

    /// Pids of QEMU and the vsock backend (for tests that check nothing is left).
    pub fn pids(&self) -> Vec<u32> {
        let fs = self.virtiofs.as_ref().and_then(|v| v.guard.pid());
        [self.qemu.pid(), self.vsock.guard.pid(), fs]
            .into_iter()
            .flatten()
            .collect()
    }

    /// Whether a helper process (QEMU, vsock backend, virtiofsd) has died; the
    /// message names it. Callers poll this while waiting on the guest.
    pub fn dead_helper(&mut self) -> Option<String> {
        if let Some(s) = self.qemu.exited() {
            return Some(format!("QEMU exited ({s}){}", self.diagnostics()));
        }
        if let Some(s) = self.vsock.guard.exited() {
            return Some(format!("the vsock backend exited ({s})"));
        }
        if self.vsock.worker_gone() {
            return Some(
                "the vsock backend lost its vring_worker thread, so it will answer no connection \
                 again; restart the VM (vhost-device-vsock ends that thread when a host connection \
                 arrives while QEMU is still setting up the rings: connect only once `boot` reports \
                 the agent ready)"
                    .into(),
            );
        }
        if let Some(s) = self.virtiofs.as_mut().and_then(|v| v.guard.exited()) {
            return Some(format!(
                "virtiofsd exited ({s}); the container's files are gone"
            ));
        }
        None
    }

    /// The tail of the guest console and QEMU's stderr, for error messages.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        let dir = self.run_dir.path();
        if let Some(line) = self.console_log.as_deref().and_then(verity_failure) {
            out.push_str(&format!(
                "\nthe guest's dm-verity found the root image modified since it was built: {line}"
            ));
        }
        if let Some(log) = &self.console_log {
            out.push_str(&format!(
                "\n--- guest console (last lines) ---\n{}",
                tail(log, 20)
            ));
        }
        let q = tail(&dir.join("qemu.log"), 10);
        if !q.trim().is_empty() {
            out.push_str(&format!("\n--- qemu stderr ---\n{q}"));
        }
        let v = tail(&dir.join("vsock.log"), 10);
        if !v.trim().is_empty() {
            out.push_str(&format!("\n--- vsock backend ---\n{v}"));
        }
        out
    }

    /// Hot-plugs `file` as a virtio-blk disk into free root port `index`,
    /// on the first independent IOThread when there is one.
    pub fn hotplug_disk(&self, index: u32, file: &Path) -> anyhow::Result<HotpluggedDisk> {
        if index >= self.hotplug_ports {
            anyhow::bail!(
                "no free PCIe root port for disk {index}: this VM has {} (hypervisor.qemu.hotplug_root_ports; PCIe machines only)",
                self.hotplug_ports
            );
        }
        let file = file
            .canonicalize()
            .with_context(|| format!("disk image {}", file.display()))?;
        let mut qmp = self.qmp()?;
        let id = format!("kiln_disk{index}");
        let node = format!("{id}_node");
        qmp.blockdev_add_raw_file(&node, &file, false)?;
        let mut props = vec![("drive", serde_json::json!(node))];
        if let Some(t) = &self.iothread {
            props.push(("iothread", serde_json::json!(t)));
        }
        qmp.device_add(
            "virtio-blk-pci",
            &id,
            Some(&qemu::root_port_id(index)),
            &props,
        )?;
        Ok(HotpluggedDisk {
            id,
            pci_path: qemu::root_port_device_path(index),
        })
    }

    /// Hot-plugs a passed-through device into free root port `index`
    /// (a host device must already be bound to vfio-pci; an emulated one
    /// needs nothing); returns what to tell the agent.
    pub fn hotplug_vfio(
        &self,
        index: u32,
        backend: crate::vfio::Backend,
        mode: crate::vfio::GuestMode,
        host_group: u32,
    ) -> anyhow::Result<crate::vfio::PassedDevice> {
        if index >= self.hotplug_ports {
            anyhow::bail!(
                "no free PCIe root port {index} for a VFIO device: this VM has {} (hypervisor.qemu.hotplug_root_ports)",
                self.hotplug_ports
            );
        }
        let id = format!("kiln_hp_vfio{index}");
        let (driver, props) = match &backend {
            crate::vfio::Backend::Host(b) => ("vfio-pci", vec![("host", serde_json::json!(b.0))]),
            crate::vfio::Backend::Emulated { driver, .. } => (driver.as_str(), vec![]),
        };
        self.qmp()?
            .device_add(driver, &id, Some(&qemu::root_port_id(index)), &props)?;
        Ok(crate::vfio::PassedDevice {
            backend,
            mode,
            host_group,
            pci_path: qemu::root_port_device_path(index),
        })
    }

    /// Waits until the guest console shows `marker` (or QEMU exits after
    /// printing it); returns the time from launch. For measuring boots of
    /// images without an agent, such as a trivial /init.
    pub async fn wait_console(
        &mut self,
        marker: &str,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let log = self
            .console_log
            .clone()
            .context("the console goes to the terminal (--console); no log to watch")?;
        let deadline = self.launched + timeout;
        loop {
            let seen = std::fs::read(&log)
                .map(|b| String::from_utf8_lossy(&b).contains(marker))
                .unwrap_or(false);
            if seen {
                return Ok(self.launched.elapsed());
            }
            if let Some(status) = self.qemu.exited() {
                anyhow::bail!(
                    "QEMU exited ({status}) before the console showed {marker:?}{}",
                    self.diagnostics()
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the console did not show {marker:?} within {timeout:?}{}",
                    self.diagnostics()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Resolves when QEMU exits on its own.
    pub async fn wait_exit(&mut self) {
        while self.qemu.exited().is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A QMP connection to this VM's QEMU.
    /// Hot-plugs the next vCPU (needs `default_maxvcpus` room).
    pub fn hotplug_vcpu(&self, index: u32) -> anyhow::Result<crate::qmp::CpuSlot> {
        self.qmp()?.hotplug_vcpu(&format!("kiln_cpu{index}"))
    }

    /// Hot-plugs a DIMM of `size_mib` (needs `default_maxmemory` room).
    pub fn hotplug_memory(&self, index: u32, size_mib: u64) -> anyhow::Result<()> {
        self.qmp()?
            .hotplug_memory(&format!("kiln_dimm{index}"), size_mib)
    }

    pub fn qmp(&self) -> anyhow::Result<QmpClient> {
        QmpClient::connect(&self.qmp_socket, Duration::from_secs(5))
    }

    /// Stops the VM cleanly through QMP `quit`, falling back to signals; then
    /// its helpers (drop does the signal part too).
    pub fn shutdown(mut self) {
        if self.qemu.exited().is_none() {
            if let Ok(mut q) = QmpClient::connect(&self.qmp_socket, Duration::from_secs(1)) {
                q.quit();
                self.qemu.wait_exit(Duration::from_secs(5));
            }
        }
        self.qemu.stop(Duration::from_secs(5));
        self.vsock.guard.stop(Duration::from_secs(2));
        if let Some(fs) = self.virtiofs.as_mut() {
            fs.guard.stop(Duration::from_secs(2));
        }
    }
}

/// The id map base that applies: `configured` when the shim runs as root.
/// An unprivileged shim's virtiofsd runs as the caller and cannot make a
/// file root's or anyone else's, so there is nothing to map (and no right to
/// re-own the rootfs).
fn effective_id_map_base(configured: u32) -> u32 {
    if configured != 0 && !nix::unistd::geteuid().is_root() {
        tracing::info!(
            "hypervisor.qemu.virtio_fs_id_map_base: not root, so no id map (virtiofsd runs as you)"
        );
        return 0;
    }
    configured
}

/// Binds the requested host devices (recorded in the run state first) and
/// lays out every passed device behind its own root port (on pseries, in
/// its own slot of the passed devices' PHB).
#[allow(clippy::type_complexity)]
fn passthrough(
    opts: &crate::vfio::VfioOptions,
    arch: kiln_manifest::Arch,
    state: &mut RunState,
) -> anyhow::Result<(
    Option<crate::vfio::VfioBinding>,
    Vec<crate::vfio::PassedDevice>,
)> {
    use crate::vfio::{Backend, GuestMode, Host, PassedDevice, RealWriter, VfioBinding};
    let mut passed = Vec::new();
    let mut binding = None;
    if !opts.host.is_empty() {
        let host = Host::new("/", &RealWriter);
        let plans = host.plan(&opts.host)?;
        host.check_not_in_use(&plans, opts.force)?;
        binding = Some(VfioBinding::bind(Path::new("/"), &plans, &mut |b| {
            state.add_vfio(b)
        })?);
        for p in &plans {
            for d in &p.devices {
                passed.push((Backend::Host(d.bdf.clone()), p.mode, p.group));
            }
        }
    }
    for (i, e) in (0u32..).zip(&opts.emulated) {
        passed.push((e.clone(), GuestMode::Vfio, crate::vfio::emulated_group(i)));
    }
    let passed = (0u32..)
        .zip(passed)
        .map(|(i, (backend, mode, host_group))| PassedDevice {
            backend,
            mode,
            host_group,
            pci_path: crate::vfio::cold_device_path(arch, i),
        })
        .collect();
    Ok((binding, passed))
}

fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Where `path` is, as an entry inside the share `shared`: its directories
/// resolved, the entry itself not followed (a symlink handed over is
/// re-owned as a symlink, never its target). Anything that is not strictly
/// inside the share is an error.
fn entry_in_share(path: &Path, shared: &Path) -> anyhow::Result<PathBuf> {
    let Some(name) = path.file_name() else {
        anyhow::bail!(
            "{} names no entry to hand over (it ends in `..` or is `/`)",
            path.display()
        );
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let real = parent
        .canonicalize()
        .with_context(|| format!("resolving {}", parent.display()))?
        .join(name);
    let shared_real = shared
        .canonicalize()
        .with_context(|| format!("resolving the share {}", shared.display()))?;
    if !real.starts_with(&shared_real) || real == shared_real {
        anyhow::bail!(
            "{} is not inside the VM's share {}",
            path.display(),
            shared.display()
        );
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::entry_in_share;

    #[test]
    fn an_entry_handed_over_is_never_followed_out_of_the_share() {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("shared");
        std::fs::create_dir_all(share.join("c1/rootfs")).unwrap();
        std::os::unix::fs::symlink("/etc", share.join("c1/escape")).unwrap();
        std::os::unix::fs::symlink(dir.path(), share.join("up")).unwrap();
        let real_share = share.canonicalize().unwrap();
        // A symlink is the entry itself, not /etc.
        assert_eq!(
            entry_in_share(&share.join("c1/escape"), &share).unwrap(),
            real_share.join("c1/escape")
        );
        assert_eq!(
            entry_in_share(&share.join("c1/rootfs"), &share).unwrap(),
            real_share.join("c1/rootfs")
        );
        // A directory reached through a symlink that leaves the share is outside.
        let err = entry_in_share(&share.join("up/shared/../x"), &share);
        assert!(err.is_err());
        let err = entry_in_share(&share.join("up/outside"), &share).unwrap_err();
        assert!(
            err.to_string().contains("not inside the VM's share"),
            "{err}"
        );
        // `..` and the share itself name nothing to hand over.
        assert!(entry_in_share(&share.join("c1/.."), &share).is_err());
        let err = entry_in_share(&share, &share).unwrap_err();
        assert!(err.to_string().contains("not inside"), "{err}");
    }

    #[test]
    fn a_verity_corruption_line_is_found_in_the_console() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(
            &log,
            "[    1.2] virtio_blk virtio1: [vda] 45056 512-byte logical blocks\n\
             [    1.9] device-mapper: verity: 254:0: metadata block 5124 is corrupted\n\
             [    2.0] Kernel panic - not syncing: VFS: Unable to mount root fs\n",
        )
        .unwrap();
        assert_eq!(
            super::verity_failure(&log).as_deref(),
            Some("[    1.9] device-mapper: verity: 254:0: metadata block 5124 is corrupted")
        );
        std::fs::write(
            &log,
            "device-mapper: verity: sha256 using implementation \"sha256-generic\"\n",
        )
        .unwrap();
        assert_eq!(super::verity_failure(&log), None);
        assert_eq!(super::verity_failure(&dir.path().join("none")), None);
    }
}
