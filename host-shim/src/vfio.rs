//! VFIO passthrough on the host: which devices, their IOMMU groups, binding
//! them to vfio-pci and giving them back.
//!
//! Every sysfs and procfs access goes through a root path, and every write
//! through a [`SysfsWriter`], so the logic is tested against a fake tree whose
//! writer plays the kernel. The binding is recorded in the run state before the
//! first write, so `kiln-shim cleanup` gives devices back after a crash.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub const VFIO_PCI: &str = "vfio-pci";
/// PCI class of a PCI-to-PCI bridge: allowed to stay with its driver.
const CLASS_BRIDGE: u32 = 0x0604;

/// A host PCI address, `0000:01:00.0`, lower case. Read back from
/// state.json through the same parser, so a planted `../..` never becomes a
/// sysfs path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostBdf(pub String);

impl TryFrom<String> for HostBdf {
    type Error = anyhow::Error;
    fn try_from(s: String) -> anyhow::Result<HostBdf> {
        s.parse()
    }
}

impl From<HostBdf> for String {
    fn from(b: HostBdf) -> String {
        b.0
    }
}

impl fmt::Display for HostBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for HostBdf {
    type Err = anyhow::Error;

    /// `0000:01:00.0`, or `01:00.0` for domain 0.
    fn from_str(s: &str) -> anyhow::Result<HostBdf> {
        let full = if s.len() == 7 {
            format!("0000:{s}")
        } else {
            s.to_string()
        };
        let b = full.as_bytes();
        let ok = b.len() == 12
            && b.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b':',
                10 => *c == b'.',
                11 => (b'0'..=b'7').contains(c),
                _ => c.is_ascii_hexdigit(),
            });
        if !ok {
            anyhow::bail!("{s:?} is not a PCI address like 0000:01:00.0");
        }
        Ok(HostBdf(full.to_ascii_lowercase()))
    }
}

/// How the guest uses a device (Kata's device types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestMode {
    /// `vfio-pci`: bound to vfio-pci in the guest too, `/dev/vfio/<group>`
    /// in the container (needs a virtual IOMMU in the guest).
    Vfio,
    /// `vfio-pci-gk`: the guest kernel's own driver.
    GuestKernel,
}

impl GuestMode {
    pub fn device_type(self) -> &'static str {
        match self {
            GuestMode::Vfio => "vfio-pci",
            GuestMode::GuestKernel => "vfio-pci-gk",
        }
    }
}

/// What a `--device` argument (or an OCI `linux.devices` path) names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceArg {
    Bdf(HostBdf),
    Group(u32),
}

/// `vfio:0000:01:00.0`, `vfio-gk:0000:01:00.0`, `/dev/vfio/12`,
/// `vfio-gk:/dev/vfio/12`.
pub fn parse_device_arg(arg: &str) -> anyhow::Result<(DeviceArg, GuestMode)> {
    let (mode, rest) = if let Some(r) = arg.strip_prefix("vfio-gk:") {
        (GuestMode::GuestKernel, r)
    } else if let Some(r) = arg.strip_prefix("vfio:") {
        (GuestMode::Vfio, r)
    } else {
        (GuestMode::Vfio, arg)
    };
    if let Some(g) = vfio_group_path(rest) {
        return Ok((DeviceArg::Group(g), mode));
    }
    if rest.starts_with('/') {
        anyhow::bail!("--device {arg}: a VFIO group is /dev/vfio/<number>");
    }
    let bdf = rest
        .parse()
        .with_context(|| format!("--device {arg}: give vfio:<PCI address> or /dev/vfio/<group>"))?;
    Ok((DeviceArg::Bdf(bdf), mode))
}

/// The group number of a `/dev/vfio/<N>` path.
pub fn vfio_group_path(p: &str) -> Option<u32> {
    p.strip_prefix("/dev/vfio/")?.parse().ok()
}

/// The VFIO groups among a spec's `linux.devices`, in order.
pub fn groups_in_spec(spec: &oci_spec::runtime::Spec) -> Vec<u32> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.devices().clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|d| vfio_group_path(&d.path().display().to_string()))
        .collect()
}

/// Writes to sysfs files. The real one writes; the tests' one also plays
/// the kernel's part (binding drivers).
pub trait SysfsWriter {
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()>;
}

pub struct RealWriter;

impl SysfsWriter for RealWriter {
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()> {
        std::fs::write(path, value)
    }
}

/// A host PCI device as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    pub bdf: HostBdf,
    pub class: u32,
    pub driver: Option<String>,
}

impl PciDevice {
    pub fn is_bridge(&self) -> bool {
        self.class == CLASS_BRIDGE
    }
}

/// A device this shim bound to vfio-pci, and the driver to give it back to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundDevice {
    pub bdf: HostBdf,
    pub original_driver: Option<String>,
}

