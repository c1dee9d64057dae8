//! CreateContainer's `devices`: PCI devices the host passed through with
//! VFIO, and block devices (`--device`, raw-block volumes).
//!
//! Block devices, Kata's form: `Device{type: "blk" | "virtio-blk" |
//! "virtio-blk-pci", vm_path: "<guest PCI path>"}`, `Device{type: "blk-ccw",
//! id: "<CCW bus id>"}` (s390x) or `Device{type: "scsi",
//! vm_path: "<target>:<lun>"}`, with `container_path` naming the spec's
//! `linux.devices` entry. The disk is awaited, and that entry and the
//! cgroup rules that named the host's device numbers get the guest's.
//!
//! Kata's form: `Device{type: "vfio-pci" | "vfio-pci-gk", options:
//! ["<host BDF>=<guest PCI path>", ...], container_path: "/dev/vfio/<host group>"}`.
//! Each guest PCI path is resolved to a guest BDF (waiting for a hot-plugged
//! device within `agent.hotplug_timeout`). `vfio-pci` rebinds every device of
//! the guest IOMMU group to vfio-pci and gives the container
//! `/dev/vfio/<guest group>` plus `/dev/vfio/vfio` (the spec's
//! `/dev/vfio/<host group>` entry becomes the guest group's node);
//! `vfio-pci-gk` keeps the guest kernel's driver. The host → guest BDF map
//! rewrites the container's `PCIDEVICE_*` variables (device plugins put host
//! addresses there), at CreateContainer and at every ExecProcess.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use kiln_protocol::{agent, oci};

use crate::error::{invalid, os, precondition, Result};
use crate::guest::GuestFs;
use crate::pci::{self, GuestBdf, PciPath};
use crate::storage::Disk;
use crate::uevent;

pub const VFIO_PCI: &str = "vfio-pci";
/// Block device types (virtio-blk by PCI path, virtio-scsi by address).
pub const BLOCK_TYPES: &[&str] = &["blk", "virtio-blk", "virtio-blk-pci", "blk-ccw", "scsi"];
pub const VFIO_PCI_GK: &str = "vfio-pci-gk";
const MAX_DEVICES: usize = 64;
/// `/dev/vfio/vfio` is misc device 196.
const VFIO_CONTAINER_DEV: (i64, i64) = (10, 196);
/// PCI class of a PCI-to-PCI bridge (root ports included): never rebound.
const CLASS_BRIDGE: u32 = 0x0604;

/// Host BDF → guest BDF, both `0000:01:00.0`.
pub type PciMap = BTreeMap<String, String>;

/// One `<host BDF>=<guest PCI path>` option.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VfioOption {
    host: String,
    path: PciPath,
}

/// `0000:01:00.0` (or `01:00.0`, domain 0) in lower case, if `s` is one.
pub fn parse_bdf(s: &str) -> Option<String> {
    let full = if s.len() == 7 {
        format!("0000:{s}")
    } else {
        s.to_string()
    };
    is_bdf(full.as_bytes()).then(|| full.to_ascii_lowercase())
}

/// `hhhh:hh:hh.f` exactly.
fn is_bdf(b: &[u8]) -> bool {
    b.len() == 12
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b':',
            10 => *c == b'.',
            11 => (b'0'..=b'7').contains(c),
            _ => c.is_ascii_hexdigit(),
        })
}

fn parse_option(device: &agent::Device, opt: &str) -> Result<VfioOption> {
    let (host, path) = opt.split_once('=').ok_or_else(|| {
        invalid(format!(
            "device {:?}: option {opt:?} is not <host BDF>=<guest PCI path>",
            device.container_path
        ))
    })?;
    let host = parse_bdf(host).ok_or_else(|| {
        invalid(format!(
            "device {:?}: {host:?} is not a PCI address like 0000:01:00.0",
            device.container_path
        ))
    })?;
    Ok(VfioOption {
        host,
        path: path.parse()?,
    })
}

