//! The container's filesystem view, built by the helper inside the new mount
//! namespace: rootfs bind, spec mounts, device nodes, then pivot_root (or the
//! chroot fallback), then masked/read-only paths.
//!
//! pivot_root cannot move away from an initramfs (the kernel answers EINVAL
//! when the current root has no parent mount). PID 1 leaves the initramfs for
//! a tmpfs at boot (`crate::initramfs`), so this only happens when that move
//! failed; then, or when asked, the rootfs is moved over `/` (MS_MOVE) and
//! chrooted into, as runc's `--no-pivot` does. The old root is then hidden
//! under the container's rootfs in this mount namespace rather than detached;
//! a process with CAP_SYS_ADMIN could still reach it, so containers that keep
//! that capability are weaker under the fallback.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, Mode, SFlag};

use super::inroot::{fd_path, open_source, Last, Root};
use super::spec::{ContainerSpec, DeviceSpec, MountSpec};

type Res<T> = std::result::Result<T, String>;

fn m(what: impl std::fmt::Display, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

fn do_mount(
    src: Option<&str>,
    dst: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Res<()> {
    mount(src, dst, fstype, flags, data).map_err(|e| mount_error(src, dst, fstype, flags, data, e))
}

fn mount_error(
    src: Option<&str>,
    dst: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
    e: nix::errno::Errno,
) -> String {
    m(
        format_args!(
            "mount {} on {} (type {}, {:?}, {:?})",
            src.unwrap_or("none"),
            dst.display(),
            fstype.unwrap_or("none"),
            flags,
            data.unwrap_or("")
        ),
        e,
    )
}

/// Builds the container's root and enters it. Runs in the helper, in the
/// container's fresh mount namespace.
pub fn prepare_rootfs(spec: &ContainerSpec, no_pivot: bool) -> Res<()> {
    let rootfs = fs::canonicalize(&spec.root.path).map_err(|e| {
        m(
            format_args!("container rootfs {}", spec.root.path.display()),
            e,
        )
    })?;
    if !rootfs.is_dir() {
        return Err(format!(
            "container rootfs {} is not a directory",
            rootfs.display()
        ));
    }
    // Nothing mounted from here on may propagate back to the agent's namespace.
    do_mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | spec.rootfs_propagation,
        None,
    )?;
    do_mount(
        Some(path_str(&rootfs)?),
        &rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;

    // Opened after the bind above, so it holds the new mount.
    let root = Root::open(&rootfs)?;
    let mut dev_is_tmpfs = false;
    for mnt in &spec.mounts {
        mount_one(&root, mnt)?;
        if mnt.destination == Path::new("/dev") && mnt.fstype == "tmpfs" {
            dev_is_tmpfs = true;
        }
    }
    if dev_is_tmpfs {
        default_devices(&root)?;
    }
    for d in &spec.devices {
        create_device(&root, d)?;
    }

    enter_root(&rootfs, no_pivot)?;

    for (k, v) in &spec.sysctl {
        let p = Path::new("/proc/sys").join(k.replace('.', "/"));
        fs::write(&p, v).map_err(|e| m(format_args!("sysctl {k}={v}"), e))?;
    }
    if !spec.masked_paths.is_empty() {
        let null = dev_null()?;
        let null = PathBuf::from(format!("/proc/self/fd/{}", null.as_raw_fd()));
        for p in &spec.masked_paths {
            mask_path(p, &null)?;
        }
    }
    for p in &spec.readonly_paths {
        readonly_path(p)?;
    }
    if spec.root.readonly {
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_REC;
        do_mount(None, Path::new("/"), None, flags, None)?;
    }
    Ok(())
}

fn path_str(p: &Path) -> Res<&str> {
    p.to_str()
        .ok_or_else(|| format!("path {} is not UTF-8", p.display()))
}

/// One spec mount, its destination resolved in the root and mounted on
/// through the fd (see [`super::inroot`]); a bind source is opened once,
/// without symlinks, and mounted from its fd.
fn mount_one(root: &Root, mnt: &MountSpec) -> Res<()> {
    let dst = &mnt.destination;
    let at = |r: Res<()>| r.map_err(|e| format!("mount at {}: {e}", dst.display()));
    let o = &mnt.options;
    if o.is_bind() {
        let src = open_source(&mnt.source)?;
        let st = nix::sys::stat::fstat(src.as_raw_fd())
            .map_err(|e| m(format_args!("bind mount source {}", mnt.source), e))?;
        let last = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            Last::Dir
        } else {
            Last::File
        };
        let dest = root.ensure(dst, last)?;
        let rec = o.flags & MsFlags::MS_REC;
        let src_path = fd_path(&src);
        at(do_mount(
            Some(path_str(&src_path)?),
            &fd_path(&dest),
            None,
            MsFlags::MS_BIND | rec,
            None,
        ))?;
        let extra = o.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !extra.is_empty() {
            // Resolved again: the old fd names the covered directory, not
            // the mount now on top of it.
            let now = root.open_in(dst)?;
            at(do_mount(
                None,
                &fd_path(&now),
                None,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | extra | rec,
                None,
            ))?;
        }
    } else {
        // The fd must outlive the mount calls that name it.
        let dest_fd = root.ensure(dst, Last::Dir)?;
        let dest = fd_path(&dest_fd);
        let (fstype, source) = match mnt.fstype.as_str() {
            // v2 only: a "cgroup" mount gets the container's cgroup2 view.
            "cgroup" | "cgroup2" => ("cgroup2", "cgroup2"),
            t => (
                t,
                if mnt.source.is_empty() {
                    t
                } else {
                    mnt.source.as_str()
                },
            ),
        };
        match mount(Some(source), &dest, Some(fstype), o.flags, o.data()) {
            Ok(()) => {}
            // ENODEV: the kernel has no such filesystem type. A failure,
            // naming the option to turn on, unless the image says to do
            // without it (agent.tolerate_missing_fs).
            Err(nix::errno::Errno::ENODEV) => {
                let tolerated = crate::config::AgentConfig::of_running_kernel().tolerate_missing_fs;
                return match missing_fs(fstype, dst, &tolerated) {
                    Some(err) => Err(err),
                    None => Ok(()),
                };
            }
            // /sys cannot be mounted read-write in some namespaces: retry
            // read-only, as runc does.
            Err(_) if fstype == "sysfs" => at(do_mount(
                Some(source),
                &dest,
                Some(fstype),
                o.flags | MsFlags::MS_RDONLY,
                o.data(),
            ))?,
            Err(_) => at(do_mount(
                Some(source),
                &dest,
                Some(fstype),
                o.flags,
                o.data(),
            ))?,
        }
    }
    if !o.propagation.is_empty() {
        let now = root.open_in(dst)?;
        at(do_mount(None, &fd_path(&now), None, o.propagation, None))?;
    }
    Ok(())
}

/// The kernel option that provides filesystem type `fstype`, for the error
/// a container gets when its spec mounts one the guest kernel lacks.
fn fs_kernel_option(fstype: &str) -> Option<&'static str> {
    Some(match fstype {
        "mqueue" => "CONFIG_POSIX_MQUEUE",
        "hugetlbfs" => "CONFIG_HUGETLBFS",
        "tmpfs" => "CONFIG_TMPFS",
        "devpts" => "CONFIG_UNIX98_PTYS",
        "proc" => "CONFIG_PROC_FS",
        "sysfs" => "CONFIG_SYSFS",
        "cgroup2" => "CONFIG_CGROUPS",
        "securityfs" => "CONFIG_SECURITYFS",
        "configfs" => "CONFIG_CONFIGFS_FS",
        "debugfs" => "CONFIG_DEBUG_FS",
        "tracefs" => "CONFIG_TRACING",
        "bpf" => "CONFIG_BPF_SYSCALL",
        "binfmt_misc" => "CONFIG_BINFMT_MISC",
        "fusectl" | "fuse" => "CONFIG_FUSE_FS",
        "overlay" => "CONFIG_OVERLAY_FS",
        "virtiofs" => "CONFIG_VIRTIO_FS",
        "9p" => "CONFIG_9P_FS",
        "ext4" => "CONFIG_EXT4_FS",
        "xfs" => "CONFIG_XFS_FS",
        "erofs" => "CONFIG_EROFS_FS",
        "squashfs" => "CONFIG_SQUASHFS",
        "nfs" | "nfs4" => "CONFIG_NFS_FS",
        _ => return None,
    })
}