/// One IOMMU group to pass through: its devices (bridges left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlan {
    pub group: u32,
    pub devices: Vec<PciDevice>,
    pub mode: GuestMode,
}

/// The host's sysfs and procfs under `root` ("/" for real).
pub struct Host<'a> {
    root: PathBuf,
    writer: &'a dyn SysfsWriter,
}

impl<'a> Host<'a> {
    pub fn new(root: impl Into<PathBuf>, writer: &'a dyn SysfsWriter) -> Host<'a> {
        Host {
            root: root.into(),
            writer,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    fn device_dir(&self, bdf: &HostBdf) -> PathBuf {
        self.path("/sys/bus/pci/devices").join(&bdf.0)
    }

    fn write(&self, path: &Path, value: &str) -> anyhow::Result<()> {
        self.writer
            .write(path, value)
            .with_context(|| format!("writing {value:?} to {}", path.display()))
    }

    pub fn device(&self, bdf: &HostBdf) -> anyhow::Result<PciDevice> {
        let dir = self.device_dir(bdf);
        if !dir.exists() {
            anyhow::bail!(
                "there is no PCI device {bdf} on this host ({} is missing)",
                dir.display()
            );
        }
        let class = std::fs::read_to_string(dir.join("class"))
            .ok()
            .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
            .map_or(0, |c| c >> 8);
        Ok(PciDevice {
            bdf: bdf.clone(),
            class,
            driver: self.driver(bdf),
        })
    }

    pub fn driver(&self, bdf: &HostBdf) -> Option<String> {
        std::fs::read_link(self.device_dir(bdf).join("driver"))
            .ok()?
            .file_name()?
            .to_str()
            .map(str::to_string)
    }

    pub fn group_of(&self, bdf: &HostBdf) -> anyhow::Result<u32> {
        self.device(bdf)?;
        let link = self.device_dir(bdf).join("iommu_group");
        let target = std::fs::read_link(&link).map_err(|_| {
            anyhow::anyhow!(
                "PCI device {bdf} has no IOMMU group: the host has no IOMMU enabled \
                 (intel_iommu=on / amd_iommu=on on the host's kernel command line), so it cannot be passed through"
            )
        })?;
        target
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .with_context(|| {
                format!(
                    "{} points to {}, not an IOMMU group",
                    link.display(),
                    target.display()
                )
            })
    }

    pub fn group_devices(&self, group: u32) -> anyhow::Result<Vec<PciDevice>> {
        let dir = self.path(&format!("/sys/kernel/iommu_groups/{group}/devices"));
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .with_context(|| format!("IOMMU group {group} does not exist ({})", dir.display()))?
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        names.sort();
        names.iter().map(|n| self.device(&n.parse()?)).collect()
    }

    /// Resolves the requested devices to whole IOMMU groups. A device named by
    /// address brings its group only if every other non-bridge member of the
    /// group is named too (the kernel would refuse the group otherwise).
    pub fn plan(&self, requests: &[(DeviceArg, GuestMode)]) -> anyhow::Result<Vec<GroupPlan>> {
        let mut named = BTreeSet::new();
        let mut groups: Vec<(u32, GuestMode)> = Vec::new();
        for (arg, mode) in requests {
            let g = match arg {
                DeviceArg::Bdf(b) => {
                    named.insert(b.clone());
                    self.group_of(b)?
                }
                DeviceArg::Group(g) => {
                    for d in self.group_devices(*g)? {
                        named.insert(d.bdf);
                    }
                    *g
                }
            };
            match groups.iter().find(|(x, _)| *x == g) {
                Some((_, m)) if m != mode => anyhow::bail!(
                    "IOMMU group {g} is asked for both as {} and as {}",
                    m.device_type(),
                    mode.device_type()
                ),
                Some(_) => {}
                None => groups.push((g, *mode)),
            }
        }
        let mut plans = Vec::new();
        for (g, mode) in groups {
            let members = self.group_devices(g)?;
            let missing: Vec<String> = members
                .iter()
                .filter(|d| !d.is_bridge() && !named.contains(&d.bdf))
                .map(|d| d.bdf.0.clone())
                .collect();
            if !missing.is_empty() {
                anyhow::bail!(
                    "IOMMU group {g} also holds {}: a group is passed through whole; \
                     add them (--device vfio:ADDR) or pass the group (--device /dev/vfio/{g})",
                    missing.join(", ")
                );
            }
            plans.push(GroupPlan {
                group: g,
                devices: members.into_iter().filter(|d| !d.is_bridge()).collect(),
                mode,
            });
        }
        Ok(plans)
    }

    /// Why the host is using `bdf`, if it is: a mounted block device or an
    /// up network interface below it. `mounts` is /proc/mounts' text.
    pub fn in_use(&self, bdf: &HostBdf, mounts: &str) -> Vec<String> {
        let mut why = Vec::new();
        let Ok(dev) = std::fs::canonicalize(self.device_dir(bdf)) else {
            return why;
        };
        let below = |link: &Path| {
            std::fs::canonicalize(link)
                .map(|t| t.starts_with(&dev))
                .unwrap_or(false)
        };
        let sources: Vec<&str> = mounts
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.next()?, f.next()?))
            })
            .map(|(src, _)| src)
            .collect();
        for e in std::fs::read_dir(self.path("/sys/block"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if !below(&e.path()) {
                continue;
            }
            let disk = e.file_name().to_string_lossy().into_owned();
            // The disk and its partitions (subdirectories named after it).
            let mut names = vec![disk.clone()];
            for p in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                let n = p.file_name().to_string_lossy().into_owned();
                if n.starts_with(&disk) {
                    names.push(n);
                }
            }
            for n in names {
                let node = format!("/dev/{n}");
                if sources.contains(&node.as_str()) {
                    why.push(format!("block device {node} is mounted"));
                }
            }
        }
        for e in std::fs::read_dir(self.path("/sys/class/net"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if !below(&e.path()) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let oper = std::fs::read_to_string(e.path().join("operstate")).unwrap_or_default();
            let flags = std::fs::read_to_string(e.path().join("flags"))
                .ok()
                .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
                .unwrap_or(0);
            if oper.trim() == "up" || flags & libc::IFF_UP as u32 != 0 {
                why.push(format!("network interface {name} is up"));
            }
        }
        why
    }

