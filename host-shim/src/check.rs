//! `kiln-shim check`, like `kata-runtime check`: can this host run kiln VMs,
//! and what is missing? Each line passes or fails with how to fix it; only
//! `required` lines decide the exit status.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_manifest::Arch;
use serde::Serialize;

use crate::config::ShimConfig;
use crate::qemu::{self, HostKvm};

#[derive(Serialize, Debug, Clone)]
pub struct CheckLine {
    pub name: String,
    pub ok: bool,
    /// A failed required line means no VM can run.
    pub required: bool,
    pub detail: String,
    /// How to fix a failure (empty when ok).
    pub fix: String,
}

fn line(name: &str, ok: bool, required: bool, detail: String, fix: &str) -> CheckLine {
    CheckLine {
        name: name.into(),
        ok,
        required,
        detail,
        fix: if ok { String::new() } else { fix.into() },
    }
}

pub fn which(name: &str) -> Option<std::path::PathBuf> {
    if name.contains('/') {
        return Path::new(name).exists().then(|| name.into());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs every check for guests of `arch`. With `kernel` (from `--image`),
/// KVM is probed by booting that kernel, which is the only reliable test.
pub fn run(cfg: &ShimConfig, arch: Arch, root: &Path, kernel: Option<&Path>) -> Vec<CheckLine> {
    let mut out = Vec::new();
    let qemu_path = check_qemu(cfg, arch, &mut out);
    check_accel(arch, root, kernel, qemu_path.as_deref(), &mut out);
    check_backends(cfg, &mut out);
    check_passthrough(root, &mut out);
    check_memory(cfg, root, &mut out);
    out
}

/// QEMU, its machine type and vhost-user devices; QEMU's path if found.
fn check_qemu(cfg: &ShimConfig, arch: Arch, out: &mut Vec<CheckLine>) -> Option<PathBuf> {
    let q = &cfg.hypervisor.qemu;
    let binary = if q.path.is_empty() {
        qemu::profile(arch).binary.to_string()
    } else {
        q.path.clone()
    };
    let qemu_path = which(&binary);
    let version = qemu_path
        .as_ref()
        .and_then(|p| output(Command::new(p).arg("--version")))
        .unwrap_or_default();
    out.push(line(
        "qemu",
        qemu_path.is_some(),
        true,
        if version.is_empty() { format!("{binary} not found") } else { version.lines().next().unwrap_or("").to_string() },
        "apt-get install qemu-system-x86 (or the arch's qemu-system-* package), or set hypervisor.qemu.path",
    ));
    if let Some(p) = &qemu_path {
        let machine = if q.machine_type.is_empty() {
            qemu::profile(arch).machine
        } else {
            &q.machine_type
        };
        let types = output(Command::new(p).args(["-machine", "help"])).unwrap_or_default();
        let has = types
            .lines()
            .any(|l| l.split_whitespace().next() == Some(machine));
        out.push(line(
            "machine type",
            has,
            true,
            format!("{machine} {}", if has { "available" } else { "missing" }),
            "use a QEMU that has this machine, or set hypervisor.qemu.machine_type",
        ));
        let devices = output(Command::new(p).args(["-device", "help"])).unwrap_or_default();
        for dev in ["vhost-user-vsock-pci", "vhost-user-fs-pci"] {
            let has = devices.contains(&format!("\"{dev}\""));
            out.push(line(
                dev,
                has,
                dev.contains("vsock"),
                format!(
                    "QEMU device {dev} {}",
                    if has { "available" } else { "missing" }
                ),
                "use QEMU 7.2 or newer built with vhost-user",
            ));
        }
    }

    qemu_path
}

/// KVM if it really runs guests, else TCG.
fn check_accel(
    arch: Arch,
    root: &Path,
    kernel: Option<&Path>,
    qemu_path: Option<&Path>,
    out: &mut Vec<CheckLine>,
) {
    let host = HostKvm::probe(root);
    let kvm = if !host.dev_kvm_rw {
        Err("/dev/kvm is missing or not accessible".to_string())
    } else if arch.name() != std::env::consts::ARCH {
        Err(format!(
            "a {arch} guest cannot use this {} host's KVM",
            std::env::consts::ARCH
        ))
    } else {
        match (qemu_path, kernel) {
            (None, _) => Err("no QEMU to probe with".into()),
            (Some(q), Some(k)) => probe_kvm(q, Some(k)),
            (Some(q), None) => match host.unusable_reason() {
                Some(why) => Err(format!(
                    "{why} (give --image to probe by booting its kernel)"
                )),
                None => probe_kvm(q, None),
            },
        }
    };
    let tcg_ok = qemu_path.is_some();
    match &kvm {
        Ok(d) => out.push(line("kvm", true, false, d.clone(), "")),
        Err(why) => out.push(line(
            "kvm",
            false,
            false,
            format!("{why}; TCG will be used (slower)"),
            "load kvm_intel or kvm_amd and give access to /dev/kvm for hardware speed",
        )),
    }
    out.push(line(
        "accelerator",
        kvm.is_ok() || tcg_ok,
        true,
        if kvm.is_ok() {
            "kvm".into()
        } else {
            "tcg (software emulation)".into()
        },
        "install QEMU",
    ));
}

/// The vsock backend and virtiofsd.
fn check_backends(cfg: &ShimConfig, out: &mut Vec<CheckLine>) {
    let q = &cfg.hypervisor.qemu;
    let vsock = which(&cfg.vsock.backend);
    out.push(line(
        "vsock backend",
        vsock.is_some(),
        true,
        format!(
            "{} {}",
            cfg.vsock.backend,
            if vsock.is_some() {
                "found"
            } else {
                "not found"
            }
        ),
        "cargo install --locked vhost-device-vsock (or `cargo xtask setup`)",
    ));
    let fs_needed = q.shared_fs == "virtio-fs";
    let vfsd = which(&q.virtio_fs_daemon);
    out.push(line(
        "virtiofsd",
        vfsd.is_some() || !fs_needed,
        false,
        format!(
            "{} {}",
            q.virtio_fs_daemon,
            if vfsd.is_some() {
                "found"
            } else {
                "not found (needed by `run`)"
            }
        ),
        "cargo install --locked virtiofsd (needs libseccomp-dev libcap-ng-dev)",
    ));
}

/// IOMMU groups and vfio-pci, for device passthrough.
fn check_passthrough(root: &Path, out: &mut Vec<CheckLine>) {
    let groups = std::fs::read_dir(root.join("sys/kernel/iommu_groups"))
        .map(|d| d.count())
        .unwrap_or(0);
    out.push(line(
        "iommu",
        groups > 0,
        false,
        format!("{groups} IOMMU group(s)"),
        "enable the IOMMU (intel_iommu=on / amd_iommu=on) for VFIO passthrough",
    ));
    let vfio = root.join("sys/module/vfio_pci").exists() || root.join("dev/vfio/vfio").exists();
    out.push(line(
        "vfio",
        vfio,
        false,
        if vfio {
            "vfio-pci loaded".into()
        } else {
            "vfio-pci not loaded".into()
        },
        "modprobe vfio-pci (needed only for --device vfio:...)",
    ));
}

/// Enough free memory for one VM.
fn check_memory(cfg: &ShimConfig, root: &Path, out: &mut Vec<CheckLine>) {
    let q = &cfg.hypervisor.qemu;
    let avail_mib = std::fs::read_to_string(root.join("proc/meminfo"))
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0);
    let need = u64::from(q.default_memory) + 128;
    out.push(line(
        "memory",
        avail_mib >= need,
        true,
        format!("{avail_mib} MiB available, a VM needs about {need} MiB"),
        "free memory or lower hypervisor.qemu.default_memory",
    ));
}

/// Starts QEMU with KVM and waits a bounded time for the guest to print:
/// the kernel's first console line when a kernel is given, else SeaBIOS on
/// the debug port. On a KVM that hangs guests (the PVM flavour hangs a Linux
/// kernel before its first message) nothing appears, and the probe says so
/// instead of hanging.
fn probe_kvm(qemu: &Path, kernel: Option<&Path>) -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let log = dir.path().join("probe.log");
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-accel",
        "kvm",
        "-machine",
        "q35",
        "-m",
        "128M",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
    ]);
    let (what, limit) = match kernel {
        Some(k) => {
            cmd.arg("-serial")
                .arg(format!("file:{}", log.display()))
                .arg("-kernel")
                .arg(k);
            cmd.args(["-append", "console=ttyS0 earlyprintk=serial panic=-1"]);
            ("its kernel", Duration::from_secs(10))
        }
        None => {
            cmd.arg("-debugcon")
                .arg(format!("file:{}", log.display()))
                .args(["-global", "isa-debugcon.iobase=0x402"]);
            ("its firmware", Duration::from_secs(5))
        }
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    let start = Instant::now();
    let result = loop {
        if std::fs::read(&log).map(|b| !b.is_empty()).unwrap_or(false) {
            break Ok(format!(
                "a KVM guest started {what} in {:.2} s",
                start.elapsed().as_secs_f64()
            ));
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!("QEMU with -accel kvm exited at once ({status})"));
        }
        if start.elapsed() > limit {
            break Err(format!(
                "a KVM guest printed nothing from {what} in {} s: this KVM hangs guests",
                limit.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A VM can run when every required line passed.
pub fn can_run(lines: &[CheckLine]) -> bool {
    lines.iter().all(|l| l.ok || !l.required)
}

pub fn print(lines: &[CheckLine]) {
    for l in lines {
        let mark = if l.ok {
            "PASS"
        } else if l.required {
            "FAIL"
        } else {
            "WARN"
        };
        println!("{mark:<4}  {:<22} {}", l.name, l.detail);
        if !l.fix.is_empty() {
            println!("      {:<22} fix: {}", "", l.fix);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_fail_with_fixes_in_a_fake_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("proc")).unwrap();
        std::fs::write(
            root.path().join("proc/meminfo"),
            "MemTotal: 100 kB\nMemAvailable: 2048000 kB\n",
        )
        .unwrap();
        let mut cfg = ShimConfig::default();
        cfg.hypervisor.qemu.path = "/nonexistent/qemu".into();
        cfg.vsock.backend = "/nonexistent/vhost-device-vsock".into();
        let lines = run(&cfg, Arch::X86_64, root.path(), None);
        let get = |n: &str| lines.iter().find(|l| l.name == n).unwrap().clone();
        assert!(!get("qemu").ok && get("qemu").fix.contains("apt-get"));
        assert!(!get("vsock backend").ok && get("vsock backend").fix.contains("cargo install"));
        assert!(get("memory").ok, "{:?}", get("memory"));
        assert!(!get("kvm").ok, "no /dev/kvm in the fake root");
        assert!(!get("iommu").ok && !get("iommu").required);
        assert!(!can_run(&lines));
    }
}
