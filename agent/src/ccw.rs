//! Channel-I/O (CCW) bus ids and the virtio-blk disks behind them: how an
//! s390x guest names a disk, where other arches use a PCI path.
//!
//! Kata's runtime hot-plugs `virtio-blk-ccw` with the host-side device number
//! `fe.<set>.<devno>` and tells the agent the guest's view of it,
//! `0.<set>.<devno>` (driver/type `blk-ccw`, in `Storage.source` or
//! `Device.id`): the channel subsystem id is always 0 inside the guest.
//! Facts: QEMU's docs/system/s390x/css.rst, Linux's drivers/s390/cio.

use std::fmt;
use std::str::FromStr;

use crate::error::{invalid, AgentError};
use crate::guest::GuestFs;

/// A guest CCW bus id, `0.<subchannel set 0-3>.<device number>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CcwId {
    pub set: u8,
    pub devno: u16,
}

impl fmt::Display for CcwId {
    /// The kernel's spelling, as in `/sys/bus/ccw/devices/0.0.0005`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0.{}.{:04x}", self.set, self.devno)
    }
}

impl FromStr for CcwId {
    type Err = AgentError;

    /// `0.0.0005` or `0.1.a` (leading zeroes of the device number may go).
    fn from_str(s: &str) -> Result<Self, AgentError> {
        let bad = || {
            invalid(format!(
                "CCW bus id {s:?} is not like 0.0.0005 (0, a subchannel set 0-3, a hex device number)"
            ))
        };
        let mut parts = s.split('.');
        let (Some(css), Some(set), Some(devno), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        // Digits only: Rust's integer parsers also take a leading `+`.
        let hex =
            |p: &str| !p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_hexdigit());
        if css != "0" || !matches!(set, "0" | "1" | "2" | "3") || !hex(devno) {
            return Err(bad());
        }
        Ok(CcwId {
            set: set.parse().map_err(|_| bad())?,
            devno: u16::from_str_radix(devno, 16).map_err(|_| bad())?,
        })
    }
}

impl CcwId {
    /// The `vdX` of the virtio-blk disk at this bus id, once its node opens:
    /// `/sys/bus/ccw/devices/<id>/virtioN/block/<name>`.
    pub fn block_device(&self, guest: &GuestFs) -> Option<String> {
        let dev = guest.path("/sys/bus/ccw/devices").join(self.to_string());
        std::fs::read_dir(dev)
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("virtio"))
            .find_map(|e| {
                std::fs::read_dir(e.path().join("block"))
                    .ok()?
                    .flatten()
                    .map(|b| b.file_name().to_string_lossy().into_owned())
                    .find(|n| crate::pci::block_node_ready(&guest.path("/dev").join(n)))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_ids_parse_as_the_guest_writes_them() {
        let id: CcwId = "0.0.0005".parse().unwrap();
        assert_eq!(id, CcwId { set: 0, devno: 5 });
        assert_eq!(id.to_string(), "0.0.0005");
        let id: CcwId = "0.3.fe1".parse().unwrap();
        assert_eq!(id.to_string(), "0.3.0fe1");
        for bad in [
            "",
            "0.0",
            "0.0.0.5",
            "fe.0.0005",
            "0.4.0005",
            "0.0.10000",
            "0.0.",
            "0.0.+5",
            "0.0.xyz",
            "0.-1.5",
            "1.0.0005",
        ] {
            let e = bad.parse::<CcwId>().unwrap_err();
            assert!(e.to_string().contains("0.0.0005"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_disk_is_found_under_its_bus_id_only() {
        let root = tempfile::tempdir().unwrap();
        let guest = GuestFs::new(root.path());
        let devs = root.path().join("sys/bus/ccw/devices");
        std::fs::create_dir_all(devs.join("0.0.0001/virtio0")).unwrap();
        std::fs::create_dir_all(devs.join("0.0.001e/virtio3/block/vdb")).unwrap();
        std::fs::create_dir_all(root.path().join("dev")).unwrap();
        let id: CcwId = "0.0.1e".parse().unwrap();
        assert_eq!(id.block_device(&guest), None, "no /dev/vdb yet");
        std::fs::write(root.path().join("dev/vdb"), "").unwrap();
        assert_eq!(id.block_device(&guest).as_deref(), Some("vdb"));
        let other: CcwId = "0.0.0001".parse().unwrap();
        assert_eq!(other.block_device(&guest), None, "a vsock or net device");
    }
}
