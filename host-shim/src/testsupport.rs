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
