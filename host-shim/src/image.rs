//! Reading a built image's `manifest.json` (written by `cargo xtask build-image`)
//! and checking its artifacts before a VM is started from them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_manifest::{role, ArtifactRecord, Manifest, RootfsRecord};
use sha2::Digest;

/// A manifest plus the absolute paths of the files a boot needs.
#[derive(Debug, Clone)]
pub struct BootImage {
    pub manifest: Manifest,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The manifest's directory (artifacts are relative to it).
    pub dir: PathBuf,
}

/// The root filesystem image, checked against the manifest.
#[derive(Debug, Clone)]
pub struct RootfsImage {
    pub path: PathBuf,
    pub size: u64,
    pub layout: RootfsRecord,
}

impl BootImage {
    /// The `rootfs_image` artifact, verified (size and sha256, read as a
    /// stream) and its headers parsed as kiln-disk's DAX layout, so a stale or
    /// foreign file fails here and not as a kernel panic.
    pub fn rootfs_image(&self) -> anyhow::Result<RootfsImage> {
        let a = self.manifest.artifact(role::ROOTFS_IMAGE).with_context(|| {
            format!(
                "image `{}` has no rootfs_image artifact: rebuild it with `cargo xtask build-image --image {}`",
                self.manifest.image, self.manifest.image
            )
        })?;
        let layout = self.manifest.rootfs.clone().with_context(|| {
            format!(
                "image `{}`: manifest.json lists rootfs_image but no `rootfs` layout",
                self.manifest.image
            )
        })?;
        let path = self.dir.join(&a.file);
        verify_streaming(&path, a)?;
        let facts = kiln_disk::layout::inspect_file(&path)
            .with_context(|| format!("{} is not a kiln DAX image", path.display()))?;
        if facts.fs_offset != layout.partition_offset {
            anyhow::bail!(
                "{}: the filesystem starts at {} but the manifest says {}: rebuild the image",
                path.display(),
                facts.fs_offset,
                layout.partition_offset
            );
        }
        Ok(RootfsImage {
            path,
            size: a.size,
            layout,
        })
    }
}

/// [`verify`] without reading the whole file into memory.
fn verify_streaming(path: &Path, a: &ArtifactRecord) -> anyhow::Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("artifact {} is missing", path.display()))?;
    let len = f.metadata()?.len();
    if len != a.size {
        anyhow::bail!(
            "{} has {len} bytes but the manifest says {}: rebuild the image",
            path.display(),
            a.size
        );
    }
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    if hex_string(&h.finalize()) != a.sha256 {
        anyhow::bail!(
            "{} does not match its sha256 in the manifest: rebuild the image",
            path.display()
        );
    }
    Ok(())
}

impl BootImage {
    pub fn load(path: &Path) -> anyhow::Result<BootImage> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read image manifest {}: build it with `cargo xtask build-image`",
                path.display()
            )
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a kiln manifest.json", path.display()))?;
        if manifest.kiln_manifest != kiln_manifest::FORMAT {
            anyhow::bail!(
                "{}: manifest format {} is not supported (expected {})",
                path.display(),
                manifest.kiln_manifest,
                kiln_manifest::FORMAT
            );
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let file_of = |role: &str| -> anyhow::Result<PathBuf> {
            let a = manifest
                .artifact(role)
                .with_context(|| format!("{}: no `{role}` artifact listed", path.display()))?;
            let p = dir.join(&a.file);
            verify(&p, a)?;
            Ok(p)
        };
        let kernel = file_of(role::KERNEL)?;
        let initrd = file_of(role::INITRD)?;
        Ok(BootImage {
            dir: dir.to_path_buf(),
            manifest,
            kernel,
            initrd,
        })
    }
}

