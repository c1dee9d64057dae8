//! PCI paths (Kata's `02/00` notation) and the guest devices behind them.
//!
//! A PCI path lists one slot per bus level, from the root bus down: `02/00`
//! is "slot 2 on the root bus, a bridge; slot 0 on the bus behind it". The
//! guest's bus numbers depend on enumeration order, so the path is resolved by
//! walking sysfs bridge by bridge: `/sys/bus/pci/devices/<bdf>/pci_bus/` of a
//! bridge names its secondary bus.
//!
//! The root bus is `0000:00` unless the path's first segment names another:
//! - Kata's form for a pxb-pcie root complex: `20/00/02`, a first segment of
//!   0x20 or more (never a slot, slots stop at 0x1f) followed by at least two
//!   hops is root bus `0000:20`;
//! - kiln's form for another PCI domain: `0001:00/18` is root bus `0001:00`.
//!   A second host bridge is its own domain (a pseries PHB, a zPCI
//!   function), which bus numbers alone cannot name.

use std::fmt;
use std::str::FromStr;

use crate::error::{invalid, AgentError};
use crate::guest::GuestFs;

/// One hop: device (slot) and function on a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotFn {
    pub slot: u8,
    pub function: u8,
}

/// The root bus a PCI path starts from: domain and bus number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RootBus {
    pub domain: u16,
    pub bus: u8,
}

/// Kata's pxb-pcie root complexes take guest bus numbers from 0x20 up.
const PXB_ROOT_BUS_MIN: u8 = 0x20;

impl fmt::Display for RootBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}", self.domain, self.bus)
    }
}

/// A guest PCI path: its root bus, then one hop per bus level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciPath {
    pub root: RootBus,
    pub hops: Vec<SlotFn>,
}

impl PciPath {
    /// A path from the default root bus, `0000:00`.
    pub fn on_root_bus(hops: Vec<SlotFn>) -> Self {
        PciPath {
            root: RootBus::default(),
            hops,
        }
    }
}

/// A guest PCI address, `0000:01:00.0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestBdf(pub String);

impl fmt::Display for GuestBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for PciPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let RootBus { domain, bus } = self.root;
        if domain == 0 && bus >= PXB_ROOT_BUS_MIN && self.hops.len() >= 2 {
            write!(f, "{bus:02x}/")?; // Kata's form
        } else if self.root != RootBus::default() {
            write!(f, "{}/", self.root)?;
        }
        for (i, hop) in self.hops.iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            write!(f, "{:02x}", hop.slot)?;
            if hop.function != 0 {
                write!(f, ".{}", hop.function)?;
            }
        }
        Ok(())
    }
}

impl FromStr for PciPath {
    type Err = AgentError;

