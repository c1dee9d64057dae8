//! CopyFile: files (in chunks), directories and symlinks from the host into
//! the agent's run directory, and nowhere else.
//!
//! Chunks go to `<path>.kiln-part` at their offset; when the part file
//! reaches `file_size` it gets its owner and mode and is renamed over `path`,
//! so readers never see half a file. Every step goes through directory fds
//! ([`crate::beneath`]): nothing is looked up by path twice.

use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use kiln_protocol::agent::CopyFileRequest;
use nix::errno::Errno;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

use crate::beneath::{set_owner_and_mode, Dir};
use crate::error::{exhausted, invalid, os, AgentError, Result};
use crate::paths::confined;

/// Largest file CopyFile accepts (the run directory is guest RAM).
pub const MAX_FILE_SIZE: i64 = 512 << 20;

pub fn copy_file(run_dir: &Path, req: &CopyFileRequest) -> Result<()> {
    let path = confined("CopyFile path", run_dir, &req.path)?;
    let rel = path.strip_prefix(run_dir).unwrap_or(Path::new(""));
    let (Some(name), Some(parent_rel)) = (rel.file_name(), rel.parent()) else {
        return Err(invalid("CopyFile path is the run directory itself"));
    };
    fs::create_dir_all(run_dir).map_err(|e| os(format!("mkdir {}", run_dir.display()), e))?;
    let base = Dir::open(run_dir).map_err(|e| os(format!("opening {}", run_dir.display()), e))?;
    // Resolved once, through fds: a directory swapped for a symlink after the
    // check above makes this fail instead of writing elsewhere.
    let dir_mode = if req.dir_mode == 0 {
        0o755
    } else {
        req.dir_mode
    };
    let parent = base
        .make_dirs(parent_rel, dir_mode)
        .map_err(|e| refused(&req.path, "creating its directories", e))?;
    let uid = (req.uid >= 0).then(|| Uid::from_raw(req.uid as u32));
    let gid = (req.gid >= 0).then(|| Gid::from_raw(req.gid as u32));
    match req.file_mode & libc::S_IFMT {
        libc::S_IFDIR => {
            match nix::sys::stat::mkdirat(Some(parent.fd()), name, Mode::from_bits_truncate(0o700))
            {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(refused(&req.path, "mkdir", e)),
            }
            let d = parent
                .dir(name)
                .map_err(|e| refused(&req.path, "opening", e))?;
            return set_owner_and_mode(d.fd(), uid, gid, req.file_mode)
                .map_err(|e| refused(&req.path, "setting owner and mode", e));
        }
        libc::S_IFLNK => {
            let target = std::str::from_utf8(&req.data)
                .map_err(|_| invalid("CopyFile symlink target is not UTF-8"))?;
            if target.is_empty() || target.contains('\0') {
                return Err(invalid("CopyFile symlink target is empty or contains NUL"));
            }
            parent
                .remove_file(name)
                .and_then(|()| parent.symlink(OsStr::new(target), name))
                .and_then(|()| parent.chown_entry(name, uid, gid))
                .map_err(|e| refused(&req.path, "making the symlink", e))?;
            return Ok(());
        }
        0 | libc::S_IFREG => {}
        other => {
            return Err(invalid(format!(
                "CopyFile file type {other:o} is not a file, directory or symlink"
            )))
        }
    }
    if req.file_size < 0 || req.file_size > MAX_FILE_SIZE {
        return Err(invalid(format!(
            "CopyFile file_size {} is outside 0..={MAX_FILE_SIZE}",
            req.file_size
        )));
    }
    let end = req.offset.checked_add(req.data.len() as i64);
    if req.offset < 0 || end.is_none_or(|e| e > req.file_size) {
        return Err(invalid(format!(
            "CopyFile chunk at offset {} of {} bytes does not fit in file_size {}",
            req.offset,
            req.data.len(),
            req.file_size
        )));
    }
    let mut part = name.to_os_string();
    part.push(".kiln-part");
    // The first chunk starts a new part file (O_EXCL: a planted file or hard
    // link of that name is removed, never written through); later chunks
    // reopen only a plain, singly linked file.
    let f = if req.offset == 0 {
        parent
            .remove_file(&part)
            .and_then(|()| parent.create_new(&part, 0o600))
    } else {
        parent.open_existing(&part)
    }
    .map_err(|e| refused(&req.path, "opening its part file", e))?;
    if let Err(e) = f.write_all_at(&req.data, req.offset as u64) {
        // A part file that can never complete is not left to fill /run.
        let _ = parent.remove_file(&part);
        let full = matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT));
        return Err(if full {
            exhausted(format!(
                "CopyFile {}: the guest's /run is full ({e}); it is a tmpfs of agent.run_size \
                 (default {} of guest memory): raise it on the kernel command line, or copy less",
                req.path,
                crate::config::RUN_SIZE
            ))
        } else {
            os(format!("writing {}.kiln-part", path.display()), e)
        });
    }
    let size = f
        .metadata()
        .map_err(|e| os(format!("stat {}.kiln-part", path.display()), e))?
        .len();
    if size as i64 != req.file_size {
        return Ok(()); // more chunks to come
    }
    // Owner first: a chown clears the setuid and setgid bits the mode asks for.
    set_owner_and_mode(f.as_raw_fd(), uid, gid, req.file_mode)
        .map_err(|e| refused(&req.path, "setting owner and mode", e))?;
    parent
        .rename(&part, name)
        .map_err(|e| refused(&req.path, "renaming its part file", e))
}

