//! The virtio-fs daemon (virtiofsd) that shares a host directory with the
//! guest under the tag the agent expects (`kataShared`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

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

pub use crate::id_shift::ID_RANGE;

/// virtiofsd's id translation for a mapped share: guest ids 0..65535 are
/// host ids `base`.., both ways, and a guest id above the range (which would
/// pass through untranslated, possibly onto a real host user) is refused. So
/// a setuid-root file the guest makes is setuid-`base` on the host.
///
/// Only half of the job: virtiofsd changes modes with its own (root) rights,
/// so a file owned by host root in the share could still be made setuid root
/// by the guest. Everything in the share must therefore be in the range:
/// [`crate::id_shift::shift_tree`] and the shim's own directories see to that.
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
}
