//! Helpers the end-to-end tests share (public so every test binary can use
//! them; nothing in the shim itself calls them).

use std::path::Path;
use std::process::Command;

use anyhow::Context;

/// Fills `root` with a container root filesystem: the host's static
/// `/bin/busybox` with its applets as symlinks, `/etc/passwd` with root, and
/// the usual empty directories (plus `/data`).
pub fn busybox_rootfs(root: &Path) -> anyhow::Result<()> {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root", "data"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("copying /bin/busybox (busybox-static is installed by `cargo xtask setup`)")?;
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .context("running busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    Ok(())
}

/// A booted VM whose sandbox mounts the virtio-fs share, a busybox-style
/// rootfs shared under one container id: where the container tests start.
pub struct SandboxVm {
    pub vm: crate::vm::Vm,
    pub client: crate::client::AgentClient,
    /// The shared rootfs on the host; lives as long as the VM uses it.
    pub rootfs: tempfile::TempDir,
    /// The VM's run directory base (`KILN_RUN_DIR`), removed last.
    pub run_base: tempfile::TempDir,
}

/// Boots `manifest` with `rootfs` shared as `share_id`, waits for the agent
/// and creates `sandbox` with the share's storage added. Errors carry the
/// VM's console and backend logs, so a failed boot explains itself.
pub async fn boot_sandbox(
    cfg: &crate::config::ShimConfig,
    manifest: &Path,
    rootfs: tempfile::TempDir,
    share_id: &str,
    mut sandbox: kiln_protocol::agent::CreateSandboxRequest,
) -> anyhow::Result<SandboxVm> {
    let run_base = tempfile::tempdir()?;
    std::env::set_var("KILN_RUN_DIR", run_base.path());
    let image = crate::image::BootImage::load(manifest)?;
    let opts = crate::vm::BootOptions {
        share_rootfs: Some((share_id.into(), rootfs.path().to_path_buf())),
        ..Default::default()
    };
    let mut vm = crate::vm::Vm::launch(&image, cfg, &opts)?;
    let ready = match vm.wait_ready(cfg).await {
        Ok(r) => r,
        Err(e) => anyhow::bail!("the agent never answered: {e:#}"),
    };
    eprintln!(
        "agent ready after {:.2} s ({})",
        ready.elapsed.as_secs_f64(),
        vm.accel_note
    );
    sandbox.storages.push(crate::run::share_storage());
    if let Err(e) = ready
        .client
        .agent
        .create_sandbox(ready.client.ctx(), &sandbox)
        .await
    {
        anyhow::bail!("CreateSandbox: {e:?}{}", vm.diagnostics());
    }
    Ok(SandboxVm {
        vm,
        client: ready.client,
        rootfs,
        run_base,
    })
}
