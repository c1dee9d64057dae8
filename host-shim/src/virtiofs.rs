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
/// guest is refused, never a host device). Not done: mapping guest root to
/// an unprivileged host uid (`--translate-uid`): virtiofsd then creates files
/// with that uid's rights, and container roots prepared by the host's root
/// become read-only to the container's root.
pub const HARDENING: &[&str] = &["--sandbox", "namespace", "--modcaps=-mknod"];

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
