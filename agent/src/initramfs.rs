//! PID 1 leaves the kernel's initramfs for a tmpfs, as `switch_root` does.
//!
//! The initramfs is the `rootfs` mount: it has no parent, so `pivot_root`
//! can never move away from it, and a container started on it could only be
//! chrooted, with the guest's own root (this agent, its modules) still
//! underneath in the container's mount namespace. So, first thing at boot,
//! the agent copies every file of the initramfs onto a fresh tmpfs, deletes
//! the originals (the memory comes back), moves the tmpfs onto `/` and
//! chroots into it. From then on `/` is a mount with a parent, containers
//! `pivot_root` and detach the guest's root, and what is left below is empty.
//!
//! Never fatal: any failure is reported and the agent carries on where it is
//! (containers then use the chroot fallback, as before).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// ramfs's f_type (linux/magic.h); neither libc nor nix name it.
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Where the tmpfs is mounted before it is moved onto `/`.
const NEW_ROOT: &str = "/.kiln-root";

/// True when `/` is an initramfs (ramfs or tmpfs); a disk root (ext4, erofs,
/// dm-verity) can be pivoted away from already.
// fs_type_t is i64 on most targets but not all (s390x): the cast stays.
#[allow(clippy::unnecessary_cast)]
fn root_is_initramfs() -> bool {
    match nix::sys::statfs::statfs("/") {
        Ok(s) => {
            let t = s.filesystem_type();
            t == nix::sys::statfs::TMPFS_MAGIC || t.0 as i64 == RAMFS_MAGIC
        }
        Err(_) => false,
    }
}

/// Moves PID 1 onto a tmpfs when booted from an initramfs. Returns what it
/// did (None: not an initramfs), or an error after undoing what it could.
pub fn leave() -> Result<Option<String>, String> {
    // Only before anything is mounted: the initramfs then holds nothing but
    // its own files, so the copy below cannot wander into /proc or /dev.
    if !root_is_initramfs() || Path::new("/proc/self").exists() {
        return Ok(None);
    }
    let new_root = Path::new(NEW_ROOT);
    fs::create_dir_all(new_root).map_err(|e| format!("mkdir {NEW_ROOT}: {e}"))?;
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(|e| format!("mount tmpfs on {NEW_ROOT}: {e}"))?;
    let skip = OsStr::new(".kiln-root");
    let copied = match copy_tree(Path::new("/"), new_root, Some(skip)) {
        Ok(n) => n,
        Err(e) => {
            let _ = umount2(new_root, MntFlags::MNT_DETACH);
            let _ = fs::remove_dir(new_root);
            return Err(format!("copying the initramfs to a tmpfs: {e}"));
        }
    };
    // The originals only cost memory from here on; a leftover is harmless.
    let freed = remove_tree_contents(Path::new("/"), Some(skip));
    let switch = || -> nix::Result<()> {
        nix::unistd::chdir(new_root)?;
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
        nix::unistd::chroot(".")?;
        nix::unistd::chdir("/")
    };
    switch().map_err(|e| format!("moving the tmpfs onto /: {e}"))?;
    Ok(Some(format!(
        "left the initramfs: {copied} entries on a tmpfs root ({freed} removed from the initramfs)"
    )))
}

