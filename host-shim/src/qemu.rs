//! QEMU command lines for kiln guests, and the choice between KVM and TCG.

use std::path::Path;

use kiln_manifest::Arch;

use crate::config::QemuSection;

/// Per-arch QEMU facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchProfile {
    pub binary: &'static str,
    pub machine: &'static str,
    /// Options of the default machine (not added when the configuration
    /// names another machine type).
    pub machine_opts: &'static str,
    pub tcg_cpu: Option<&'static str>,
    /// Machine options appended under TCG only (features TCG cannot emulate).
    pub tcg_machine_opts: &'static str,
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

/// The QEMU facts for `arch` (binary and machine from [`Arch`], the rest
/// kiln-shim's choice of options).
pub fn profile(arch: Arch) -> ArchProfile {
    let p = |machine_opts, tcg_cpu, tcg_machine_opts, console| ArchProfile {
        binary: arch.qemu_binary(),
        machine: arch.qemu_machine(),
        machine_opts,
        tcg_cpu,
        tcg_machine_opts,
        console,
    };
    match arch {
        Arch::X86_64 => p("", Some("max"), "", ConsoleKind::Serial),
        // virt's default CPU (cortex-a15) is 32-bit only: TCG needs an arm64 model.
        Arch::Aarch64 => p("", Some("max"), "", ConsoleKind::Serial),
        // x-vof=on: QEMU's minimal Virtual Open Firmware instead of SLOF boots a
        // -kernel guest to agent-ready in about 2 s instead of 14 s under TCG.
        // pseries asks for Spectre mitigations by default, which TCG cannot
        // provide ("TCG doesn't support requested feature" warnings); say broken.
        Arch::Ppc64le => p(
            "x-vof=on",
            None,
            "cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,cap-ccf-assist=off",
            ConsoleKind::Serial,
        ),
        Arch::S390x => p("", None, "", ConsoleKind::Sclp),
    }
}

/// Persistent memory sizes must be multiples of this (QEMU aligns nvdimm
/// regions to 2 MiB and the kernel's PFN layout assumes it).
pub const PMEM_ALIGN: u64 = 2 << 20;

/// Whether kiln-shim can give this arch and machine a persistent-memory
/// device. QEMU 7.2 has `-device nvdimm` (ACPI NFIT) on x86 q35; virt needs
/// ACPI from UEFI firmware (no NFIT with -kernel and a device tree: `firmware`), pseries
/// needs labelled namespaces created in the guest, s390x has none, and
/// virtio-pmem-pci exists only in the x86 binary.
pub fn supports_pmem(arch: Arch, machine: &str, firmware: bool) -> bool {
    (arch, machine) == (Arch::Ppc64le, "pseries") || supports_nvdimm_root(arch, machine, firmware)
}

/// Whether the rootfs image can be the root on an NVDIMM (on pseries the
/// image must be labelled, as kiln builds ppc64le images).
pub fn supports_nvdimm_root(arch: Arch, machine: &str, firmware: bool) -> bool {
    matches!(
        (arch, machine),
        (Arch::X86_64, "q35") | (Arch::Ppc64le, "pseries")
    ) || (firmware && (arch, machine) == (Arch::Aarch64, "virt"))
}

/// pseries NVDIMMs (`spapr-nvdimm`): QEMU wants the size without the label
/// area to be a multiple of this, and `maxmem` aligned to it.
pub const PSERIES_NVDIMM_BLOCK: u64 = 256 << 20;

/// The uuid of the i-th pseries NVDIMM (`spapr-nvdimm,uuid=`, the guest's
/// `ibm,unit-guid`): [`kiln_disk::nslabel::KILN_DIMM_UUID`], whose first half
/// makes the interleave-set cookie kiln's labels carry, with the index last.
pub fn pseries_nvdimm_uuid(index: u8) -> String {
    let mut b = kiln_disk::nslabel::KILN_DIMM_UUID;
    b[15] = index;
    format!(
        "{}-{}-{}-{}-{}",
        hex(&b[..4]),
        hex(&b[4..6]),
        hex(&b[6..8]),
        hex(&b[8..10]),
        hex(&b[10..])
    )
}

