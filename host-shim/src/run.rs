//! `kiln-shim run`: one container in one VM, from launch to exit code.
//!
//! Shares the rootfs over virtio-fs in Kata's layout, creates the sandbox and
//! the container through the agent, streams stdio (or a pty with `-t`),
//! forwards SIGINT/SIGTERM, and exits with the container's status (128+N
//! for a signal). Every helper is owned by the `Vm`, so any exit path tears
//! everything down.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use kiln_protocol::agent;
use protobuf::MessageField;
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{signal, SignalKind};

use crate::client::AgentClient;
use crate::config::ShimConfig;
use crate::image::BootImage;
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
    let opts = BootOptions {
        console: req.console,
        share_rootfs: Some((cid.clone(), req.rootfs.clone())),
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
    let mut sandbox = agent::CreateSandboxRequest::new();
    sandbox.hostname = req.spec.hostname().clone().unwrap_or_else(|| "kiln".into());
    sandbox.sandbox_id = cid.to_string();
    sandbox.storages.push(share_storage());
    c.agent
        .create_sandbox(c.ctx(), &sandbox)
        .await
        .context("CreateSandbox")?;

    let (mut spec, sandbox_pidns) = agent_spec(&req.spec, cid)?;
    let mut create = agent::CreateContainerRequest::new();
    create.sandbox_pidns = sandbox_pidns;
    for (i, disk) in req.disks.iter().enumerate() {
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
        create.storages.push(s);
        let mut m = kiln_protocol::oci::Mount::new();
        m.destination = disk.dest.clone();
        m.source = mount_point;
        m.type_ = "bind".into();
        m.options = vec!["rbind".into(), "rw".into()];
        spec.Mounts.push(m);
    }
    for d in &vm.passed {
        tracing::info!(
            "{} passed through as {} at guest PCI path {}",
            d.backend.host_bdf(),
            d.mode.device_type(),
            d.pci_path
        );
        create.devices.push(d.agent_device());
    }
    create.container_id = cid.to_string();
    create.exec_id = cid.to_string();
    create.OCI = MessageField::some(spec);
    c.agent
        .create_container(c.ctx(), &create)
        .await
        .context("CreateContainer")?;
    let mut start = agent::StartContainerRequest::new();
    start.container_id = cid.to_string();
    c.agent
        .start_container(c.ctx(), &start)
        .await
        .context("StartContainer")?;

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

    let mut wait_req = agent::WaitProcessRequest::new();
    wait_req.container_id = cid.to_string();
    wait_req.exec_id = cid.to_string();
    let wait = c.agent.wait_process(no_deadline(), &wait_req);
    tokio::pin!(wait);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigwinch = signal(SignalKind::window_change())?;
    let mut health = tokio::time::interval(Duration::from_millis(500));
    let status = loop {
        tokio::select! {
            r = &mut wait => match r {
                Ok(resp) => break resp.status,
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
    let mut sandbox = agent::CreateSandboxRequest::new();
    sandbox.sandbox_id = id.into();
    sandbox.hostname = hostname.into();
    sandbox.storages.push(share_storage());
    c.agent
        .create_sandbox(c.ctx(), &sandbox)
        .await
        .context("CreateSandbox")?;
    let spec = crate::spec::default_spec(&["sleep".into(), "1000000000".into()], &[], false)?;
    let mut create = agent::CreateContainerRequest::new();
    create.container_id = id.into();
    create.exec_id = id.into();
    create.OCI = MessageField::some(protocol_spec(&spec, id)?);
    c.agent
        .create_container(c.ctx(), &create)
        .await
        .context("CreateContainer")?;
    let mut start = agent::StartContainerRequest::new();
    start.container_id = id.into();
    c.agent
        .start_container(c.ctx(), &start)
        .await
        .context("StartContainer")?;
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

/// A context without deadline, for calls that block until the container acts.
pub(crate) fn no_deadline() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

pub(crate) async fn forward(c: &AgentClient, cid: &str, exec_id: &str, sig: i32) {
    let mut r = agent::SignalProcessRequest::new();
    r.container_id = cid.to_string();
    r.exec_id = exec_id.to_string();
    r.signal = sig as u32;
    if let Err(e) = c.agent.signal_process(c.ctx(), &r).await {
        tracing::warn!("forwarding signal {sig}: {e}");
    }
}

pub(crate) async fn resize(c: &AgentClient, cid: &str, exec_id: &str) {
    let Some((rows, cols)) = terminal_size() else {
        return;
    };
    let mut r = agent::TtyWinResizeRequest::new();
    r.container_id = cid.to_string();
    r.exec_id = exec_id.to_string();
    r.row = rows.into();
    r.column = cols.into();
    let _ = c.agent.tty_win_resize(c.ctx(), &r).await;
}

fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: winsize is four integers; all zeroes is a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills `ws`; fd 0 may not be a tty, then it fails.
    let rc = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Copies the container's stdout (or stderr) to ours until the agent says EOF
/// (an empty answer) or the process is gone.
pub(crate) async fn copy_out(
    agent: kiln_protocol::agent_ttrpc::AgentServiceClient,
    cid: String,
    exec_id: String,
    err: bool,
) {
    let mut req = agent::ReadStreamRequest::new();
    req.container_id = cid;
    req.exec_id = exec_id;
    req.len = 64 * 1024;
    loop {
        let r = if err {
            agent.read_stderr(no_deadline(), &req).await
        } else {
            agent.read_stdout(no_deadline(), &req).await
        };
        let data = match r {
            Ok(resp) if !resp.data.is_empty() => resp.data,
            _ => break,
        };
        let written = if err {
            let mut e = std::io::stderr().lock();
            e.write_all(&data).and_then(|_| e.flush())
        } else {
            let mut o = std::io::stdout().lock();
            o.write_all(&data).and_then(|_| o.flush())
        };
        if written.is_err() {
            break;
        }
    }
}

/// Copies our stdin to the container's until EOF, then closes it there.
pub(crate) async fn copy_in(
    agent: kiln_protocol::agent_ttrpc::AgentServiceClient,
    cid: String,
    exec_id: String,
) {
    let mut input = tokio::io::stdin();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut w = agent::WriteStreamRequest::new();
        w.container_id = cid.clone();
        w.exec_id = exec_id.clone();
        w.data = buf[..n].to_vec();
        if agent.write_stdin(no_deadline(), &w).await.is_err() {
            return;
        }
    }
    let mut close = agent::CloseStdinRequest::new();
    close.container_id = cid;
    close.exec_id = exec_id;
    let _ = agent.close_stdin(no_deadline(), &close).await;
}

/// The host terminal in raw mode while a `-t` container runs; restored on drop.
pub(crate) struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    pub(crate) fn enter() -> Option<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
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