/// Sets up the request's devices and rewrites `spec` (device nodes and
/// `PCIDEVICE_*` env) for them; returns the host → guest BDF map.
pub async fn setup(
    guest: &GuestFs,
    hotplug_timeout: Duration,
    devices: &[agent::Device],
    spec: &mut oci::Spec,
) -> Result<PciMap> {
    let mut map = PciMap::new();
    if devices.is_empty() {
        return Ok(map);
    }
    if devices.len() > MAX_DEVICES {
        return Err(invalid(format!(
            "{} devices in one request; at most {MAX_DEVICES}",
            devices.len()
        )));
    }
    // Validate everything before waiting on anything.
    let mut parsed = Vec::new();
    let mut blocks = Vec::new();
    for d in devices {
        if BLOCK_TYPES.contains(&d.type_.as_str()) {
            if d.container_path.is_empty() {
                return Err(invalid(format!(
                    "{} device {:?} has no container_path",
                    d.type_, d.vm_path
                )));
            }
            // Kata's runtime puts a CCW bus id in `id`, a PCI path or SCSI
            // address in `vm_path`.
            let at = if d.type_ == "blk-ccw" && d.vm_path.is_empty() {
                &d.id
            } else {
                &d.vm_path
            };
            blocks.push((d, Disk::parse(&d.type_, at)?));
            continue;
        }
        if d.type_ != VFIO_PCI && d.type_ != VFIO_PCI_GK {
            return Err(invalid(format!(
                "device {:?} has type {:?}; kiln-agent supports {VFIO_PCI:?}, {VFIO_PCI_GK:?} and {}",
                d.container_path,
                d.type_,
                BLOCK_TYPES.join(", ")
            )));
        }
        if d.options.is_empty() {
            return Err(invalid(format!(
                "{} device {:?} has no <host BDF>=<guest PCI path> option",
                d.type_, d.container_path
            )));
        }
        let opts = d
            .options
            .iter()
            .map(|o| parse_option(d, o))
            .collect::<Result<Vec<_>>>()?;
        parsed.push((d, opts));
    }
    let _ = std::fs::write(guest.path("/sys/bus/pci/rescan"), "1");
    for (d, at) in blocks {
        let name = at.wait(guest, hotplug_timeout).await?;
        let numbers = dev_numbers(
            guest,
            &format!("/sys/class/block/{name}/dev"),
            &format!("/dev/{name}"),
        )
        .ok_or_else(|| precondition(format!("cannot read the device numbers of /dev/{name}")))?;
        tracing::info!(device = %name, container_path = %d.container_path, "block device present");
        point_spec_at(spec, &d.container_path, "b", numbers)?;
    }
    for (d, opts) in parsed {
        let mut groups = Vec::new();
        for o in &opts {
            let bdf = wait_for_device(guest, hotplug_timeout, o).await?;
            tracing::info!(host = %o.host, guest = %bdf, kind = %d.type_, "VFIO device present");
            if d.type_ == VFIO_PCI {
                let group = group_for_vfio(guest, &bdf)?;
                if !groups.contains(&group) {
                    groups.push(group);
                }
            }
            map.insert(o.host.clone(), bdf.0);
        }
        for (i, group) in groups.iter().enumerate() {
            bind_group_to_vfio(guest, *group)?;
            wait_for_group_node(guest, hotplug_timeout, *group).await?;
            // The spec names the host's group; the first guest group takes its place.
            let from = (i == 0).then_some(d.container_path.as_str());
            add_group_node(guest, spec, *group, from)?;
        }
        if !groups.is_empty() {
            add_container_node(guest, spec);
        }
    }
    if let Some(p) = spec.Process.as_mut() {
        rewrite_pci_env(&mut p.Env, &map);
    }
    Ok(map)
}

