//! A build killed with SIGKILL in the middle of a stage: no tool it started
//! keeps running, and the next build trusts nothing half-made: it finishes
//! and gives byte for byte what an uninterrupted build gives.
//!
//! Each build writes to its own KILN_OUT_DIR, so the checkout's images are
//! untouched. The kernel stage is not killed here: its outputs live in the
//! shared cache and a rebuild costs minutes; it uses the same stamp protocol.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ARTIFACTS: &[&str] = &[
    "kiln-agent",
    "vmlinuz",
    "kernel.config",
    "initrd.img",
    "rootfs.img",
    "manifest.json",
    "sbom.spdx.json",
];

fn xtask(out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.args(["--no-setup", "build-image", "--arch", "x86_64"])
        .env("KILN_OUT_DIR", out)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap())
        .stdin(Stdio::null());
    c
}

fn image_dir(out: &Path) -> PathBuf {
    out.join("minimal/x86_64")
}

/// Processes (other than zombies) whose command line mentions `dir`.
fn tools_on(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let _: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let zombie = std::fs::read_to_string(e.path().join("stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(false);
            (cmd.contains(&needle) && !zombie).then_some(cmd)
        })
        .collect()
}

#[test]
#[ignore = "builds images; run by `cargo xtask test`"]
fn sigkill_in_any_stage_leaves_nothing_running_and_nothing_trusted() {
    let reference = tempfile::tempdir().unwrap();
    let out = xtask(reference.path()).output().unwrap();
    assert!(
        out.status.success(),
        "reference build: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    for stage in ["agent", "initrd", "rootfs.img", "manifest", "sbom"] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = xtask(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let marker = format!("[kiln] {stage} x86_64: started");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let seen = lines.by_ref().map_while(Result::ok).any(|l| l == marker);
        assert!(seen, "the build never started stage {stage}");
        // Into the stage's work (mke2fs/debugfs, compression, copying).
        std::thread::sleep(Duration::from_millis(150));
        child.kill().unwrap();
        child.wait().unwrap();

        // The kernel kills the tools with xtask (PR_SET_PDEATHSIG).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !tools_on(dir.path()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            tools_on(dir.path()).is_empty(),
            "killed in {stage}, still running: {:?}",
            tools_on(dir.path())
        );

        let again = xtask(dir.path()).output().unwrap();
        assert!(
            again.status.success(),
            "build after a kill in {stage}: {}",
            String::from_utf8_lossy(&again.stderr)
        );
        for a in ARTIFACTS {
            let want = std::fs::read(image_dir(reference.path()).join(a)).unwrap();
            let got = std::fs::read(image_dir(dir.path()).join(a))
                .unwrap_or_else(|e| panic!("{a} after a kill in {stage}: {e}"));
            assert!(
                want == got,
                "{a} differs from an uninterrupted build after a kill in {stage}"
            );
        }
        eprintln!("killed in {stage}: nothing left running, rebuild identical");
    }
}