/// What a spec mount of `fstype` at `dest` does when the kernel has no such
/// filesystem: `None` (skip it) if the image tolerates that type, else the
/// error, naming the kernel option.
fn missing_fs(fstype: &str, dest: &Path, tolerated: &[String]) -> Option<String> {
    if tolerated.iter().any(|t| t == fstype) {
        return None;
    }
    let option = fs_kernel_option(fstype)
        .map(|o| format!(" ({o})"))
        .unwrap_or_default();
    Some(format!(
        "mount of {fstype} at {}: the guest kernel has no {fstype} filesystem{option}; \
         use a kernel with it, or boot with agent.tolerate_missing_fs={fstype} to skip such mounts",
        dest.display()
    ))
}

/// The devices every container gets when its /dev is a fresh tmpfs.
const DEFAULT_DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn default_devices(root: &Root) -> Res<()> {
    for (name, major, minor) in DEFAULT_DEVICES {
        let d = DeviceSpec {
            path: Path::new("/dev").join(name),
            kind: 'c',
            major: *major,
            minor: *minor,
            mode: 0o666,
            uid: 0,
            gid: 0,
        };
        create_device(root, &d)?;
    }
    let dev = root.ensure(Path::new("/dev"), Last::Dir)?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        if exists_at(&dev, link.as_ref()) {
            continue;
        }
        nix::unistd::symlinkat(target, Some(dev.as_raw_fd()), link)
            .map_err(|e| m(format_args!("symlink /dev/{link}"), e))?;
    }
    Ok(())
}