    /// Refuses devices the host is using, unless `force`.
    pub fn check_not_in_use(&self, plans: &[GroupPlan], force: bool) -> anyhow::Result<()> {
        let mounts = std::fs::read_to_string(self.path("/proc/mounts")).unwrap_or_default();
        for d in plans.iter().flat_map(|p| &p.devices) {
            let why = self.in_use(&d.bdf, &mounts);
            if why.is_empty() {
                continue;
            }
            if force {
                tracing::warn!(
                    "passing {} through although {} (--force)",
                    d.bdf,
                    why.join(", ")
                );
            } else {
                anyhow::bail!(
                    "the host is using PCI device {}: {}; passing it through would take it away \
                     (unmount / bring it down first, or use --force)",
                    d.bdf,
                    why.join(", ")
                );
            }
        }
        Ok(())
    }

    /// Binds `dev` to vfio-pci: `driver_override`, unbind, `drivers_probe`.
    /// `record` is called with what to restore before anything is written.
    pub fn bind(
        &self,
        dev: &PciDevice,
        record: &mut dyn FnMut(BoundDevice) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        if !self.path("/sys/bus/pci/drivers/vfio-pci").exists() {
            anyhow::bail!("the host has no vfio-pci driver loaded (modprobe vfio-pci)");
        }
        let current = self.driver(&dev.bdf);
        if current.as_deref() == Some(VFIO_PCI) {
            tracing::info!("{} is already bound to vfio-pci; left as it is", dev.bdf);
            return Ok(());
        }
        record(BoundDevice {
            bdf: dev.bdf.clone(),
            original_driver: current.clone(),
        })?;
        let dir = self.device_dir(&dev.bdf);
        self.write(&dir.join("driver_override"), VFIO_PCI)?;
        if current.is_some() {
            self.write(&dir.join("driver/unbind"), &dev.bdf.0)?;
        }
        self.write(&self.path("/sys/bus/pci/drivers_probe"), &dev.bdf.0)?;
        match self.driver(&dev.bdf) {
            Some(d) if d == VFIO_PCI => {
                tracing::info!(
                    "{} bound to vfio-pci (was {})",
                    dev.bdf,
                    current.as_deref().unwrap_or("no driver")
                );
                Ok(())
            }
            other => anyhow::bail!(
                "{} did not bind to vfio-pci (its driver is now {})",
                dev.bdf,
                other.as_deref().unwrap_or("none")
            ),
        }
    }