/// Size and sha256 must match the manifest: a stale or half-copied artifact
/// would otherwise boot into a confusing failure.
fn verify(path: &Path, a: &ArtifactRecord) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(path).with_context(|| format!("artifact {} is missing", path.display()))?;
    if bytes.len() as u64 != a.size {
        anyhow::bail!(
            "{} has {} bytes but the manifest says {}: rebuild the image",
            path.display(),
            bytes.len(),
            a.size
        );
    }
    let sha = hex_string(&sha2::Sha256::digest(&bytes));
    if sha != a.sha256 {
        anyhow::bail!(
            "{} does not match its sha256 in the manifest: rebuild the image",
            path.display()
        );
    }
    Ok(())
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_image(dir: &Path, kernel: &[u8], sha_override: Option<&str>) -> PathBuf {
        std::fs::write(dir.join("vmlinuz"), kernel).unwrap();
        std::fs::write(dir.join("initrd.img"), b"cpio").unwrap();
        let ksha = sha_override
            .map(str::to_string)
            .unwrap_or_else(|| hex_string(&sha2::Sha256::digest(kernel)));
        let isha = hex_string(&sha2::Sha256::digest(b"cpio"));
        let m = serde_json::json!({
            "kiln_manifest": 1, "image": "minimal", "arch": "x86_64", "kernel_version": "6.12",
            "cmdline": "console=ttyS0", "source_date_epoch": 0, "inputs": {},
            "artifacts": {
                "kernel": {"file": "vmlinuz", "size": kernel.len(), "sha256": ksha},
                "initrd": {"file": "initrd.img", "size": 4, "sha256": isha}
            }
        });
        let p = dir.join("manifest.json");
        std::fs::write(&p, m.to_string()).unwrap();
        p
    }

    /// A manifest as xtask writes it (kiln-manifest's types, pretty JSON)
    /// reads back here with every field and boots from the listed files.
    #[test]
    fn reads_what_xtask_writes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("vmlinuz"), b"kernel").unwrap();
        std::fs::write(d.path().join("initrd.img"), b"cpio").unwrap();
        let record = |file: &str, bytes: &[u8]| ArtifactRecord {
            file: file.into(),
            size: bytes.len() as u64,
            sha256: hex_string(&sha2::Sha256::digest(bytes)),
        };
        let written = Manifest {
            kiln_manifest: kiln_manifest::FORMAT,
            image: "minimal".into(),
            arch: kiln_manifest::Arch::Aarch64,
            kernel_version: "6.12.57".into(),
            kernel_patches: vec![],
            cmdline: "console=ttyAMA0".into(),
            source_date_epoch: 7,
            artifacts: [
                (role::KERNEL.to_string(), record("vmlinuz", b"kernel")),
                (role::INITRD.to_string(), record("initrd.img", b"cpio")),
            ]
            .into(),
            inputs: [("kernel".to_string(), "k".to_string())].into(),
            rootfs: None,
            packages: vec![],
            kernel_modules: vec![],
        };
        let p = d.path().join(kiln_manifest::FILE);
        std::fs::write(&p, serde_json::to_string_pretty(&written).unwrap() + "\n").unwrap();
        let img = BootImage::load(&p).unwrap();
        assert_eq!(img.manifest, written);
        assert_eq!(img.initrd, d.path().join("initrd.img"));
        let err = format!("{:#}", img.rootfs_image().unwrap_err());
        assert!(err.contains("no rootfs_image artifact"), "{err}");
    }

    #[test]
    fn loads_and_verifies() {
        let d = tempfile::tempdir().unwrap();
        let p = write_image(d.path(), b"kernel", None);
        let img = BootImage::load(&p).unwrap();
        assert_eq!(img.kernel, d.path().join("vmlinuz"));
    }

    #[test]
    fn tampered_artifact_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = write_image(d.path(), b"kernel", Some(&"0".repeat(64)));
        let err = format!("{:#}", BootImage::load(&p).unwrap_err());
        assert!(err.contains("sha256") && err.contains("rebuild"), "{err}");
    }

    #[test]
    fn missing_manifest_says_how_to_build() {
        let err = format!(
            "{:#}",
            BootImage::load(Path::new("/nonexistent/manifest.json")).unwrap_err()
        );
        assert!(err.contains("cargo xtask build-image"), "{err}");
    }
}
