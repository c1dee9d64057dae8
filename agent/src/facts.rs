//! `kiln.Diagnostics/GuestFacts`: read-only facts about the running guest —
//! what its kernel carries (`/proc/config.gz`, `/proc/filesystems`) and which
//! devices registered (vfio, vsock, pmem with DAX). End-to-end tests use it to
//! prove that a built kernel has the features its fragments asked for.
//!
//! Everything is read through [`GuestFs`], so tests run against a fake tree.
//! Nothing here changes the guest.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use kiln_protocol::kiln::{
    DmDevice, GuestFacts, GuestFactsRequest, MountEntry, PathAttributes, PmemDevice,
};

use crate::guest::GuestFs;

/// `STATX_ATTR_DAX` from linux/stat.h (libc does not export it for Linux).
const STATX_ATTR_DAX: u64 = 0x0020_0000;

/// The ttrpc service, ready to register.
pub fn service(guest: GuestFs) -> std::collections::HashMap<String, ttrpc::r#async::Service> {
    kiln_protocol::kiln_ttrpc::create_diagnostics(Arc::new(Diagnostics { guest }))
}

struct Diagnostics {
    guest: GuestFs,
}

#[async_trait::async_trait]
impl kiln_protocol::kiln_ttrpc::Diagnostics for Diagnostics {
    async fn guest_facts(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: GuestFactsRequest,
    ) -> ttrpc::Result<GuestFacts> {
        let guest = self.guest.clone();
        // Decompressing config.gz and walking sysfs is blocking file I/O.
        tokio::task::spawn_blocking(move || collect(&guest, &req))
            .await
            .map_err(|e| {
                ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::INTERNAL,
                    format!("GuestFacts: the reader task failed: {e}"),
                ))
            })
    }
}

/// All facts the request asks for. Missing files are facts too (false/empty),
/// never errors: the point is to report what the guest has.
pub fn collect(guest: &GuestFs, req: &GuestFactsRequest) -> GuestFacts {
    let mut f = GuestFacts::new();
    f.kernel_release = read_trimmed(guest, "/proc/sys/kernel/osrelease");
    f.machine = read_trimmed(guest, "/proc/sys/kernel/arch");
    f.filesystems = filesystems(&read_string(guest, "/proc/filesystems"));
    f.vfio_container = guest.path("/dev/vfio/vfio").exists();
    f.vsock_device = guest.path("/dev/vsock").exists();
    f.vsock_transports = vsock_transports(guest);
    f.pmem = pmem_devices(guest);
    f.modules = loaded_modules(&read_string(guest, "/proc/modules"));
    if !req.config_options.is_empty() {
        match kernel_config(guest) {
            Ok(config) => {
                f.config_available = true;
                for name in &req.config_options {
                    let key = name.trim().trim_start_matches("CONFIG_");
                    let value = config.get(key).cloned().unwrap_or_else(|| "n".to_string());
                    f.config.insert(key.to_string(), value);
                }
            }
            Err(e) => f.config_error = e,
        }
    }
    if let Some(root) = root_mount(&read_string(guest, "/proc/mounts")) {
        f.root_mount = protobuf::MessageField::some(root);
    }
    if let Some(dm) = root_dm(guest) {
        f.root_dm = protobuf::MessageField::some(dm);
    }
    f.paths = req
        .statx_paths
        .iter()
        .map(|p| path_attributes(guest, p))
        .collect();
    f
}

/// The device-mapper device under "/", found through the root's device
/// number (the mount table only says `/dev/root`), with its table and status.
fn root_dm(guest: &GuestFs) -> Option<DmDevice> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(guest.path("/")).ok()?.dev();
    let sys = format!(
        "/sys/dev/block/{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    let name = read_trimmed(guest, &format!("{sys}/dm/name"));
    if name.is_empty() {
        return None;
    }
    let mut d = DmDevice::new();
    d.device = std::fs::read_link(guest.path(&sys))
        .ok()
        .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let control = guest.path("/dev/mapper/control");
    let mut errors = Vec::new();
    match crate::dm::table_status(&control, &name, true) {
        Ok(t) if !t.is_empty() => {
            d.target = t[0].target_type.clone();
            d.table = t[0].params.clone();
            if d.target == "verity" {
                // version data hash data_bs hash_bs blocks hash_start alg root salt
                d.verity_root_hash = d.table.split(' ').nth(8).unwrap_or_default().to_string();
            }
        }
        Ok(_) => errors.push("the device has no table".to_string()),
        Err(e) => errors.push(format!("table: {e}")),
    }
    match crate::dm::table_status(&control, &name, false) {
        Ok(t) if !t.is_empty() => d.status = t[0].params.clone(),
        Ok(_) => {}
        Err(e) => errors.push(format!("status: {e}")),
    }
    d.name = name;
    d.error = errors.join("; ");
    Some(d)
}