    /// Gives a device back: clear `driver_override`, unbind from vfio-pci,
    /// `drivers_probe` (the kernel picks the original driver again).
    pub fn restore(&self, b: &BoundDevice) -> anyhow::Result<()> {
        let dir = self.device_dir(&b.bdf);
        if !dir.exists() {
            return Ok(());
        }
        // Only a device kiln handed to vfio-pci is touched: a stale or
        // planted state.json naming another device (the host's NIC) must not
        // unbind it from its driver.
        let over = std::fs::read_to_string(dir.join("driver_override")).unwrap_or_default();
        if over.trim() != VFIO_PCI {
            anyhow::bail!(
                "{} has driver_override {:?}, not {VFIO_PCI:?}: kiln did not bind it, left alone",
                b.bdf,
                over.trim()
            );
        }
        self.write(&dir.join("driver_override"), "\n")?;
        if self.driver(&b.bdf).as_deref() == Some(VFIO_PCI) {
            self.write(&dir.join("driver/unbind"), &b.bdf.0)?;
        }
        self.write(&self.path("/sys/bus/pci/drivers_probe"), &b.bdf.0)?;
        let now = self.driver(&b.bdf);
        if now != b.original_driver {
            tracing::warn!(
                "{} is now driven by {}, not by {} as before",
                b.bdf,
                now.as_deref().unwrap_or("nothing"),
                b.original_driver.as_deref().unwrap_or("nothing")
            );
        } else {
            tracing::info!(
                "{} given back to {}",
                b.bdf,
                now.as_deref().unwrap_or("no driver")
            );
        }
        Ok(())
    }
}

/// Devices bound for one VM; gives them back when dropped (after QEMU is
/// gone: vfio-pci's unbind waits until the device is released).
pub struct VfioBinding {
    root: PathBuf,
    pub bound: Vec<BoundDevice>,
}

impl VfioBinding {
    /// Binds every device of `plans`, handing each to `record` (the run
    /// state, so a killed shim's devices can be given back) before it is
    /// bound; on error, what was bound is given back.
    pub fn bind(
        root: &Path,
        plans: &[GroupPlan],
        record: &mut dyn FnMut(BoundDevice) -> anyhow::Result<()>,
    ) -> anyhow::Result<VfioBinding> {
        let mut binding = VfioBinding {
            root: root.to_path_buf(),
            bound: Vec::new(),
        };
        let host = Host::new(root, &RealWriter);
        for d in plans.iter().flat_map(|p| &p.devices) {
            let mut recorded = None;
            let r = host.bind(d, &mut |b| {
                recorded = Some(b.clone());
                record(b)
            });
            if let Some(b) = recorded {
                binding.bound.push(b);
            }
            r?;
        }
        Ok(binding)
    }

    pub fn restore_all(&mut self) {
        let host = Host::new(&self.root, &RealWriter);
        for b in self.bound.drain(..).rev() {
            if let Err(e) = host.restore(&b) {
                tracing::warn!("giving {} back to its driver: {e:#}", b.bdf);
            }
        }
    }
}

impl Drop for VfioBinding {
    fn drop(&mut self) {
        self.restore_all();
    }
}

/// The pcie-root-port and device options for cold-plugged VFIO devices.
pub const COLD_PORT_SLOT_BASE: u32 = 0x18;
/// Slots 0x18..=0x1e: 0x1f is the q35 ICH9 functions'.
pub const MAX_COLD_DEVICES: u32 = 7;

pub fn cold_port_id(i: u32) -> String {
    format!("kiln_vfio_rp{i}")
}

/// Guest PCI path of the i-th cold-plugged device (kiln's root-bus form for
/// another domain, see the agent's `pci` module): `<port slot>/00` behind its
/// root port; on pseries `0001:00/<slot>` on the passed devices' PHB; on
/// s390x `<uid>:00/00`, its zPCI function's own domain.
pub fn cold_device_path(arch: kiln_manifest::Arch, i: u32) -> String {
    match arch {
        kiln_manifest::Arch::Ppc64le => format!("0001:00/{:02x}", COLD_PORT_SLOT_BASE + i),
        kiln_manifest::Arch::S390x => format!("{:04x}:00/00", zpci_uid(i)),
        _ => format!("{:02x}/00", COLD_PORT_SLOT_BASE + i),
    }
}

/// The zPCI uid (and fid) of the i-th passed device on s390x. With the
/// unique uids QEMU reports, the guest makes the uid the PCI domain.
pub fn zpci_uid(i: u32) -> u32 {
    COLD_PORT_SLOT_BASE + i
}

/// What QEMU attaches for one passed device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A real host device: `vfio-pci,host=BDF`.
    Host(HostBdf),
    /// An emulated QEMU device (`edu`, `e1000e`, `pci-testdev`) presented to
    /// the agent as host device `pretend` (testing and demos, no IOMMU needed
    /// on the host).
    Emulated { driver: String, pretend: HostBdf },
}

impl Backend {
    /// The host address the agent is told about.
    pub fn host_bdf(&self) -> &HostBdf {
        match self {
            Backend::Host(b) => b,
            Backend::Emulated { pretend, .. } => pretend,
        }
    }

    /// `-device` value (without bus and id).
    pub fn qemu_device(&self) -> String {
        match self {
            Backend::Host(b) => format!("vfio-pci,host={b}"),
            Backend::Emulated { driver, .. } => driver.clone(),
        }
    }
}

