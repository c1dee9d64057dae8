//! Re-owning a container's root filesystem into the host id range that
//! virtiofsd maps the guest's ids onto (`hypervisor.qemu.virtio_fs_id_map_base`),
//! as podman does for `--userns=auto`. Without it, host-root-owned files are
//! both read-only to the guest's root and chmod-able by it into setuid-root
//! host files.
//!
//! What the shift never does: follow a symlink, cross onto another
//! filesystem, or change an inode that is also reachable from outside the
//! tree (a hard link into a cache or into `/usr/bin`): such a file gets a
//! private copy first. Setuid/setgid bits and file capabilities, which
//! chown clears, are put back.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Ids one guest range covers: guest 0..65535 ⇄ host base..base+65535.
pub const ID_RANGE: u32 = 65536;

/// The xattr that holds a file's capabilities; chown removes it.
const CAPS_XATTR: &str = "security.capability";

/// Re-owns `root` and everything below it on the same filesystem: uid/gid
/// `n` < 65536 becomes `base + n`. Ids already in the range are skipped, so
/// a second run (or one after a crash half-way) costs one stat per entry.
/// Returns how many entries were changed.
pub fn shift_tree(root: &Path, base: u32) -> anyhow::Result<u64> {
    let top = lstat(root)?;
    if !top.is_dir() {
        anyhow::bail!("{} is not a directory", root.display());
    }
    shift_from(root, top, base)
}

/// [`shift_tree`] for any entry: a directory with everything below it, or
/// one file or symlink (never followed).
pub fn shift_entry(root: &Path, base: u32) -> anyhow::Result<u64> {
    shift_from(root, lstat(root)?, base)
}

fn shift_from(root: &Path, top: std::fs::Metadata, base: u32) -> anyhow::Result<u64> {
    let mut entries = Vec::new();
    let dev = top.dev();
    walk(root, top, dev, &mut entries)?;
    break_outside_links(&mut entries)?;
    let mut changed = 0;
    let mut seen = std::collections::HashSet::new();
    // Children before parents (walk's order): the root's owner, changed
    // last, marks a finished shift. An inode with several names is shifted once.
    for (path, meta) in &entries {
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert(meta.ino()) {
            continue;
        }
        changed += shift_one(path, meta, base)?;
    }
    Ok(changed)
}

fn lstat(path: &Path) -> anyhow::Result<std::fs::Metadata> {
    std::fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))
}

/// `path` (whose `meta` the caller read) and every entry below it on
/// device `dev`, children before their parent.
fn walk(
    path: &Path,
    meta: std::fs::Metadata,
    dev: u64,
    out: &mut Vec<(PathBuf, std::fs::Metadata)>,
) -> anyhow::Result<()> {
    if meta.dev() != dev {
        return Ok(());
    }
    if meta.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(path)
            .with_context(|| format!("listing {}", path.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("listing {}", path.display()))?;
        names.sort();
        for child in names {
            let child_meta = lstat(&child)?;
            walk(&child, child_meta, dev, out)?;
        }
    }
    out.push((path.to_path_buf(), meta));
    Ok(())
}

fn needs_shift(meta: &std::fs::Metadata) -> bool {
    meta.uid() < ID_RANGE || meta.gid() < ID_RANGE
}

/// Gives every inode that needs a shift and has links outside the tree
/// (more links than names inside it) a private copy, linked under all its
/// names inside the tree, so the shift cannot re-own a file elsewhere on
/// the host. `entries` is updated to the copies.
fn break_outside_links(entries: &mut [(PathBuf, std::fs::Metadata)]) -> anyhow::Result<()> {
    let mut names: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, (_, meta)) in entries.iter().enumerate() {
        if !meta.is_dir() && meta.nlink() > 1 && needs_shift(meta) {
            names.entry(meta.ino()).or_default().push(i);
        }
    }
    let mut inodes: Vec<_> = names.into_values().collect();
    inodes.sort();
    for idx in inodes {
        let (first, meta) = entries[idx[0]].clone();
        if idx.len() as u64 >= meta.nlink() {
            continue; // every name is inside the tree
        }
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_symlink() {
            anyhow::bail!(
                "{} is hard-linked to a {:?} outside the rootfs; re-owning it would change that one \
                 too. Give the rootfs its own copy (e.g. `cp -a`) or turn \
                 hypervisor.qemu.virtio_fs_id_map_base off",
                first.display(),
                kind
            );
        }
        let copy = part_name(&first);
        private_copy(&first, &copy, &meta).with_context(|| {
            format!(
                "copying {} (hard-linked outside the rootfs)",
                first.display()
            )
        })?;
        std::fs::rename(&copy, &first)
            .with_context(|| format!("replacing {} with its copy", first.display()))?;
        for &i in &idx[1..] {
            let other = entries[i].0.clone();
            let part = part_name(&other);
            std::fs::hard_link(&first, &part)
                .and_then(|()| std::fs::rename(&part, &other))
                .with_context(|| format!("linking {} to its copy", other.display()))?;
        }
        let fresh = std::fs::symlink_metadata(&first)?;
        for &i in &idx {
            entries[i].1 = fresh.clone();
        }
    }
    Ok(())
}