/// Makes the spec's device entry at `container_path` the guest device
/// `numbers`, and rewrites the cgroup rules that allowed the host's numbers
/// (the runtime wrote the host's) to allow the guest's instead.
fn point_spec_at(
    spec: &mut oci::Spec,
    container_path: &str,
    kind: &str,
    numbers: (i64, i64),
) -> Result<()> {
    let linux = spec.Linux.mut_or_insert_default();
    let host = match linux.Devices.iter_mut().find(|d| d.Path == container_path) {
        Some(d) => {
            let host = (d.Major, d.Minor);
            d.Type = kind.into();
            (d.Major, d.Minor) = numbers;
            Some(host)
        }
        None => {
            let mut d = oci::LinuxDevice::new();
            d.Path = container_path.into();
            d.Type = kind.into();
            (d.Major, d.Minor) = numbers;
            d.FileMode = 0o660;
            linux.Devices.push(d);
            None
        }
    };
    if let Some(r) = linux.Resources.as_mut() {
        let mut allowed = false;
        for rule in r.Devices.iter_mut() {
            if Some((rule.Major, rule.Minor)) == host && (rule.Type == kind || rule.Type == "a") {
                (rule.Major, rule.Minor) = numbers;
                allowed |= rule.Allow;
            }
        }
        if host.is_none() || !allowed {
            let mut rule = oci::LinuxDeviceCgroup::new();
            rule.Allow = true;
            rule.Type = kind.into();
            (rule.Major, rule.Minor) = numbers;
            rule.Access = "rwm".into();
            r.Devices.push(rule);
        }
    }
    Ok(())
}

async fn wait_for_device(guest: &GuestFs, limit: Duration, o: &VfioOption) -> Result<GuestBdf> {
    let g = guest.clone();
    let path = o.path.clone();
    uevent::wait_for(
        &format!("PCI device {} (host {}) at guest PCI path", o.path, o.host),
        limit,
        move || pci::resolve(&g, &path),
        |ev| ev.get("SUBSYSTEM") == "pci",
    )
    .await
}

/// The guest IOMMU group of `bdf`.
pub fn iommu_group(guest: &GuestFs, bdf: &GuestBdf) -> Result<u32> {
    let link = guest
        .path("/sys/bus/pci/devices")
        .join(&bdf.0)
        .join("iommu_group");
    let target = std::fs::read_link(&link).map_err(|_| {
        precondition(format!(
            "guest device {bdf} has no IOMMU group, so it cannot be given to vfio-pci: \
             the VM needs a virtual IOMMU (q35: -device intel-iommu and intel_iommu=on; \
             virt: -device virtio-iommu-pci), \
             or pass the device as {VFIO_PCI_GK:?}"
        ))
    })?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            precondition(format!(
                "guest device {bdf}: iommu_group points to {}, not a group",
                target.display()
            ))
        })
}

fn pci_class(dev: &Path) -> u32 {
    std::fs::read_to_string(dev.join("class"))
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
        .map_or(0, |c| c >> 8)
}

fn driver_of(dev: &Path) -> Option<String> {
    std::fs::read_link(dev.join("driver"))
        .ok()?
        .file_name()?
        .to_str()
        .map(str::to_string)
}

/// The IOMMU group of `bdf`, which is to go to vfio-pci. On a device-tree
/// guest (aarch64 `virt` with virtio-iommu) a device joins its group only
/// when a driver probes it (`of_dma_configure` runs at probe), so a device
/// with no driver and no group is bound to vfio-pci first, which puts it
/// in its group.
fn group_for_vfio(guest: &GuestFs, bdf: &GuestBdf) -> Result<u32> {
    match iommu_group(guest, bdf) {
        Ok(group) => Ok(group),
        Err(e) => {
            let dev = guest.path("/sys/bus/pci/devices").join(&bdf.0);
            if driver_of(&dev).is_some() {
                return Err(e);
            }
            bind_to_vfio(guest, &bdf.0)?;
            iommu_group(guest, bdf)
        }
    }
}

/// Binds every device of guest IOMMU group `group` except bridges to
/// vfio-pci: `driver_override`, unbind from the current driver, `drivers_probe`.
pub fn bind_group_to_vfio(guest: &GuestFs, group: u32) -> Result<()> {
    let dir = guest.path(&format!("/sys/kernel/iommu_groups/{group}/devices"));
    let mut members: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| os(format_args!("listing {}", dir.display()), e))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    members.sort();
    for bdf in members {
        let dev = guest.path("/sys/bus/pci/devices").join(&bdf);
        if pci_class(&dev) == CLASS_BRIDGE {
            continue;
        }
        if let Some(from) = bind_to_vfio(guest, &bdf)? {
            tracing::info!(device = %bdf, group, from = ?from, "bound to vfio-pci");
        }
    }
    Ok(())
}

