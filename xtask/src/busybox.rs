//! A container root filesystem made of the host's static busybox, for the
//! agent's container steps (`cargo xtask dev`'s smoke exec, the exec bench).

use std::path::Path;

use anyhow::Context;

/// Writes the tree into `root` (an empty or missing directory); the one
/// writer, shared with the tests, lives in kiln-testsupport.
pub fn write_tree(root: &Path) -> anyhow::Result<()> {
    kiln_testsupport::busybox::write_tree(root)
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
