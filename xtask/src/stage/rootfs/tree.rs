//! A root filesystem tree under construction: the files on disk plus an index
//! of what each path must be in the image (type, permissions, owner, device
//! numbers). The index is the truth; the disk copy carries the file contents.
//!
//! Why both: ownership, device nodes and timestamps cannot be made right on
//! disk without root (and ctime never can), so filesystem writers take the
//! contents from the disk copy and the metadata from the index.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// What a path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink(String),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

impl Kind {
    /// The `S_IFMT` bits of this kind.
    pub fn type_bits(&self) -> u32 {
        match self {
            Kind::Dir => 0o040000,
            Kind::File => 0o100000,
            Kind::Symlink(_) => 0o120000,
            Kind::Char(..) => 0o020000,
            Kind::Block(..) => 0o060000,
            Kind::Fifo => 0o010000,
        }
    }

    /// Nodes exist only in the index: creating them on disk needs root.
    pub fn is_node(&self) -> bool {
        matches!(self, Kind::Char(..) | Kind::Block(..) | Kind::Fifo)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits (0o7777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Entry {
    fn root_owned(kind: Kind, mode: u32) -> Entry {
        Entry {
            kind,
            mode,
            uid: 0,
            gid: 0,
        }
    }
}

pub struct Tree {
    dir: PathBuf,
    /// Relative path ("" is the root) → entry; sorted, parents before children.
    entries: BTreeMap<String, Entry>,
    /// Running as root: the disk copy gets real owners and modes (mkfs.erofs
    /// reads them from there).
    as_root: bool,
}

impl Tree {
    /// An empty tree (just the root directory) at `dir`, which must not exist yet.
    pub fn empty(dir: &Path) -> anyhow::Result<Tree> {
        fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut entries = BTreeMap::new();
        entries.insert(String::new(), Entry::root_owned(Kind::Dir, 0o755));
        Ok(Tree {
            dir: dir.to_path_buf(),
            entries,
            as_root: is_root(),
        })
    }

    /// A tree unpacked from a tar archive (mmdebstrap's output). Paths are
    /// checked: absolute paths and `..` are refused, links may not be followed
    /// out of the tree.
    pub fn from_tar(dir: &Path, tar_path: &Path) -> anyhow::Result<Tree> {
        let mut tree = Tree::empty(dir)?;
        let file =
            fs::File::open(tar_path).with_context(|| format!("opening {}", tar_path.display()))?;
        let mut archive = tar::Archive::new(std::io::BufReader::new(file));
        for entry in archive
            .entries()
            .with_context(|| format!("reading {}", tar_path.display()))?
        {
            let mut entry = entry.with_context(|| format!("reading {}", tar_path.display()))?;
            let raw = entry.path()?.to_string_lossy().into_owned();
            let path = tar_path_to_rel(&raw)
                .with_context(|| format!("{}: entry `{raw}`", tar_path.display()))?;
            let h = entry.header();
            let mode = h.mode()? & 0o7777;
            let uid = u32::try_from(h.uid()?).context("uid beyond 32 bits")?;
            let gid = u32::try_from(h.gid()?).context("gid beyond 32 bits")?;
            let dev = |v: Option<u32>| v.unwrap_or(0);
            let kind = match h.entry_type() {
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
                tar::EntryType::Symlink => Kind::Symlink(
                    entry
                        .link_name()?
                        .context("symlink without a target")?
                        .to_string_lossy()
                        .into_owned(),
                ),
                tar::EntryType::Link => {
                    let target = entry
                        .link_name()?
                        .context("hard link without a target")?
                        .to_string_lossy()
                        .into_owned();
                    let target = tar_path_to_rel(&target)?;
                    tree.add_hard_link(&path, &target, mode, uid, gid)?;
                    continue;
                }
                tar::EntryType::Char => Kind::Char(dev(h.device_major()?), dev(h.device_minor()?)),
                tar::EntryType::Block => {
                    Kind::Block(dev(h.device_major()?), dev(h.device_minor()?))
                }
                tar::EntryType::Fifo => Kind::Fifo,
                other => anyhow::bail!(
                    "{}: entry `{raw}` has tar type {other:?}, which kiln does not unpack",
                    tar_path.display()
                ),
            };
            let meta = Entry {
                kind: kind.clone(),
                mode,
                uid,
                gid,
            };
            if path.is_empty() {
                if kind != Kind::Dir {
                    anyhow::bail!("{}: the root entry is not a directory", tar_path.display());
                }
                tree.entries.insert(path, meta);
                continue;
            }
            match kind {
                Kind::File => {
                    let mut data = Vec::with_capacity(entry.size() as usize);
                    entry.read_to_end(&mut data)?;
                    tree.put(&path, meta, Some(&data))?;
                }
                _ => tree.put(&path, meta, None)?,
            }
        }
        tree.finish_modes()?;
        Ok(tree)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(p, e)| (p.as_str(), e))
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Host path of a relative path.
    pub fn host(&self, path: &str) -> PathBuf {
        if path.is_empty() {
            self.dir.clone()
        } else {
            self.dir.join(path)
        }
    }

    /// Adds a directory (and missing parents, 0755 root). An existing
    /// directory keeps its entry.
    pub fn add_dir(&mut self, path: &str, mode: u32) -> anyhow::Result<()> {
        if matches!(self.entries.get(path), Some(e) if e.kind == Kind::Dir) {
            return Ok(());
        }
        self.put(path, Entry::root_owned(Kind::Dir, mode), None)
    }

    /// Adds or replaces a regular file owned by root.
    pub fn add_file(&mut self, path: &str, mode: u32, data: &[u8]) -> anyhow::Result<()> {
        self.put(path, Entry::root_owned(Kind::File, mode), Some(data))
    }

    /// Adds or replaces a regular file with the given owner.
    pub fn add_file_owned(
        &mut self,
        path: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        data: &[u8],
    ) -> anyhow::Result<()> {
        self.put(
            path,
            Entry {
                kind: Kind::File,
                mode,
                uid,
                gid,
            },
            Some(data),
        )
    }

    /// Adds or replaces a symlink owned by root.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> anyhow::Result<()> {
        self.put(
            path,
            Entry::root_owned(Kind::Symlink(target.to_string()), 0o777),
            None,
        )
    }

    /// Adds or replaces a device node or fifo (index only).
    pub fn add_node(&mut self, path: &str, kind: Kind, mode: u32) -> anyhow::Result<()> {
        self.put(path, Entry::root_owned(kind, mode), None)
    }

    /// Deletes `path` and everything below it; a missing path is fine.
    pub fn remove(&mut self, path: &str) -> anyhow::Result<()> {
        if path.is_empty() {
            anyhow::bail!("refusing to remove the root of the tree");
        }
        // Only what the index knows is touched: its parents are real
        // directories, so the host path cannot lead through a symlink (an
        // absolute one would point outside the tree).
        if !self.entries.contains_key(path) {
            return Ok(());
        }
        let host = self.host(path);
        match fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&host),
            Ok(_) => fs::remove_file(&host),
            Err(_) => Ok(()),
        }
        .with_context(|| format!("removing {}", host.display()))?;
        let prefix = format!("{path}/");
        self.entries
            .retain(|p, _| p != path && !p.starts_with(&prefix));
        Ok(())
    }

