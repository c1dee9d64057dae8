//! The virtio-fs daemon (virtiofsd) that shares a host directory with the
//! guest under the tag the agent expects (`kataShared`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{wait_for_path, ChildGuard};

/// The tag Kata's runtime and agent agree on.
pub const TAG: &str = "kataShared";

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
            .args(["--sandbox", "none", "--cache", "auto"])
            .args(extra_args)
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut guard = ChildGuard::spawn("virtiofsd", &mut cmd)?;
        wait_for_path(&socket, &mut guard, Duration::from_secs(10))?;
        Ok(VirtioFs { guard, socket })
    }
}