    /// `02/00`, `2/0`, or with functions `02.1/00.0`; slots are hex (0..=1f),
    /// functions 0..=7, at most 32 hops; optionally after a root bus, `20/`
    /// (Kata's pxb-pcie form, then two hops or more) or `0001:00/`.
    fn from_str(s: &str) -> Result<Self, AgentError> {
        let bad = || {
            invalid(format!(
                "PCI path {s:?} is not like 02/00 (hex slots, optional .function; \
                 a root bus other than 0000:00 first, as 0001:00/02 or Kata's 20/00/02)"
            ))
        };
        if s.is_empty() || s.len() > 200 {
            return Err(bad());
        }
        let hex = |t: &str, digits: usize| {
            (t.len() == digits && t.bytes().all(|c| c.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(t, 16).ok())
                .flatten()
        };
        let mut parts: Vec<&str> = s.split('/').collect();
        let mut root = RootBus::default();
        if let Some((domain, bus)) = parts[0].split_once(':') {
            let (Some(domain), Some(bus)) = (hex(domain, 4), hex(bus, 2)) else {
                return Err(bad());
            };
            if parts.len() < 2 {
                return Err(bad());
            }
            root = RootBus {
                domain: domain as u16,
                bus: bus as u8,
            };
            parts.remove(0);
        } else if parts.len() >= 3 {
            if let Some(bus) = hex(parts[0], 2).filter(|b| *b >= u32::from(PXB_ROOT_BUS_MIN)) {
                root.bus = bus as u8;
                parts.remove(0);
            }
        }
        let mut hops = Vec::new();
        for part in parts {
            let (slot, func) = match part.split_once('.') {
                Some((s, f)) => (s, f),
                None => (part, "0"),
            };
            // Digits only: Rust's integer parsers also take a leading `+`.
            if !slot.bytes().all(|c| c.is_ascii_hexdigit())
                || !func.bytes().all(|c| c.is_ascii_digit())
            {
                return Err(bad());
            }
            let slot = u8::from_str_radix(slot, 16).map_err(|_| bad())?;
            let function = func.parse::<u8>().map_err(|_| bad())?;
            if slot > 0x1f || function > 7 || part.is_empty() {
                return Err(bad());
            }
            hops.push(SlotFn { slot, function });
        }
        if hops.len() > 32 {
            return Err(bad());
        }
        Ok(PciPath { root, hops })
    }
}

/// Resolves a PCI path to the guest address of its last device. `None`
/// while some hop is not (yet) in sysfs.
pub fn resolve(guest: &GuestFs, path: &PciPath) -> Option<GuestBdf> {
    let devices = guest.path("/sys/bus/pci/devices");
    let mut bus = path.root.to_string();
    for (i, hop) in path.hops.iter().enumerate() {
        let bdf = format!("{bus}:{:02x}.{}", hop.slot, hop.function);
        let dev = devices.join(&bdf);
        if !dev.exists() {
            return None;
        }
        if i + 1 == path.hops.len() {
            return Some(GuestBdf(bdf));
        }
        // A bridge has exactly one secondary bus under pci_bus/.
        let mut buses: Vec<String> = std::fs::read_dir(dev.join("pci_bus"))
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        if buses.len() != 1 {
            return None;
        }
        bus = buses.pop()?;
    }
    None
}

/// The block device (`vdb`) a virtio-blk PCI function exposes, if it is up.
pub fn block_device(guest: &GuestFs, bdf: &GuestBdf) -> Option<String> {
    let dev = guest.path("/sys/bus/pci/devices").join(&bdf.0);
    for entry in std::fs::read_dir(&dev).ok()?.flatten() {
        let name = entry.file_name();
        let name = name.to_str()?;
        if !name.starts_with("virtio") {
            continue;
        }
        if let Some(block) = std::fs::read_dir(entry.path().join("block"))
            .ok()?
            .flatten()
            .next()
        {
            let devname = block.file_name().to_str()?.to_string();
            if block_node_ready(&guest.path("/dev").join(&devname)) {
                return Some(devname);
            }
        }
    }
    None
}

/// The disk behind a block device node is live. devtmpfs makes the node
/// (and sysfs the `block/` entry) when the disk is registered, a moment before
/// the kernel adds its block device and sends the block "add" uevent; opened
/// (or mounted) in between, it gives ENXIO. So ready means openable.
pub fn block_node_ready(node: &std::path::Path) -> bool {
    std::fs::File::open(node).is_ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::fs;
    use std::path::Path;

    use super::*;

    /// Root bus with a bridge at 02.0 (secondary bus 01) and a virtio-blk
    /// disk `vdb` at 01:00.0, plus a plain device at 00:03.0.
    pub fn fake_pci_tree(root: &Path, with_disk: bool) {
        let devs = root.join("sys/bus/pci/devices");
        fs::create_dir_all(devs.join("0000:00:02.0/pci_bus/0000:01")).unwrap();
        fs::create_dir_all(devs.join("0000:00:03.0")).unwrap();
        fs::create_dir_all(root.join("dev")).unwrap();
        if with_disk {
            fs::create_dir_all(devs.join("0000:01:00.0/virtio4/block/vdb")).unwrap();
            fs::write(root.join("dev/vdb"), "").unwrap();
        }
    }

    #[test]
    fn parses_pci_paths() {
        assert_eq!(
            "02/00".parse::<PciPath>().unwrap().hops,
            vec![
                SlotFn {
                    slot: 2,
                    function: 0
                },
                SlotFn {
                    slot: 0,
                    function: 0
                }
            ]
        );
        assert_eq!(
            "1f.3".parse::<PciPath>().unwrap().hops,
            vec![SlotFn {
                slot: 0x1f,
                function: 3
            }]
        );
        for bad in ["", "02/", "/02", "20", "02.8", "zz", "02//00", "../00"] {
            assert!(bad.parse::<PciPath>().is_err(), "{bad:?}");
        }
    }

    /// Found by fuzzing (`fuzz/`, agent_requests): `u8::from_str_radix` and
    /// `parse` take a sign, so `02/0/+0` was a valid path.
    #[test]
    fn signs_are_not_digits() {
        for bad in ["02/0/+0", "+2/00", "02.+1", "-0/00"] {
            assert!(bad.parse::<PciPath>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resolves_bridge_by_bridge_in_a_fake_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        fake_pci_tree(dir.path(), true);
        let g = GuestFs::new(dir.path());
        assert_eq!(
            resolve(&g, &"03".parse().unwrap()),
            Some(GuestBdf("0000:00:03.0".into()))
        );
        let bdf = resolve(&g, &"02/00".parse().unwrap()).unwrap();
        assert_eq!(bdf.0, "0000:01:00.0");
        assert_eq!(block_device(&g, &bdf).as_deref(), Some("vdb"));
        assert_eq!(
            resolve(&g, &"02/01".parse().unwrap()),
            None,
            "nothing at 01:01.0"
        );
        assert_eq!(
            resolve(&g, &"03/00".parse().unwrap()),
            None,
            "03 is no bridge"
        );
        assert_eq!(resolve(&g, &"05".parse().unwrap()), None);
    }

    #[test]
    fn resolves_through_two_bridges_and_prints_back() {
        let dir = tempfile::tempdir().unwrap();
        let devs = dir.path().join("sys/bus/pci/devices");
        // Root port 00:18.0 → bus 03; a switch port 03:00.0 → bus 04; device 04:02.1.
        fs::create_dir_all(devs.join("0000:00:18.0/pci_bus/0000:03")).unwrap();
        fs::create_dir_all(devs.join("0000:03:00.0/pci_bus/0000:04")).unwrap();
        fs::create_dir_all(devs.join("0000:04:02.1")).unwrap();
        let g = GuestFs::new(dir.path());
        let path: PciPath = "18/00/02.1".parse().unwrap();
        assert_eq!(path.to_string(), "18/00/02.1");
        assert_eq!(resolve(&g, &path), Some(GuestBdf("0000:04:02.1".into())));
        assert_eq!(resolve(&g, &"18/00/02".parse().unwrap()), None);
    }

    /// Kata's pxb-pcie form and kiln's domain form name another root bus;
    /// both print back as they were written.
    #[test]
    fn root_bus_forms() {
        let pxb: PciPath = "20/00/02".parse().unwrap();
        assert_eq!(
            pxb.root,
            RootBus {
                domain: 0,
                bus: 0x20
            }
        );
        assert_eq!(pxb.hops.len(), 2);
        assert_eq!(pxb.to_string(), "20/00/02");
        let phb: PciPath = "0001:00/18".parse().unwrap();
        assert_eq!(phb.root, RootBus { domain: 1, bus: 0 });
        assert_eq!(
            phb.hops,
            vec![SlotFn {
                slot: 0x18,
                function: 0
            }]
        );
        assert_eq!(phb.to_string(), "0001:00/18");
        // Printed back in a form that parses to the same path.
        for p in ["0000:21/05", "0000:05/01/02", "0000:20/00/02", "0000:00/03"] {
            let path: PciPath = p.parse().unwrap();
            assert_eq!(path.to_string().parse::<PciPath>().unwrap(), path, "{p}");
        }
        assert_eq!(
            "02/00/01".parse::<PciPath>().unwrap().root,
            RootBus::default()
        );
        for bad in [
            "0001:00",
            "1:00/18",
            "0001:0/18",
            "000g:00/18",
            "20/00",
            "0001:00/20",
        ] {
            assert!(bad.parse::<PciPath>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resolves_from_another_domain() {
        let dir = tempfile::tempdir().unwrap();
        let devs = dir.path().join("sys/bus/pci/devices");
        fs::create_dir_all(devs.join("0001:00:18.0")).unwrap();
        fs::create_dir_all(devs.join("0000:00:18.0")).unwrap();
        let g = GuestFs::new(dir.path());
        assert_eq!(
            resolve(&g, &"0001:00/18".parse().unwrap()),
            Some(GuestBdf("0001:00:18.0".into()))
        );
        assert_eq!(resolve(&g, &"0002:00/18".parse().unwrap()), None);
    }

    #[test]
    fn disk_not_yet_there() {
        let dir = tempfile::tempdir().unwrap();
        fake_pci_tree(dir.path(), false);
        let g = GuestFs::new(dir.path());
        assert_eq!(resolve(&g, &"02/00".parse().unwrap()), None);
    }
}
