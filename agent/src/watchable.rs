//! `watchable-bind` storages: configMap and secret volumes with few files.
//!
//! Kata's runtime shares them over virtio-fs and asks the agent to present
//! them at a mount point under `shared/containers/watchable/` (a tmpfs the
//! agent mounts). inotify does not see host-side changes through virtio-fs,
//! so, as Kata's agent does, small sources (at most 16 entries and 1 MiB)
//! are *copied* there and polled every 2 s: an update on the host becomes an
//! ordinary write in the guest, which a workload watching with inotify sees.
//! Larger sources are bind-mounted instead (updates still visible, without
//! inotify events).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{os, Result};

pub const MAX_ENTRIES: usize = 16;
pub const MAX_BYTES: u64 = 1024 * 1024;
pub const POLL: Duration = Duration::from_secs(2);

/// What a source entry is, as far as copying goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File { size: u64, mtime: SystemTime },
    Link(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// The source tree, by path relative to its root; `None` when it is too
/// large to copy.
type Snapshot = BTreeMap<PathBuf, Entry>;

fn scan(root: &Path) -> Result<Option<Snapshot>> {
    let mut snap = Snapshot::new();
    let mut bytes = 0u64;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = fs::read_dir(&dir).map_err(|e| os(format!("reading {}", dir.display()), e))?;
        for de in rd.flatten() {
            let r = rel.join(de.file_name());
            let p = root.join(&r);
            let md =
                fs::symlink_metadata(&p).map_err(|e| os(format!("stat {}", p.display()), e))?;
            let kind = if md.file_type().is_symlink() {
                Kind::Link(
                    fs::read_link(&p).map_err(|e| os(format!("readlink {}", p.display()), e))?,
                )
            } else if md.is_dir() {
                stack.push(r.clone());
                Kind::Dir
            } else if md.is_file() {
                bytes += md.len();
                Kind::File {
                    size: md.len(),
                    mtime: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                }
            } else {
                // Devices, fifos, sockets have no business in a configMap.
                continue;
            };
            snap.insert(
                r,
                Entry {
                    kind,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                },
            );
            if snap.len() > MAX_ENTRIES || bytes > MAX_BYTES {
                return Ok(None);
            }
        }
    }
    Ok(Some(snap))
}

/// Brings `target` in line with `now`, given what it held (`before`).
fn sync(source: &Path, target: &Path, before: &Snapshot, now: &Snapshot) -> Result<usize> {
    let mut changed = 0;
    // Removed entries first, deepest first (BTreeMap order reversed).
    for (rel, _) in before.iter().rev().filter(|(r, _)| !now.contains_key(*r)) {
        let p = target.join(rel);
        let _ = fs::remove_file(&p).or_else(|_| fs::remove_dir_all(&p));
        changed += 1;
    }
    // New and changed entries, parents first.
    for (rel, e) in now {
        if before.get(rel) == Some(e) {
            continue;
        }
        let dst = target.join(rel);
        let err = |what: &str, e: std::io::Error| os(format!("{what} {}", dst.display()), e);
        if let Ok(md) = fs::symlink_metadata(&dst) {
            let same_dir = md.is_dir() && e.kind == Kind::Dir;
            if !same_dir {
                let _ = fs::remove_file(&dst).or_else(|_| fs::remove_dir_all(&dst));
            }
        }
        match &e.kind {
            Kind::Dir => fs::create_dir_all(&dst).map_err(|x| err("creating", x))?,
            Kind::Link(to) => {
                std::os::unix::fs::symlink(to, &dst).map_err(|x| err("linking", x))?
            }
            Kind::File { .. } => {
                // Written beside, then renamed: a reader never sees half a file.
                let tmp = dst.with_file_name(format!(
                    ".{}.kiln-tmp",
                    dst.file_name().unwrap_or_default().to_string_lossy()
                ));
                fs::copy(source.join(rel), &tmp).map_err(|x| err("copying to", x))?;
                fs::rename(&tmp, &dst).map_err(|x| err("renaming onto", x))?;
            }
        }
        if !matches!(e.kind, Kind::Link(_)) {
            fs::set_permissions(&dst, fs::Permissions::from_mode(e.mode))
                .map_err(|x| err("chmod", x))?;
        }
        let _ = nix::unistd::fchownat(
            None,
            &dst,
            Some(e.uid.into()),
            Some(e.gid.into()),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        );
        changed += 1;
    }
    Ok(changed)
}

/// How a watchable storage is presented.
pub enum Watch {
    /// Copied and kept in step by a polling task.
    Copied(tokio::task::JoinHandle<()>),
    /// Too large to copy: bind-mounted.
    Bound,
}

