//! A container root filesystem made of the host's static busybox, for the
//! agent's container steps (`cargo xtask dev`'s smoke exec, the exec bench).

use std::path::Path;

use anyhow::Context;

const BUSYBOX: &str = "/bin/busybox";

/// Writes the tree into `root` (an empty or missing directory).
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
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    let list = duct::cmd!(busybox, "--list").read()?;
    for applet in list.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    Ok(())
}

/// A throwaway tree (removed on drop).
pub fn tempdir() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    write_tree(dir.path())?;
    Ok(dir)
}

/// A tree kept at `dir` across runs: written beside it, then renamed into
/// place, so an interrupted run never leaves half a tree there.
pub fn persistent(dir: &Path) -> anyhow::Result<()> {
    if dir.join("bin/busybox").exists() {
        return Ok(());
    }
    let parent = dir.parent().context("busybox tree has no parent")?;
    std::fs::create_dir_all(parent)?;
    let tmp = tempfile::tempdir_in(parent)?;
    write_tree(tmp.path())?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(tmp.keep(), dir)
        .with_context(|| format!("placing the busybox tree at {}", dir.display()))?;
    Ok(())
}
