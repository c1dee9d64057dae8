//! Paths inside a container's root filesystem, resolved by the kernel with
//! `openat2(RESOLVE_IN_ROOT)` and used through `O_PATH` file descriptors.
//!
//! The rootfs and its volumes are the workload's to change, at any moment: a
//! path checked as text and then handed to mount(2), mknod(2) or open(2) can
//! meet a directory swapped for a symlink in between (the CVE-2021-30465
//! class). Here every path is resolved once, inside the root, and the
//! operation acts on the resulting fd (`/proc/self/fd/N` for mount(2), `*at`
//! calls for creation), so a swap makes it fail or stay inside the root.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

type Res<T> = std::result::Result<T, String>;

/// What to create for a missing last component.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Last {
    Dir,
    File,
}

/// The container's root directory, held open.
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

/// The path mount(2) and friends take for an fd: the magic link resolves to
/// exactly the file the fd holds, whatever the tree looks like now.
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn own(fd: i32) -> OwnedFd {
    // SAFETY: callers pass an fd a successful open just returned.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `p` as a path relative to the root: `/a/../b` stays as written (the
/// kernel clamps `..` at the root); empty means the root itself.
fn relative(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| {
            !matches!(
                c,
                Component::RootDir | Component::CurDir | Component::Prefix(_)
            )
        })
        .collect()
}

impl Root {
    pub fn open(path: &Path) -> Res<Root> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("opening container rootfs {}: {e}", path.display()))?;
        Ok(Root {
            fd: own(fd),
            path: path.to_path_buf(),
        })
    }

    fn at(&self, rel: &Path) -> Result<OwnedFd, Errno> {
        let rel: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        openat2(self.fd.as_raw_fd(), rel, how).map(own)
    }

    /// `p` (a path in the container), which must exist.
    pub fn open_in(&self, p: &Path) -> Res<OwnedFd> {
        self.at(&relative(p)).map_err(|e| {
            format!(
                "{} in the container rootfs {}: {e}",
                p.display(),
                self.path.display()
            )
        })
    }

    /// `p` resolved in the root, creating missing directories on the way
    /// and the last component as `last`. Each missing piece is created with
    /// an `*at` call in its resolved parent, then the prefix is resolved
    /// again in the root: nothing is created or returned outside it.
    pub fn ensure(&self, p: &Path, last: Last) -> Res<OwnedFd> {
        let rel = relative(p);
        let err = |e: Errno| {
            format!(
                "{} in the container rootfs {}: {e}",
                p.display(),
                self.path.display()
            )
        };
        match self.at(&rel) {
            Ok(fd) => return Ok(fd),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(err(e)),
        }
        let comps: Vec<&OsStr> = rel.iter().collect();
        let mut parent = self.at(Path::new("")).map_err(err)?;
        let mut prefix = PathBuf::new();
        for (i, c) in comps.iter().enumerate() {
            prefix.push(c);
            match self.at(&prefix) {
                Ok(fd) => {
                    parent = fd;
                    continue;
                }
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(err(e)),
            }
            let is_last = i + 1 == comps.len();
            if is_last && last == Last::File {
                match nix::fcntl::openat(
                    Some(parent.as_raw_fd()),
                    *c,
                    OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_WRONLY
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o644),
                ) {
                    Ok(fd) => drop(own(fd)),
                    Err(Errno::EEXIST) => {}
                    Err(e) => return Err(err(e)),
                }
            } else {
                match nix::sys::stat::mkdirat(
                    Some(parent.as_raw_fd()),
                    *c,
                    Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(err(e)),
                }
            }
            // A dangling symlink there still resolves to nothing: an error,
            // not a creation through it.
            parent = self.at(&prefix).map_err(err)?;
        }
        Ok(parent)
    }
}

/// A bind-mount source, opened once without following any symlink: a
/// source inside a volume the workload writes could otherwise be swapped for
/// a link to `/` between the check and the mount.
pub fn open_source(src: &str) -> Res<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
    openat2(libc::AT_FDCWD, src, how)
        .map(own)
        .map_err(|e| match e {
            Errno::ELOOP => format!(
                "bind mount source {src}: a component is a symlink; kiln mounts only sources \
             reached without symlinks (a workload could swap one in a shared volume): \
             give the resolved path"
            ),
            e => format!("bind mount source {src}: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real(fd: &OwnedFd) -> PathBuf {
        std::fs::read_link(fd_path(fd)).unwrap()
    }

    #[test]
    fn links_and_dot_dot_resolve_inside_the_root_and_creation_stays_there() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("/", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("usr/up")).unwrap();
        let r = Root::open(&root).unwrap();
        let canon = root.canonicalize().unwrap();
        assert_eq!(
            real(&r.open_in(Path::new("/abs/usr/lib")).unwrap()),
            canon.join("usr/lib")
        );
        assert_eq!(
            real(&r.open_in(Path::new("/../../usr")).unwrap()),
            canon.join("usr")
        );
        assert_eq!(real(&r.open_in(Path::new("/usr/up")).unwrap()), canon);
        // Creation through links lands inside the root.
        let d = r.ensure(Path::new("/abs/new/dir"), Last::Dir).unwrap();
        assert_eq!(real(&d), canon.join("new/dir"));
        let f = r
            .ensure(Path::new("/usr/up/etc/hosts"), Last::File)
            .unwrap();
        assert_eq!(real(&f), canon.join("etc/hosts"));
        assert!(canon.join("etc/hosts").is_file());
        assert!(!Path::new("/new/dir").exists());
        // A dangling link is an error, not a creation elsewhere.
        std::os::unix::fs::symlink("/nowhere/x", root.join("dangling")).unwrap();
        assert!(r.ensure(Path::new("/dangling"), Last::Dir).is_err());
        assert!(!canon.join("nowhere").exists());
    }

    #[test]
    fn bind_sources_with_a_symlink_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("vol")).unwrap();
        std::os::unix::fs::symlink("/", tmp.path().join("vol/swapped")).unwrap();
        let src = tmp.path().canonicalize().unwrap();
        assert!(open_source(&src.join("vol").display().to_string()).is_ok());
        let e = open_source(&src.join("vol/swapped").display().to_string()).unwrap_err();
        assert!(e.contains("is a symlink"), "{e}");
    }
}