/// Whether a file of `size` bytes can back a pseries NVDIMM: whole 256 MiB
/// blocks, then kiln's label area.
fn pseries_nvdimm_file(size: u64) -> bool {
    let label = kiln_disk::nslabel::LABEL_AREA_SIZE as u64;
    size > label && (size - label).is_multiple_of(PSERIES_NVDIMM_BLOCK)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Debian's edk2 build for QEMU's aarch64 `virt` (package qemu-efi-aarch64).
pub const AARCH64_EDK2: &str = "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd";

/// Whether an aarch64 NVDIMM can have firmware: the configured one, or
/// Debian's edk2 where it is installed.
fn aarch64_firmware_available(configured: &str) -> bool {
    !configured.is_empty() || Path::new(AARCH64_EDK2).exists()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Decides the accelerator; the string says why (for the log line).
pub fn choose_accel(setting: &str, guest_arch: Arch, host: &HostKvm) -> (Accel, String) {
    match setting {
        "tcg" => (Accel::Tcg, "TCG requested in the configuration".into()),
        "kvm" => (Accel::Kvm, "KVM requested in the configuration".into()),
        _ => {
            if guest_arch.name() != std::env::consts::ARCH {
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
    pub arch: Arch,
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
    /// The image's root filesystem as a disk; then `initrd` is not used.
    pub rootfs: Option<RootfsDisk<'a>>,
    /// Devices passed through cold, each behind its own pcie-root-port
    /// (`crate::vfio::cold_port_id(i)`).
    pub passthrough: &'a [crate::vfio::PassedDevice],
    /// Give the guest a virtual IOMMU (`intel-iommu`), so it can use
    /// vfio-pci itself (devices passed as `vfio-pci`, cold or hot-plugged).
    pub viommu: bool,
    /// A NIC, if any (`hypervisor.qemu.network`).
    pub network: Network,
    /// A container's rootfs image, attached as `crate::rootfs_disk` says.
    pub container_disk: Option<&'a Path>,
}

/// The guest's network link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// No NIC (the default: a kiln guest talks to its host over vsock only).
    #[default]
    None,
    /// One virtio-net NIC (MAC [`usernet::MAC`]) on QEMU's user-mode network
    /// (slirp: no privileges, no host interface), IPv4 and IPv6. The guest's
    /// addresses and routes are the runtime's to set (UpdateInterface,
    /// UpdateRoutes), as Kata's runtime does for a pod's interface.
    User,
}

/// Facts of QEMU's user-mode network as kiln-shim configures it (QEMU's
/// defaults): what a runtime gives the guest through UpdateInterface and
/// UpdateRoutes. Connections from the guest to the host addresses reach the
/// host's loopback (127.0.0.1, ::1).
pub mod usernet {
    /// The NIC's MAC address ("kil" in its last three bytes).
    pub const MAC: &str = "52:54:00:6b:69:6c";
    pub const GUEST_V4: &str = "10.0.2.15";
    pub const PREFIX_V4: u8 = 24;
    /// The virtual router, which is also the host.
    pub const GATEWAY_V4: &str = "10.0.2.2";
    pub const GUEST_V6: &str = "fec0::15";
    pub const PREFIX_V6: u8 = 64;
    /// The virtual router's IPv6 address, also the host.
    pub const GATEWAY_V6: &str = "fec0::2";
    /// The guest's MTU on it (slirp's default).
    pub const MTU: u32 = 1500;
}

/// The virtio-net device for `arch`: PCI everywhere but on s390x (channel I/O).
/// PCI NICs get no option ROM: guests boot with -kernel, never from the network.
pub fn nic_device(arch: Arch, netdev: &str, mac: &str) -> String {
    if arch == Arch::S390x {
        format!("virtio-net-ccw,netdev={netdev},mac={mac}")
    } else {
        format!("virtio-net-pci,netdev={netdev},mac={mac},romfile=")
    }
}

/// How the rootfs image is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsDevice {
    /// `-device nvdimm`: the guest's /dev/pmem0, mounted with DAX.
    Nvdimm,
    /// A read-only virtio-blk disk: the guest's /dev/vda.
    VirtioBlk,
}

/// A rootfs image (kiln-disk's layout: partition 1 in both views) to boot from.
#[derive(Debug, Clone, Copy)]
pub struct RootfsDisk<'a> {
    pub device: RootfsDevice,
    pub path: &'a Path,
    pub size: u64,
    /// "ext4" or "erofs".
    pub filesystem: &'a str,
    /// PID 1 if not the kernel's default (/sbin/init).
    pub init: Option<&'a str>,
    /// Open the root through dm-verity with this tree (from manifest.json).
    pub verity: Option<&'a kiln_manifest::VerityRecord>,
}

/// Resolves `hypervisor.qemu.rootfs` (or `--rootfs`) for a machine: None for
/// "initrd", else the device and a sentence for the log. Asking for DAX
/// ("nvdimm") where the machine has no NVDIMM is an error, never a silent
/// fallback; "image" picks the best the machine has and says so.
pub fn choose_rootfs_device(
    key: &str,
    setting: &str,
    arch: Arch,
    machine: &str,
    firmware: &str,
) -> anyhow::Result<Option<(RootfsDevice, String)>> {
    crate::config::check_rootfs_mode(key, setting)?;
    // "image" takes an NVDIMM only where no firmware boot is needed or one
    // was configured; "nvdimm" asks for it, and then gets Debian's edk2.
    let nvdimm = supports_nvdimm_root(arch, machine, !firmware.is_empty());
    let asked_nvdimm = supports_nvdimm_root(arch, machine, aarch64_firmware_available(firmware));
    Ok(match setting {
        "initrd" => None,
        "virtio-blk" => Some((
            RootfsDevice::VirtioBlk,
            "rootfs image on virtio-blk (/dev/vda1, no DAX), as configured".into(),
        )),
        "nvdimm" if asked_nvdimm => Some((
            RootfsDevice::Nvdimm,
            "rootfs image on an NVDIMM (/dev/pmem0p1, DAX)".into(),
        )),
        "nvdimm" if (arch, machine) == (Arch::Aarch64, "virt") => anyhow::bail!(
            "{key} = \"nvdimm\" on aarch64 virt needs UEFI firmware, whose ACPI NFIT describes the NVDIMM: \
             install Debian's qemu-efi-aarch64 ({AARCH64_EDK2}) or set hypervisor.qemu.firmware"
        ),
        "nvdimm" => anyhow::bail!(
            "{key} = \"nvdimm\" asks for a DAX root on an NVDIMM, but kiln-shim has no NVDIMM for {arch} {machine} \
             (QEMU 7.2 offers -device nvdimm with ACPI NFIT on x86_64 q35 and on aarch64 virt booted through UEFI, \
             and spapr-nvdimm on ppc64le pseries); \
             use \"virtio-blk\" (no DAX) or \"image\""
        ),
        _ if nvdimm => Some((
            RootfsDevice::Nvdimm,
            "rootfs image on an NVDIMM (/dev/pmem0p1, DAX), the best this machine has".into(),
        )),
        _ if asked_nvdimm => Some((
            RootfsDevice::VirtioBlk,
            format!(
                "rootfs image on virtio-blk (/dev/vda1), no DAX: an NVDIMM on {arch} {machine} needs a UEFI boot \
                 (set hypervisor.qemu.firmware, or ask for \"nvdimm\")"
            ),
        )),
        _ => Some((
            RootfsDevice::VirtioBlk,
            format!("rootfs image on virtio-blk (/dev/vda1): {arch} {machine} has no NVDIMM, so no DAX"),
        )),
    })
}

/// Name of the device-mapper device kiln-shim makes for a verity root.
pub const VERITY_DM_NAME: &str = "kiln-root";

/// Kernel parameters that mount the rootfs image's partition 1 as `/`,
/// read-only (ext4 with DAX on an NVDIMM:
/// `root=/dev/pmem0p1 rootflags=dax,errors=remount-ro ro rootfstype=ext4`).
///
/// With `verity`, the kernel's DM_INIT creates a dm-verity device over the
/// partition from `dm-mod.create=` before mounting root, and `/` is that
/// device (`/dev/dm-0`): every block read is checked against the root hash.
/// dm-verity does not pass DAX through, so a verity root is never DAX.
pub fn root_params(
    device: RootfsDevice,
    filesystem: &str,
    init: Option<&str>,
    verity: Option<&kiln_manifest::VerityRecord>,
) -> anyhow::Result<String> {
    let part = match device {
        RootfsDevice::Nvdimm => "/dev/pmem0p1",
        RootfsDevice::VirtioBlk => "/dev/vda1",
    };
    let dax = device == RootfsDevice::Nvdimm && verity.is_none();
    let flags = match (filesystem, dax) {
        ("ext4", true) => "dax,errors=remount-ro",
        ("ext4", false) => "errors=remount-ro",
        ("erofs", true) => "dax",
        ("erofs", false) => "",
        (other, _) => anyhow::bail!(
            "the image's rootfs is `{other}`, which kiln-shim cannot mount (ext4, erofs)"
        ),
    };
    let mut p = String::new();
    let root = match verity {
        Some(v) => {
            // name,uuid,minor,flags,table: one read-only verity target over the
            // whole filesystem. The value is quoted: the table has spaces.
            p.push_str(&format!(
                "dm-mod.create=\"{VERITY_DM_NAME},,,ro,0 {} verity {}\" ",
                v.data_sectors(),
                v.table_args(part)
            ));
            "/dev/dm-0"
        }
        None => part,
    };
    p.push_str(&format!("root={root}"));
    if !flags.is_empty() {
        p.push_str(&format!(" rootflags={flags}"));
    }
    p.push_str(&format!(" ro rootfstype={filesystem}"));
    if let Some(init) = init {
        p.push_str(&format!(" init={init}"));
    }
    Ok(p)
}

/// A path inside a QEMU option value: commas are doubled.
fn qemu_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
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
pub fn has_pcie_root_ports(arch: Arch, machine: &str) -> bool {
    matches!(
        (arch, machine),
        (Arch::X86_64, "q35") | (Arch::Aarch64, "virt")
    )
}

/// The device that gives passed devices a guest IOMMU: intel-iommu on
/// x86_64 (caching-mode lets QEMU's vfio-pci follow the guest's mappings),
/// virtio-iommu on aarch64 (described to the guest in the device tree).
/// A pseries guest always has its own sPAPR TCE IOMMU, with one IOMMU group
/// per DMA window and one window per PHB, so passed devices get a second PHB
/// ([`VFIO_PHB`]) of their own; otherwise they would share a group with the
/// vsock and disk functions. s390x needs none: every zPCI function is its own
/// PCI domain behind the s390 IOMMU, with a group of its own.
pub fn viommu_device(arch: Arch) -> Option<&'static str> {
    match arch {
        Arch::X86_64 => Some("intel-iommu,caching-mode=on"),
        Arch::Aarch64 => Some("virtio-iommu-pci"),
        Arch::Ppc64le => Some("spapr-pci-host-bridge,index=1,id=kiln_vfio_phb"),
        Arch::S390x => None,
    }
}

/// The pseries PHB passed devices sit on; the guest numbers a PHB's PCI
/// domain after its index, so its root bus is `0001:00`.
pub const VFIO_PHB: &str = "kiln_vfio_phb";

/// Whether `machine` gives passed devices a guest IOMMU: root ports and a
/// virtual IOMMU (x86_64 q35, aarch64 virt), a PHB of their own (ppc64le
/// pseries) or a zPCI function each (s390x).
pub fn supports_guest_vfio(arch: Arch, machine: &str) -> bool {
    match arch {
        Arch::X86_64 | Arch::Aarch64 => has_pcie_root_ports(arch, machine),
        Arch::Ppc64le => machine == "pseries",
        Arch::S390x => machine == "s390-ccw-virtio",
    }
}

/// Whether DIMMs can be hot-plugged (`-m ...,slots,maxmem` and `pc-dimm`).
pub fn supports_memory_hotplug(arch: Arch, machine: &str) -> bool {
    (arch, machine) == (Arch::X86_64, "q35")
}

/// `-m`: the boot memory, plus the hot-plug area when NVDIMMs (given in
/// bytes) or DIMM hot-plug (`hotplug_mib`, in `slots` DIMMs) need one.
/// `align_mib` rounds `maxmem` up (pseries wants 256 MiB multiples).
pub fn memory_arg(
    mem_mib: u32,
    nvdimm_bytes: u64,
    hotplug_mib: u32,
    slots: u32,
    align_mib: u64,
) -> String {
    if nvdimm_bytes == 0 && hotplug_mib == 0 {
        return format!("{mem_mib}M");
    }
    let mut total_slots = 0;
    let mut maxmem = u64::from(mem_mib);
    if nvdimm_bytes > 0 {
        // An nvdimm lives in the hotplug area: give it a slot and room.
        total_slots += 2;
        maxmem += nvdimm_bytes.div_ceil(1 << 20) + 1024;
    }
    if hotplug_mib > 0 {
        total_slots += slots;
        maxmem += u64::from(hotplug_mib);
    }
    let maxmem = maxmem.next_multiple_of(align_mib.max(1));
    format!("{mem_mib}M,slots={total_slots},maxmem={maxmem}M")
}

/// `-smp`: the boot vCPUs, and with `maxcpus` room to hot-plug up to
/// `max_vcpus` (0 or not above `vcpus`: none).
pub fn smp_arg(vcpus: u32, max_vcpus: u32) -> String {
    if max_vcpus > vcpus {
        format!("{vcpus},maxcpus={max_vcpus}")
    } else {
        vcpus.to_string()
    }
}

impl QemuLaunch<'_> {
    pub fn binary(&self) -> anyhow::Result<String> {
        if !self.config.path.is_empty() {
            return Ok(self.config.path.clone());
        }
        Ok(profile(self.arch).binary.to_string())
    }

    /// The machine type this launch uses.
    pub fn machine(&self) -> anyhow::Result<String> {
        let p = profile(self.arch);
        Ok(if self.config.machine_type.is_empty() {
            p.machine.to_string()
        } else {
            self.config.machine_type.clone()
        })
    }

    /// Whether this launch can have persistent memory, booting through
    /// firmware where the machine needs it.
    fn pmem_possible(&self, machine: &str) -> bool {
        supports_pmem(
            self.arch,
            machine,
            aarch64_firmware_available(&self.config.firmware),
        )
    }

    /// The firmware to boot through: the configured one, or for an aarch64
    /// NVDIMM (described only by ACPI) Debian's edk2; None: a direct boot.
    pub fn firmware(&self, nvdimm: bool) -> anyhow::Result<Option<String>> {
        let path = match self.config.firmware.as_str() {
            "" if nvdimm && self.arch == Arch::Aarch64 => AARCH64_EDK2,
            "" => return Ok(None),
            configured => configured,
        };
        if !Path::new(path).is_file() {
            anyhow::bail!(
                "UEFI firmware {path} is missing: install Debian's qemu-efi-aarch64 or set hypervisor.qemu.firmware"
            );
        }
        Ok(Some(qemu_path(Path::new(path))))
    }

    /// The configured persistent-memory file and its size, checked.
    fn pmem(&self, machine: &str) -> anyhow::Result<Option<(std::path::PathBuf, u64)>> {
        let file = self.config.pmem_file.trim();
        if file.is_empty() {
            return Ok(None);
        }
        if !self.pmem_possible(machine) {
            anyhow::bail!(
                "hypervisor.qemu.pmem_file is set, but kiln-shim can attach persistent memory only to x86_64 q35 and \
                 ppc64le pseries guests and aarch64 virt guests booted through UEFI (QEMU 7.2 has no nvdimm or \
                 virtio-pmem for {} {machine} booted with -kernel)",
                self.arch
            );
        }
        let path = std::path::PathBuf::from(file);
        let size = std::fs::metadata(&path)
            .map_err(|e| anyhow::anyhow!("hypervisor.qemu.pmem_file {}: {e}", path.display()))?
            .len();
        if machine == "pseries" {
            if !pseries_nvdimm_file(size) {
                anyhow::bail!(
                    "hypervisor.qemu.pmem_file {} is {size} bytes; a pseries NVDIMM file is a multiple of 256 MiB \
                     followed by a {}-byte namespace label area (kiln_disk::nslabel), without which \
                     the guest shows no namespace",
                    path.display(),
                    kiln_disk::nslabel::LABEL_AREA_SIZE
                );
            }
            return Ok(Some((path, size)));
        }
        if size == 0 || size % PMEM_ALIGN != 0 {
            anyhow::bail!(
                "hypervisor.qemu.pmem_file {} is {size} bytes; a persistent-memory file must be a non-zero multiple of 2 MiB \
                 (else the guest reports \"pfn: resource end misaligned\" and has no pmem device)",
                path.display()
            );
        }
        Ok(Some((path, size)))
    }

    pub fn args(&self) -> anyhow::Result<Vec<String>> {
        let p = profile(self.arch);
        let mem = self.config.default_memory;
        let machine = self.machine()?;
        let machine = machine.as_str();
        let pmem = self.pmem(machine)?;
        let nvdimm_root = self.rootfs.filter(|r| r.device == RootfsDevice::Nvdimm);
        let hotplug_mib = self.config.default_maxmemory.saturating_sub(mem);
        self.check_machine(machine, nvdimm_root.is_some(), hotplug_mib)?;
        if let Some(r) = nvdimm_root.filter(|_| machine == "pseries") {
            if !pseries_nvdimm_file(r.size) {
                anyhow::bail!(
                    "{} ({} bytes) is not a labelled image, which a pseries NVDIMM root needs (a multiple of \
                     256 MiB followed by 128 KiB of namespace labels, as cargo xtask build-image lays out ppc64le \
                     images): rebuild the image, or use --rootfs virtio-blk",
                    r.path.display(),
                    r.size
                );
            }
        }
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        if self.config.seccomp_sandbox != "off" {
            push(&["-sandbox", &self.config.seccomp_sandbox]);
        }
        // vhost-user devices need guest RAM the backend can map: a shared memfd.
        push(&[
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        ]);
        let nvdimm = pmem.is_some() || nvdimm_root.is_some();
        push(&["-machine", &self.machine_opts(&p, machine, nvdimm)]);
        if let Some(fw) = self.firmware(nvdimm)? {
            push(&["-bios", &fw]);
        }
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => {
                push(&["-accel", "tcg"]);
                if let Some(cpu) = p.tcg_cpu {
                    push(&["-cpu", cpu]);
                }
            }
        }
        let nvdimm_bytes =
            pmem.as_ref().map_or(0, |(_, size)| *size) + nvdimm_root.map_or(0, |r| r.size);
        push(&[
            "-m",
            &memory_arg(
                mem,
                nvdimm_bytes,
                hotplug_mib,
                self.config.memory_slots,
                if machine == "pseries" {
                    PSERIES_NVDIMM_BLOCK >> 20
                } else {
                    1
                },
            ),
        ]);
        push(&[
            "-smp",
            &smp_arg(self.config.default_vcpus, self.config.default_maxvcpus),
        ]);
        if self.viommu && has_pcie_root_ports(self.arch, machine) {
            // Before any PCI device, so it translates for all of them.
            if let Some(device) = viommu_device(self.arch) {
                push(&["-device", device]);
            }
        }
        a.extend(nvdimm_args(
            nvdimm_root,
            pmem.as_ref(),
            machine == "pseries",
        ));
        a.extend(self.console_args(p.console));
        a.extend(self.boot_args()?);
        a.extend(self.device_args(machine));
        Ok(a)
    }

    /// What `machine` cannot do that this launch asks for, as an error.
    fn check_machine(
        &self,
        machine: &str,
        nvdimm_root: bool,
        hotplug_mib: u32,
    ) -> anyhow::Result<()> {
        if nvdimm_root
            && !supports_nvdimm_root(
                self.arch,
                machine,
                aarch64_firmware_available(&self.config.firmware),
            )
        {
            anyhow::bail!(
                "an NVDIMM root needs an x86_64 q35 machine or aarch64 virt with UEFI firmware, not {} {machine}",
                self.arch
            );
        }
        if hotplug_mib > 0 && !supports_memory_hotplug(self.arch, machine) {
            anyhow::bail!(
                "hypervisor.qemu.default_maxmemory = {} leaves room for DIMM hot-plug, which kiln-shim offers \
                 only on x86_64 q35 (pc-dimm with ACPI), not {} {machine}",
                self.config.default_maxmemory,
                self.arch
            );
        }
        if (self.viommu || !self.passthrough.is_empty()) && !supports_guest_vfio(self.arch, machine)
        {
            anyhow::bail!(
                "VFIO passthrough needs an x86_64 q35 or aarch64 virt machine (pcie-root-port and a virtual IOMMU), \
                 ppc64le pseries (a PHB of its own) or s390x s390-ccw-virtio (zPCI), not {} {machine}",
                self.arch
            );
        }
        if self.passthrough.len() > crate::vfio::MAX_COLD_DEVICES as usize {
            anyhow::bail!(
                "{} devices to pass through; kiln-shim attaches at most {} at boot",
                self.passthrough.len(),
                crate::vfio::MAX_COLD_DEVICES
            );
        }
        Ok(())
    }

    /// `-machine`'s value: the type, the shared memory backend and the
    /// profile's, TCG's and NVDIMM options.
    fn machine_opts(&self, p: &ArchProfile, machine: &str, nvdimm: bool) -> String {
        let mut machine_opts = format!("{machine},memory-backend=mem");
        if self.config.machine_type.is_empty() && !p.machine_opts.is_empty() {
            machine_opts.push(',');
            machine_opts.push_str(p.machine_opts);
        }
        if self.accel == Accel::Tcg && !p.tcg_machine_opts.is_empty() {
            machine_opts.push(',');
            machine_opts.push_str(p.tcg_machine_opts);
        }
        if nvdimm {
            machine_opts.push_str(",nvdimm=on");
        }
        machine_opts
    }

    /// The console chardev (a log file or stdio) and how it is attached.
    fn console_args(&self, console: ConsoleKind) -> Vec<String> {
        let chardev = match self.console_log {
            Some(log) => format!("file,id=console,path={}", log.display()),
            None => "stdio,id=console,signal=off".to_string(),
        };
        let attach = match console {
            ConsoleKind::Serial => ["-serial", "chardev:console"],
            ConsoleKind::Sclp => ["-device", "sclpconsole,chardev=console"],
        };
        let mut a = vec!["-chardev".to_string(), chardev];
        a.extend(attach.iter().map(|s| s.to_string()));
        a
    }

    /// The kernel, its command line (with the root parameters) and the
    /// initrd, or the rootfs image on virtio-blk.
    fn boot_args(&self) -> anyhow::Result<Vec<String>> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        let mut cmdline = self.cmdline.trim().to_string();
        if !self.config.kernel_params.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(self.config.kernel_params.trim());
        }
        let iommu_params = crate::vfio::guest_iommu_params(self.arch);
        if self.viommu && !iommu_params.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(iommu_params);
        }
        if let Some(r) = &self.rootfs {
            cmdline.push(' ');
            cmdline.push_str(&root_params(r.device, r.filesystem, r.init, r.verity)?);
            if r.device == RootfsDevice::VirtioBlk {
                push(&[
                    "-drive",
                    &format!(
                        "file={},if=none,id=kiln_rootfs,format=raw,readonly=on",
                        qemu_path(r.path)
                    ),
                ]);
                push(&["-device", "virtio-blk-pci,drive=kiln_rootfs"]);
            }
        }
        push(&["-kernel", &self.kernel.display().to_string()]);
        if self.rootfs.is_none() {
            push(&["-initrd", &self.initrd.display().to_string()]);
        }
        push(&["-append", &cmdline]);
        Ok(a)
    }

    /// vsock, virtio-fs, IOThreads, hot-plug root ports, cold-plugged VFIO
    /// devices and the QMP socket.
    fn device_args(&self, machine: &str) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&[
            "-chardev",
            &format!("socket,id=vsock,path={}", self.vhost_vsock_socket.display()),
        ]);
        // event_idx off: vhost-device-vsock 0.3 completes RX buffers on a
        // second thread, and with notification suppression on, a completion
        // racing the guest's used_event has left an agent that had logged
        // "ready" unreachable for minutes (CI, stop 27). An interrupt per
        // packet costs nothing measurable at the agent's message rate.
        push(&[
            "-device",
            "vhost-user-vsock-pci,chardev=vsock,event_idx=off",
        ]);
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
        let root_ports = has_pcie_root_ports(self.arch, machine);
        for (i, d) in (0u32..).zip(self.passthrough) {
            if !root_ports {
                continue; // onto their PHB or zPCI functions, below
            }
            let port = crate::vfio::cold_port_id(i);
            push(&[
                "-device",
                &format!(
                    "pcie-root-port,id={port},chassis={},slot=1,bus=pcie.0,addr={:#x}",
                    0x20 + i,
                    crate::vfio::COLD_PORT_SLOT_BASE + i
                ),
            ]);
            push(&[
                "-device",
                &format!("{},bus={port},id=kiln_vfio{i}", d.backend.qemu_device()),
            ]);
        }
        if let Some(disk) = self.container_disk {
            push(&[
                "-drive",
                &format!(
                    "file={},if=none,id=kiln_ctr_rootfs,format=raw",
                    qemu_path(disk)
                ),
            ]);
            push(&[
                "-device",
                &crate::rootfs_disk::attachment(self.arch, "kiln_ctr_rootfs").0,
            ]);
        }
        match self.network {
            Network::None => {}
            Network::User => {
                push(&["-netdev", "user,id=kiln_net0,ipv4=on,ipv6=on"]);
                push(&["-device", &nic_device(self.arch, "kiln_net0", usernet::MAC)]);
            }
        }
        if !root_ports
            && self.arch == Arch::Ppc64le
            && (self.viommu || !self.passthrough.is_empty())
        {
            // pseries: the passed devices' PHB comes after every other PCI
            // device, which would otherwise land on this newest bus (and in
            // the passed devices' IOMMU group); then the devices, onto it.
            if let Some(phb) = viommu_device(self.arch) {
                push(&["-device", phb]);
            }
            for (i, d) in (0u32..).zip(self.passthrough) {
                push(&[
                    "-device",
                    &format!(
                        "{},bus={VFIO_PHB}.0,addr={:#x},id=kiln_vfio{i}",
                        d.backend.qemu_device(),
                        crate::vfio::COLD_PORT_SLOT_BASE + i
                    ),
                ]);
            }
        }
        if !root_ports && self.arch == Arch::S390x {
            // s390x: a zPCI function per device, whose uid the guest takes
            // as the device's PCI domain (crate::vfio::cold_device_path).
            for (i, d) in (0u32..).zip(self.passthrough) {
                let uid = crate::vfio::zpci_uid(i);
                push(&[
                    "-device",
                    &format!("zpci,uid={uid},fid={uid},target=kiln_vfio{i},id=kiln_zpci{i}"),
                ]);
                push(&[
                    "-device",
                    &format!("{},id=kiln_vfio{i}", d.backend.qemu_device()),
                ]);
            }
        }
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", self.qmp_socket.display()),
        ]);
        a
    }
}