fn read_string(guest: &GuestFs, path: &str) -> String {
    std::fs::read_to_string(guest.path(path)).unwrap_or_default()
}

fn read_trimmed(guest: &GuestFs, path: &str) -> String {
    read_string(guest, path).trim().to_string()
}

/// Names from `/proc/modules` ("bridge 155648 0 - Live 0x0000000000000000").
fn loaded_modules(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Names from `/proc/filesystems` ("nodev\tproc", "\text4").
fn filesystems(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(str::to_string)
        .collect()
}

/// vsock transports with a bound device, named by their virtio driver.
fn vsock_transports(guest: &GuestFs) -> Vec<String> {
    const DRIVERS: &[(&str, &str)] = &[("vmw_vsock_virtio_transport", "virtio")];
    DRIVERS
        .iter()
        .filter(|(driver, _)| {
            std::fs::read_dir(guest.path(&format!("/sys/bus/virtio/drivers/{driver}")))
                .map(|rd| {
                    rd.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with("virtio"))
                })
                .unwrap_or(false)
        })
        .map(|(_, name)| name.to_string())
        .collect()
}

/// `/sys/block/pmem*`: size, DAX support and the namespace mode.
fn pmem_devices(guest: &GuestFs) -> Vec<PmemDevice> {
    let Ok(rd) = std::fs::read_dir(guest.path("/sys/block")) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.strip_prefix("pmem")
                .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let dir = format!("/sys/block/{name}");
            let mut d = PmemDevice::new();
            // `size` counts 512-byte sectors whatever the logical block size.
            d.size_bytes = read_trimmed(guest, &format!("{dir}/size"))
                .parse::<u64>()
                .unwrap_or(0)
                * 512;
            d.dax = read_trimmed(guest, &format!("{dir}/queue/dax")) == "1";
            d.mode = namespace_mode(guest, &dir);
            d.name = name;
            d
        })
        .collect()
}

/// What ndctl calls the namespace mode, from the block device's parent:
/// a pfn device means fsdax, a btt device sector mode, a namespace its own `mode`.
fn namespace_mode(guest: &GuestFs, block_dir: &str) -> String {
    let link = guest.path(&format!("{block_dir}/device"));
    let parent = std::fs::read_link(&link)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    if parent.starts_with("pfn") {
        "fsdax".into()
    } else if parent.starts_with("btt") {
        "sector".into()
    } else if parent.starts_with("namespace") {
        std::fs::read_to_string(link.join("mode"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "raw".into())
    } else {
        String::new()
    }
}

/// `/proc/config.gz` as option name (without CONFIG_) → value; "n" for
/// `# CONFIG_X is not set`.
fn kernel_config(guest: &GuestFs) -> Result<BTreeMap<String, String>, String> {
    let path = guest.path("/proc/config.gz");
    let file = std::fs::File::open(&path).map_err(|e| {
        format!("cannot open /proc/config.gz ({e}); the kernel needs CONFIG_IKCONFIG_PROC")
    })?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot decompress /proc/config.gz: {e}"))?;
    Ok(parse_config(&text))
}

fn parse_config(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# CONFIG_") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                out.insert(name.to_string(), "n".to_string());
            }
        } else if let Some(rest) = line.strip_prefix("CONFIG_") {
            if let Some((name, value)) = rest.split_once('=') {
                out.insert(name.to_string(), value.to_string());
            }
        }
    }
    out
}

