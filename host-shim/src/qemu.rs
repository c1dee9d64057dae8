//! QEMU command lines for kiln guests, and the choice between KVM and TCG.

use std::path::Path;

use crate::config::QemuSection;

/// Per-arch QEMU facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchProfile {
    pub binary: &'static str,
    pub machine: &'static str,
    pub tcg_cpu: Option<&'static str>,
    /// How the serial console is attached.
    pub console: ConsoleKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleKind {
    /// `-serial chardev:ID` (8250 on x86, PL011 on arm, spapr-vty on pseries).
    Serial,
    /// `-device sclpconsole` on s390x.
    Sclp,
}

pub fn profile(arch: &str) -> anyhow::Result<ArchProfile> {
    Ok(match arch {
        "x86_64" => ArchProfile { binary: "qemu-system-x86_64", machine: "q35", tcg_cpu: Some("max"), console: ConsoleKind::Serial },
        "aarch64" => ArchProfile { binary: "qemu-system-aarch64", machine: "virt", tcg_cpu: Some("max"), console: ConsoleKind::Serial },
        "ppc64le" => ArchProfile { binary: "qemu-system-ppc64", machine: "pseries", tcg_cpu: None, console: ConsoleKind::Serial },
        "s390x" => ArchProfile { binary: "qemu-system-s390x", machine: "s390-ccw-virtio", tcg_cpu: None, console: ConsoleKind::Sclp },
        other => anyhow::bail!("the image is for `{other}`, which kiln-shim cannot boot (x86_64, aarch64, ppc64le, s390x)"),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Decides the accelerator; the string says why (for the log line).
pub fn choose_accel(setting: &str, guest_arch: &str, host: &HostKvm) -> (Accel, String) {
    match setting {
        "tcg" => (Accel::Tcg, "TCG requested in the configuration".into()),
        "kvm" => (Accel::Kvm, "KVM requested in the configuration".into()),
        _ => {
            if guest_arch != std::env::consts::ARCH {
                return (
                    Accel::Tcg,
                    format!(
                        "KVM cannot run a {guest_arch} guest on this {} host; using TCG",
                        std::env::consts::ARCH
                    ),
                );
            }
            match host.unusable_reason() {
                None => (Accel::Kvm, "KVM is usable".into()),
                Some(why) => (
                    Accel::Tcg,
                    format!("KVM is not usable ({why}); using TCG (software emulation, slower)"),
                ),
            }
        }
    }
}

/// What the host says about KVM, read through a root path for tests.
pub struct HostKvm {
    pub dev_kvm_rw: bool,
    pub modules: Vec<String>,
}

impl HostKvm {
    pub fn probe(root: &Path) -> HostKvm {
        let dev = root.join("dev/kvm");
        let dev_kvm_rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .is_ok();
        let modules = std::fs::read_dir(root.join("sys/module"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        HostKvm {
            dev_kvm_rw,
            modules,
        }
    }

    pub fn unusable_reason(&self) -> Option<String> {
        if !self.dev_kvm_rw {
            return Some("/dev/kvm is missing or not accessible".into());
        }
        let has = |m: &str| self.modules.iter().any(|x| x == m);
        // A paravirtual KVM flavour (PVM) accepts /dev/kvm ioctls but normal
        // guests hang in it; only kvm_intel/kvm_amd (or arm/ppc/s390 KVM) are trusted.
        if has("kvm_pvm") && !has("kvm_intel") && !has("kvm_amd") {
            return Some(
                "the host's KVM is the paravirtual PVM flavour, in which normal guests hang".into(),
            );
        }
        None
    }
}

/// Everything a command line is built from.
pub struct QemuLaunch<'a> {
    pub arch: &'a str,
    pub accel: Accel,
    pub config: &'a QemuSection,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    pub vhost_vsock_socket: &'a Path,
    pub qmp_socket: &'a Path,
    /// None: console to stdout.
    pub console_log: Option<&'a Path>,
    /// virtiofsd's socket when a directory is shared with the guest.
    pub virtiofs_socket: Option<&'a Path>,
}

/// Id of the i-th independent IOThread.
pub fn iothread_id(i: u32) -> String {
    format!("indep_iothread_{i}")
}

/// Id of the i-th PCIe root port kept free for hot-plugging.
pub fn root_port_id(i: u32) -> String {
    format!("kiln_rp{i}")
}

/// PCI slot of the first hot-plug root port on the root bus; port i sits at
/// slot BASE + i, so a device plugged into it has guest PCI path `<slot>/00`.
pub const ROOT_PORT_SLOT_BASE: u32 = 0x10;

/// Guest PCI path (Kata's notation: slots from the root bus, joined by `/`)
/// of the device in root port `i`.
pub fn root_port_device_path(i: u32) -> String {
    format!("{:02x}/00", ROOT_PORT_SLOT_BASE + i)
}

/// Whether the machine has a PCIe root complex to hang root ports on.
pub fn has_pcie_root_ports(arch: &str, machine: &str) -> bool {
    matches!((arch, machine), ("x86_64", "q35") | ("aarch64", "virt"))
}

impl QemuLaunch<'_> {
    pub fn binary(&self) -> anyhow::Result<String> {
        if !self.config.path.is_empty() {
            return Ok(self.config.path.clone());
        }
        Ok(profile(self.arch)?.binary.to_string())
    }

    /// The machine type this launch uses.
    pub fn machine(&self) -> anyhow::Result<String> {
        let p = profile(self.arch)?;
        Ok(if self.config.machine_type.is_empty() {
            p.machine.to_string()
        } else {
            self.config.machine_type.clone()
        })
    }

    pub fn args(&self) -> anyhow::Result<Vec<String>> {
        let p = profile(self.arch)?;
        let mem = self.config.default_memory;
        let machine = self.machine()?;
        let machine = machine.as_str();
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        // vhost-user devices need guest RAM the backend can map: a shared memfd.
        push(&[
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        ]);
        push(&["-machine", &format!("{machine},memory-backend=mem")]);
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => {
                push(&["-accel", "tcg"]);
                if let Some(cpu) = p.tcg_cpu {
                    push(&["-cpu", cpu]);
                }
            }
        }
        push(&[
            "-m",
            &format!("{mem}M"),
            "-smp",
            &self.config.default_vcpus.to_string(),
        ]);
        match self.console_log {
            Some(log) => push(&[
                "-chardev",
                &format!("file,id=console,path={}", log.display()),
            ]),
            None => push(&["-chardev", "stdio,id=console,signal=off"]),
        }
        match p.console {
            ConsoleKind::Serial => push(&["-serial", "chardev:console"]),
            ConsoleKind::Sclp => push(&["-device", "sclpconsole,chardev=console"]),
        }
        let mut cmdline = self.cmdline.trim().to_string();
        if !self.config.kernel_params.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(self.config.kernel_params.trim());
        }
        push(&["-kernel", &self.kernel.display().to_string()]);
        push(&["-initrd", &self.initrd.display().to_string()]);
        push(&["-append", &cmdline]);
        push(&[
            "-chardev",
            &format!("socket,id=vsock,path={}", self.vhost_vsock_socket.display()),
        ]);
        push(&["-device", "vhost-user-vsock-pci,chardev=vsock"]);
        if let Some(sock) = self.virtiofs_socket {
            push(&[
                "-chardev",
                &format!("socket,id=virtiofs,path={}", sock.display()),
            ]);
            push(&[
                "-device",
                &format!(
                    "vhost-user-fs-pci,chardev=virtiofs,tag={}",
                    crate::virtiofs::TAG
                ),
            ]);
        }
        if self.config.enable_iothreads {
            for i in 0..self.config.indep_iothreads {
                push(&["-object", &format!("iothread,id={}", iothread_id(i))]);
            }
        }
        if has_pcie_root_ports(self.arch, machine) {
            for i in 0..self.config.hotplug_root_ports {
                let id = root_port_id(i);
                push(&[
                    "-device",
                    &format!(
                        "pcie-root-port,id={id},chassis={},slot={},bus=pcie.0,addr={:#x}",
                        i + 1,
                        i + 1,
                        ROOT_PORT_SLOT_BASE + i
                    ),
                ]);
            }
        }
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", self.qmp_socket.display()),
        ]);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn pvm_host_falls_back_to_tcg() {
        let host = HostKvm {
            dev_kvm_rw: true,
            modules: vec!["kvm".into(), "kvm_pvm".into()],
        };
        let (accel, why) = choose_accel("auto", std::env::consts::ARCH, &host);
        assert_eq!(accel, Accel::Tcg);
        assert!(why.contains("PVM"), "{why}");
        let good = HostKvm {
            dev_kvm_rw: true,
            modules: vec!["kvm".into(), "kvm_intel".into()],
        };
        assert_eq!(
            choose_accel("auto", std::env::consts::ARCH, &good).0,
            Accel::Kvm
        );
        let none = HostKvm {
            dev_kvm_rw: false,
            modules: vec![],
        };
        assert_eq!(
            choose_accel("auto", std::env::consts::ARCH, &none).0,
            Accel::Tcg
        );
        assert_eq!(choose_accel("auto", "s390x-not-host", &good).0, Accel::Tcg);
        assert_eq!(
            choose_accel("tcg", std::env::consts::ARCH, &good).0,
            Accel::Tcg
        );
    }

    #[test]
    fn x86_command_line_has_shared_memory_and_vsock() {
        let cfg = QemuSection::default();
        let (k, i, v, q, c) = (
            PathBuf::from("/k"),
            PathBuf::from("/i"),
            PathBuf::from("/v.sock"),
            PathBuf::from("/q.sock"),
            PathBuf::from("/c.log"),
        );
        let launch = QemuLaunch {
            arch: "x86_64",
            accel: Accel::Tcg,
            config: &cfg,
            kernel: &k,
            initrd: &i,
            cmdline: "console=ttyS0",
            vhost_vsock_socket: &v,
            qmp_socket: &q,
            console_log: Some(&c),
            virtiofs_socket: None,
        };
        let args = launch.args().unwrap().join(" ");
        assert!(
            args.contains("memory-backend-memfd,id=mem,size=512M,share=on"),
            "{args}"
        );
        assert!(args.contains("-machine q35,memory-backend=mem"), "{args}");
        assert!(
            args.contains("vhost-user-vsock-pci,chardev=vsock"),
            "{args}"
        );
        assert!(args.contains("-accel tcg -cpu max"), "{args}");
        assert_eq!(launch.binary().unwrap(), "qemu-system-x86_64");
        assert!(
            !args.contains("iothread"),
            "no IOThreads unless enabled: {args}"
        );
        assert!(
            args.contains("pcie-root-port,id=kiln_rp0,chassis=1,slot=1,bus=pcie.0,addr=0x10"),
            "{args}"
        );
        assert_eq!(root_port_device_path(1), "11/00");
    }

    #[test]
    fn iothreads_and_virtiofs_when_configured() {
        let cfg = QemuSection {
            enable_iothreads: true,
            indep_iothreads: 2,
            ..Default::default()
        };
        let (k, i, v, q, f) = (
            PathBuf::from("/k"),
            PathBuf::from("/i"),
            PathBuf::from("/v"),
            PathBuf::from("/q"),
            PathBuf::from("/fs.sock"),
        );
        let launch = QemuLaunch {
            arch: "x86_64",
            accel: Accel::Tcg,
            config: &cfg,
            kernel: &k,
            initrd: &i,
            cmdline: "",
            vhost_vsock_socket: &v,
            qmp_socket: &q,
            console_log: None,
            virtiofs_socket: Some(&f),
        };
        let args = launch.args().unwrap().join(" ");
        assert!(
            args.contains(
                "-object iothread,id=indep_iothread_0 -object iothread,id=indep_iothread_1"
            ),
            "{args}"
        );
        assert!(!args.contains("indep_iothread_2"));
        assert!(
            args.contains("vhost-user-fs-pci,chardev=virtiofs,tag=kataShared"),
            "{args}"
        );
        assert!(args.contains("stdio,id=console"), "{args}");
    }
}