/// `--emulated-vfio DRIVER@BDF`, e.g. `edu@0000:ab:00.0`.
pub fn parse_emulated(arg: &str) -> anyhow::Result<Backend> {
    let (driver, bdf) = arg.split_once('@').with_context(|| {
        format!("--emulated-vfio {arg}: give DRIVER@PCI-ADDRESS, e.g. edu@0000:ab:00.0")
    })?;
    // virtio-rng-pci-non-transitional: the one spare PCI function QEMU's
    // s390x has (no edu there); no I/O BAR, which zPCI cannot map.
    const DRIVERS: &[&str] = &[
        "edu",
        "e1000e",
        "pci-testdev",
        "virtio-rng-pci-non-transitional",
    ];
    if !DRIVERS.contains(&driver) {
        anyhow::bail!(
            "--emulated-vfio {arg}: `{driver}` is not one of the emulated devices kiln-shim attaches ({})",
            DRIVERS.join(", ")
        );
    }
    Ok(Backend::Emulated {
        driver: driver.to_string(),
        pretend: bdf
            .parse()
            .with_context(|| format!("--emulated-vfio {arg}"))?,
    })
}

/// One device the VM gets, where, and how the agent hears of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassedDevice {
    pub backend: Backend,
    pub mode: GuestMode,
    /// Host IOMMU group, for the container path `/dev/vfio/<group>`.
    pub host_group: u32,
    /// Guest PCI path, e.g. `18/00`.
    pub pci_path: String,
}

impl PassedDevice {
    /// Kata's `Device` for CreateContainerRequest.devices.
    pub fn agent_device(&self) -> kiln_protocol::agent::Device {
        let mut d = kiln_protocol::agent::Device::new();
        d.id = format!("vfio-{}", self.backend.host_bdf());
        d.type_ = self.mode.device_type().into();
        d.container_path = format!("/dev/vfio/{}", self.host_group);
        d.options = vec![format!("{}={}", self.backend.host_bdf(), self.pci_path)];
        d
    }
}

/// What a VM is to get passed through (from `--device`, the spec's
/// `linux.devices` and `--emulated-vfio`).
#[derive(Debug, Clone, Default)]
pub struct VfioOptions {
    /// Host devices: bound to vfio-pci for the VM's life.
    pub host: Vec<(DeviceArg, GuestMode)>,
    /// Emulated stand-ins (testing and demos), passed to the agent as `vfio-pci`.
    pub emulated: Vec<Backend>,
    /// Pass devices the host is using (mounted, up) anyway.
    pub force: bool,
    /// A virtual IOMMU even without cold `vfio-pci` devices (for hot-plugging).
    pub viommu: bool,
}

impl VfioOptions {
    pub fn is_empty(&self) -> bool {
        self.host.is_empty() && self.emulated.is_empty() && !self.viommu
    }

    /// Adds the groups a bundle's `linux.devices` name (`/dev/vfio/<group>`)
    /// as `vfio` passthrough, unless the command line already passes them.
    pub fn add_spec_groups(&mut self, spec: &oci_spec::runtime::Spec) {
        for g in groups_in_spec(spec) {
            let arg = DeviceArg::Group(g);
            if !self.host.iter().any(|(a, _)| *a == arg) {
                self.host.push((arg, GuestMode::Vfio));
            }
        }
    }
}

/// The pretend host IOMMU group of the i-th emulated device (its container
/// path is `/dev/vfio/<this>`); real groups are small numbers.
pub fn emulated_group(i: u32) -> u32 {
    900 + i
}

/// Kernel parameters an x86_64 guest needs to use vfio-pci itself.
pub const GUEST_IOMMU_PARAMS: &str = "intel_iommu=on vfio_iommu_type1.allow_unsafe_interrupts=1";