/// The entry mounted last on "/" (what the process sees as its root).
fn root_mount(mounts: &str) -> Option<MountEntry> {
    mounts.lines().rev().find_map(|l| {
        let mut it = l.split_whitespace();
        let (source, target, fstype, options) = (it.next()?, it.next()?, it.next()?, it.next()?);
        (unescape_mount_field(target) == "/").then(|| {
            let mut m = MountEntry::new();
            m.source = unescape_mount_field(source);
            m.fstype = fstype.to_string();
            m.options = options.to_string();
            m
        })
    })
}

/// /proc/mounts writes space, tab, newline and backslash as `\ooo` octal.
pub(crate) fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// statx(2) of one guest path, for `STATX_ATTR_DAX`.
fn path_attributes(guest: &GuestFs, path: &str) -> PathAttributes {
    let mut a = PathAttributes::new();
    a.path = path.to_string();
    match statx_attributes(&guest.path(path)) {
        Ok((attributes, mask)) => {
            a.exists = true;
            a.dax = mask & STATX_ATTR_DAX != 0 && attributes & STATX_ATTR_DAX != 0;
        }
        Err(e) => a.error = format!("statx {path}: {e}"),
    }
    a
}

/// `(stx_attributes, stx_attributes_mask)`. Through the raw syscall: the
/// libc wrapper is missing from older musl releases.
fn statx_attributes(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte")
    })?;
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `buf` a writable statx that
    // outlives the call; the kernel writes at most size_of::<statx>() bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_statx,
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_BASIC_STATS,
            &mut buf as *mut libc::statx,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((buf.stx_attributes, buf.stx_attributes_mask))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Write;
    use std::path::Path;

    use super::*;

    fn write(root: &Path, path: &str, content: &str) {
        let p = root.join(path.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    fn gzip(text: &str) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap()
    }

    /// A guest with vfio, vsock, one fsdax pmem and one raw pmem.
    fn fake_guest() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        write(r, "/proc/sys/kernel/osrelease", "6.12.117\n");
        write(r, "/proc/sys/kernel/arch", "ppc64le\n");
        write(
            r,
            "/proc/filesystems",
            "nodev\tsysfs\nnodev\tproc\n\text4\nnodev\tvirtiofs\n\terofs\n",
        );
        write(r, "/dev/vfio/vfio", "");
        write(r, "/dev/vsock", "");
        fs::create_dir_all(r.join("sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio2"))
            .unwrap();
        fs::create_dir_all(r.join("sys/bus/virtio/drivers/virtio_blk")).unwrap();
        // pmem0 sits on a pfn device (fsdax), pmem1 on a raw namespace.
        write(r, "/sys/bus/nd/devices/pfn0.1/mode", "ram\n");
        write(r, "/sys/bus/nd/devices/namespace1.0/mode", "raw\n");
        write(r, "/sys/block/pmem0/size", "4096\n");
        write(r, "/sys/block/pmem0/queue/dax", "1\n");
        std::os::unix::fs::symlink(
            "../../bus/nd/devices/pfn0.1",
            r.join("sys/block/pmem0/device"),
        )
        .unwrap();
        write(r, "/sys/block/pmem1/size", "8\n");
        write(r, "/sys/block/pmem1/queue/dax", "0\n");
        std::os::unix::fs::symlink(
            "../../bus/nd/devices/namespace1.0",
            r.join("sys/block/pmem1/device"),
        )
        .unwrap();
        write(r, "/sys/block/pmem0p1/size", "8\n"); // a partition-like name that is not a pmem disk
        write(r, "/sys/block/vda/size", "8\n");
        write(
            r,
            "/proc/mounts",
            "none / rootfs rw 0 0\nproc /proc proc rw,nosuid 0 0\n/dev/pmem0p1 / ext4 ro,relatime,dax=always 0 0\n/dev/x /mnt\\040dir ext4 rw 0 0\n",
        );
        fs::write(
            r.join("proc/config.gz"),
            gzip("#\n# Automatically generated file; DO NOT EDIT.\nCONFIG_IKCONFIG_PROC=y\nCONFIG_VIRTIO_FS=y\n# CONFIG_VFIO_NOIOMMU is not set\nCONFIG_PANIC_TIMEOUT=-1\nCONFIG_CMDLINE=\"a b\"\n"),
        )
        .unwrap();
        write(r, "/data/file", "x");
        dir
    }

    #[test]
    fn reports_a_fake_guest() {
        let dir = fake_guest();
        let mut req = GuestFactsRequest::new();
        req.config_options = [
            "CONFIG_IKCONFIG_PROC",
            "VIRTIO_FS",
            "VFIO_NOIOMMU",
            "PANIC_TIMEOUT",
            "CMDLINE",
            "NOT_THERE",
        ]
        .map(String::from)
        .to_vec();
        req.statx_paths = vec!["/data/file".into(), "/nope".into()];
        let f = collect(&GuestFs::new(dir.path()), &req);
        assert_eq!(f.kernel_release, "6.12.117");
        assert_eq!(f.machine, "ppc64le");
        assert_eq!(
            f.filesystems,
            ["sysfs", "proc", "ext4", "virtiofs", "erofs"]
        );
        assert!(f.vfio_container && f.vsock_device);
        assert_eq!(f.vsock_transports, ["virtio"]);

        assert_eq!(f.pmem.len(), 2, "{:?}", f.pmem);
        assert_eq!(
            (f.pmem[0].name.as_str(), f.pmem[0].size_bytes, f.pmem[0].dax),
            ("pmem0", 4096 * 512, true)
        );
        assert_eq!(f.pmem[0].mode, "fsdax");
        assert_eq!(
            (
                f.pmem[1].name.as_str(),
                f.pmem[1].dax,
                f.pmem[1].mode.as_str()
            ),
            ("pmem1", false, "raw")
        );

        assert!(f.config_available, "{}", f.config_error);
        assert_eq!(f.config["IKCONFIG_PROC"], "y");
        assert_eq!(f.config["VIRTIO_FS"], "y");
        assert_eq!(f.config["VFIO_NOIOMMU"], "n");
        assert_eq!(f.config["PANIC_TIMEOUT"], "-1");
        assert_eq!(f.config["CMDLINE"], "\"a b\"");
        assert_eq!(f.config["NOT_THERE"], "n");

        let root = f.root_mount.as_ref().unwrap();
        assert_eq!(
            (root.source.as_str(), root.fstype.as_str()),
            ("/dev/pmem0p1", "ext4")
        );
        assert!(root.options.contains("dax=always"));

        assert_eq!(f.paths.len(), 2);
        assert!(f.paths[0].exists && !f.paths[0].dax, "{:?}", f.paths[0]);
        assert!(
            !f.paths[1].exists && f.paths[1].error.contains("/nope"),
            "{:?}",
            f.paths[1]
        );
    }

    #[test]
    fn an_empty_guest_reports_absence_not_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = GuestFactsRequest::new();
        req.config_options = vec!["IKCONFIG".into()];
        let f = collect(&GuestFs::new(dir.path()), &req);
        assert!(f.filesystems.is_empty() && f.pmem.is_empty() && f.vsock_transports.is_empty());
        assert!(!f.vfio_container && !f.vsock_device);
        assert!(!f.config_available && f.config.is_empty());
        assert!(
            f.config_error.contains("IKCONFIG_PROC"),
            "{}",
            f.config_error
        );
        assert!(f.root_mount.is_none());
    }

    #[test]
    fn config_not_asked_for_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = collect(&GuestFs::new(dir.path()), &GuestFactsRequest::new());
        assert!(f.config_error.is_empty() && !f.config_available);
    }

    #[test]
    fn garbage_config_gz_is_an_error_message() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "/proc/config.gz", "not gzip");
        let mut req = GuestFactsRequest::new();
        req.config_options = vec!["X".into()];
        let f = collect(&GuestFs::new(dir.path()), &req);
        assert!(
            !f.config_available && f.config_error.contains("decompress"),
            "{}",
            f.config_error
        );
    }

    #[test]
    fn mount_fields_are_unescaped() {
        assert_eq!(unescape_mount_field("/mnt\\040dir"), "/mnt dir");
        assert_eq!(unescape_mount_field("a\\134b"), "a\\b");
        assert_eq!(unescape_mount_field("trailing\\04"), "trailing\\04");
        assert_eq!(
            unescape_mount_field("\\777"),
            "\\777",
            "out of byte range stays as is"
        );
    }
}
