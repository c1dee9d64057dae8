//! Reading a built image's `manifest.json` (written by `cargo xtask build-image`)
//! and checking its artifacts before a VM is started from them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;
use sha2::Digest;

#[derive(Deserialize, Debug, Clone)]
pub struct ImageManifest {
    pub kiln_manifest: u32,
    pub image: String,
    pub arch: String,
    pub kernel_version: String,
    pub cmdline: String,
    pub artifacts: BTreeMap<String, Artifact>,
}

#[derive(Deserialize, Debug, Clone)]
pub struct Artifact {
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

/// A manifest plus the absolute paths of the files a boot needs.
#[derive(Debug, Clone)]
pub struct BootImage {
    pub manifest: ImageManifest,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl BootImage {
    pub fn load(path: &Path) -> anyhow::Result<BootImage> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read image manifest {}: build it with `cargo xtask build-image`",
                path.display()
            )
        })?;
        let manifest: ImageManifest = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a kiln manifest.json", path.display()))?;
        if manifest.kiln_manifest != 1 {
            anyhow::bail!(
                "{}: manifest format {} is not supported (expected 1)",
                path.display(),
                manifest.kiln_manifest
            );
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let file_of = |role: &str| -> anyhow::Result<PathBuf> {
            let a = manifest
                .artifacts
                .get(role)
                .with_context(|| format!("{}: no `{role}` artifact listed", path.display()))?;
            let p = dir.join(&a.file);
            verify(&p, a)?;
            Ok(p)
        };
        let kernel = file_of("kernel")?;
        let initrd = file_of("initrd")?;
        Ok(BootImage {
            manifest,
            kernel,
            initrd,
        })
    }
}

/// Size and sha256 must match the manifest: a stale or half-copied artifact
/// would otherwise boot into a confusing failure.
fn verify(path: &Path, a: &Artifact) -> anyhow::Result<()> {
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
