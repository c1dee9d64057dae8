//! The virtio-fs daemon (virtiofsd) that shares a host directory with the
//! guest under the tag the agent expects (`kataShared`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use crate::process::{wait_for_path, ChildGuard};

/// The tag Kata's runtime and agent agree on.
pub const TAG: &str = "kataShared";

/// virtiofsd runs as root on the host for a guest whose workload is
/// untrusted. So: its own mount namespace rooted at the shared directory
/// (`--sandbox namespace`) and no `CAP_MKNOD` (a device node made in the
/// guest is refused, never a host device). Guest root stays host root for
/// ownership unless `hypervisor.qemu.virtio_fs_id_map_base` is set (see
/// [`id_map_args`]).
pub const HARDENING: &[&str] = &["--sandbox", "namespace", "--modcaps=-mknod"];

/// Ids one guest range covers: guest 0..65535 ⇄ host base..base+65535.
pub const ID_RANGE: u32 = 65536;

/// virtiofsd's id translation for a mapped share: guest ids 0..65535 are
/// host ids `base`.., both ways, and a guest id above the range (which would
/// pass through untranslated, possibly onto a real host user) is refused. So
/// a setuid-root file the guest makes is setuid-`base` on the host.
///
/// Only half of the job: virtiofsd changes modes with its own (root) rights,
/// so a file owned by host root in the share could still be made setuid root
/// by the guest. Everything in the share must therefore be in the range:
/// [`shift_tree`] and the shim's own directories see to that.
pub fn id_map_args(base: u32) -> Vec<String> {
    let above = u32::MAX - ID_RANGE;
    ["uid", "gid"]
        .iter()
        .flat_map(|k| {
            [
                format!("--translate-{k}=map:0:{base}:{ID_RANGE}"),
                format!("--translate-{k}=forbid-guest:{ID_RANGE}:{above}"),
            ]
        })
        .collect()
}

/// Re-owns a container's root filesystem into the guest's host id range
/// (uid/gid `n` < 65536 becomes `base + n`), as podman does for
/// `--userns=auto`: without it, host-root-owned files are both read-only to
/// the guest's root and chmod-able by it into setuid-root host files.
///
/// Symlinks are re-owned, never followed; other filesystems below `root`
/// are left alone; ids already in the range are skipped, so a second run
/// (or one after a crash half-way) costs one stat. The setuid/setgid bits
/// that chown clears are put back. File capabilities (`security.capability`
/// xattrs) are cleared by chown and not restored: such a binary loses them.
/// Returns how many entries were changed.
pub fn shift_tree(root: &Path, base: u32) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let top =
        std::fs::symlink_metadata(root).with_context(|| format!("reading {}", root.display()))?;
    if !top.is_dir() {
        anyhow::bail!("{} is not a directory", root.display());
    }
    // Children first (shift_entry's order): the root's owner, changed
    // last, marks a finished shift.
    shift_entry(root, top.dev(), base)
}

fn shift_entry(path: &Path, dev: u64, base: u32) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mut changed = 0;
    if meta.is_dir() && meta.dev() == dev {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))?
        {
            changed += shift_entry(&entry?.path(), dev, base)?;
        }
    }
    if meta.dev() == dev {
        changed += shift_one(path, &meta, base)?;
    }
    Ok(changed)
}

fn shift_one(path: &Path, meta: &std::fs::Metadata, base: u32) -> anyhow::Result<u64> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let shift = |id: u32| (id < ID_RANGE).then(|| base + id);
    let (uid, gid) = (shift(meta.uid()), shift(meta.gid()));
    if uid.is_none() && gid.is_none() {
        return Ok(0);
    }
    std::os::unix::fs::lchown(path, uid, gid)
        .with_context(|| format!("re-owning {} into the guest's id range", path.display()))?;
    let special = meta.mode() & 0o6000;
    if special != 0 && meta.file_type().is_file() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
            .with_context(|| format!("restoring the mode of {}", path.display()))?;
    }
    Ok(1)
}

pub struct VirtioFs {
    pub guard: ChildGuard,
    pub socket: PathBuf,
}

impl VirtioFs {
    pub fn start(
        binary: &Path,
        extra_args: &[String],
        shared_dir: &Path,
        run_dir: &Path,
    ) -> anyhow::Result<VirtioFs> {
        let socket = run_dir.join("virtiofs.sock");
        let log = std::fs::File::create(run_dir.join("virtiofsd.log"))?;
        let mut cmd = Command::new(binary);
        // No --tag: QEMU 7.1–8.0 crash on the CONFIG feature it enables; the
        // tag is set on the QEMU device instead.
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", shared_dir.display()))
            .args(HARDENING)
            .args(["--cache", "auto"])
            .args(extra_args)
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut guard = ChildGuard::spawn("virtiofsd", &mut cmd)?;
        wait_for_path(&socket, &mut guard, Duration::from_secs(10))?;
        Ok(VirtioFs { guard, socket })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn id_map_covers_both_kinds_and_forbids_the_rest() {
        assert_eq!(
            id_map_args(1 << 30),
            [
                "--translate-uid=map:0:1073741824:65536",
                "--translate-uid=forbid-guest:65536:4294901759",
                "--translate-gid=map:0:1073741824:65536",
                "--translate-gid=forbid-guest:65536:4294901759",
            ]
        );
    }

    #[test]
    fn shift_tree_reowns_without_following_links_and_keeps_setuid() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("note: skipped, chown needs root");
            return;
        }
        let base = 1 << 30;
        let host = tempfile::tempdir().unwrap();
        let outside = host.path().join("outside");
        std::fs::write(&outside, "host file").unwrap();
        let root = host.path().join("rootfs");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/su"), "x").unwrap();
        std::fs::set_permissions(root.join("bin/su"), std::fs::Permissions::from_mode(0o4755))
            .unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::fs::hard_link(root.join("bin/su"), root.join("su-again")).unwrap();
        std::fs::write(root.join("user"), "").unwrap();
        std::os::unix::fs::lchown(root.join("user"), Some(1000), Some(100)).unwrap();
        std::fs::write(root.join("big"), "").unwrap();
        std::os::unix::fs::lchown(root.join("big"), Some(70000), Some(70000)).unwrap();

        // bin, bin/su (one inode with su-again), link, user, rootfs itself.
        assert_eq!(shift_tree(&root, base).unwrap(), 5);
        let m = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap();
        assert_eq!((m("bin/su").uid(), m("bin/su").gid()), (base, base));
        assert_eq!(m("bin/su").mode() & 0o7777, 0o4755, "setuid kept");
        assert_eq!(
            (m("link").uid(), m("user").uid(), m("user").gid()),
            (base, base + 1000, base + 100)
        );
        assert_eq!(m("big").uid(), 70000, "out of range: left alone");
        assert_eq!(m(".").uid(), base);
        let o = std::fs::metadata(&outside).unwrap();
        assert_eq!(
            (o.uid(), o.gid()),
            (0, 0),
            "the link's target is not touched"
        );
        assert_eq!(
            shift_tree(&root, base).unwrap(),
            0,
            "a second run changes nothing"
        );
        assert!(shift_tree(&outside, base).is_err(), "not a directory");
    }
}
