//! `kiln-shim run`: one container in one VM, from launch to exit code.
//!
//! Shares the rootfs over virtio-fs in Kata's layout, creates the sandbox and
//! the container through the agent, streams stdio (or a pty with `-t`),
//! forwards SIGINT/SIGTERM, and exits with the container's status (128+N
//! for a signal). Every helper is owned by the `Vm`, so any exit path tears
//! everything down.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use kiln_protocol::agent;
use tokio::signal::unix::{signal, SignalKind};

use crate::client::{AgentClient, ContainerExtras};
use crate::config::ShimConfig;
use crate::image::BootImage;
use crate::rootfs_disk::RootfsVia;
use crate::stdio::{copy_in, copy_out, forward, resize, RawTerminal};
use crate::vm::{BootOptions, Vm};

/// Where the agent mounts the `kataShared` share (Kata's path).
pub const SHARE_MOUNT_POINT: &str = "/run/kata-containers/shared/containers";
/// Where the agent mounts block storages for the sandbox.
pub const SANDBOX_STORAGE: &str = "/run/kata-containers/sandbox/storage";

pub struct RunRequest {
    pub image: BootImage,
    pub spec: oci_spec::runtime::Spec,
    /// Host directory holding the container's root filesystem.
    pub rootfs: PathBuf,
    pub container_id: String,
    pub console: bool,
    /// Disks to hot-plug and mount in the container.
    pub disks: Vec<DiskSpec>,
    /// How `rootfs` reaches the guest.
    pub rootfs_via: RootfsVia,
    /// Devices to pass through with VFIO.
    pub vfio: crate::vfio::VfioOptions,
}

/// `--disk FILE[:DEST[:FSTYPE]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub file: PathBuf,
    pub dest: String,
    pub fstype: String,
}

impl DiskSpec {
    pub fn parse(arg: &str, index: usize) -> anyhow::Result<DiskSpec> {
        let mut parts = arg.splitn(3, ':');
        let file = parts
            .next()
            .filter(|f| !f.is_empty())
            .context("--disk needs a file")?;
        let dest = parts
            .next()
            .filter(|d| !d.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| format!("/disk{index}"));
        let fstype = parts
            .next()
            .filter(|f| !f.is_empty())
            .unwrap_or("ext4")
            .to_string();
        if !dest.starts_with('/') || dest.split('/').any(|c| c == "..") {
            anyhow::bail!("--disk {arg}: the mount point `{dest}` must be absolute, without `..`");
        }
        Ok(DiskSpec {
            file: PathBuf::from(file),
            dest,
            fstype,
        })
    }
}

/// Runs the container; returns its exit status.
pub async fn run(cfg: &ShimConfig, req: RunRequest) -> anyhow::Result<i32> {
    let terminal = req
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    let cid = req.container_id.clone();
    let block = req.rootfs_via == RootfsVia::Block;
    let opts = BootOptions {
        console: req.console,
        share_rootfs: (!block).then(|| (cid.clone(), req.rootfs.clone())),
        rootfs_disk: block.then(|| req.rootfs.clone()),
        vfio: req.vfio.clone(),
        ..Default::default()
    };
    let mut vm = Vm::launch(&req.image, cfg, &opts)?;
    let ready = tokio::select! {
        r = vm.wait_ready(cfg) => r?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted while booting"),
    };
    tracing::info!("agent ready after {:.2} s", ready.elapsed.as_secs_f64());
    let client = ready.client;
    let result = drive(&mut vm, &client, &req, &cid, terminal).await;
    // Best effort: the VM goes away right after anyway.
    let mut rm = agent::RemoveContainerRequest::new();
    rm.container_id = cid;
    rm.timeout = 5;
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        client.agent.remove_container(client.ctx(), &rm),
    )
    .await;
    drop(client);
    vm.shutdown();
    result
}