/// Presents `source` at `target` (created here) and keeps it current.
pub async fn start(source: PathBuf, target: PathBuf) -> Result<Watch> {
    let (s, t) = (source.clone(), target.clone());
    let first = tokio::task::spawn_blocking(move || -> Result<Option<Snapshot>> {
        let snap = if s.is_dir() {
            scan(&s)?
        } else {
            // A single file (one key mounted with subPath): copied as is.
            let md = fs::metadata(&s).map_err(|e| os(format!("stat {}", s.display()), e))?;
            if md.len() > MAX_BYTES {
                None
            } else {
                fs::copy(&s, &t).map_err(|e| os(format!("copying {}", s.display()), e))?;
                return Ok(Some(Snapshot::new()));
            }
        };
        if let Some(snap) = &snap {
            fs::create_dir_all(&t).map_err(|e| os(format!("creating {}", t.display()), e))?;
            sync(&s, &t, &Snapshot::new(), snap)?;
        }
        Ok(snap)
    })
    .await
    .map_err(|e| crate::error::internal(format!("watchable copy task: {e}")))??;
    let Some(mut known) = first else {
        bind(&source, &target)?;
        return Ok(Watch::Bound);
    };
    if !source.is_dir() {
        // Single files are re-copied when they change, like directories.
        known = Snapshot::new();
    }
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(POLL).await;
            let (s, t, before) = (source.clone(), target.clone(), known.clone());
            let r = tokio::task::spawn_blocking(move || -> Result<Option<Snapshot>> {
                if !s.is_dir() {
                    let same = fs::read(&s).ok() == fs::read(&t).ok();
                    if !same {
                        fs::copy(&s, &t).map_err(|e| os(format!("copying {}", s.display()), e))?;
                    }
                    return Ok(Some(before));
                }
                let Some(now) = scan(&s)? else {
                    return Ok(None);
                };
                let n = sync(&s, &t, &before, &now)?;
                if n > 0 {
                    tracing::info!(source = %s.display(), changed = n, "watchable storage updated");
                }
                Ok(Some(now))
            })
            .await;
            match r {
                Ok(Ok(Some(now))) => known = now,
                Ok(Ok(None)) => {
                    tracing::warn!(source = %source.display(), "watchable storage grew past {MAX_ENTRIES} entries or {MAX_BYTES} bytes: no longer updated");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(source = %source.display(), "watchable storage: {}", e.message)
                }
                Err(_) => return,
            }
        }
    });
    Ok(Watch::Copied(task))
}

fn bind(source: &Path, target: &Path) -> Result<()> {
    if source.is_dir() {
        fs::create_dir_all(target)
    } else {
        fs::File::create(target).map(drop)
    }
    .map_err(|e| os(format!("creating {}", target.display()), e))?;
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| {
        os(
            format!("bind-mounting {} on {}", source.display(), target.display()),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A configMap as kubelet lays it out: a timestamped dir, `..data`
    /// pointing at it, and one symlink per key.
    fn config_map(dir: &Path, value: &str) {
        let ts = dir.join("..2026_01_01");
        fs::create_dir_all(&ts).unwrap();
        fs::write(ts.join("app.conf"), value).unwrap();
        let _ = fs::remove_file(dir.join("..data"));
        std::os::unix::fs::symlink("..2026_01_01", dir.join("..data")).unwrap();
        let _ = std::os::unix::fs::symlink("..data/app.conf", dir.join("app.conf"));
    }

    #[test]
    fn copies_and_follows_updates_and_removals() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        fs::create_dir_all(&src).unwrap();
        config_map(&src, "v1");
        let s1 = scan(&src).unwrap().unwrap();
        fs::create_dir_all(&dst).unwrap();
        sync(&src, &dst, &Snapshot::new(), &s1).unwrap();
        assert_eq!(fs::read_to_string(dst.join("app.conf")).unwrap(), "v1");
        assert!(fs::symlink_metadata(dst.join("app.conf"))
            .unwrap()
            .file_type()
            .is_symlink());
        // An update with a new size is seen and copied.
        fs::write(src.join("..2026_01_01/app.conf"), "version 2").unwrap();
        fs::write(src.join("extra"), "x").unwrap();
        let s2 = scan(&src).unwrap().unwrap();
        assert!(sync(&src, &dst, &s1, &s2).unwrap() >= 2);
        assert_eq!(
            fs::read_to_string(dst.join("app.conf")).unwrap(),
            "version 2"
        );
        fs::remove_file(src.join("extra")).unwrap();
        let s3 = scan(&src).unwrap().unwrap();
        sync(&src, &dst, &s2, &s3).unwrap();
        assert!(!dst.join("extra").exists());
        assert_eq!(sync(&src, &dst, &s3, &s3).unwrap(), 0, "nothing changed");
    }

    #[test]
    fn too_many_or_too_large_is_not_copied() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..=MAX_ENTRIES {
            fs::write(d.path().join(format!("k{i}")), "v").unwrap();
        }
        assert!(scan(d.path()).unwrap().is_none());
        let big = tempfile::tempdir().unwrap();
        fs::write(big.path().join("blob"), vec![0u8; MAX_BYTES as usize + 1]).unwrap();
        assert!(scan(big.path()).unwrap().is_none());
    }

    #[tokio::test]
    async fn started_watch_picks_up_a_host_side_change() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        fs::create_dir_all(&src).unwrap();
        config_map(&src, "one");
        let w = start(src.clone(), dst.clone()).await.unwrap();
        assert_eq!(fs::read_to_string(dst.join("app.conf")).unwrap(), "one");
        fs::write(src.join("..2026_01_01/app.conf"), "two!").unwrap();
        let mut seen = String::new();
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            seen = fs::read_to_string(dst.join("app.conf")).unwrap();
            if seen == "two!" {
                break;
            }
        }
        assert_eq!(seen, "two!");
        match w {
            Watch::Copied(t) => t.abort(),
            Watch::Bound => panic!("small source must be copied"),
        }
    }
}
