//! Stage records ("stamps") and atomic file placement.
//!
//! Invariant: an artifact is only trusted when its stamp names the current
//! input key *and* the artifact's sha256 still matches. Artifacts are written to a
//! temp path and renamed; the stamp is written last. An interrupted stage
//! therefore leaves either nothing or an untrusted leftover, never a half
//! artifact that a later build would use.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::hash::sha256_file;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub key: String,
    /// Output file name (relative to the stamp's directory) → sha256.
    pub outputs: BTreeMap<String, String>,
}

impl Stamp {
    fn path(dir: &Path, stage: &str) -> PathBuf {
        dir.join(format!(".{stage}.stamp"))
    }

    /// Returns the stamp if `key` matches and every output is intact.
    pub fn fresh(dir: &Path, stage: &str, key: &str) -> Option<Stamp> {
        let text = fs::read_to_string(Self::path(dir, stage)).ok()?;
        let stamp: Stamp = serde_json::from_str(&text).ok()?;
        if stamp.key != key {
            return None;
        }
        for (name, sha) in &stamp.outputs {
            match sha256_file(&dir.join(name)) {
                Ok(actual) if &actual == sha => {}
                _ => return None,
            }
        }
        Some(stamp)
    }

    /// Records `outputs` (already in place in `dir`) as built from `key`.
    pub fn record(dir: &Path, stage: &str, key: &str, outputs: &[&str]) -> anyhow::Result<Stamp> {
        let mut map = BTreeMap::new();
        for name in outputs {
            map.insert(name.to_string(), sha256_file(&dir.join(name))?);
        }
        let stamp = Stamp {
            key: key.to_string(),
            outputs: map,
        };
        write_atomic(
            &Self::path(dir, stage),
            serde_json::to_string_pretty(&stamp)?.as_bytes(),
        )?;
        Ok(stamp)
    }

    /// Writes `stamp` for outputs someone else put in place and verified (the
    /// remote cache); written last, like [`Stamp::record`]'s.
    pub fn install(dir: &Path, stage: &str, stamp: &Stamp) -> anyhow::Result<()> {
        write_atomic(
            &Self::path(dir, stage),
            serde_json::to_string_pretty(stamp)?.as_bytes(),
        )
    }

    /// Forgets a stage before rebuilding it, so a crash mid-way cannot leave a
    /// stamp that vouches for replaced outputs.
    pub fn invalidate(dir: &Path, stage: &str) {
        let _ = fs::remove_file(Self::path(dir, stage));
    }
}

/// Writes `bytes` to `dest` through a temp file in the same directory.
/// An exclusive lock on one cache entry, held until dropped. Two kiln
/// processes that need the same entry (two checkouts, CI beside a developer)
/// take turns: one builds, the other then finds the result. Without it two
/// `make`s shared one build directory and broke each other's dependency files.
#[derive(Debug)]
pub struct EntryLock {
    _file: fs::File,
}

/// Locks `path` (a `<entry>.lock` file beside the entry, never inside an
/// output directory); `waiting` runs once if another process holds it.
pub fn lock_entry(path: &Path, waiting: impl FnOnce()) -> anyhow::Result<EntryLock> {
    use std::os::fd::AsRawFd;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening lock {}", path.display()))?;
    let fd = file.as_raw_fd();
    // SAFETY: flock on a descriptor we own; released when the file closes.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        waiting();
        // SAFETY: as above, blocking this time.
        if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
    }
    Ok(EntryLock { _file: file })
}

pub fn write_atomic(dest: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = parent_dir(dest)?;
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(dest)
        .with_context(|| format!("renaming into {}", dest.display()))?;
    Ok(())
}

/// Copies `src` to `dest` through a temp file, keeping the source's permissions.
pub fn copy_atomic(src: &Path, dest: &Path) -> anyhow::Result<()> {
    let dir = parent_dir(dest)?;
    let tmp = tempfile::NamedTempFile::new_in(&dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    fs::copy(src, tmp.path())
        .with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
    tmp.as_file().sync_all()?;
    tmp.persist(dest)
        .with_context(|| format!("renaming into {}", dest.display()))?;
    Ok(())
}

fn parent_dir(dest: &Path) -> anyhow::Result<PathBuf> {
    let dir = dest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_trusts_only_matching_key_and_content() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(&dir.path().join("a.bin"), b"hello").unwrap();
        Stamp::record(dir.path(), "s", "k1", &["a.bin"]).unwrap();
        assert!(Stamp::fresh(dir.path(), "s", "k1").is_some());
        assert!(Stamp::fresh(dir.path(), "s", "k2").is_none(), "other key");
        fs::write(dir.path().join("a.bin"), b"tampered").unwrap();
        assert!(
            Stamp::fresh(dir.path(), "s", "k1").is_none(),
            "changed output"
        );
        fs::remove_file(dir.path().join("a.bin")).unwrap();
        assert!(
            Stamp::fresh(dir.path(), "s", "k1").is_none(),
            "missing output"
        );
    }

    #[test]
    fn invalidated_stamp_is_not_fresh() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(&dir.path().join("a"), b"x").unwrap();
        Stamp::record(dir.path(), "s", "k", &["a"]).unwrap();
        Stamp::invalidate(dir.path(), "s");
        assert!(Stamp::fresh(dir.path(), "s", "k").is_none());
    }

    #[test]
    fn atomic_write_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(&dir.path().join("out"), b"data").unwrap();
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out")]);
    }

    #[test]
    fn entry_lock_makes_a_second_taker_wait() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.lock");
        let first = lock_entry(&p, || panic!("nobody holds it yet")).unwrap();
        let p2 = p.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let mut waited = false;
            let _second = lock_entry(&p2, || waited = true).unwrap();
            tx.send(waited).unwrap();
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(rx.try_recv().is_err(), "the second taker must still wait");
        drop(first);
        assert!(rx.recv().unwrap(), "it was told it had to wait");
        t.join().unwrap();
    }
}
