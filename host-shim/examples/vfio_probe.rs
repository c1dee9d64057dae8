//! A tiny VFIO user for the passthrough end-to-end test (`tests/vfio.rs`
//! builds it statically for the guest; it runs inside a container):
//! `vfio_probe /dev/vfio/<group> <PCI address>` opens the VFIO container,
//! attaches the group with the IOMMU model the guest offers (type1 behind
//! intel-iommu or virtio-iommu, sPAPR TCE on a pseries guest), gets the device
//! and prints its region and interrupt counts. No dependencies, so plain
//! `rustc` builds it.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::raw::{c_int, c_ulong};

extern "C" {
    fn ioctl(fd: c_int, request: c_ulong, ...) -> c_int;
}

/// <linux/vfio.h>'s `_IO(';', 100 + n)`. `_IOC_NONE` is 0 in the generic
/// ioctl encoding (x86_64, arm64, s390x) but 1, in bits 29..31, on powerpc.
const fn vfio_io(n: c_ulong) -> c_ulong {
    let none: c_ulong = if cfg!(target_arch = "powerpc64") {
        1 << 29
    } else {
        0
    };
    none | (b';' as c_ulong) << 8 | (100 + n)
}
const VFIO_GET_API_VERSION: c_ulong = vfio_io(0);
const VFIO_CHECK_EXTENSION: c_ulong = vfio_io(1);
const VFIO_SET_IOMMU: c_ulong = vfio_io(2);
const VFIO_GROUP_GET_STATUS: c_ulong = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: c_ulong = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: c_ulong = vfio_io(6);
const VFIO_DEVICE_GET_INFO: c_ulong = vfio_io(7);
/// The IOMMU models, best first: type1 (x86_64, arm64), then the sPAPR TCE
/// ones a pseries guest's own IOMMU offers.
const IOMMU_MODELS: &[(c_ulong, &str)] = &[(1, "type1"), (7, "spapr-tce-v2"), (2, "spapr-tce")];
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct DeviceInfo {
    argsz: u32,
    flags: u32,
    num_regions: u32,
    num_irqs: u32,
    cap_offset: u32,
    pad: u32,
}

fn check(what: &str, rc: c_int) -> Result<c_int, String> {
    if rc < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(rc)
    }
}

fn probe(group_path: &str, bdf: &str) -> Result<(), String> {
    let rw = |p: &str| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .map_err(|e| format!("opening {p}: {e}"))
    };
    let container = rw("/dev/vfio/vfio")?;
    let group = rw(group_path)?;
    let (c, g) = (container.as_raw_fd(), group.as_raw_fd());
    // SAFETY: each ioctl gets the argument type <linux/vfio.h> defines for it.
    unsafe {
        let api = check("VFIO_GET_API_VERSION", ioctl(c, VFIO_GET_API_VERSION))?;
        let mut model = None;
        for &(m, name) in IOMMU_MODELS {
            if check("VFIO_CHECK_EXTENSION", ioctl(c, VFIO_CHECK_EXTENSION, m))? > 0 {
                model = Some((m, name));
                break;
            }
        }
        let (model, iommu) = model.ok_or("the VFIO container offers no IOMMU model")?;
        let mut status = GroupStatus {
            argsz: std::mem::size_of::<GroupStatus>() as u32,
            ..Default::default()
        };
        check(
            "VFIO_GROUP_GET_STATUS",
            ioctl(g, VFIO_GROUP_GET_STATUS, &mut status as *mut GroupStatus),
        )?;
        let viable = status.flags & VFIO_GROUP_FLAGS_VIABLE != 0;
        println!("api_version={api} iommu={iommu} viable={viable}");
        check(
            "VFIO_GROUP_SET_CONTAINER",
            ioctl(g, VFIO_GROUP_SET_CONTAINER, &c as *const c_int),
        )?;
        check(
            &format!("VFIO_SET_IOMMU({iommu})"),
            ioctl(c, VFIO_SET_IOMMU, model),
        )?;
        let name = std::ffi::CString::new(bdf).map_err(|e| e.to_string())?;
        let dev = check(
            &format!("VFIO_GROUP_GET_DEVICE_FD({bdf})"),
            ioctl(g, VFIO_GROUP_GET_DEVICE_FD, name.as_ptr()),
        )?;
        let mut info = DeviceInfo {
            argsz: std::mem::size_of::<DeviceInfo>() as u32,
            ..Default::default()
        };
        check(
            "VFIO_DEVICE_GET_INFO",
            ioctl(dev, VFIO_DEVICE_GET_INFO, &mut info as *mut DeviceInfo),
        )?;
        println!(
            "device={bdf} num_regions={} num_irqs={} flags={:#x}",
            info.num_regions, info.num_irqs, info.flags
        );
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: vfio_probe /dev/vfio/<group> <PCI address>");
        std::process::exit(2);
    }
    if let Err(e) = probe(&args[1], &args[2]) {
        eprintln!("vfio_probe: {e}");
        std::process::exit(1);
    }
}