    /// Deletes what is inside directory `path`; the directory stays. A missing
    /// path is fine; a non-directory is an error.
    pub fn empty_dir(&mut self, path: &str) -> anyhow::Result<()> {
        match self.entries.get(path) {
            None => return Ok(()),
            Some(e) if e.kind != Kind::Dir => {
                anyhow::bail!("`{path}` is not a directory, so it cannot be emptied")
            }
            Some(_) => {}
        }
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        let children: Vec<String> = self
            .entries
            .keys()
            .filter(|p| p.starts_with(&prefix) && !p.is_empty() && !p[prefix.len()..].contains('/'))
            .cloned()
            .collect();
        for c in children {
            self.remove(&c)?;
        }
        Ok(())
    }

    /// Bytes the contents need in a filesystem with `block`-byte blocks:
    /// regular files (hard links once), directories, long symlinks, rounded up
    /// to whole blocks. Metadata (inodes, bitmaps, journal) is not included.
    pub fn data_bytes(&self, block: u64) -> anyhow::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let mut seen = std::collections::HashSet::new();
        let mut blocks = 0u64;
        let mut dir_bytes: BTreeMap<&str, u64> = BTreeMap::new();
        for (path, e) in &self.entries {
            if !path.is_empty() {
                let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
                let name = path.rsplit_once('/').map_or(path.as_str(), |(_, n)| n);
                // ext4 dirent: 8 bytes + name, 4-byte aligned.
                *dir_bytes.entry(parent).or_insert(24) +=
                    8 + (name.len() as u64).next_multiple_of(4);
            }
            match &e.kind {
                Kind::File => {
                    let m = fs::symlink_metadata(self.host(path))?;
                    if seen.insert((m.dev(), m.ino())) {
                        blocks += m.len().div_ceil(block);
                    }
                }
                Kind::Symlink(t) if t.len() >= 60 => blocks += 1,
                _ => {}
            }
        }
        for bytes in dir_bytes.values() {
            blocks += bytes.div_ceil(block);
        }
        let dirs = self
            .entries
            .values()
            .filter(|e| e.kind == Kind::Dir)
            .count() as u64;
        blocks += dirs.saturating_sub(dir_bytes.len() as u64); // empty directories
        Ok(blocks * block)
    }

    /// Puts `meta` at `path` on disk and in the index, replacing what was there.
    fn put(&mut self, path: &str, meta: Entry, data: Option<&[u8]>) -> anyhow::Result<()> {
        check_rel(path)?;
        self.ensure_parents(path)?;
        let host = self.host(path);
        if let Some(old) = self.entries.get(path) {
            let both_dirs = old.kind == Kind::Dir && meta.kind == Kind::Dir;
            if !both_dirs {
                if old.kind == Kind::Dir {
                    self.remove(path)?;
                } else if !old.kind.is_node() {
                    fs::remove_file(&host)
                        .with_context(|| format!("replacing {}", host.display()))?;
                }
            }
        }
        match &meta.kind {
            Kind::Dir => {
                if !host.is_dir() {
                    fs::create_dir(&host)
                        .with_context(|| format!("creating {}", host.display()))?;
                }
            }
            Kind::File => {
                fs::write(&host, data.unwrap_or_default())
                    .with_context(|| format!("writing {}", host.display()))?;
                self.apply_disk_meta(&host, &meta)?;
            }
            Kind::Symlink(target) => {
                std::os::unix::fs::symlink(target, &host)
                    .with_context(|| format!("creating symlink {}", host.display()))?;
                if self.as_root {
                    std::os::unix::fs::lchown(&host, Some(meta.uid), Some(meta.gid))?;
                }
            }
            Kind::Char(..) | Kind::Block(..) | Kind::Fifo => {}
        }
        self.entries.insert(path.to_string(), meta);
        Ok(())
    }

    fn add_hard_link(
        &mut self,
        path: &str,
        target: &str,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> anyhow::Result<()> {
        check_rel(path)?;
        let Some(t) = self.entries.get(target) else {
            anyhow::bail!(
                "hard link `{path}` points at `{target}`, which is not in the tree (yet)"
            );
        };
        if t.kind != Kind::File {
            anyhow::bail!("hard link `{path}` points at `{target}`, which is not a regular file");
        }
        self.ensure_parents(path)?;
        let host = self.host(path);
        if self.entries.contains_key(path) {
            self.remove(path)?;
        }
        fs::hard_link(self.host(target), &host)
            .with_context(|| format!("linking {}", host.display()))?;
        self.entries.insert(
            path.to_string(),
            Entry {
                kind: Kind::File,
                mode,
                uid,
                gid,
            },
        );
        Ok(())
    }

    fn ensure_parents(&mut self, path: &str) -> anyhow::Result<()> {
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            let parent = &path[..at + i];
            match self.entries.get(parent) {
                Some(e) if e.kind == Kind::Dir => {}
                Some(_) => anyhow::bail!("cannot add `{path}`: `{parent}` is not a directory"),
                None => {
                    let host = self.host(parent);
                    fs::create_dir(&host)
                        .with_context(|| format!("creating {}", host.display()))?;
                    self.entries
                        .insert(parent.to_string(), Entry::root_owned(Kind::Dir, 0o755));
                }
            }
            at += i + 1;
        }
        Ok(())
    }

    /// Owner and mode on disk: real ones as root, else the mode with owner
    /// read/write so later steps can still read everything.
    fn apply_disk_meta(&self, host: &Path, meta: &Entry) -> anyhow::Result<()> {
        let mode = if self.as_root {
            std::os::unix::fs::lchown(host, Some(meta.uid), Some(meta.gid))
                .with_context(|| format!("chown {}", host.display()))?;
            meta.mode
        } else {
            meta.mode | if meta.kind == Kind::Dir { 0o700 } else { 0o600 }
        };
        fs::set_permissions(host, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", host.display()))
    }

    /// Directory modes are set last (children were written into them first).
    pub fn finish_modes(&self) -> anyhow::Result<()> {
        for (path, e) in self.entries.iter().rev() {
            if e.kind == Kind::Dir {
                self.apply_disk_meta(&self.host(path), e)?;
            }
        }
        Ok(())
    }
}