/// Kernel parameters a guest of `arch` needs to use vfio-pci itself: the
/// IOMMU switched on where it is off by default, and interrupts allowed
/// without remapping (neither virtual IOMMU remaps them under TCG).
/// pseries needs none: its TCE IOMMU is always on and VFIO there is not type1.
pub fn guest_iommu_params(arch: kiln_manifest::Arch) -> &'static str {
    match arch {
        kiln_manifest::Arch::X86_64 => GUEST_IOMMU_PARAMS,
        kiln_manifest::Arch::Ppc64le => "",
        _ => "vfio_iommu_type1.allow_unsafe_interrupts=1",
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;

    /// Plays the kernel: `driver_override`, `unbind` and `drivers_probe`
    /// change the `driver` links as the PCI core would; every write is logged.
    struct FakeKernel {
        root: PathBuf,
        log: RefCell<Vec<(String, String)>>,
    }

    impl SysfsWriter for FakeKernel {
        fn write(&self, path: &Path, value: &str) -> std::io::Result<()> {
            let rel = path.strip_prefix(&self.root).unwrap().display().to_string();
            self.log.borrow_mut().push((rel.clone(), value.to_string()));
            let devs = self.root.join("sys/bus/pci/devices");
            if rel.ends_with("/driver_override") {
                return fs::write(path, value.trim());
            }
            if rel.ends_with("/unbind") {
                let link = devs.join(value).join("driver");
                return fs::remove_file(link);
            }
            if rel == "sys/bus/pci/drivers_probe" {
                let dev = devs.join(value);
                if dev.join("driver").exists() {
                    return Ok(());
                }
                let over = fs::read_to_string(dev.join("driver_override")).unwrap_or_default();
                let native = fs::read_to_string(dev.join("native_driver")).unwrap_or_default();
                let drv = if over.trim().is_empty() {
                    native.trim().to_string()
                } else {
                    over.trim().to_string()
                };
                if !drv.is_empty() {
                    symlink(
                        self.root.join("sys/bus/pci/drivers").join(&drv),
                        dev.join("driver"),
                    )?;
                }
                return Ok(());
            }
            Err(std::io::Error::other(format!("unexpected write to {rel}")))
        }
    }

    fn kernel(root: &Path) -> FakeKernel {
        FakeKernel {
            root: root.to_path_buf(),
            log: RefCell::new(Vec::new()),
        }
    }

    /// Group 5: root port 00:1c.0 (bridge), NIC 01:00.0 (ixgbe, eth0) and
    /// its function 01:00.1 (ixgbe). Group 6: NVMe 02:00.0 (nvme0n1p1 mounted
    /// on /data).
    fn fake_host(root: &Path) {
        let devices = root.join("sys/devices/pci0000:00");
        let bus = root.join("sys/bus/pci");
        for d in ["ixgbe", "nvme", "pcieport", "vfio-pci"] {
            fs::create_dir_all(bus.join("drivers").join(d)).unwrap();
        }
        fs::create_dir_all(bus.join("devices")).unwrap();
        for (bdf, real, class, group, driver) in [
            ("0000:00:1c.0", "0000:00:1c.0", "0x060400", 5, "pcieport"),
            (
                "0000:01:00.0",
                "0000:00:1c.0/0000:01:00.0",
                "0x020000",
                5,
                "ixgbe",
            ),
            (
                "0000:01:00.1",
                "0000:00:1c.0/0000:01:00.1",
                "0x020000",
                5,
                "ixgbe",
            ),
            ("0000:02:00.0", "0000:02:00.0", "0x010802", 6, "nvme"),
        ] {
            let dir = devices.join(real);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("class"), class).unwrap();
            fs::write(dir.join("driver_override"), "").unwrap();
            fs::write(dir.join("native_driver"), driver).unwrap();
            symlink(bus.join("drivers").join(driver), dir.join("driver")).unwrap();
            let g = root.join(format!("sys/kernel/iommu_groups/{group}"));
            fs::create_dir_all(g.join("devices")).unwrap();
            symlink(&g, dir.join("iommu_group")).unwrap();
            symlink(&dir, g.join("devices").join(bdf)).unwrap();
            symlink(&dir, bus.join("devices").join(bdf)).unwrap();
        }
        let net = devices.join("0000:00:1c.0/0000:01:00.0/net/eth0");
        fs::create_dir_all(&net).unwrap();
        fs::write(net.join("operstate"), "down\n").unwrap();
        fs::write(net.join("flags"), "0x1002\n").unwrap();
        fs::create_dir_all(root.join("sys/class/net")).unwrap();
        symlink(&net, root.join("sys/class/net/eth0")).unwrap();
        let disk = devices.join("0000:02:00.0/nvme/nvme0/nvme0n1");
        fs::create_dir_all(disk.join("nvme0n1p1")).unwrap();
        fs::create_dir_all(root.join("sys/block")).unwrap();
        symlink(&disk, root.join("sys/block/nvme0n1")).unwrap();
        fs::create_dir_all(root.join("proc")).unwrap();
        fs::write(
            root.join("proc/mounts"),
            "/dev/sda1 / ext4 rw 0 0\n/dev/nvme0n1p1 /data xfs rw 0 0\n",
        )
        .unwrap();
    }

    fn bdf(s: &str) -> HostBdf {
        s.parse().unwrap()
    }

    #[test]
    fn device_args_parse() {
        assert_eq!(
            parse_device_arg("vfio:0000:01:00.0").unwrap(),
            (DeviceArg::Bdf(bdf("0000:01:00.0")), GuestMode::Vfio)
        );
        assert_eq!(
            parse_device_arg("/dev/vfio/12").unwrap(),
            (DeviceArg::Group(12), GuestMode::Vfio)
        );
        assert_eq!(
            parse_device_arg("vfio-gk:01:00.1").unwrap(),
            (DeviceArg::Bdf(bdf("0000:01:00.1")), GuestMode::GuestKernel)
        );
        for bad in ["vfio:zz", "/dev/vfio/x", "/dev/sda", "vfio:0000:01:00.9"] {
            assert!(parse_device_arg(bad).is_err(), "{bad}");
        }
        assert!(parse_emulated("edu@0000:ab:00.0").is_ok());
        assert!(parse_emulated("virtio-net@0000:ab:00.0").is_err());
        assert!(parse_emulated("edu").is_err());
    }

    #[test]
    fn groups_must_be_passed_whole_but_bridges_stay() {
        let dir = tempfile::tempdir().unwrap();
        fake_host(dir.path());
        let k = kernel(dir.path());
        let host = Host::new(dir.path(), &k);
        assert_eq!(host.group_of(&bdf("0000:01:00.1")).unwrap(), 5);
        let err = host
            .plan(&[(DeviceArg::Bdf(bdf("0000:01:00.0")), GuestMode::Vfio)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("0000:01:00.1") && !err.contains("00:1c.0"),
            "{err}"
        );
        let plans = host
            .plan(&[
                (DeviceArg::Bdf(bdf("0000:01:00.0")), GuestMode::Vfio),
                (DeviceArg::Bdf(bdf("0000:01:00.1")), GuestMode::Vfio),
            ])
            .unwrap();
        assert_eq!(plans.len(), 1);
        let names: Vec<_> = plans[0].devices.iter().map(|d| d.bdf.0.as_str()).collect();
        assert_eq!(names, ["0000:01:00.0", "0000:01:00.1"]);
        let by_group = host
            .plan(&[(DeviceArg::Group(5), GuestMode::Vfio)])
            .unwrap();
        assert_eq!(by_group, plans);
        let err = host
            .plan(&[(DeviceArg::Bdf(bdf("0000:09:00.0")), GuestMode::Vfio)])
            .unwrap_err();
        assert!(
            err.to_string().contains("no PCI device 0000:09:00.0"),
            "{err}"
        );
        assert!(host
            .plan(&[(DeviceArg::Group(99), GuestMode::Vfio)])
            .is_err());
    }

    #[test]
    fn bind_and_restore_through_the_kernel_knobs() {
        let dir = tempfile::tempdir().unwrap();
        fake_host(dir.path());
        let k = kernel(dir.path());
        let host = Host::new(dir.path(), &k);
        let plans = host
            .plan(&[(DeviceArg::Group(5), GuestMode::Vfio)])
            .unwrap();
        let mut recorded = Vec::new();
        for d in &plans[0].devices {
            host.bind(d, &mut |b| {
                recorded.push(b);
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(host.driver(&bdf("0000:01:00.0")).as_deref(), Some(VFIO_PCI));
        assert_eq!(host.driver(&bdf("0000:01:00.1")).as_deref(), Some(VFIO_PCI));
        assert_eq!(
            host.driver(&bdf("0000:00:1c.0")).as_deref(),
            Some("pcieport")
        );
        assert_eq!(
            recorded[0],
            BoundDevice {
                bdf: bdf("0000:01:00.0"),
                original_driver: Some("ixgbe".into())
            }
        );
        let first: Vec<_> = k.log.borrow()[..3].to_vec();
        assert_eq!(
            first,
            vec![
                (
                    "sys/bus/pci/devices/0000:01:00.0/driver_override".to_string(),
                    "vfio-pci".to_string()
                ),
                (
                    "sys/bus/pci/devices/0000:01:00.0/driver/unbind".to_string(),
                    "0000:01:00.0".to_string()
                ),
                (
                    "sys/bus/pci/drivers_probe".to_string(),
                    "0000:01:00.0".to_string()
                ),
            ]
        );
        // Bound already: nothing written, nothing recorded.
        let n = k.log.borrow().len();
        host.bind(&plans[0].devices[0], &mut |_| panic!("recorded twice"))
            .unwrap();
        assert_eq!(k.log.borrow().len(), n);

        for b in recorded.iter().rev() {
            host.restore(b).unwrap();
        }
        assert_eq!(host.driver(&bdf("0000:01:00.0")).as_deref(), Some("ixgbe"));
        assert_eq!(host.driver(&bdf("0000:01:00.1")).as_deref(), Some("ixgbe"));
        assert_eq!(
            fs::read_to_string(
                dir.path()
                    .join("sys/bus/pci/devices/0000:01:00.0/driver_override")
            )
            .unwrap(),
            ""
        );
    }

    /// A stale or planted state.json: a device kiln never bound (the NVMe
    /// holding /data) is not unbound from its driver, and a path in place
    /// of an address does not even load.
    #[test]
    fn restore_touches_only_devices_bound_to_vfio_pci() {
        let dir = tempfile::tempdir().unwrap();
        fake_host(dir.path());
        let k = kernel(dir.path());
        let host = Host::new(dir.path(), &k);
        let planted = BoundDevice {
            bdf: bdf("0000:02:00.0"),
            original_driver: None,
        };
        let err = host.restore(&planted).unwrap_err().to_string();
        assert!(err.contains("left alone"), "{err}");
        assert!(k.log.borrow().is_empty(), "{:?}", k.log.borrow());
        assert_eq!(host.driver(&bdf("0000:02:00.0")).as_deref(), Some("nvme"));
        for bad in ["../../../../etc", "0000:01:00.0/../..", "", "0000:01:00.8"] {
            let json = format!(r#"{{"bdf":"{bad}","original_driver":null}}"#);
            assert!(
                serde_json::from_str::<BoundDevice>(&json).is_err(),
                "{bad:?} was accepted"
            );
        }
        let good: BoundDevice =
            serde_json::from_str(r#"{"bdf":"0000:01:00.0","original_driver":"ixgbe"}"#).unwrap();
        assert_eq!(good.bdf, bdf("0000:01:00.0"));
    }

    #[test]
    fn binding_fails_clearly_without_vfio_pci() {
        let dir = tempfile::tempdir().unwrap();
        fake_host(dir.path());
        fs::remove_dir(dir.path().join("sys/bus/pci/drivers/vfio-pci")).unwrap();
        let k = kernel(dir.path());
        let host = Host::new(dir.path(), &k);
        let d = host.device(&bdf("0000:01:00.0")).unwrap();
        let err = host.bind(&d, &mut |_| Ok(())).unwrap_err().to_string();
        assert!(err.contains("modprobe vfio-pci"), "{err}");
        assert!(k.log.borrow().is_empty());
    }

    #[test]
    fn devices_the_host_uses_are_refused_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        fake_host(dir.path());
        let k = kernel(dir.path());
        let host = Host::new(dir.path(), &k);
        let nvme = host
            .plan(&[(DeviceArg::Group(6), GuestMode::Vfio)])
            .unwrap();
        let err = host.check_not_in_use(&nvme, false).unwrap_err().to_string();
        assert!(
            err.contains("/dev/nvme0n1p1 is mounted") && err.contains("--force"),
            "{err}"
        );
        host.check_not_in_use(&nvme, true).unwrap();

        let nic = host
            .plan(&[(DeviceArg::Group(5), GuestMode::Vfio)])
            .unwrap();
        host.check_not_in_use(&nic, false).unwrap();
        let eth0 = dir
            .path()
            .join("sys/devices/pci0000:00/0000:00:1c.0/0000:01:00.0/net/eth0");
        fs::write(eth0.join("operstate"), "up\n").unwrap();
        let err = host.check_not_in_use(&nic, false).unwrap_err().to_string();
        assert!(err.contains("eth0 is up"), "{err}");
        fs::write(eth0.join("operstate"), "unknown\n").unwrap();
        fs::write(eth0.join("flags"), "0x1003\n").unwrap();
        assert!(
            host.check_not_in_use(&nic, false).is_err(),
            "IFF_UP in flags"
        );
    }

    #[test]
    fn agent_device_is_katas() {
        let d = PassedDevice {
            backend: Backend::Host(bdf("0000:01:00.0")),
            mode: GuestMode::Vfio,
            host_group: 5,
            pci_path: cold_device_path(kiln_manifest::Arch::X86_64, 1),
        };
        let a = d.agent_device();
        assert_eq!(a.type_, "vfio-pci");
        assert_eq!(a.options, vec!["0000:01:00.0=19/00"]);
        assert_eq!(a.container_path, "/dev/vfio/5");
        assert_eq!(d.backend.qemu_device(), "vfio-pci,host=0000:01:00.0");
    }

    #[test]
    fn a_bundles_vfio_groups_are_passed_once() {
        let dev = |p: &str| {
            let mut d = oci_spec::runtime::LinuxDevice::default();
            d.set_path(p.into());
            d
        };
        let mut linux = oci_spec::runtime::Linux::default();
        linux.set_devices(Some(vec![
            dev("/dev/vfio/12"),
            dev("/dev/null"),
            dev("/dev/vfio/3"),
        ]));
        let mut spec = oci_spec::runtime::Spec::default();
        spec.set_linux(Some(linux));
        assert_eq!(groups_in_spec(&spec), vec![12, 3]);
        let mut opts = VfioOptions {
            host: vec![(DeviceArg::Group(3), GuestMode::Vfio)],
            emulated: vec![],
            force: false,
            viommu: false,
        };
        opts.add_spec_groups(&spec);
        let groups: Vec<_> = opts.host.iter().map(|(a, _)| a.clone()).collect();
        assert_eq!(groups, vec![DeviceArg::Group(3), DeviceArg::Group(12)]);
    }
}
