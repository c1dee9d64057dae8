//! A tiny VFIO user for the passthrough end-to-end test (`tests/vfio.rs`
//! builds it statically for the guest; it runs inside a container):
//! `vfio_probe /dev/vfio/<group> <PCI address>` opens the VFIO container,
//! attaches the group with the type1 IOMMU, gets the device and prints its
//! region and interrupt counts. No dependencies, so plain `rustc` builds it.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::raw::{c_int, c_ulong};

extern "C" {
    fn ioctl(fd: c_int, request: c_ulong, ...) -> c_int;
}

// <linux/vfio.h>: _IO(';', 100 + n).
const VFIO_GET_API_VERSION: c_ulong = 0x3b64;
const VFIO_CHECK_EXTENSION: c_ulong = 0x3b65;
const VFIO_SET_IOMMU: c_ulong = 0x3b66;
const VFIO_GROUP_GET_STATUS: c_ulong = 0x3b67;
const VFIO_GROUP_SET_CONTAINER: c_ulong = 0x3b68;
const VFIO_GROUP_GET_DEVICE_FD: c_ulong = 0x3b6a;
const VFIO_DEVICE_GET_INFO: c_ulong = 0x3b6b;
const VFIO_TYPE1_IOMMU: c_ulong = 1;
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
        let type1 = check(
            "VFIO_CHECK_EXTENSION",
            ioctl(c, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU),
        )?;
        let mut status = GroupStatus {
            argsz: std::mem::size_of::<GroupStatus>() as u32,
            ..Default::default()
        };
        check(
            "VFIO_GROUP_GET_STATUS",
            ioctl(g, VFIO_GROUP_GET_STATUS, &mut status as *mut GroupStatus),
        )?;
        let viable = status.flags & VFIO_GROUP_FLAGS_VIABLE != 0;
        println!("api_version={api} type1={type1} viable={viable}");
        check(
            "VFIO_GROUP_SET_CONTAINER",
            ioctl(g, VFIO_GROUP_SET_CONTAINER, &c as *const c_int),
        )?;
        check(
            "VFIO_SET_IOMMU(type1)",
            ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU),
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
