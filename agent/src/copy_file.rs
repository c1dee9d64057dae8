//! CopyFile: files (in chunks), directories and symlinks from the host into
//! the agent's run directory, and nowhere else.
//!
//! Chunks go to `<path>.kiln-part` (opened without following symlinks) at
//! their offset; when the part file reaches `file_size` it gets its mode and
//! owner and is renamed over `path`, so readers never see half a file.

use std::fs;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use kiln_protocol::agent::CopyFileRequest;

use crate::error::{invalid, os, Result};
use crate::paths::confined;

/// Largest file CopyFile accepts (the run directory is guest RAM).
pub const MAX_FILE_SIZE: i64 = 512 << 20;

pub fn copy_file(run_dir: &Path, req: &CopyFileRequest) -> Result<()> {
    let path = confined("CopyFile path", run_dir, &req.path)?;
    if path == run_dir {
        return Err(invalid("CopyFile path is the run directory itself"));
    }
    let parent = path
        .parent()
        .ok_or_else(|| invalid("CopyFile path has no parent"))?;
    create_dirs(run_dir, parent, req.dir_mode)?;
    let owner = |p: &Path| -> Result<()> {
        let uid = (req.uid >= 0).then(|| nix::unistd::Uid::from_raw(req.uid as u32));
        let gid = (req.gid >= 0).then(|| nix::unistd::Gid::from_raw(req.gid as u32));
        nix::unistd::fchownat(None, p, uid, gid, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| os(format!("chown {}", p.display()), e))
    };
    match req.file_mode & libc::S_IFMT {
        libc::S_IFDIR => {
            if !path.is_dir() {
                fs::create_dir(&path).map_err(|e| os(format!("mkdir {}", path.display()), e))?;
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(req.file_mode & 0o7777))
                .map_err(|e| os(format!("chmod {}", path.display()), e))?;
            return owner(&path);
        }
        libc::S_IFLNK => {
            let target = std::str::from_utf8(&req.data)
                .map_err(|_| invalid("CopyFile symlink target is not UTF-8"))?;
            if target.is_empty() || target.contains('\0') {
                return Err(invalid("CopyFile symlink target is empty or contains NUL"));
            }
            let _ = fs::remove_file(&path);
            std::os::unix::fs::symlink(target, &path)
                .map_err(|e| os(format!("symlink {}", path.display()), e))?;
            return owner(&path);
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
    let mut part = path.clone().into_os_string();
    part.push(".kiln-part");
    let part = std::path::PathBuf::from(part);
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(req.offset == 0)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&part)
        .map_err(|e| os(format!("opening {}", part.display()), e))?;
    f.write_all_at(&req.data, req.offset as u64)
        .map_err(|e| os(format!("writing {}", part.display()), e))?;
    let size = f
        .metadata()
        .map_err(|e| os(format!("stat {}", part.display()), e))?
        .len();
    if size as i64 != req.file_size {
        return Ok(()); // more chunks to come
    }
    f.set_permissions(fs::Permissions::from_mode(req.file_mode & 0o7777))
        .map_err(|e| os(format!("chmod {}", part.display()), e))?;
    owner(&part)?;
    fs::rename(&part, &path).map_err(|e| {
        os(
            format!("renaming {} to {}", part.display(), path.display()),
            e,
        )
    })
}

/// Creates missing directories between `base` and `dir` with `mode`.
fn create_dirs(base: &Path, dir: &Path, mode: u32) -> Result<()> {
    let rel = dir
        .strip_prefix(base)
        .map_err(|_| invalid(format!("{} is outside {}", dir.display(), base.display())))?;
    let mut cur = base.to_path_buf();
    fs::create_dir_all(&cur).map_err(|e| os(format!("mkdir {}", cur.display()), e))?;
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(invalid(format!(
                    "{} exists and is not a directory",
                    cur.display()
                )))
            }
            Err(_) => {
                fs::create_dir(&cur).map_err(|e| os(format!("mkdir {}", cur.display()), e))?;
                let m = if mode == 0 { 0o755 } else { mode & 0o7777 };
                fs::set_permissions(&cur, fs::Permissions::from_mode(m))
                    .map_err(|e| os(format!("chmod {}", cur.display()), e))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