/// An fd-level failure, worded for the caller: a symlink or a non-directory
/// on the way means the tree changed under us or the request points outside.
fn refused(path: &str, step: &str, e: Errno) -> AgentError {
    match e {
        Errno::ELOOP | Errno::ENOTDIR | Errno::EXDEV => invalid(format!(
            "CopyFile {path:?}: {step}: a component is a symlink or not a directory ({e}); \
             CopyFile writes only through real directories under the run directory"
        )),
        _ => os(format!("CopyFile {path:?}: {step}"), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The race of the security review: the workload swaps a directory of
    /// the destination with a symlink out of the tree (RENAME_EXCHANGE in a
    /// loop) while CopyFile writes into it, chmods and renames. No byte, mode
    /// or name may land outside.
    #[test]
    fn a_directory_swapped_for_a_symlink_mid_copy_never_redirects_a_write() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let outside = dir.path().join("outside");
        fs::create_dir_all(run.join("c/etc")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, run.join("c/link")).unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let racer = {
            let (stop, c) = (stop.clone(), run.join("c"));
            std::thread::spawn(move || {
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    nix::fcntl::renameat2(
                        None,
                        &c.join("etc"),
                        None,
                        &c.join("link"),
                        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                    )
                    .unwrap();
                    swaps += 1;
                }
                swaps
            })
        };
        let target = format!("{}/c/etc/hosts", run.display());
        let (mut ok, mut refused) = (0, 0);
        for i in 0..2000 {
            let mut r = req(&target, b"0123456789", 0, 10);
            r.file_mode = libc::S_IFREG | if i % 2 == 0 { 0o644 } else { 0o4755 };
            match copy_file(&run, &r) {
                Ok(()) => ok += 1,
                Err(_) => refused += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = racer.join().unwrap();
        let leaked: Vec<_> = fs::read_dir(&outside)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(leaked.is_empty(), "written outside the tree: {leaked:?}");
        assert!(
            swaps > 100 && ok > 0 && refused > 0,
            "{swaps} swaps, {ok} ok, {refused} refused"
        );
    }

    fn req(path: &str, data: &[u8], offset: i64, size: i64) -> CopyFileRequest {
        let mut r = CopyFileRequest::new();
        r.path = path.into();
        r.data = data.to_vec();
        r.offset = offset;
        r.file_size = size;
        r.file_mode = libc::S_IFREG | 0o640;
        r.dir_mode = 0o750;
        r.uid = -1;
        r.gid = -1;
        r
    }

    #[test]
    fn chunks_land_atomically_inside_the_run_dir() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let target = format!("{}/shared/containers/c1/hosts", run.display());
        copy_file(&run, &req(&target, b"127.0.0.1 ", 0, 19)).unwrap();
        assert!(!Path::new(&target).exists(), "not complete yet");
        copy_file(&run, &req(&target, b"localhost", 10, 19)).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "127.0.0.1 localhost");
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
            0o640
        );
        let parent = Path::new(&target).parent().unwrap();
        assert_eq!(
            fs::metadata(parent).unwrap().permissions().mode() & 0o7777,
            0o750
        );
        // A directory and a symlink.
        let mut d = req(&format!("{}/shared/dir", run.display()), b"", 0, 0);
        d.file_mode = libc::S_IFDIR | 0o700;
        copy_file(&run, &d).unwrap();
        assert!(run.join("shared/dir").is_dir());
        let mut l = req(&format!("{}/shared/link", run.display()), b"/etc", 0, 0);
        l.file_mode = libc::S_IFLNK | 0o777;
        copy_file(&run, &l).unwrap();
        assert_eq!(
            fs::read_link(run.join("shared/link")).unwrap(),
            Path::new("/etc")
        );
    }

    /// `/run` is a sized tmpfs (`agent.run_size`): a CopyFile past it is a
    /// RESOURCE_EXHAUSTED error naming the knob, and leaves no part file.
    #[test]
    fn a_full_run_directory_is_a_clear_error() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("note: skipped, mounting a tmpfs needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=64k"),
        )
        .unwrap();
        let run = dir.path().join("run");
        let target = format!("{}/big", run.display());
        let data = vec![7u8; 256 << 10];
        let e = copy_file(&run, &req(&target, &data, 0, data.len() as i64)).unwrap_err();
        let leftovers: Vec<_> = fs::read_dir(&run)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        nix::mount::umount2(dir.path(), nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert_eq!(e.kind, crate::error::ErrorKind::ResourceExhausted, "{e}");
        assert!(e.message.contains("agent.run_size"), "{e}");
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn escapes_and_bad_sizes_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        fs::create_dir_all(run.join("shared")).unwrap();
        std::os::unix::fs::symlink(dir.path(), run.join("shared/out")).unwrap();
        let r = run.display();
        for bad in [
            format!("{r}/../escape"),
            format!("{r}/shared/out/escape"),
            "/etc/passwd".to_string(),
            "relative".to_string(),
            r.to_string(),
        ] {
            let e = copy_file(&run, &req(&bad, b"x", 0, 1)).unwrap_err();
            assert_eq!(
                e.kind,
                crate::error::ErrorKind::InvalidArgument,
                "{bad}: {}",
                e.message
            );
        }
        assert!(!dir.path().join("escape").exists());
        let ok = format!("{r}/f");
        for (off, size) in [
            (-1, 1),
            (0, -1),
            (1, 1),
            (0, MAX_FILE_SIZE + 1),
            (i64::MAX, i64::MAX),
        ] {
            assert!(
                copy_file(&run, &req(&ok, b"x", off, size)).is_err(),
                "{off} {size}"
            );
        }
        let mut odd = req(&ok, b"", 0, 0);
        odd.file_mode = libc::S_IFCHR | 0o600;
        assert!(copy_file(&run, &odd).is_err());
    }
}
