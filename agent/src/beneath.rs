//! Directories the agent owns, walked and changed through file descriptors.
//!
//! A path from a request is checked once as text ([`crate::paths::confined`])
//! and then resolved component by component with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` from a directory fd the agent holds. Every later
//! step acts on an fd or on one name inside an fd (`mkdirat`, `fchmod`,
//! `fchown`, `renameat`, `O_EXCL` part files), so a directory that a workload
//! swaps for a symlink between a check and a use cannot redirect a write, a
//! chmod or a rename outside the tree (the CVE-2021-30465 class).

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

/// An open directory; names given to its methods are single components.
pub struct Dir(OwnedFd);

fn how(flags: OFlag, mode: u32) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .mode(Mode::from_bits_truncate(mode))
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS)
}

/// One path component that names an entry (not `.`, `..`, empty or nested).
fn single(name: &OsStr) -> Result<&OsStr, Errno> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(Errno::EINVAL);
    }
    Ok(name)
}

fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: every caller passes an fd a successful open just returned.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

impl Dir {
    /// Opens `path` itself, a directory the agent made (not a request's).
    pub fn open(path: &Path) -> Result<Dir, Errno> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )?;
        Ok(Dir(own(fd)))
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// The subdirectory `name`; refuses a symlink or anything not a directory.
    pub fn dir(&self, name: &OsStr) -> Result<Dir, Errno> {
        let fd = openat2(
            self.fd(),
            single(name)?,
            how(OFlag::O_DIRECTORY | OFlag::O_RDONLY, 0),
        )?;
        Ok(Dir(own(fd)))
    }

    /// Walks `rel` below this directory, creating missing directories with
    /// `mode` (exactly, umask aside); an existing symlink or file on the way
    /// is an error (`ELOOP` / `ENOTDIR`), never followed.
    pub fn make_dirs(&self, rel: &Path, mode: u32) -> Result<Dir, Errno> {
        let mut cur = self.dir_dup()?;
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(Errno::EINVAL);
            };
            match nix::sys::stat::mkdirat(
                Some(cur.fd()),
                single(name)?,
                Mode::from_bits_truncate(0o700),
            ) {
                Ok(()) => {
                    let next = cur.dir(name)?;
                    nix::sys::stat::fchmod(next.fd(), Mode::from_bits_truncate(mode & 0o7777))?;
                    cur = next;
                }
                Err(Errno::EEXIST) => cur = cur.dir(name)?,
                Err(e) => return Err(e),
            }
        }
        Ok(cur)
    }

    fn dir_dup(&self) -> Result<Dir, Errno> {
        Ok(Dir(self.0.try_clone().map_err(|_| Errno::EMFILE)?))
    }

    /// A new file `name`, which must not exist yet (`O_EXCL`): a planted
    /// file or hard link of the same name is refused, not reused.
    pub fn create_new(&self, name: &OsStr, mode: u32) -> Result<File, Errno> {
        let fd = openat2(
            self.fd(),
            single(name)?,
            how(OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY, mode),
        )?;
        Ok(File::from(own(fd)))
    }

    /// The existing regular file `name` for writing; refuses anything else
    /// and a file with other links (one could be a hard link planted to a
    /// file elsewhere).
    pub fn open_existing(&self, name: &OsStr) -> Result<File, Errno> {
        let fd = openat2(self.fd(), single(name)?, how(OFlag::O_WRONLY, 0))?;
        let f = File::from(own(fd));
        let st = nix::sys::stat::fstat(f.as_raw_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_nlink != 1 {
            return Err(Errno::EPERM);
        }
        Ok(f)
    }

    /// Removes the entry `name` if it is not a directory; absent is fine.
    pub fn remove_file(&self, name: &OsStr) -> Result<(), Errno> {
        match nix::unistd::unlinkat(
            Some(self.fd()),
            single(name)?,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        ) {
            Err(Errno::ENOENT) => Ok(()),
            r => r,
        }
    }

    pub fn symlink(&self, target: &OsStr, name: &OsStr) -> Result<(), Errno> {
        nix::unistd::symlinkat(target, Some(self.fd()), single(name)?)
    }

    /// Renames `from` to `to`, both in this directory.
    pub fn rename(&self, from: &OsStr, to: &OsStr) -> Result<(), Errno> {
        nix::fcntl::renameat(Some(self.fd()), single(from)?, Some(self.fd()), single(to)?)
    }

    /// chown of the entry `name` itself (a symlink is not followed).
    pub fn chown_entry(
        &self,
        name: &OsStr,
        uid: Option<Uid>,
        gid: Option<Gid>,
    ) -> Result<(), Errno> {
        nix::unistd::fchownat(
            Some(self.fd()),
            single(name)?,
            uid,
            gid,
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
    }
}

/// Writes `data` to `name` in `dir` atomically: a fresh `O_EXCL` part file,
/// then a rename over `name` (which replaces a symlink, never follows it).
pub fn replace_file(dir: &Dir, name: &OsStr, data: &[u8], mode: u32) -> Result<(), Errno> {
    let mut part = name.to_os_string();
    part.push(".kiln-part");
    dir.remove_file(&part)?;
    let mut f = dir.create_new(&part, 0o600)?;
    std::io::Write::write_all(&mut f, data)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    set_owner_and_mode(f.as_raw_fd(), None, None, mode)?;
    dir.rename(&part, name)
}

/// chown, then chmod (a chown clears setuid/setgid bits, so the mode goes
/// last), both on the fd.
pub fn set_owner_and_mode(
    fd: RawFd,
    uid: Option<Uid>,
    gid: Option<Gid>,
    mode: u32,
) -> Result<(), Errno> {
    if uid.is_some() || gid.is_some() {
        nix::unistd::fchown(fd, uid, gid)?;
    }
    nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(mode & 0o7777))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn symlinks_and_dot_dot_are_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base");
        std::fs::create_dir_all(base.join("a")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), base.join("a/out")).unwrap();
        std::os::unix::fs::symlink("/", base.join("root")).unwrap();
        let d = Dir::open(&base).unwrap();
        let refused =
            |r: Result<Dir, Errno>| matches!(r.err(), Some(Errno::ELOOP | Errno::ENOTDIR));
        assert!(refused(d.make_dirs(Path::new("a/out/x"), 0o755)));
        assert!(refused(d.make_dirs(Path::new("root/etc"), 0o755)));
        assert_eq!(
            d.make_dirs(Path::new("../x"), 0o755).err(),
            Some(Errno::EINVAL)
        );
        assert_eq!(d.dir(OsStr::new("..")).err(), Some(Errno::EINVAL));
        assert_eq!(d.dir(OsStr::new("a/out")).err(), Some(Errno::EINVAL));
        assert!(!tmp.path().join("x").exists());
        let a = d.dir(OsStr::new("a")).unwrap();
        assert_eq!(
            a.create_new(OsStr::new("out"), 0o600).err(),
            Some(Errno::EEXIST)
        );
        assert!(matches!(
            a.open_existing(OsStr::new("out")).err(),
            Some(Errno::ELOOP)
        ));
    }

    #[test]
    fn new_directories_get_the_mode_and_files_are_exclusive() {
        let tmp = tempfile::tempdir().unwrap();
        let d = Dir::open(tmp.path()).unwrap();
        let deep = d.make_dirs(Path::new("p/q"), 0o750).unwrap();
        let mode = |p: &str| {
            std::fs::metadata(tmp.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!((mode("p"), mode("p/q")), (0o750, 0o750));
        let f = deep.create_new(OsStr::new("f"), 0o600).unwrap();
        set_owner_and_mode(f.as_raw_fd(), None, None, 0o4755).unwrap();
        assert_eq!(mode("p/q/f"), 0o4755);
        assert_eq!(
            deep.create_new(OsStr::new("f"), 0o600).err(),
            Some(Errno::EEXIST)
        );
        // A second name for the file (a planted hard link) is refused.
        std::fs::hard_link(tmp.path().join("p/q/f"), tmp.path().join("p/q/g")).unwrap();
        assert_eq!(
            deep.open_existing(OsStr::new("g")).err(),
            Some(Errno::EPERM)
        );
        deep.rename(OsStr::new("f"), OsStr::new("h")).unwrap();
        deep.remove_file(OsStr::new("nothing")).unwrap();
        assert!(tmp.path().join("p/q/h").exists());
        // replace_file puts a file where a planted symlink was.
        std::os::unix::fs::symlink("/etc/hostname", tmp.path().join("p/q/r")).unwrap();
        replace_file(&deep, OsStr::new("r"), b"x\n", 0o644).unwrap();
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("p/q/r")).unwrap(),
            "x\n"
        );
        assert!(!std::fs::symlink_metadata(tmp.path().join("p/q/r"))
            .unwrap()
            .file_type()
            .is_symlink());
    }
}