async fn drive(
    vm: &mut Vm,
    c: &AgentClient,
    req: &RunRequest,
    cid: &str,
    terminal: bool,
) -> anyhow::Result<i32> {
    let hostname = req.spec.hostname().clone().unwrap_or_else(|| "kiln".into());
    // A rootfs on a disk needs no share (and s390x cannot mount one).
    let sandbox_storages = match vm.container_disk {
        Some(_) => vec![],
        None => vec![share_storage()],
    };
    c.create_sandbox(cid, &hostname, sandbox_storages)
        .await
        .context("CreateSandbox")?;
    let (mut spec, sandbox_pidns) = agent_spec(&req.spec, cid)?;
    let mut extras = ContainerExtras {
        sandbox_pidns,
        ..Default::default()
    };
    if let Some(disk) = &vm.container_disk {
        tracing::info!(
            "rootfs on a virtio-blk disk, guest {} {}",
            disk.driver,
            disk.source
        );
        extras.storages.push(rootfs_disk_storage(disk, cid));
    }
    plug_disks(vm, &req.disks, &mut spec, &mut extras)?;
    for d in &vm.passed {
        tracing::info!(
            "{} passed through as {} at guest PCI path {}",
            d.backend.host_bdf(),
            d.mode.device_type(),
            d.pci_path
        );
        extras.devices.push(d.agent_device());
    }
    c.create_container(cid, spec, extras)
        .await
        .context("CreateContainer")?;
    c.start_container(cid).await.context("StartContainer")?;
    attach(vm, c, cid, terminal).await
}

/// The container storage that mounts its rootfs disk where the spec's root
/// points (`<share mount point>/<id>/rootfs`), as Kata's runtime sends a
/// block-based rootfs.
pub fn rootfs_disk_storage(disk: &crate::rootfs_disk::GuestDisk, cid: &str) -> agent::Storage {
    let mut s = agent::Storage::new();
    s.driver = disk.driver.into();
    s.source = disk.source.clone();
    s.fstype = "ext4".into();
    s.mount_point = format!("{SHARE_MOUNT_POINT}/{cid}/rootfs");
    s
}

/// Hot-plugs each `--disk` and has the container bind-mount it.
fn plug_disks(
    vm: &mut Vm,
    disks: &[DiskSpec],
    spec: &mut kiln_protocol::oci::Spec,
    extras: &mut ContainerExtras,
) -> anyhow::Result<()> {
    for (i, disk) in disks.iter().enumerate() {
        let plugged = vm.hotplug_disk(i as u32, &disk.file)?;
        tracing::info!(
            "disk {} plugged as {} at guest PCI path {}",
            disk.file.display(),
            plugged.id,
            plugged.pci_path
        );
        let mount_point = format!("{SANDBOX_STORAGE}/{}", plugged.id);
        let mut s = agent::Storage::new();
        s.driver = "blk".into();
        s.source = plugged.pci_path;
        s.fstype = disk.fstype.clone();
        s.mount_point = mount_point.clone();
        extras.storages.push(s);
        let mut m = kiln_protocol::oci::Mount::new();
        m.destination = disk.dest.clone();
        m.source = mount_point;
        m.type_ = "bind".into();
        m.options = vec!["rbind".into(), "rw".into()];
        spec.Mounts.push(m);
    }
    Ok(())
}

/// Connects our stdio (or terminal) to the started container, forwards
/// signals until it exits and returns its status.
async fn attach(vm: &mut Vm, c: &AgentClient, cid: &str, terminal: bool) -> anyhow::Result<i32> {
    let _raw = if terminal { RawTerminal::enter() } else { None };
    let stdout = tokio::spawn(copy_out(
        c.agent.clone(),
        cid.to_string(),
        cid.to_string(),
        false,
    ));
    let stderr = (!terminal).then(|| {
        tokio::spawn(copy_out(
            c.agent.clone(),
            cid.to_string(),
            cid.to_string(),
            true,
        ))
    });
    let stdin = tokio::spawn(copy_in(c.agent.clone(), cid.to_string(), cid.to_string()));
    if terminal {
        resize(c, cid, cid).await;
    }

    let wait = c.wait_process_unbounded(cid, cid);
    tokio::pin!(wait);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigwinch = signal(SignalKind::window_change())?;
    let mut health = tokio::time::interval(Duration::from_millis(500));
    let status = loop {
        tokio::select! {
            r = &mut wait => match r {
                Ok(status) => break status,
                // A dying QEMU or backend shows up here first, as a broken
                // connection: name the real cause when there is one.
                Err(e) => match helper_death(vm).await {
                    Some(why) => anyhow::bail!("the VM failed while the container ran: {why}"),
                    None => return Err(anyhow::Error::new(e).context("WaitProcess")),
                },
            },
            _ = sigint.recv() => forward(c, cid, cid, libc::SIGINT).await,
            _ = sigterm.recv() => forward(c, cid, cid, libc::SIGTERM).await,
            _ = sigwinch.recv(), if terminal => resize(c, cid, cid).await,
            _ = health.tick() => {
                if let Some(why) = vm.dead_helper() {
                    anyhow::bail!("the VM failed while the container ran: {why}");
                }
            }
        }
    };
    stdin.abort();
    // Output written before the exit is still in the agent's pipes: drain it.
    let _ = tokio::time::timeout(Duration::from_secs(30), stdout).await;
    if let Some(e) = stderr {
        let _ = tokio::time::timeout(Duration::from_secs(30), e).await;
    }
    Ok(status)
}

