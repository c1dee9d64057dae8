//! Image manifests (`image-manifests/<name>.toml`, the input saying what an image
//! contains) and the `manifest.json` written next to built artifacts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::arch::Arch;
use crate::ctx::Ctx;
use crate::stage::kernel::KernelRequest;

/// One image flavour, as written by a human.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    /// Must equal the file name without `.toml`.
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub arches: Vec<Arch>,
    /// A file name (without `.toml`) in rootfs-recipes/.
    pub recipe: String,
    /// Initrd compression: none, gzip or zstd.
    pub compression: String,
    pub kernel: KernelSection,
    #[serde(default)]
    pub agent: AgentSection,
    pub boot: BootSection,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct KernelSection {
    /// Kernel series the fragments were written for, e.g. "6.12".
    pub series: String,
    /// Feature fragments: `kernel-configs/features/<name>.conf`, plus
    /// `kernel-configs/<arch>/<name>.conf` where that exists.
    #[serde(default)]
    pub features: Vec<String>,
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Cargo features of kiln-agent to enable.
    #[serde(default)]
    pub features: Vec<String>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct BootSection {
    /// Kernel command line; the arch's console is prepended by the pipeline.
    pub cmdline: String,
}

impl ImageManifest {
    pub fn path(ctx: &Ctx, name: &str) -> PathBuf {
        ctx.root
            .join("image-manifests")
            .join(format!("{name}.toml"))
    }

    pub fn load(ctx: &Ctx, name: &str) -> anyhow::Result<ImageManifest> {
        let path = Self::path(ctx, name);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no image manifest `{name}`: {} is missing (images are the .toml files in image-manifests/)",
                ctx.rel(&path).display()
            )
        })?;
        Self::parse(&text, name).with_context(|| format!("in {}", ctx.rel(&path).display()))
    }

    pub fn parse(text: &str, expected_name: &str) -> anyhow::Result<ImageManifest> {
        let m: ImageManifest = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        if m.name != expected_name {
            anyhow::bail!(
                "key `name` is `{}` but the file is named `{expected_name}.toml`; make them equal",
                m.name
            );
        }
        if m.arches.is_empty() {
            anyhow::bail!(
                "key `arches` is empty; list at least one of x86_64, aarch64, ppc64le, s390x"
            );
        }
        m.compression
            .parse::<kiln_initrd::Compression>()
            .map_err(|e| anyhow::anyhow!("key `compression`: {e}"))?;
        for f in &m.kernel.features {
            if f.is_empty() || f.contains('/') || f.contains("..") {
                anyhow::bail!(
                    "key `kernel.features`: `{f}` is not a fragment name (use names like `vsock`)"
                );
            }
        }
        Ok(m)
    }

    /// Kernel command line for `arch` (console first, then the manifest's).
    pub fn cmdline(&self, arch: Arch) -> String {
        format!("console={} {}", arch.console(), self.boot.cmdline.trim())
    }

    /// Ordered fragment list for `arch`: common base, arch base, then each
    /// feature's common and arch-specific parts. Later fragments win.
    pub fn kernel_request(
        &self,
        ctx: &Ctx,
        arch: Arch,
        kernel_src: Option<PathBuf>,
    ) -> anyhow::Result<KernelRequest> {
        let dir = ctx.root.join("kernel-configs");
        let mut fragments = vec![dir.join("common").join("base.conf")];
        let arch_base = dir.join(arch.fragment_dir()).join("base.conf");
        if arch_base.exists() {
            fragments.push(arch_base);
        }
        for f in &self.kernel.features {
            let common = dir.join("features").join(format!("{f}.conf"));
            let arch_part = dir.join(arch.fragment_dir()).join(format!("{f}.conf"));
            if !common.exists() && !arch_part.exists() {
                anyhow::bail!(
                    "image `{}` asks for kernel feature `{f}`, but neither {} nor {} exists",
                    self.name,
                    ctx.rel(&common).display(),
                    ctx.rel(&arch_part).display()
                );
            }
            fragments.extend([common, arch_part].into_iter().filter(|p| p.exists()));
        }
        for f in &fragments {
            if !f.exists() {
                anyhow::bail!("kernel fragment {} is missing", ctx.rel(f).display());
            }
        }
        let patches = ctx.root.join("kernel-configs").join("patches").join(&self.kernel.series);
        Ok(KernelRequest {
            arch,
            series: self.kernel.series.clone(),
            fragments,
            kernel_src,
            patches: (!ctx.no_patches).then_some(patches),
        })
    }
}

/// `manifest.json`: what a built image contains. No host paths, no build time.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BuiltManifest {
    pub kiln_manifest: u32,
    pub image: String,
    pub arch: Arch,
    pub kernel_version: String,
    /// Patches applied to the kernel source, in order (name and sha256).
    pub kernel_patches: Vec<crate::stage::kernel::PatchRecord>,
    pub cmdline: String,
    pub source_date_epoch: u64,
    /// Role (kernel, initrd, kernel_config, agent) → file record.
    pub artifacts: BTreeMap<String, ArtifactRecord>,
    /// Input name → content hash (stage keys and input files).
    pub inputs: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRecord {
    /// File name, relative to the manifest's directory.
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

impl ArtifactRecord {
    pub fn of(dir: &Path, file: &str) -> anyhow::Result<ArtifactRecord> {
        let path = dir.join(file);
        let size = std::fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        Ok(ArtifactRecord {
            file: file.to_string(),
            size,
            sha256: crate::hash::sha256_file(&path)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "minimal"
arches = ["x86_64"]
recipe = "minimal"
compression = "gzip"
[kernel]
series = "6.12"
features = ["vsock"]
[boot]
cmdline = "quiet"
"#;

    #[test]
    fn parses_a_good_manifest() {
        let m = ImageManifest::parse(GOOD, "minimal").unwrap();
        assert_eq!(m.arches, vec![Arch::X86_64]);
        assert_eq!(m.cmdline(Arch::X86_64), "console=ttyS0 quiet");
    }

    #[test]
    fn unknown_key_is_named() {
        let bad = GOOD.replace("recipe =", "recipee =");
        let err = format!("{:#}", ImageManifest::parse(&bad, "minimal").unwrap_err());
        assert!(err.contains("recipee"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = format!(
            "{:#}",
            ImageManifest::parse(&GOOD.replace("\"gzip\"", "\"lzma9\""), "minimal").unwrap_err()
        );
        assert!(
            err.contains("compression") && err.contains("lzma9"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            ImageManifest::parse(&GOOD.replace("\"x86_64\"]", "\"mips\"]"), "minimal").unwrap_err()
        );
        assert!(err.contains("mips"), "{err}");
        let err = format!("{:#}", ImageManifest::parse(GOOD, "other").unwrap_err());
        assert!(err.contains("`name`"), "{err}");
        let err = format!(
            "{:#}",
            ImageManifest::parse(&GOOD.replace("\"vsock\"", "\"../x\""), "minimal").unwrap_err()
        );
        assert!(err.contains("kernel.features"), "{err}");
    }
}