/// A sibling name for a part file: same directory, so the rename is atomic.
fn part_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".kiln-shift-part");
    path.with_file_name(name)
}

/// A copy of file or symlink `from` at `to` with its mode, owner (shifted
/// later), times and file capabilities.
fn private_copy(from: &Path, to: &Path, meta: &std::fs::Metadata) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(to);
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)?;
        std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))?;
        return Ok(());
    }
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    std::io::copy(&mut src, &mut dst)?;
    dst.sync_all()?;
    let caps = get_xattr(from, CAPS_XATTR)?;
    std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    if let Some(caps) = caps {
        set_xattr(to, CAPS_XATTR, &caps)?;
    }
    let times = std::fs::FileTimes::new()
        .set_accessed(meta.accessed()?)
        .set_modified(meta.modified()?);
    dst.set_times(times)?;
    Ok(())
}

fn shift_one(path: &Path, meta: &std::fs::Metadata, base: u32) -> anyhow::Result<u64> {
    let shift = |id: u32| (id < ID_RANGE).then(|| base + id);
    let (uid, gid) = (shift(meta.uid()), shift(meta.gid()));
    if uid.is_none() && gid.is_none() {
        return Ok(0);
    }
    let is_file = meta.file_type().is_file();
    let caps = if is_file {
        get_xattr(path, CAPS_XATTR)?
    } else {
        None
    };
    std::os::unix::fs::lchown(path, uid, gid)
        .with_context(|| format!("re-owning {} into the guest's id range", path.display()))?;
    if is_file && meta.mode() & 0o6000 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
            .with_context(|| format!("restoring the mode of {}", path.display()))?;
    }
    if let Some(caps) = caps {
        set_xattr(path, CAPS_XATTR, &caps)
            .with_context(|| format!("restoring the file capabilities of {}", path.display()))?;
    }
    Ok(1)
}

fn c_path(path: &Path) -> anyhow::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} has a NUL byte", path.display()))
}

