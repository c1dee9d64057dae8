//! ResizeVolume: grow the filesystem of a block volume after the runtime
//! grew its disk (Kata's direct-volume resize). Kata's own agent answers
//! UNIMPLEMENTED; kiln grows ext4 online with EXT4_IOC_RESIZE_FS, the ioctl
//! resize2fs uses, and names the filesystem it cannot grow otherwise.

use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{invalid, not_found, os, precondition, Result};

nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);
nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);

/// The mount at `mount_point` in a mountinfo text: (source, fstype).
pub fn find_mount(mountinfo: &str, mount_point: &str) -> Option<(String, String)> {
    // Later lines shadow earlier ones at the same mount point.
    mountinfo.lines().rev().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mp = pre.split(' ').nth(4)?;
        if crate::facts::unescape_mount_field(mp) != mount_point {
            return None;
        }
        let mut it = post.split(' ');
        let fstype = it.next()?.to_string();
        let source = crate::facts::unescape_mount_field(it.next()?);
        Some((source, fstype))
    })
}

pub fn resize(volume_guest_path: &str, size: u64) -> Result<()> {
    let p = crate::container::spec::abs_path("volume_guest_path", volume_guest_path)?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| os("reading /proc/self/mountinfo", e))?;
    let (source, fstype) = find_mount(&mountinfo, &p.to_string_lossy())
        .ok_or_else(|| not_found(format!("no filesystem is mounted at {}", p.display())))?;
    if fstype != "ext4" {
        return Err(precondition(format!(
            "volume {} is {fstype}: kiln-agent grows ext4 volumes only",
            p.display()
        )));
    }
    let dev = std::fs::File::open(&source).map_err(|e| os(format!("opening {source}"), e))?;
    let mut dev_size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 into dev_size.
    unsafe { blk_get_size64(dev.as_raw_fd(), &mut dev_size) }
        .map_err(|e| os(format!("size of {source} (BLKGETSIZE64)"), e))?;
    let want = if size == 0 {
        dev_size
    } else {
        size.min(dev_size)
    };
    let st =
        nix::sys::statvfs::statvfs(&p).map_err(|e| os(format!("statvfs {}", p.display()), e))?;
    let block = st.fragment_size() as u64;
    if block == 0 {
        return Err(invalid(format!(
            "{} reports a block size of 0",
            p.display()
        )));
    }
    let blocks = want / block;
    if blocks <= st.blocks() as u64 {
        tracing::info!(volume = %p.display(), "already {} blocks; nothing to grow", st.blocks());
        return Ok(());
    }
    let dir = std::fs::File::open(Path::new(&p))
        .map_err(|e| os(format!("opening {}", p.display()), e))?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 (the new block count).
    unsafe { ext4_resize_fs(dir.as_raw_fd(), &blocks) }.map_err(|e| {
        os(
            format!(
                "growing {} to {blocks} blocks (EXT4_IOC_RESIZE_FS)",
                p.display()
            ),
            e,
        )
    })?;
    tracing::info!(volume = %p.display(), blocks, "volume grown");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_last_mount_at_a_point_with_escapes() {
        let mi = "22 1 8:1 / / rw - ext4 /dev/vda rw\n\
                  40 22 0:5 / /run/kata-containers/sandbox/storage/vol\\0401 rw - ext4 /dev/vdb rw\n\
                  41 40 0:6 / /run/kata-containers/sandbox/storage/vol\\0401 rw - xfs /dev/vdc rw\n";
        assert_eq!(
            find_mount(mi, "/run/kata-containers/sandbox/storage/vol 1"),
            Some(("/dev/vdc".into(), "xfs".into()))
        );
        assert_eq!(
            find_mount(mi, "/"),
            Some(("/dev/vda".into(), "ext4".into()))
        );
        assert_eq!(find_mount(mi, "/nope"), None);
    }

    #[test]
    fn unmounted_or_relative_paths_are_errors() {
        assert!(resize("relative", 1 << 30).is_err());
        let d = tempfile::tempdir().unwrap();
        let e = resize(d.path().to_str().unwrap(), 1 << 30).unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::NotFound, "{}", e.message);
    }
}