/// The NVDIMMs: the read-only rootfs image and the `pmem_file`.
fn nvdimm_args(
    nvdimm_root: Option<RootfsDisk>,
    pmem: Option<&(std::path::PathBuf, u64)>,
    pseries: bool,
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    if let Some(r) = nvdimm_root {
        // Read-only backing: guests share the image, none can change it.
        // A read-only NVDIMM must say it is "unarmed" (no persistence).
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id=kiln_rootfs_mem,share=on,mem-path={},size={},readonly=on",
                qemu_path(r.path),
                r.size
            ),
        ]);
        push(&[
            "-device",
            &nvdimm_device(
                "id=kiln_rootfs,memdev=kiln_rootfs_mem,unarmed=on",
                pseries.then_some(1),
            ),
        ]);
    }
    if let Some((file, size)) = pmem {
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id=kiln_pmem0,share=on,mem-path={},size={size}",
                file.display()
            ),
        ]);
        push(&[
            "-device",
            &nvdimm_device("id=kiln_nvdimm0,memdev=kiln_pmem0", pseries.then_some(0)),
        ]);
    }
    a
}

/// `-device` for an NVDIMM with `props`: plain `nvdimm`, or on pseries the
/// label-aware `spapr-nvdimm` with kiln's label area (the backing file's last
/// 128 KiB) and the uuid of DIMM `index` (`pseries_nvdimm_uuid`).
fn nvdimm_device(props: &str, pseries_index: Option<u8>) -> String {
    match pseries_index {
        Some(i) => format!(
            "spapr-nvdimm,{props},label-size={},uuid={}",
            kiln_disk::nslabel::LABEL_AREA_SIZE,
            pseries_nvdimm_uuid(i)
        ),
        None => format!("nvdimm,{props}"),
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
        let (accel, why) = choose_accel("auto", Arch::host(), &host);
        assert_eq!(accel, Accel::Tcg);
        assert!(why.contains("PVM"), "{why}");
        let good = HostKvm {
            dev_kvm_rw: true,
            modules: vec!["kvm".into(), "kvm_intel".into()],
        };
        assert_eq!(choose_accel("auto", Arch::host(), &good).0, Accel::Kvm);
        let none = HostKvm {
            dev_kvm_rw: false,
            modules: vec![],
        };
        assert_eq!(choose_accel("auto", Arch::host(), &none).0, Accel::Tcg);
        let not_host = match Arch::host() {
            Arch::X86_64 => Arch::S390x,
            _ => Arch::X86_64,
        };
        assert_eq!(choose_accel("auto", not_host, &good).0, Accel::Tcg);
        assert_eq!(choose_accel("tcg", Arch::host(), &good).0, Accel::Tcg);
    }

    #[test]
    fn hotplug_room_for_vcpus_and_memory() {
        assert_eq!(smp_arg(1, 0), "1");
        assert_eq!(smp_arg(2, 2), "2");
        assert_eq!(smp_arg(1, 4), "1,maxcpus=4");
        assert_eq!(memory_arg(512, 0, 0, 10, 1), "512M");
        assert_eq!(
            memory_arg(512, 0, 1536, 10, 1),
            "512M,slots=10,maxmem=2048M"
        );
        assert_eq!(
            memory_arg(512, 4 << 20, 0, 10, 1),
            "512M,slots=2,maxmem=1540M"
        );
        assert_eq!(
            memory_arg(512, (256 << 20) + (128 << 10), 0, 10, 256),
            "512M,slots=2,maxmem=2048M"
        );
        assert_eq!(
            memory_arg(512, 4 << 20, 512, 4, 1),
            "512M,slots=6,maxmem=2052M",
            "NVDIMMs and DIMMs share the hot-plug area"
        );

        let mut cfg = QemuSection {
            default_vcpus: 1,
            default_maxvcpus: 2,
            default_maxmemory: 1024,
            memory_slots: 4,
            ..Default::default()
        };
        let args = launch_for(Arch::X86_64, &cfg, Accel::Tcg)
            .args()
            .unwrap()
            .join(" ");
        assert!(args.contains("-m 512M,slots=4,maxmem=1024M"), "{args}");
        assert!(args.contains("-smp 1,maxcpus=2"), "{args}");
        let e = launch_for(Arch::Aarch64, &cfg, Accel::Tcg)
            .args()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("default_maxmemory") && e.contains("aarch64"),
            "{e}"
        );
        cfg.default_maxmemory = 0;
        let arm = launch_for(Arch::Aarch64, &cfg, Accel::Tcg)
            .args()
            .unwrap()
            .join(" ");
        assert!(arm.contains("-m 512M -smp 1,maxcpus=2"), "{arm}");
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
            arch: Arch::X86_64,
            accel: Accel::Tcg,
            config: &cfg,
            kernel: &k,
            initrd: &i,
            cmdline: "console=ttyS0",
            vhost_vsock_socket: &v,
            qmp_socket: &q,
            console_log: Some(&c),
            virtiofs_socket: None,
            rootfs: None,
            passthrough: &[],
            viommu: false,
            network: Network::None,
            container_disk: None,
        };
        let args = launch.args().unwrap().join(" ");
        assert!(
            args.contains("memory-backend-memfd,id=mem,size=512M,share=on"),
            "{args}"
        );
        assert!(args.contains("-machine q35,memory-backend=mem"), "{args}");
        assert!(
            args.contains(&format!("-sandbox {}", crate::config::SECCOMP_SANDBOX)),
            "QEMU runs under its seccomp filter by default: {args}"
        );
        assert!(
            args.contains("vhost-user-vsock-pci,chardev=vsock,event_idx=off"),
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

    fn launch_for<'a>(arch: Arch, cfg: &'a QemuSection, accel: Accel) -> QemuLaunch<'a> {
        let p: &'static Path = Path::new("/x");
        QemuLaunch {
            arch,
            accel,
            config: cfg,
            kernel: p,
            initrd: p,
            cmdline: "",
            vhost_vsock_socket: p,
            qmp_socket: p,
            console_log: None,
            virtiofs_socket: None,
            rootfs: None,
            passthrough: &[],
            viommu: false,
            network: Network::None,
            container_disk: None,
        }
    }

    #[test]
    fn a_container_rootfs_disk_is_writable_at_its_fixed_address() {
        let cfg = QemuSection::default();
        let disk = Path::new("/r/ctr.img");
        for (arch, device) in [
            (
                Arch::S390x,
                "-device virtio-blk-ccw,drive=kiln_ctr_rootfs,devno=fe.0.001e",
            ),
            (
                Arch::X86_64,
                "-device virtio-blk-pci,drive=kiln_ctr_rootfs,bus=pcie.0,addr=0x1e",
            ),
        ] {
            let mut l = launch_for(arch, &cfg, Accel::Tcg);
            l.container_disk = Some(disk);
            let args = l.args().unwrap().join(" ");
            assert!(
                args.contains(
                    "-drive file=/r/ctr.img,if=none,id=kiln_ctr_rootfs,format=raw -device"
                ),
                "{args}"
            );
            assert!(args.contains(device), "{args}");
        }
    }

    #[test]
    fn every_arch_gets_its_machine_cpu_and_console() {
        let cfg = QemuSection::default();
        let args = |arch, accel| launch_for(arch, &cfg, accel).args().unwrap().join(" ");
        let arm = args(Arch::Aarch64, Accel::Tcg);
        assert!(
            arm.contains("-machine virt,memory-backend=mem -accel tcg -cpu max"),
            "{arm}"
        );
        assert!(
            arm.contains("-serial chardev:console") && arm.contains("vhost-user-vsock-pci"),
            "{arm}"
        );
        let ppc = args(Arch::Ppc64le, Accel::Tcg);
        assert!(
            ppc.contains("-machine pseries,memory-backend=mem,x-vof=on,cap-cfpc=broken,"),
            "{ppc}"
        );
        assert!(!ppc.contains("-cpu"), "pseries' default CPU: {ppc}");
        let ppc_kvm = args(Arch::Ppc64le, Accel::Kvm);
        assert!(
            !ppc_kvm.contains("cap-cfpc"),
            "TCG-only options stay off under KVM: {ppc_kvm}"
        );
        let s390 = args(Arch::S390x, Accel::Tcg);
        assert!(
            s390.contains("-machine s390-ccw-virtio,memory-backend=mem"),
            "{s390}"
        );
        assert!(
            s390.contains("-device sclpconsole,chardev=console") && !s390.contains("-serial"),
            "{s390}"
        );
        assert!(
            !s390.contains("pcie-root-port"),
            "zPCI has no root ports: {s390}"
        );
        assert_eq!(
            launch_for(Arch::S390x, &cfg, Accel::Tcg).binary().unwrap(),
            "qemu-system-s390x"
        );
        // An unknown arch cannot get here: manifest.json with one does not parse
        // (kiln-manifest's unknown_arch_is_a_clear_error).
    }

    #[test]
    fn user_network_nic_per_arch() {
        let cfg = QemuSection::default();
        for arch in kiln_manifest::arch::ALL {
            let line = launch_for(arch, &cfg, Accel::Tcg).args().unwrap().join(" ");
            assert!(
                !line.contains("-netdev") && !line.contains("virtio-net"),
                "no NIC unless asked for: {line}"
            );
            let mut l = launch_for(arch, &cfg, Accel::Tcg);
            l.network = Network::User;
            let args = l.args().unwrap();
            let netdev = args
                .iter()
                .position(|a| a == "-netdev")
                .unwrap_or_else(|| panic!("{arch}"));
            assert_eq!(
                args[netdev + 1],
                "user,id=kiln_net0,ipv4=on,ipv6=on",
                "{arch}"
            );
            assert_eq!(args[netdev + 2], "-device", "{arch}");
            let want = match arch {
                Arch::S390x => "virtio-net-ccw,netdev=kiln_net0,mac=52:54:00:6b:69:6c",
                _ => "virtio-net-pci,netdev=kiln_net0,mac=52:54:00:6b:69:6c,romfile=",
            };
            assert_eq!(args[netdev + 3], want, "{arch}");
            assert_eq!(
                args.iter().filter(|a| a.contains("virtio-net")).count(),
                1,
                "{arch}: one NIC"
            );
        }
    }

    #[test]
    fn pmem_file_becomes_an_nvdimm_on_x86_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pm.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let cfg = QemuSection {
            pmem_file: file.display().to_string(),
            ..Default::default()
        };
        let args = launch_for(Arch::X86_64, &cfg, Accel::Tcg)
            .args()
            .unwrap()
            .join(" ");
        assert!(
            args.contains("-machine q35,memory-backend=mem,nvdimm=on"),
            "{args}"
        );
        assert!(args.contains("-m 512M,slots=2,maxmem=1540M"), "{args}");
        assert!(
            args.contains(&format!(
                "memory-backend-file,id=kiln_pmem0,share=on,mem-path={},size=4194304",
                file.display()
            )),
            "{args}"
        );
        assert!(
            args.contains("-device nvdimm,id=kiln_nvdimm0,memdev=kiln_pmem0"),
            "{args}"
        );

        let err = format!(
            "{:#}",
            launch_for(Arch::S390x, &cfg, Accel::Tcg)
                .args()
                .unwrap_err()
        );
        assert!(err.contains("pmem_file") && err.contains("s390x"), "{err}");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(3 << 20)
            .unwrap();
        let err = format!(
            "{:#}",
            launch_for(Arch::X86_64, &cfg, Accel::Tcg)
                .args()
                .unwrap_err()
        );
        assert!(err.contains("multiple of 2 MiB"), "{err}");
        let cfg = QemuSection {
            pmem_file: dir.path().join("missing").display().to_string(),
            ..Default::default()
        };
        let err = format!(
            "{:#}",
            launch_for(Arch::X86_64, &cfg, Accel::Tcg)
                .args()
                .unwrap_err()
        );
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn rootfs_image_as_nvdimm_or_virtio_blk() {
        let cfg = QemuSection::default();
        let img = PathBuf::from("/images/a,b/rootfs.img");
        let disk = |device| RootfsDisk {
            device,
            path: &img,
            size: 64 << 20,
            filesystem: "ext4",
            init: Some("/init"),
            verity: None,
        };
        let mut l = launch_for(Arch::X86_64, &cfg, Accel::Tcg);
        l.cmdline = "console=ttyS0";
        l.rootfs = Some(disk(RootfsDevice::Nvdimm));
        let args = l.args().unwrap();
        let line = args.join(" ");
        assert!(
            line.contains("-machine q35,memory-backend=mem,nvdimm=on"),
            "{line}"
        );
        assert!(line.contains("-m 512M,slots=2,maxmem=1600M"), "{line}");
        assert!(
            line.contains("memory-backend-file,id=kiln_rootfs_mem,share=on,mem-path=/images/a,,b/rootfs.img,size=67108864,readonly=on"),
            "{line}"
        );
        assert!(
            line.contains("-device nvdimm,id=kiln_rootfs,memdev=kiln_rootfs_mem,unarmed=on"),
            "{line}"
        );
        assert!(
            !line.contains("-initrd"),
            "no initrd with a rootfs image: {line}"
        );
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert_eq!(
            append,
            "console=ttyS0 root=/dev/pmem0p1 rootflags=dax,errors=remount-ro ro rootfstype=ext4 init=/init"
        );

        let mut l = launch_for(Arch::S390x, &cfg, Accel::Tcg);
        l.rootfs = Some(disk(RootfsDevice::VirtioBlk));
        let line = l.args().unwrap().join(" ");
        assert!(
            line.contains(
                "-drive file=/images/a,,b/rootfs.img,if=none,id=kiln_rootfs,format=raw,readonly=on"
            ),
            "{line}"
        );
        assert!(
            line.contains("-device virtio-blk-pci,drive=kiln_rootfs"),
            "{line}"
        );
        assert!(
            line.contains("root=/dev/vda1 rootflags=errors=remount-ro ro rootfstype=ext4"),
            "{line}"
        );
        assert!(!line.contains("nvdimm") && !line.contains("dax"), "{line}");
        assert!(!line.contains("-bios"), "a direct kernel boot: {line}");
        l.rootfs = Some(disk(RootfsDevice::Nvdimm));
        assert!(l.args().is_err(), "no NVDIMM on s390x");

        // aarch64: the NVDIMM is described by ACPI, so the VM boots through
        // UEFI firmware (a configured one here; Debian's edk2 by default).
        let fw = tempfile::NamedTempFile::new().unwrap();
        let arm_cfg = QemuSection {
            firmware: fw.path().display().to_string(),
            ..QemuSection::default()
        };
        let mut l = launch_for(Arch::Aarch64, &arm_cfg, Accel::Tcg);
        l.rootfs = Some(disk(RootfsDevice::Nvdimm));
        let line = l.args().unwrap().join(" ");
        assert!(
            line.contains("-machine virt,memory-backend=mem,nvdimm=on"),
            "{line}"
        );
        assert!(
            line.contains(&format!("-bios {}", fw.path().display())),
            "{line}"
        );
        let missing = QemuSection {
            firmware: "/nonexistent/QEMU_EFI.fd".into(),
            ..QemuSection::default()
        };
        let mut l = launch_for(Arch::Aarch64, &missing, Accel::Tcg);
        l.rootfs = Some(disk(RootfsDevice::Nvdimm));
        let err = l.args().unwrap_err().to_string();
        assert!(err.contains("qemu-efi-aarch64"), "{err}");
    }

    /// pseries: the root NVDIMM is a label-aware spapr-nvdimm (kiln's uuid,
    /// index 1), and only a labelled image's size is taken.
    #[test]
    fn pseries_nvdimm_root_is_a_labelled_spapr_nvdimm() {
        let cfg = QemuSection::default();
        let img = PathBuf::from("/images/rootfs.img");
        let disk = |size| RootfsDisk {
            device: RootfsDevice::Nvdimm,
            path: &img,
            size,
            filesystem: "ext4",
            init: Some("/init"),
            verity: None,
        };
        let mut l = launch_for(Arch::Ppc64le, &cfg, Accel::Tcg);
        l.rootfs = Some(disk((256 << 20) + (128 << 10)));
        let line = l.args().unwrap().join(" ");
        assert!(line.contains(",nvdimm=on"), "{line}");
        assert!(
            line.contains(&format!(
                "-device spapr-nvdimm,id=kiln_rootfs,memdev=kiln_rootfs_mem,unarmed=on,label-size=131072,uuid={}",
                pseries_nvdimm_uuid(1)
            )),
            "{line}"
        );
        assert_eq!(
            pseries_nvdimm_uuid(1),
            "6b696c6e-2d6e-7664-696d-6d2d30303001"
        );
        assert!(line.contains("maxmem=2048M"), "{line}");
        l.rootfs = Some(disk(64 << 20));
        let err = l.args().unwrap_err().to_string();
        assert!(err.contains("not a labelled image"), "{err}");
    }

    #[test]
    fn rootfs_modes_pick_a_device_or_refuse() {
        let k = "hypervisor.qemu.rootfs";
        let choose = |mode, arch, machine, fw| choose_rootfs_device(k, mode, arch, machine, fw);
        assert!(choose("initrd", Arch::X86_64, "q35", "").unwrap().is_none());
        let (d, _) = choose("image", Arch::X86_64, "q35", "").unwrap().unwrap();
        assert_eq!(d, RootfsDevice::Nvdimm);
        let (d, why) = choose("image", Arch::Aarch64, "virt", "").unwrap().unwrap();
        assert_eq!(d, RootfsDevice::VirtioBlk);
        assert!(why.contains("no DAX"), "{why}");
        let (d, _) = choose("image", Arch::Aarch64, "virt", "/fw.fd")
            .unwrap()
            .unwrap();
        assert_eq!(
            d,
            RootfsDevice::Nvdimm,
            "with firmware, ACPI describes an NVDIMM"
        );
        match choose("nvdimm", Arch::Aarch64, "virt", "") {
            Ok(d) => assert!(Path::new(AARCH64_EDK2).exists(), "{d:?} without edk2"),
            Err(e) => assert!(e.to_string().contains("qemu-efi-aarch64"), "{e}"),
        }
        let (d, _) = choose("image", Arch::Ppc64le, "pseries", "")
            .unwrap()
            .unwrap();
        assert_eq!(d, RootfsDevice::Nvdimm, "spapr-nvdimm, no firmware");
        let err = choose("nvdimm", Arch::S390x, "s390-ccw-virtio", "")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(k) && err.contains("virtio-blk"),
            "DAX asked where there is none: {err}"
        );
        let err = choose_rootfs_device("--rootfs", "dax", Arch::X86_64, "q35", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--rootfs"), "{err}");
        assert_eq!(
            root_params(RootfsDevice::Nvdimm, "erofs", None, None).unwrap(),
            "root=/dev/pmem0p1 rootflags=dax ro rootfstype=erofs"
        );
        assert_eq!(
            root_params(RootfsDevice::VirtioBlk, "erofs", None, None).unwrap(),
            "root=/dev/vda1 ro rootfstype=erofs"
        );
        assert!(root_params(RootfsDevice::VirtioBlk, "xfs", None, None).is_err());
    }

    #[test]
    fn a_verity_root_is_the_dm_device_made_from_the_manifest() {
        let v = kiln_manifest::VerityRecord {
            algorithm: "sha256".into(),
            format: 1,
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks: 2560,
            hash_start_block: 2560,
            hash_blocks: 22,
            salt: "5a".repeat(32),
            root_hash: "ab".repeat(32),
        };
        let p = root_params(RootfsDevice::VirtioBlk, "ext4", Some("/init"), Some(&v)).unwrap();
        assert_eq!(
            p,
            format!(
                "dm-mod.create=\"kiln-root,,,ro,0 20480 verity 1 /dev/vda1 /dev/vda1 4096 4096 2560 2560 sha256 {} {}\" \
                 root=/dev/dm-0 rootflags=errors=remount-ro ro rootfstype=ext4 init=/init",
                "ab".repeat(32),
                "5a".repeat(32)
            )
        );
        // On an NVDIMM the table sits on pmem0p1 and DAX is off: dm-verity has none.
        let p = root_params(RootfsDevice::Nvdimm, "erofs", None, Some(&v)).unwrap();
        assert!(p.contains("verity 1 /dev/pmem0p1 /dev/pmem0p1 "), "{p}");
        assert!(p.ends_with("root=/dev/dm-0 ro rootfstype=erofs"), "{p}");
    }

    #[test]
    fn vfio_devices_get_root_ports_and_a_viommu() {
        use crate::vfio::{Backend, GuestMode, PassedDevice};
        let cfg = QemuSection::default();
        let passed = [
            PassedDevice {
                backend: Backend::Host("0000:01:00.0".parse().unwrap()),
                mode: GuestMode::Vfio,
                host_group: 5,
                pci_path: crate::vfio::cold_device_path(Arch::X86_64, 0),
            },
            PassedDevice {
                backend: crate::vfio::parse_emulated("edu@0000:ab:00.0").unwrap(),
                mode: GuestMode::Vfio,
                host_group: 900,
                pci_path: crate::vfio::cold_device_path(Arch::X86_64, 1),
            },
        ];
        let mut l = launch_for(Arch::X86_64, &cfg, Accel::Tcg);
        l.passthrough = &passed;
        l.viommu = true;
        let args = l.args().unwrap();
        let line = args.join(" ");
        let iommu = line.find("intel-iommu,caching-mode=on").expect(&line);
        assert!(iommu < line.find("vhost-user-vsock-pci").unwrap(), "{line}");
        assert!(
            line.contains("-device pcie-root-port,id=kiln_vfio_rp0,chassis=32,slot=1,bus=pcie.0,addr=0x18 -device vfio-pci,host=0000:01:00.0,bus=kiln_vfio_rp0,id=kiln_vfio0"),
            "{line}"
        );
        assert!(
            line.contains("addr=0x19 -device edu,bus=kiln_vfio_rp1,id=kiln_vfio1"),
            "{line}"
        );
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(
            append.ends_with(crate::vfio::GUEST_IOMMU_PARAMS),
            "{append}"
        );
        assert_eq!(passed[1].pci_path, "19/00");

        let mut arm = launch_for(Arch::Aarch64, &cfg, Accel::Tcg);
        arm.passthrough = &passed;
        arm.viommu = true;
        let args = arm.args().unwrap();
        let line = args.join(" ");
        let iommu = line.find("-device virtio-iommu-pci").expect(&line);
        assert!(iommu < line.find("vhost-user-vsock-pci").unwrap(), "{line}");
        assert!(line.contains("-device edu,bus=kiln_vfio_rp1"), "{line}");
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(
            append.ends_with(" vfio_iommu_type1.allow_unsafe_interrupts=1"),
            "{append}"
        );
        assert!(!append.contains("intel_iommu"), "{append}");
        // The same devices where `arch` puts them (vm.rs's passthrough()).
        let placed_for = |arch: Arch| -> Vec<PassedDevice> {
            (0u32..)
                .zip(&passed)
                .map(|(i, d)| PassedDevice {
                    pci_path: crate::vfio::cold_device_path(arch, i),
                    ..d.clone()
                })
                .collect()
        };
        // pseries: the devices go straight onto a PHB of their own, which the
        // guest numbers domain 0001; no root ports, no IOMMU parameters.
        let ppc_passed = placed_for(Arch::Ppc64le);
        assert_eq!(ppc_passed[1].pci_path, "0001:00/19");
        let mut ppc = launch_for(Arch::Ppc64le, &cfg, Accel::Tcg);
        ppc.passthrough = &ppc_passed;
        ppc.viommu = true;
        let args = ppc.args().unwrap();
        let line = args.join(" ");
        let phb = line
            .find("-device spapr-pci-host-bridge,index=1,id=kiln_vfio_phb")
            .expect(&line);
        assert!(phb < line.find("kiln_vfio_phb.0").unwrap(), "{line}");
        // After every device placed without a bus, which would land on it.
        assert!(phb > line.find("vhost-user-vsock-pci").unwrap(), "{line}");
        assert!(
            line.contains("-device edu,bus=kiln_vfio_phb.0,addr=0x19,id=kiln_vfio1"),
            "{line}"
        );
        assert!(!line.contains("pcie-root-port"), "{line}");
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(!append.contains("iommu"), "{append}");
        // s390x: a zPCI function each, its uid the guest's PCI domain.
        let s390_passed = placed_for(Arch::S390x);
        assert_eq!(s390_passed[1].pci_path, "0019:00/00");
        let mut s390 = launch_for(Arch::S390x, &cfg, Accel::Tcg);
        s390.passthrough = &s390_passed;
        s390.viommu = true;
        let line = s390.args().unwrap().join(" ");
        assert!(
            line.contains("-device zpci,uid=25,fid=25,target=kiln_vfio1,id=kiln_zpci1 -device edu,id=kiln_vfio1"),
            "{line}"
        );
        assert!(
            !line.contains("pcie-root-port") && !line.contains("iommu,"),
            "{line}"
        );
        let pc_cfg = QemuSection {
            machine_type: "pc".into(),
            ..Default::default()
        };
        let mut pc = launch_for(Arch::X86_64, &pc_cfg, Accel::Tcg);
        pc.passthrough = &passed;
        let err = pc.args().unwrap_err().to_string();
        assert!(err.contains("x86_64 q35 or aarch64 virt"), "{err}");
        let plain = launch_for(Arch::X86_64, &cfg, Accel::Tcg)
            .args()
            .unwrap()
            .join(" ");
        assert!(!plain.contains("iommu"), "no vIOMMU unless asked: {plain}");
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
            arch: Arch::X86_64,
            accel: Accel::Tcg,
            config: &cfg,
            kernel: &k,
            initrd: &i,
            cmdline: "",
            vhost_vsock_socket: &v,
            qmp_socket: &q,
            console_log: None,
            virtiofs_socket: Some(&f),
            rootfs: None,
            passthrough: &[],
            viommu: false,
            network: Network::None,
            container_disk: None,
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