/// `./usr/bin/x` → `usr/bin/x`; `./` → ``; refuses absolute paths and `..`.
fn tar_path_to_rel(raw: &str) -> anyhow::Result<String> {
    let trimmed = raw.trim_start_matches("./").trim_end_matches('/');
    let p = if trimmed == "." { "" } else { trimmed };
    if p.is_empty() {
        return Ok(String::new());
    }
    check_rel(p)?;
    Ok(p.to_string())
}

fn check_rel(p: &str) -> anyhow::Result<()> {
    if p.starts_with('/')
        || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        || p.contains('\0')
    {
        anyhow::bail!("`{p}` is not a plain relative path inside the tree");
    }
    Ok(())
}

/// Whether this process runs as root (/proc/self belongs to the effective uid).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_tar(dir: &Path) -> PathBuf {
        let path = dir.join("t.tar");
        let mut b = tar::Builder::new(fs::File::create(&path).unwrap());
        let mut add =
            |name: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>| {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(kind);
                h.set_mode(mode);
                h.set_uid(0);
                h.set_gid(if name.contains("shadow") { 42 } else { 0 });
                h.set_size(data.len() as u64);
                if let Some(l) = link {
                    h.set_link_name(l).unwrap();
                }
                if kind == tar::EntryType::Char {
                    h.set_device_major(1).unwrap();
                    h.set_device_minor(3).unwrap();
                }
                b.append_data(&mut h, name, data).unwrap();
            };
        add("./", tar::EntryType::Directory, 0o755, b"", None);
        add("./etc/", tar::EntryType::Directory, 0o755, b"", None);
        add(
            "./etc/shadow",
            tar::EntryType::Regular,
            0o640,
            b"root:*:",
            None,
        );
        add(
            "./usr/bin/passwd",
            tar::EntryType::Regular,
            0o4755,
            b"ELF",
            None,
        );
        add(
            "./usr/bin/chsh",
            tar::EntryType::Link,
            0o4755,
            b"",
            Some("./usr/bin/passwd"),
        );
        add(
            "./bin",
            tar::EntryType::Symlink,
            0o777,
            b"",
            Some("usr/bin"),
        );
        add("./dev/null", tar::EntryType::Char, 0o666, b"", None);
        add(
            "./var/log/apt/history.log",
            tar::EntryType::Regular,
            0o644,
            b"junk",
            None,
        );
        b.finish().unwrap();
        path
    }

    #[test]
    fn unpacks_tar_with_metadata_in_the_index() {
        let d = tempfile::tempdir().unwrap();
        let tree = Tree::from_tar(&d.path().join("root"), &sample_tar(d.path())).unwrap();
        let shadow = tree.get("etc/shadow").unwrap();
        assert_eq!((shadow.mode, shadow.gid), (0o640, 42));
        assert_eq!(tree.get("usr/bin/passwd").unwrap().mode, 0o4755);
        assert_eq!(tree.get("usr").unwrap().kind, Kind::Dir, "implied parent");
        assert_eq!(tree.get("dev/null").unwrap().kind, Kind::Char(1, 3));
        assert!(
            !tree.host("dev/null").exists(),
            "nodes live in the index only"
        );
        assert_eq!(
            tree.get("bin").unwrap().kind,
            Kind::Symlink("usr/bin".into())
        );
        assert_eq!(fs::read(tree.host("usr/bin/chsh")).unwrap(), b"ELF");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(tree.host("usr/bin/chsh")).unwrap().ino(),
            fs::metadata(tree.host("usr/bin/passwd")).unwrap().ino(),
            "hard links stay links"
        );
    }

    #[test]
    fn edits_keep_disk_and_index_in_step() {
        let d = tempfile::tempdir().unwrap();
        let mut tree = Tree::from_tar(&d.path().join("root"), &sample_tar(d.path())).unwrap();
        tree.empty_dir("var/log").unwrap();
        assert!(tree.get("var/log").is_some() && tree.get("var/log/apt").is_none());
        assert!(tree.host("var/log").is_dir() && !tree.host("var/log/apt").exists());
        tree.remove("etc/shadow").unwrap();
        tree.remove("no/such/path").unwrap();
        // Through a symlink: not in the index, so nothing on the host is touched.
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), b"host file").unwrap();
        tree.add_symlink("escape", outside.to_str().unwrap())
            .unwrap();
        tree.remove("escape/keep").unwrap();
        tree.empty_dir("escape").unwrap_err();
        assert!(
            outside.join("keep").exists(),
            "a host file was removed through a symlink"
        );
        assert!(tree.get("etc/shadow").is_none() && !tree.host("etc/shadow").exists());
        tree.add_file("etc/hostname", 0o644, b"kiln\n").unwrap();
        tree.add_file("etc/hostname", 0o600, b"again\n").unwrap();
        assert_eq!(fs::read(tree.host("etc/hostname")).unwrap(), b"again\n");
        assert_eq!(tree.get("etc/hostname").unwrap().mode, 0o600);
        tree.add_symlink("bin", "usr/sbin").unwrap();
        assert_eq!(
            fs::read_link(tree.host("bin")).unwrap(),
            Path::new("usr/sbin")
        );
        tree.add_file("a/b/c", 0o755, b"x").unwrap();
        assert_eq!(tree.get("a/b").unwrap().kind, Kind::Dir);
        assert!(tree.add_file("etc/hostname/x", 0o644, b"").is_err());
        assert!(tree.empty_dir("etc/hostname").is_err());
        assert!(tree.remove("").is_err());
        let bytes = tree.data_bytes(4096).unwrap();
        assert!(bytes >= 4 * 4096 && bytes.is_multiple_of(4096), "{bytes}");
    }

    #[test]
    fn hostile_tar_paths_are_refused() {
        for bad in ["../etc/passwd", "/etc/passwd", "a/../../b", "a//b"] {
            assert!(tar_path_to_rel(bad).is_err(), "{bad}");
        }
        assert_eq!(tar_path_to_rel("./").unwrap(), "");
        assert_eq!(tar_path_to_rel("./usr/").unwrap(), "usr");
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("evil.tar");
        {
            let mut b = tar::Builder::new(fs::File::create(&path).unwrap());
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(1);
            h.set_mode(0o644);
            // set_path refuses `..`; write the name bytes directly.
            let name = b"../escape";
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
            b.finish().unwrap();
        }
        let err = format!(
            "{:#}",
            Tree::from_tar(&d.path().join("root"), &path).err().unwrap()
        );
        assert!(err.contains("escape"), "{err}");
        assert!(!d.path().join("escape").exists());
    }
}
