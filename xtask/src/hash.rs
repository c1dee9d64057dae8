//! Content hashing for stage keys and artifact records.
//!
//! A stage key is the sha256 of a labelled list of its inputs. Labels keep two
//! different inputs with the same bytes from colliding, and the walk order is
//! sorted so the key never depends on directory order or on where the checkout lives.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use anyhow::Context;
use sha2::{Digest, Sha256};

/// Builder for a stage's input key.
#[derive(Default)]
pub struct KeyHasher {
    inner: Sha256,
}

impl KeyHasher {
    pub fn new(stage: &str) -> Self {
        let mut h = KeyHasher::default();
        h.str("stage", stage);
        h
    }

    pub fn str(&mut self, label: &str, value: &str) -> &mut Self {
        self.bytes(label, value.as_bytes())
    }

    pub fn bytes(&mut self, label: &str, value: &[u8]) -> &mut Self {
        self.inner.update((label.len() as u64).to_le_bytes());
        self.inner.update(label.as_bytes());
        self.inner.update((value.len() as u64).to_le_bytes());
        self.inner.update(value);
        self
    }

    /// Adds a file's content under `label`.
    pub fn file(&mut self, label: &str, path: &Path) -> anyhow::Result<&mut Self> {
        let digest = sha256_file(path)?;
        Ok(self.str(label, &digest))
    }

    /// Adds every regular file below `root` (relative path + content), skipping
    /// directories named in `skip_dirs` (such as `target`).
    pub fn tree(
        &mut self,
        label: &str,
        root: &Path,
        skip_dirs: &[&str],
    ) -> anyhow::Result<&mut Self> {
        let walker = walkdir::WalkDir::new(root)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| {
                !(e.file_type().is_dir() && skip_dirs.iter().any(|s| e.file_name() == *s))
            });
        for entry in walker {
            let entry = entry.with_context(|| format!("walking {}", root.display()))?;
            if entry.file_type().is_file() {
                let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
                let digest = sha256_file(entry.path())?;
                self.str(&format!("{label}/{}", rel.display()), &digest);
            }
        }
        Ok(self)
    }

    pub fn finish(&self) -> String {
        hex::encode(self.inner.clone().finalize())
    }
}

/// Hash of the code that writes initrds, disk images and manifests (xtask,
/// kiln-initrd, kiln-disk sources and the lock file): a new compressor backend
/// changes their bytes, so it belongs in those stages' keys. Sources, not the
/// binary, so two checkouts of one commit agree.
pub fn xtask_self_hash(root: &Path) -> String {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        let mut h = KeyHasher::new("pipeline-code");
        for dir in ["xtask", "initrd", "disk"] {
            if h.tree(dir, &root.join(dir), &["target"]).is_err() {
                return "unknown".into();
            }
        }
        if h.file("Cargo.lock", &root.join("Cargo.lock")).is_err() {
            return "unknown".into();
        }
        h.finish()
    })
    .clone()
}

pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The manifest.json record (name, size, sha256) of `file` in `dir`.
pub fn artifact_record(dir: &Path, file: &str) -> anyhow::Result<kiln_manifest::ArtifactRecord> {
    let path = dir.join(file);
    let size = std::fs::metadata(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    Ok(kiln_manifest::ArtifactRecord {
        file: file.to_string(),
        size,
        sha256: sha256_file(&path)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_separate_equal_bytes() {
        let a = KeyHasher::new("s").str("a", "x").finish();
        let b = KeyHasher::new("s").str("b", "x").finish();
        assert_ne!(a, b);
        // Length prefixes: ("ab","c") and ("a","bc") must differ.
        let c = KeyHasher::new("s").str("ab", "c").finish();
        let d = KeyHasher::new("s").str("a", "bc").finish();
        assert_ne!(c, d);
    }

    #[test]
    fn tree_key_ignores_location_and_skipped_dirs() {
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        for dir in [one.path(), two.path()] {
            std::fs::create_dir_all(dir.join("src")).unwrap();
            std::fs::write(dir.join("src/main.rs"), "fn main() {}").unwrap();
        }
        std::fs::create_dir_all(two.path().join("target")).unwrap();
        std::fs::write(two.path().join("target/junk"), "x").unwrap();
        let k1 = KeyHasher::new("t")
            .tree("agent", one.path(), &["target"])
            .unwrap()
            .finish();
        let k2 = KeyHasher::new("t")
            .tree("agent", two.path(), &["target"])
            .unwrap()
            .finish();
        assert_eq!(k1, k2);
        std::fs::write(two.path().join("src/main.rs"), "fn main() { }").unwrap();
        let k3 = KeyHasher::new("t")
            .tree("agent", two.path(), &["target"])
            .unwrap()
            .finish();
        assert_ne!(k1, k3);
    }
}