/// Which helper died, if one did: polled for a second, since the broken
/// connection may be noticed before the process's exit is.
async fn helper_death(vm: &mut Vm) -> Option<String> {
    for _ in 0..10 {
        if let Some(why) = vm.dead_helper() {
            return Some(why);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// `spec` as the agent gets it: the protocol message, its root the rootfs
/// shared as `share_id` (Kata's layout), rewritten as Kata's runtime does
/// (see [`crate::spec::constrain_for_agent`]: among others no pid namespace,
/// the agent makes one; the sandbox's network namespace).
pub fn protocol_spec(
    spec: &oci_spec::runtime::Spec,
    share_id: &str,
) -> anyhow::Result<kiln_protocol::oci::Spec> {
    Ok(agent_spec(spec, share_id)?.0)
}

/// [`protocol_spec`] and the CreateContainer `sandbox_pidns` Kata's runtime
/// derives from the spec (true when its pid namespace had a path).
pub fn agent_spec(
    spec: &oci_spec::runtime::Spec,
    share_id: &str,
) -> anyhow::Result<(kiln_protocol::oci::Spec, bool)> {
    let (mut p, dropped) = crate::spec::to_protocol(spec)?;
    if !dropped.is_empty() {
        tracing::debug!("OCI keys without a protocol field: {dropped:?}");
    }
    p.Root.mut_or_insert_default().Path = format!("{SHARE_MOUNT_POINT}/{share_id}/rootfs");
    let sandbox_pidns = crate::spec::constrain_for_agent(&mut p);
    Ok((p, sandbox_pidns))
}

/// A sandbox on the virtio-fs share, then container `id` (its rootfs the
/// tree shared as `id`) sleeping in it, ready for execs: what the smoke
/// sequence and the exec bench start from.
pub async fn start_idle_container(c: &AgentClient, id: &str, hostname: &str) -> anyhow::Result<()> {
    c.create_sandbox(id, hostname, vec![share_storage()])
        .await
        .context("CreateSandbox")?;
    let spec = crate::spec::default_spec(&["sleep".into(), "1000000000".into()], &[], false)?;
    c.create_container(id, protocol_spec(&spec, id)?, ContainerExtras::default())
        .await
        .context("CreateContainer")?;
    c.start_container(id).await.context("StartContainer")?;
    Ok(())
}

/// The sandbox storage that mounts the virtio-fs share (`kataShared`).
pub fn share_storage() -> agent::Storage {
    let mut s = agent::Storage::new();
    s.driver = "virtio-fs".into();
    s.source = crate::virtiofs::TAG.into();
    s.fstype = "virtiofs".into();
    s.mount_point = SHARE_MOUNT_POINT.into();
    s
}

/// A container id from the clock and pid: unique per host, valid for the agent.
pub fn new_container_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("kiln-{:x}-{:x}", std::process::id(), nanos & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_storage_is_katas() {
        let s = share_storage();
        assert_eq!(
            (s.driver.as_str(), s.source.as_str(), s.fstype.as_str()),
            ("virtio-fs", "kataShared", "virtiofs")
        );
        assert_eq!(s.mount_point, SHARE_MOUNT_POINT);
    }

    #[test]
    fn disk_specs() {
        let d = DiskSpec::parse("/tmp/a.img", 0).unwrap();
        assert_eq!((d.dest.as_str(), d.fstype.as_str()), ("/disk0", "ext4"));
        let d = DiskSpec::parse("a.img:/data:xfs", 3).unwrap();
        assert_eq!(
            (d.file, d.dest.as_str(), d.fstype.as_str()),
            (PathBuf::from("a.img"), "/data", "xfs")
        );
        assert!(DiskSpec::parse("a.img:rel", 0).is_err());
        assert!(DiskSpec::parse("a.img:/x/../y", 0).is_err());
        assert!(DiskSpec::parse("", 0).is_err());
    }

    #[test]
    fn container_ids_are_plain() {
        let id = new_container_id();
        assert!(
            id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{id}"
        );
    }
}