/// Binds one device to vfio-pci unless it is already: `driver_override`,
/// unbind from its driver, `drivers_probe`. Some(previous driver) when it
/// changed anything.
fn bind_to_vfio(guest: &GuestFs, bdf: &str) -> Result<Option<Option<String>>> {
    let dev = guest.path("/sys/bus/pci/devices").join(bdf);
    let current = driver_of(&dev);
    if current.as_deref() == Some(VFIO_PCI) {
        return Ok(None);
    }
    let write = |file: &Path, value: &str| {
        std::fs::write(file, value)
            .map_err(|e| os(format_args!("writing {value:?} to {}", file.display()), e))
    };
    write(&dev.join("driver_override"), VFIO_PCI)?;
    if current.is_some() {
        write(&dev.join("driver/unbind"), bdf)?;
    }
    write(&guest.path("/sys/bus/pci/drivers_probe"), bdf)?;
    Ok(Some(current))
}

async fn wait_for_group_node(guest: &GuestFs, limit: Duration, group: u32) -> Result<()> {
    let node = guest.path(&format!("/dev/vfio/{group}"));
    uevent::wait_for(
        &format!("/dev/vfio/{group} (vfio-pci bound to guest IOMMU group {group})"),
        limit,
        move || node.exists().then_some(()),
        |ev| ev.get("SUBSYSTEM") == "vfio" || ev.get("DEVNAME").starts_with("vfio"),
    )
    .await
}

/// `major:minor` of a character device from its sysfs `dev` file, else from
/// the node itself.
fn dev_numbers(guest: &GuestFs, sysfs_dev: &str, node: &str) -> Option<(i64, i64)> {
    if let Ok(s) = std::fs::read_to_string(guest.path(sysfs_dev)) {
        let (a, b) = s.trim().split_once(':')?;
        return Some((a.parse().ok()?, b.parse().ok()?));
    }
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(guest.path(node)).ok()?.rdev();
    (rdev != 0).then(|| {
        (
            nix::sys::stat::major(rdev) as i64,
            nix::sys::stat::minor(rdev) as i64,
        )
    })
}

fn char_device(path: &str, (major, minor): (i64, i64)) -> oci::LinuxDevice {
    let mut d = oci::LinuxDevice::new();
    d.Path = path.into();
    d.Type = "c".into();
    d.Major = major;
    d.Minor = minor;
    d.FileMode = 0o666;
    d
}

/// Gives the container `/dev/vfio/<group>`: the spec's entry at `from` (the
/// host group's path) is rewritten to it, or a new entry is added.
fn add_group_node(
    guest: &GuestFs,
    spec: &mut oci::Spec,
    group: u32,
    from: Option<&str>,
) -> Result<()> {
    let path = format!("/dev/vfio/{group}");
    let numbers = dev_numbers(guest, &format!("/sys/class/vfio/{group}/dev"), &path)
        .ok_or_else(|| precondition(format!("cannot read the device numbers of {path}")))?;
    let linux = spec.Linux.mut_or_insert_default();
    let existing = linux
        .Devices
        .iter_mut()
        .find(|d| d.Path == path || from.is_some_and(|f| !f.is_empty() && d.Path == f));
    match existing {
        Some(d) => {
            d.Path = path;
            d.Type = "c".into();
            d.Major = numbers.0;
            d.Minor = numbers.1;
        }
        None => linux.Devices.push(char_device(&path, numbers)),
    }
    Ok(())
}

fn add_container_node(guest: &GuestFs, spec: &mut oci::Spec) {
    const PATH: &str = "/dev/vfio/vfio";
    let numbers =
        dev_numbers(guest, "/sys/class/misc/vfio/dev", PATH).unwrap_or(VFIO_CONTAINER_DEV);
    let linux = spec.Linux.mut_or_insert_default();
    match linux.Devices.iter_mut().find(|d| d.Path == PATH) {
        Some(d) => {
            d.Major = numbers.0;
            d.Minor = numbers.1;
        }
        None => linux.Devices.push(char_device(PATH, numbers)),
    }
}