/// The value of xattr `name` on `path` itself (never a link's target), or
/// None when it has none or the filesystem keeps no xattrs.
fn get_xattr(path: &Path, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let (p, n) = (c_path(path)?, CString::new(name)?);
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: p and n are NUL-terminated; buf is writable for its length.
        let len =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if len >= 0 {
            buf.truncate(len as usize);
            return Ok(Some(buf));
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => return Ok(None),
            Some(libc::ERANGE) if buf.len() < 1 << 16 => buf.resize(buf.len() * 4, 0),
            _ => return Err(err).with_context(|| format!("reading {name} of {}", path.display())),
        }
    }
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> anyhow::Result<()> {
    let (p, n) = (c_path(path)?, CString::new(name)?);
    // SAFETY: p and n are NUL-terminated; value is readable for its length.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setting {name} on {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_only() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            eprintln!("note: skipped, chown needs root");
        }
        root
    }

    #[test]
    fn shift_tree_reowns_without_following_links_and_keeps_setuid() {
        if !root_only() {
            return;
        }
        let base = 1 << 30;
        let host = tempfile::tempdir().unwrap();
        let outside = host.path().join("outside");
        std::fs::write(&outside, "host file").unwrap();
        let root = host.path().join("rootfs");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/su"), "x").unwrap();
        std::fs::set_permissions(root.join("bin/su"), std::fs::Permissions::from_mode(0o4755))
            .unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::fs::hard_link(root.join("bin/su"), root.join("su-again")).unwrap();
        std::fs::write(root.join("user"), "").unwrap();
        std::os::unix::fs::lchown(root.join("user"), Some(1000), Some(100)).unwrap();
        std::fs::write(root.join("big"), "").unwrap();
        std::os::unix::fs::lchown(root.join("big"), Some(70000), Some(70000)).unwrap();

        // bin, bin/su (one inode with su-again), link, user, rootfs itself.
        assert_eq!(shift_tree(&root, base).unwrap(), 5);
        let m = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap();
        assert_eq!((m("bin/su").uid(), m("bin/su").gid()), (base, base));
        assert_eq!(m("bin/su").mode() & 0o7777, 0o4755, "setuid kept");
        assert_eq!(
            m("bin/su").ino(),
            m("su-again").ino(),
            "a link inside stays a link"
        );
        assert_eq!(
            (m("link").uid(), m("user").uid(), m("user").gid()),
            (base, base + 1000, base + 100)
        );
        assert_eq!(m("big").uid(), 70000, "out of range: left alone");
        assert_eq!(m(".").uid(), base);
        let o = std::fs::metadata(&outside).unwrap();
        assert_eq!(
            (o.uid(), o.gid()),
            (0, 0),
            "the link's target is not touched"
        );
        assert_eq!(
            shift_tree(&root, base).unwrap(),
            0,
            "a second run changes nothing"
        );
        assert!(shift_tree(&outside, base).is_err(), "not a directory");
    }

    /// A rootfs assembled by hard-linking from a cache (or from /usr/bin)
    /// must not re-own the cache's files.
    #[test]
    fn a_file_linked_from_outside_gets_a_private_copy() {
        if !root_only() {
            return;
        }
        let base = 1 << 30;
        let host = tempfile::tempdir().unwrap();
        let cache = host.path().join("cache-ping");
        std::fs::write(&cache, "ping binary").unwrap();
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o4711)).unwrap();
        let root = host.path().join("rootfs");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::hard_link(&cache, root.join("bin/ping")).unwrap();
        std::fs::hard_link(&cache, root.join("bin/ping6")).unwrap();
        let cache_link = host.path().join("cache-link");
        std::os::unix::fs::symlink("target", &cache_link).unwrap();
        std::fs::hard_link(&cache_link, root.join("ln")).unwrap();

        shift_tree(&root, base).unwrap();
        let c = std::fs::symlink_metadata(&cache).unwrap();
        assert_eq!(
            (c.uid(), c.gid(), c.nlink()),
            (0, 0, 1),
            "the cache's file is its own again"
        );
        assert_eq!(c.mode() & 0o7777, 0o4711);
        let (p, p6) = (
            std::fs::symlink_metadata(root.join("bin/ping")).unwrap(),
            std::fs::symlink_metadata(root.join("bin/ping6")).unwrap(),
        );
        assert_eq!((p.uid(), p.gid(), p.mode() & 0o7777), (base, base, 0o4711));
        assert_eq!(
            (p.ino(), p.nlink()),
            (p6.ino(), 2),
            "the two names inside share the copy"
        );
        assert_eq!(
            std::fs::read(root.join("bin/ping")).unwrap(),
            b"ping binary"
        );
        assert_eq!(std::fs::symlink_metadata(&cache_link).unwrap().uid(), 0);
        assert_eq!(
            std::fs::read_link(root.join("ln")).unwrap(),
            Path::new("target")
        );
        assert_eq!(
            std::fs::symlink_metadata(root.join("ln")).unwrap().uid(),
            base
        );
        let left: Vec<_> = std::fs::read_dir(root.join("bin"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 2, "no part file left: {left:?}");
    }

    /// chown clears `security.capability`; the shift puts it back, so a
    /// binary like ping keeps working in a re-owned rootfs.
    #[test]
    fn file_capabilities_survive_the_shift() {
        if !root_only() {
            return;
        }
        let base = 1 << 30;
        let host = tempfile::tempdir().unwrap();
        let root = host.path().join("rootfs");
        std::fs::create_dir_all(&root).unwrap();
        let ping = root.join("ping");
        std::fs::write(&ping, "x").unwrap();
        // VFS_CAP_REVISION_2 with CAP_NET_RAW (bit 13) permitted, effective flag set.
        let mut caps = vec![0u8; 20];
        caps[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
        caps[4..8].copy_from_slice(&(1u32 << 13).to_le_bytes());
        if set_xattr(&ping, CAPS_XATTR, &caps).is_err() {
            eprintln!("note: skipped, the temp filesystem keeps no security xattrs");
            return;
        }
        // Hard-linked from outside too: the copy keeps them as well.
        let linked = root.join("ping-linked");
        std::fs::write(host.path().join("outside"), "y").unwrap();
        set_xattr(&host.path().join("outside"), CAPS_XATTR, &caps).unwrap();
        std::fs::hard_link(host.path().join("outside"), &linked).unwrap();

        shift_tree(&root, base).unwrap();
        for f in [&ping, &linked] {
            assert_eq!(std::fs::metadata(f).unwrap().uid(), base);
            assert_eq!(
                get_xattr(f, CAPS_XATTR).unwrap().as_deref(),
                Some(&caps[..]),
                "{}",
                f.display()
            );
        }
    }

    /// What a runtime shares after launch can be a single file.
    #[test]
    fn shift_entry_takes_one_file_and_shift_tree_only_directories() {
        if !root_only() {
            return;
        }
        let host = tempfile::tempdir().unwrap();
        let f = host.path().join("cid-0123-hosts");
        std::fs::write(&f, "127.0.0.1 localhost\n").unwrap();
        assert!(shift_tree(&f, 1 << 30).is_err(), "not a directory");
        assert_eq!(shift_entry(&f, 1 << 30).unwrap(), 1);
        assert_eq!(std::fs::metadata(&f).unwrap().uid(), 1 << 30);
        assert_eq!(shift_entry(&f, 1 << 30).unwrap(), 0);
    }

    #[test]
    fn a_device_linked_from_outside_is_refused_with_the_fix() {
        if !root_only() {
            return;
        }
        let host = tempfile::tempdir().unwrap();
        let root = host.path().join("rootfs");
        std::fs::create_dir_all(&root).unwrap();
        let fifo = host.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        std::fs::hard_link(&fifo, root.join("fifo")).unwrap();
        let e = format!("{:#}", shift_tree(&root, 1 << 30).unwrap_err());
        assert!(e.contains("hard-linked") && e.contains("cp -a"), "{e}");
        assert_eq!(std::fs::symlink_metadata(&fifo).unwrap().uid(), 0);
    }
}
