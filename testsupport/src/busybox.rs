//! A container root filesystem made of the host's static busybox: the one
//! copy used by the end-to-end tests, the agent's host tests and xtask's dev
//! loop and exec bench.

use std::path::Path;
use std::process::Command;

use anyhow::Context;

const BUSYBOX: &str = "/bin/busybox";

/// Writes the tree into `root` (an empty or missing directory): `/bin/busybox`
/// with its applets as symlinks, `/etc/passwd` with root, and the usual empty
/// directories.
pub fn write_tree(root: &Path) -> anyhow::Result<()> {
    let busybox = Path::new(BUSYBOX);
    if !busybox.exists() {
        anyhow::bail!(
            "{BUSYBOX} is missing: apt-get install busybox-static (cargo xtask setup installs it)"
        );
    }
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(busybox, root.join("bin/busybox"))
        .with_context(|| format!("copying {BUSYBOX} into {}", root.display()))?;
    let list = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .context("running busybox --list")?;
    if !list.status.success() {
        anyhow::bail!("busybox --list failed: {}", list.status);
    }
    for applet in String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tree_has_busybox_applets_and_passwd() {
        if !std::path::Path::new(super::BUSYBOX).exists() {
            eprintln!("SKIPPED: no {}", super::BUSYBOX);
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        super::write_tree(dir.path()).unwrap();
        assert!(dir.path().join("bin/sh").is_symlink());
        assert!(std::fs::read_to_string(dir.path().join("etc/passwd"))
            .unwrap()
            .starts_with("root:x:0:0:"));
    }
}