/// Rewrites host PCI addresses to guest ones in every `PCIDEVICE_*`
/// variable: comma-separated address lists entry by entry, and any address
/// inside the JSON of `PCIDEVICE_*_INFO`. Addresses not in `map` and values
/// that are not addresses stay as they are.
pub fn rewrite_pci_env(env: &mut [String], map: &PciMap) {
    if map.is_empty() {
        return;
    }
    for e in env.iter_mut() {
        let Some((name, value)) = e.split_once('=') else {
            continue;
        };
        if !name.starts_with("PCIDEVICE_") {
            continue;
        }
        let new = if name.ends_with("_INFO") {
            replace_addresses(value, map)
        } else {
            value
                .split(',')
                .map(|item| {
                    let t = item.trim();
                    match parse_bdf(t).and_then(|b| map.get(&b)) {
                        Some(g) => item.replacen(t, g, 1),
                        None => item.to_string(),
                    }
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        if new != value {
            *e = format!("{name}={new}");
        }
    }
}

/// Every whole-token `hhhh:hh:hh.f` in `s` that `map` knows, replaced.
fn replace_addresses(s: &str, map: &PciMap) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b':' || c == b'.';
    while i < b.len() {
        if i + 12 <= b.len()
            && is_bdf(&b[i..i + 12])
            && (i == 0 || !word(b[i - 1]))
            && (i + 12 == b.len() || !word(b[i + 12]))
        {
            let found = String::from_utf8_lossy(&b[i..i + 12]).to_ascii_lowercase();
            if let Some(g) = map.get(&found) {
                out.push_str(g);
                i += 12;
                continue;
            }
        }
        // Copy one whole UTF-8 character.
        let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;

    fn map(pairs: &[(&str, &str)]) -> PciMap {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn env(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn env_one_device() {
        let m = map(&[("0000:ab:00.0", "0000:01:00.0")]);
        let mut e = env(&["PCIDEVICE_TEST=0000:ab:00.0", "PATH=/bin"]);
        rewrite_pci_env(&mut e, &m);
        assert_eq!(e, env(&["PCIDEVICE_TEST=0000:01:00.0", "PATH=/bin"]));
    }

    #[test]
    fn env_several_devices_and_lists() {
        let m = map(&[
            ("0000:ab:00.0", "0000:01:00.0"),
            ("0000:ab:00.1", "0000:02:00.0"),
            ("0000:cd:10.2", "0000:03:00.0"),
        ]);
        let mut e = env(&[
            "PCIDEVICE_INTEL_COM_SRIOV=0000:ab:00.0,0000:AB:00.1, 0000:cd:10.2",
            "PCIDEVICE_OTHER=0000:cd:10.2",
            "PCIDEVICE_MIXED=0000:ab:00.0,0000:99:00.0,notanaddress",
        ]);
        rewrite_pci_env(&mut e, &m);
        assert_eq!(
            e,
            env(&[
                "PCIDEVICE_INTEL_COM_SRIOV=0000:01:00.0,0000:02:00.0, 0000:03:00.0",
                "PCIDEVICE_OTHER=0000:03:00.0",
                "PCIDEVICE_MIXED=0000:01:00.0,0000:99:00.0,notanaddress",
            ])
        );
    }

    #[test]
    fn env_info_json() {
        let m = map(&[("0000:ab:00.0", "0000:01:00.0")]);
        let mut e = env(&[
            r#"PCIDEVICE_INTEL_COM_SRIOV_INFO={"0000:ab:00.0":{"generic":{"deviceID":"0000:ab:00.0"}},"0000:ab:00.10":{}}"#,
        ]);
        rewrite_pci_env(&mut e, &m);
        assert_eq!(
            e,
            env(&[
                r#"PCIDEVICE_INTEL_COM_SRIOV_INFO={"0000:01:00.0":{"generic":{"deviceID":"0000:01:00.0"}},"0000:ab:00.10":{}}"#
            ]),
            "whole addresses only"
        );
    }

    #[test]
    fn env_untouched() {
        let m = map(&[("0000:ab:00.0", "0000:01:00.0")]);
        let orig = env(&[
            "OTHER=0000:ab:00.0",
            "PCIDEVICE_X=hello",
            "PCIDEVICE_Y=0000:ab:00.0x",
            "PCIDEVICE_Z=",
            "PCIDEVICE_NOT_MINE=0000:ac:00.0",
            "NOEQUALS",
        ]);
        let mut e = orig.clone();
        rewrite_pci_env(&mut e, &m);
        assert_eq!(e, orig);
        rewrite_pci_env(&mut e, &PciMap::new());
        assert_eq!(e, orig);
    }

    #[test]
    fn bdfs_parse() {
        assert_eq!(parse_bdf("0000:AB:00.0").as_deref(), Some("0000:ab:00.0"));
        assert_eq!(parse_bdf("ab:00.0").as_deref(), Some("0000:ab:00.0"));
        for bad in [
            "",
            "0000:ab:00.8",
            "0000:ab:00",
            "0000-ab:00.0",
            "00000:ab:00.0",
        ] {
            assert_eq!(parse_bdf(bad), None, "{bad}");
        }
    }

    /// Root bus: root port 10.0 (bus 01) holding an edu at 01:00.0 in IOMMU
    /// group 7 with the port, and a device with a driver at 01:00.1.
    fn fake_tree(root: &Path) {
        let devs = root.join("sys/bus/pci/devices");
        let groups = root.join("sys/kernel/iommu_groups/7/devices");
        fs::create_dir_all(&groups).unwrap();
        fs::create_dir_all(root.join("sys/bus/pci/drivers/foo")).unwrap();
        for (bdf, class) in [
            ("0000:00:10.0", "0x060400"),
            ("0000:01:00.0", "0x00ff00"),
            ("0000:01:00.1", "0x020000"),
        ] {
            let d = devs.join(bdf);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("class"), class).unwrap();
            fs::write(d.join("driver_override"), "(null)\n").unwrap();
            symlink("../../../../kernel/iommu_groups/7", d.join("iommu_group")).unwrap();
            symlink(&d, groups.join(bdf)).unwrap();
        }
        fs::create_dir_all(devs.join("0000:00:10.0/pci_bus/0000:01")).unwrap();
        // 01:00.1 is driven by `foo`; its unbind file is the driver's.
        symlink(
            root.join("sys/bus/pci/drivers/foo"),
            devs.join("0000:01:00.1/driver"),
        )
        .unwrap();
        fs::create_dir_all(root.join("sys/class/vfio/7")).unwrap();
        fs::write(root.join("sys/class/vfio/7/dev"), "244:0\n").unwrap();
        fs::create_dir_all(root.join("dev/vfio")).unwrap();
        fs::write(root.join("dev/vfio/7"), "").unwrap();
    }

    /// A device-tree guest: a driverless device joins its group only once
    /// a driver probes it, so it is bound first; one with a driver is not
    /// taken from it.
    #[test]
    fn a_driverless_device_without_a_group_is_probed_by_vfio_pci_first() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake_tree(root);
        let guest = GuestFs::new(root);
        let devs = root.join("sys/bus/pci/devices");
        fs::remove_file(devs.join("0000:01:00.0/iommu_group")).unwrap();
        fs::remove_file(devs.join("0000:01:00.1/iommu_group")).unwrap();
        let bdf = GuestBdf("0000:01:00.0".into());
        // The fake kernel makes no group: the error stays, after the probe.
        assert!(group_for_vfio(&guest, &bdf).is_err());
        let over = fs::read_to_string(devs.join("0000:01:00.0/driver_override")).unwrap();
        assert_eq!(over, VFIO_PCI);
        let probed = fs::read_to_string(root.join("sys/bus/pci/drivers_probe")).unwrap();
        assert_eq!(probed, "0000:01:00.0");
        let driven = GuestBdf("0000:01:00.1".into());
        assert!(group_for_vfio(&guest, &driven).is_err());
        let over = fs::read_to_string(devs.join("0000:01:00.1/driver_override")).unwrap();
        assert_eq!(over, "(null)\n", "a driven device keeps its driver");
        // With the group there (as the kernel makes it at probe), it is read.
        symlink(
            "../../../../kernel/iommu_groups/7",
            devs.join("0000:01:00.0/iommu_group"),
        )
        .unwrap();
        assert_eq!(group_for_vfio(&guest, &bdf).unwrap(), 7);
    }

    fn device(kind: &str, opts: &[&str], cpath: &str) -> agent::Device {
        let mut d = agent::Device::new();
        d.type_ = kind.into();
        d.options = opts.iter().map(|s| s.to_string()).collect();
        d.container_path = cpath.into();
        d
    }

    fn spec_with_env(e: &[&str]) -> oci::Spec {
        let mut s = oci::Spec::new();
        s.Process.mut_or_insert_default().Env = env(e);
        s
    }

    #[tokio::test]
    async fn vfio_pci_binds_the_group_and_maps_the_nodes() {
        let dir = tempfile::tempdir().unwrap();
        fake_tree(dir.path());
        let g = GuestFs::new(dir.path());
        let mut spec = spec_with_env(&["PCIDEVICE_TEST=0000:ab:00.0"]);
        // The runtime put the host's node into the spec.
        spec.Linux
            .mut_or_insert_default()
            .Devices
            .push(char_device("/dev/vfio/42", (241, 3)));
        let devices = [device(VFIO_PCI, &["0000:ab:00.0=10/00"], "/dev/vfio/42")];
        let m = setup(&g, Duration::from_secs(1), &devices, &mut spec)
            .await
            .unwrap();
        assert_eq!(m, map(&[("0000:ab:00.0", "0000:01:00.0")]));
        assert_eq!(spec.Process.Env, env(&["PCIDEVICE_TEST=0000:01:00.0"]));
        let nodes: Vec<_> = spec
            .Linux
            .Devices
            .iter()
            .map(|d| (d.Path.as_str(), d.Major, d.Minor))
            .collect();
        assert_eq!(
            nodes,
            vec![("/dev/vfio/7", 244, 0), ("/dev/vfio/vfio", 10, 196)]
        );
        // The kernel's knobs were written for both non-bridge members.
        let devs = dir.path().join("sys/bus/pci/devices");
        let read = |p: &Path| fs::read_to_string(p).unwrap();
        assert_eq!(read(&devs.join("0000:01:00.0/driver_override")), VFIO_PCI);
        assert_eq!(read(&devs.join("0000:01:00.1/driver_override")), VFIO_PCI);
        assert_eq!(
            read(&devs.join("0000:00:10.0/driver_override")),
            "(null)\n",
            "bridges keep their driver"
        );
        assert_eq!(
            read(&dir.path().join("sys/bus/pci/drivers/foo/unbind")),
            "0000:01:00.1"
        );
        assert_eq!(
            read(&dir.path().join("sys/bus/pci/drivers_probe")),
            "0000:01:00.1",
            "probed last"
        );
    }

    #[tokio::test]
    async fn vfio_pci_gk_keeps_the_driver() {
        let dir = tempfile::tempdir().unwrap();
        fake_tree(dir.path());
        let g = GuestFs::new(dir.path());
        let mut spec = spec_with_env(&["PCIDEVICE_A=0000:ab:00.1"]);
        let devices = [device(VFIO_PCI_GK, &["0000:ab:00.1=10/00.1"], "")];
        let m = setup(&g, Duration::from_secs(1), &devices, &mut spec)
            .await
            .unwrap();
        assert_eq!(m, map(&[("0000:ab:00.1", "0000:01:00.1")]));
        assert!(spec.Linux.Devices.is_empty());
        assert_eq!(
            fs::read_to_string(
                dir.path()
                    .join("sys/bus/pci/devices/0000:01:00.1/driver_override")
            )
            .unwrap(),
            "(null)\n"
        );
        assert_eq!(spec.Process.Env, env(&["PCIDEVICE_A=0000:01:00.1"]));
    }

    #[tokio::test]
    async fn bad_devices_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        fake_tree(dir.path());
        let g = GuestFs::new(dir.path());
        let mut spec = oci::Spec::new();
        for (d, needle) in [
            (device("nvme", &["x"], "/dev/vda"), "supports"),
            (device("virtio-blk", &[], "/dev/vda"), "PCI path"),
            (device(VFIO_PCI, &[], "/dev/vfio/1"), "no <host BDF>"),
            (
                device(VFIO_PCI, &["10/00"], "/dev/vfio/1"),
                "not <host BDF>",
            ),
            (
                device(VFIO_PCI, &["zz=10/00"], "/dev/vfio/1"),
                "not a PCI address",
            ),
            (
                device(VFIO_PCI, &["0000:ab:00.0=zz"], "/dev/vfio/1"),
                "PCI path",
            ),
        ] {
            let e = setup(&g, Duration::from_millis(10), &[d], &mut spec)
                .await
                .unwrap_err();
            assert!(e.message.contains(needle), "{needle}: {}", e.message);
        }
        // A device without an IOMMU group cannot become vfio-pci.
        fs::remove_file(
            dir.path()
                .join("sys/bus/pci/devices/0000:01:00.0/iommu_group"),
        )
        .unwrap();
        let e = setup(
            &g,
            Duration::from_millis(10),
            &[device(VFIO_PCI, &["0000:ab:00.0=10/00"], "/dev/vfio/1")],
            &mut spec,
        )
        .await
        .unwrap_err();
        assert!(e.message.contains("virtual IOMMU"), "{}", e.message);
    }

    #[test]
    fn block_device_entries_and_rules_take_the_guest_numbers() {
        let mut spec = oci::Spec::new();
        let linux = spec.Linux.mut_or_insert_default();
        let mut d = oci::LinuxDevice::new();
        d.Path = "/dev/xvda".into();
        d.Type = "b".into();
        (d.Major, d.Minor) = (8, 16);
        linux.Devices.push(d);
        let r = linux.Resources.mut_or_insert_default();
        let mut deny = oci::LinuxDeviceCgroup::new();
        deny.Type = "a".into();
        (deny.Major, deny.Minor) = (-1, -1);
        r.Devices.push(deny);
        let mut allow = oci::LinuxDeviceCgroup::new();
        allow.Allow = true;
        allow.Type = "b".into();
        (allow.Major, allow.Minor) = (8, 16);
        allow.Access = "rw".into();
        r.Devices.push(allow);
        point_spec_at(&mut spec, "/dev/xvda", "b", (254, 32)).unwrap();
        let linux = spec.Linux.as_ref().unwrap();
        assert_eq!((linux.Devices[0].Major, linux.Devices[0].Minor), (254, 32));
        let rules = &linux.Resources.as_ref().unwrap().Devices;
        assert_eq!(rules.len(), 2, "the host rule was rewritten, not added to");
        assert_eq!(
            (rules[1].Major, rules[1].Minor, rules[1].Allow),
            (254, 32, true)
        );
        // A path the spec does not list gets an entry and an allow rule.
        point_spec_at(&mut spec, "/dev/sdz", "b", (8, 0)).unwrap();
        let linux = spec.Linux.as_ref().unwrap();
        assert!(linux
            .Devices
            .iter()
            .any(|d| d.Path == "/dev/sdz" && d.Major == 8));
        assert!(linux
            .Resources
            .as_ref()
            .unwrap()
            .Devices
            .iter()
            .any(|r| r.Allow && r.Major == 8 && r.Minor == 0));
        assert_eq!(
            Disk::parse("scsi", "0:1").unwrap(),
            Disk::Scsi(crate::storage::ScsiAddr { target: 0, lun: 1 })
        );
        assert!(Disk::parse("blk", "0:1").is_err(), "not a PCI path");
        assert_eq!(
            Disk::parse("blk-ccw", "0.0.001e").unwrap(),
            Disk::Ccw(crate::ccw::CcwId {
                set: 0,
                devno: 0x1e
            })
        );
        assert!(Disk::parse("blk-ccw", "02/00").is_err(), "not a CCW id");
    }
}