/// Whether `name` exists in the directory `dir` (a symlink counts, unfollowed).
fn exists_at(dir: &OwnedFd, name: &std::ffi::OsStr) -> bool {
    nix::sys::stat::fstatat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .is_ok()
}

/// A device node from the spec, made with mknodat in its resolved parent;
/// its mode and owner are set through an fd to the new node.
fn create_device(root: &Root, d: &DeviceSpec) -> Res<()> {
    let (Some(parent), Some(name)) = (d.path.parent(), d.path.file_name()) else {
        return Err(format!("device path {} has no file name", d.path.display()));
    };
    let dir = root.ensure(parent, Last::Dir)?;
    if exists_at(&dir, name) {
        return Ok(());
    }
    let kind = match d.kind {
        'b' => SFlag::S_IFBLK,
        'p' => SFlag::S_IFIFO,
        _ => SFlag::S_IFCHR,
    };
    let what = || format!("{} ({}:{})", d.path.display(), d.major, d.minor);
    nix::sys::stat::mknodat(
        Some(dir.as_raw_fd()),
        name,
        kind,
        Mode::from_bits_truncate(d.mode),
        makedev(d.major, d.minor),
    )
    .map_err(|e| m(format_args!("mknod {}", what()), e))?;
    let node = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| m(format_args!("opening {}", what()), e))?;
    // SAFETY: openat returned a new fd that we now own.
    let node = unsafe { OwnedFd::from_raw_fd(node) };
    // mknod applies the umask; set the asked-for mode exactly.
    fs::set_permissions(fd_path(&node), fs::Permissions::from_mode(d.mode))
        .map_err(|e| m(format_args!("chmod {}", what()), e))?;
    nix::unistd::fchownat(
        Some(dir.as_raw_fd()),
        name,
        Some(nix::unistd::Uid::from_raw(d.uid)),
        Some(nix::unistd::Gid::from_raw(d.gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| m(format_args!("chown {}", what()), e))?;
    Ok(())
}

fn enter_root(rootfs: &Path, no_pivot: bool) -> Res<()> {
    nix::unistd::chdir(rootfs).map_err(|e| m(format_args!("chdir {}", rootfs.display()), e))?;
    if !no_pivot {
        match nix::unistd::pivot_root(".", ".") {
            Ok(()) => {
                // The old root is now stacked on "."; detach it without
                // letting the unmount propagate anywhere.
                do_mount(
                    None,
                    Path::new("."),
                    None,
                    MsFlags::MS_SLAVE | MsFlags::MS_REC,
                    None,
                )?;
                umount2(".", MntFlags::MNT_DETACH).map_err(|e| m("detaching the old root", e))?;
                nix::unistd::chdir("/").map_err(|e| m("chdir /", e))?;
                return Ok(());
            }
            Err(nix::errno::Errno::EINVAL) => {} // initramfs root: fall back
            Err(e) => return Err(m("pivot_root", e)),
        }
    }
    do_mount(
        Some(path_str(rootfs)?),
        Path::new("/"),
        None,
        MsFlags::MS_MOVE,
        None,
    )?;
    nix::unistd::chroot(".").map_err(|e| m("chroot", e))?;
    nix::unistd::chdir("/").map_err(|e| m("chdir /", e))?;
    Ok(())
}

/// The container's `/dev/null`, refused unless it is the 1:3 character
/// device: an image's `/dev/null -> /proc/sys/kernel/core_pattern` would
/// otherwise be bind-mounted, writable, over every masked file
/// (CVE-2025-31133). Opened once, used through its fd.
fn dev_null() -> Res<OwnedFd> {
    let fd = nix::fcntl::open(
        "/dev/null",
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| m("opening the container's /dev/null for masking", e))?;
    // SAFETY: open returned a new fd that we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| m("fstat /dev/null", e))?;
    check_dev_null(st.st_mode, st.st_rdev)?;
    Ok(fd)
}

fn check_dev_null(mode: u32, rdev: u64) -> Res<()> {
    let is_chr = mode & libc::S_IFMT == libc::S_IFCHR;
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    if is_chr && (major, minor) == (1, 3) {
        return Ok(());
    }
    Err(format!(
        "the container's /dev/null is not the null device (mode {mode:o}, {major}:{minor}); \
         refusing to mask paths with it: mount a tmpfs /dev or ship a real 1:3 node"
    ))
}

fn mask_path(p: &Path, null: &Path) -> Res<()> {
    match fs::metadata(p) {
        Err(_) => Ok(()), // nothing there to hide
        Ok(md) if md.is_dir() => {
            do_mount(Some("tmpfs"), p, Some("tmpfs"), MsFlags::MS_RDONLY, None)
        }
        Ok(_) => do_mount(Some(path_str(null)?), p, None, MsFlags::MS_BIND, None),
    }
}

fn readonly_path(p: &Path) -> Res<()> {
    if fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    let s = path_str(p)?;
    do_mount(Some(s), p, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
    let flags = MsFlags::MS_REMOUNT
        | MsFlags::MS_BIND
        | MsFlags::MS_RDONLY
        | MsFlags::MS_REC
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    do_mount(None, p, None, flags, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_takes_only_the_real_null_device() {
        check_dev_null(libc::S_IFCHR | 0o666, libc::makedev(1, 3)).unwrap();
        // A regular file or a link target planted by the image.
        let e = check_dev_null(libc::S_IFREG | 0o644, 0).unwrap_err();
        assert!(
            e.contains("not the null device") && e.contains("tmpfs /dev"),
            "{e}"
        );
        // /dev/zero, /dev/kmsg: character devices, wrong numbers.
        assert!(check_dev_null(libc::S_IFCHR | 0o666, libc::makedev(1, 5)).is_err());
        assert!(check_dev_null(libc::S_IFBLK | 0o666, libc::makedev(1, 3)).is_err());
    }

    #[test]
    fn a_missing_filesystem_fails_naming_the_kernel_option_unless_tolerated() {
        let err = missing_fs("mqueue", Path::new("/dev/mqueue"), &[]).unwrap();
        assert!(
            err.starts_with("mount of mqueue at /dev/mqueue: the guest kernel has no mqueue filesystem (CONFIG_POSIX_MQUEUE)"),
            "{err}"
        );
        let tolerated = vec!["hugetlbfs".to_string(), "mqueue".to_string()];
        assert_eq!(
            missing_fs("mqueue", Path::new("/dev/mqueue"), &tolerated),
            None
        );
        // Tolerating one type does not tolerate another.
        let err = missing_fs("xfs", Path::new("/data"), &tolerated[..1]).unwrap();
        assert!(err.contains("(CONFIG_XFS_FS)"), "{err}");
        // An unknown type still fails, without a guessed option.
        let err = missing_fs("zonefs", Path::new("/z"), &[]).unwrap();
        assert!(err.contains("no zonefs filesystem;"), "{err}");
    }
}