/// Copies the tree under `src` into the existing directory `dst`, keeping
/// types, modes, owners and symlink targets; device nodes are made again.
/// Never leaves `src`'s filesystem. Returns the number of entries.
pub fn copy_tree(src: &Path, dst: &Path, skip: Option<&OsStr>) -> std::io::Result<usize> {
    let dev = fs::symlink_metadata(src)?.dev();
    let mut count = 0;
    let mut entries: Vec<_> = fs::read_dir(src)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        if Some(name.as_os_str()) == skip {
            continue;
        }
        let (from, to) = (entry.path(), dst.join(&name));
        let meta = fs::symlink_metadata(&from)?;
        if meta.dev() != dev {
            continue;
        }
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir(&to)?;
            count += copy_tree(&from, &to, None)?;
            fs::set_permissions(&to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
        } else if ft.is_file() {
            fs::copy(&from, &to)?;
            fs::set_permissions(&to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        } else {
            // Character and block devices, fifos, sockets.
            nix::sys::stat::mknod(
                &to,
                nix::sys::stat::SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT),
                nix::sys::stat::Mode::from_bits_truncate(meta.mode() & 0o7777),
                meta.rdev(),
            )
            .map_err(std::io::Error::from)?;
        }
        // Ownership last (a chown clears set-id bits; chmod above came first,
        // so put them back after).
        let _ = nix::unistd::fchownat(
            None,
            &to,
            Some(nix::unistd::Uid::from_raw(meta.uid())),
            Some(nix::unistd::Gid::from_raw(meta.gid())),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        );
        if !ft.is_symlink() && meta.mode() & 0o6000 != 0 {
            fs::set_permissions(&to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        }
        count += 1;
    }
    Ok(count)
}

/// Removes everything under `dir` on its filesystem (but `dir` itself and
/// `skip`); returns how many entries went. Errors are skipped over.
fn remove_tree_contents(dir: &Path, skip: Option<&OsStr>) -> usize {
    let Ok(dev) = fs::symlink_metadata(dir).map(|m| m.dev()) else {
        return 0;
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries.flatten() {
        if Some(entry.file_name().as_os_str()) == skip {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            n += remove_tree_contents(&path, None);
            if fs::remove_dir(&path).is_ok() {
                n += 1;
            }
        } else if fs::remove_file(&path).is_ok() {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_is_copied_with_its_types_modes_and_links() {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        fs::create_dir_all(s.join("lib/modules")).unwrap();
        fs::write(s.join("init"), b"\x7fELF agent").unwrap();
        fs::set_permissions(s.join("init"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(s.join("lib/modules/a.ko"), b"module").unwrap();
        fs::set_permissions(s.join("lib/modules"), fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("init", s.join("sbin-init")).unwrap();
        fs::create_dir(s.join(".kiln-root")).unwrap();
        let dst = tempfile::tempdir().unwrap();
        let d = dst.path();
        let n = copy_tree(s, d, Some(OsStr::new(".kiln-root"))).unwrap();
        assert_eq!(n, 5, "init, lib, lib/modules, a.ko, sbin-init");
        assert_eq!(fs::read(d.join("init")).unwrap(), b"\x7fELF agent");
        assert_eq!(fs::metadata(d.join("init")).unwrap().mode() & 0o7777, 0o755);
        assert_eq!(
            fs::metadata(d.join("lib/modules")).unwrap().mode() & 0o7777,
            0o700
        );
        assert_eq!(
            fs::read_link(d.join("sbin-init")).unwrap(),
            Path::new("init")
        );
        assert!(
            !d.join(".kiln-root").exists(),
            "the new root is not copied into itself"
        );

        let removed = remove_tree_contents(s, Some(OsStr::new(".kiln-root")));
        assert_eq!(removed, 5);
        let left: Vec<_> = fs::read_dir(s)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [OsStr::new(".kiln-root")]);
    }

    #[test]
    fn device_nodes_and_setuid_bits_survive_the_copy() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: mknod needs root");
            return;
        }
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        nix::sys::stat::mknod(
            &s.join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
        fs::write(s.join("su"), b"x").unwrap();
        nix::unistd::chown(&s.join("su"), Some(0.into()), Some(0.into())).unwrap();
        fs::set_permissions(s.join("su"), fs::Permissions::from_mode(0o4755)).unwrap();
        let dst = tempfile::tempdir().unwrap();
        copy_tree(s, dst.path(), None).unwrap();
        let null = fs::symlink_metadata(dst.path().join("null")).unwrap();
        assert_eq!(
            (null.mode() & libc::S_IFMT, null.rdev()),
            (libc::S_IFCHR, nix::sys::stat::makedev(1, 3))
        );
        assert_eq!(
            fs::metadata(dst.path().join("su")).unwrap().mode() & 0o7777,
            0o4755
        );
    }
}
