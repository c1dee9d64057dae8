//! Image specs (`image-manifests/<name>.toml`): the input saying what an
//! image contains, parsed and checked. What a build produced is recorded in
//! `manifest.json`, whose schema is the kiln-manifest crate.

use std::path::PathBuf;

use anyhow::Context;
use serde::Deserialize;

use crate::arch::{Arch, ArchSel};
use crate::ctx::Ctx;

/// One image flavour, as written by a human.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Must equal the file name without `.toml`.
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub arches: Vec<Arch>,
    /// A file name (without `.toml`) in rootfs-recipes/.
    pub recipe: String,
    /// Initrd compression: none, gzip or zstd.
    pub compression: String,
    /// zstd level for the initrd (default 19: smallest, but minutes for a
    /// 150 MB Debian tree; 9 packs that in seconds).
    #[serde(default)]
    pub compression_level: Option<i32>,
    pub kernel: KernelSection,
    #[serde(default)]
    pub agent: AgentSection,
    pub boot: BootSection,
    #[serde(default)]
    pub rootfs: RootfsSection,
}

/// How the recipe's tree becomes `rootfs.img`, and what the image adds to it.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RootfsSection {
    /// "ext4" (4 KiB blocks) or "erofs" (read-only, uncompressed so DAX works).
    #[serde(default = "default_filesystem")]
    pub filesystem: String,
    /// Free space in MiB on top of the content (ext4; erofs is sized by its content).
    #[serde(default = "default_margin_mib")]
    pub margin_mib: u64,
    /// Debian packages on top of the recipe's (needs a recipe with `[debian]`).
    #[serde(default)]
    pub packages: Vec<String>,
    /// Small literal files on top of the recipe's.
    #[serde(default)]
    pub files: Vec<crate::recipe::LiteralFile>,
    /// Kernel modules (by name, e.g. "bridge") to put into the image with
    /// their dependencies; the kernel must build them (`=m` in a fragment).
    #[serde(default)]
    pub modules: Vec<String>,
    /// Append a dm-verity hash tree to the filesystem in rootfs.img; kiln-shim
    /// then boots the root through dm-verity (needs the kernel feature `verity`).
    #[serde(default)]
    pub verity: bool,
}

impl Default for RootfsSection {
    fn default() -> Self {
        RootfsSection {
            filesystem: default_filesystem(),
            margin_mib: default_margin_mib(),
            packages: Vec::new(),
            files: Vec::new(),
            modules: Vec::new(),
            verity: false,
        }
    }
}

fn default_filesystem() -> String {
    "ext4".into()
}

fn default_margin_mib() -> u64 {
    8
}

/// Filesystems `rootfs.filesystem` may name.
pub const FILESYSTEMS: &[&str] = &["ext4", "erofs"];

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

impl ImageSpec {
    pub fn path(ctx: &Ctx, name: &str) -> PathBuf {
        ctx.root
            .join("image-manifests")
            .join(format!("{name}.toml"))
    }

    pub fn load(ctx: &Ctx, name: &str) -> anyhow::Result<ImageSpec> {
        let path = Self::path(ctx, name);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no image manifest `{name}`: {} is missing (images are the .toml files in image-manifests/)",
                ctx.rel(&path).display()
            )
        })?;
        Self::parse(&text, name).with_context(|| format!("in {}", ctx.rel(&path).display()))
    }

    pub fn parse(text: &str, expected_name: &str) -> anyhow::Result<ImageSpec> {
        let m: ImageSpec = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
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
        if let Some(level) = m.compression_level {
            if m.compression != "zstd" || !(1..=22).contains(&level) {
                anyhow::bail!(
                    "key `compression_level` is {level}: it sets the zstd level (1 to 22) and needs compression = \"zstd\""
                );
            }
        }
        if !FILESYSTEMS.contains(&m.rootfs.filesystem.as_str()) {
            anyhow::bail!(
                "key `rootfs.filesystem` is `{}`; use one of {}",
                m.rootfs.filesystem,
                FILESYSTEMS.join(", ")
            );
        }
        if m.rootfs.margin_mib > 1 << 20 {
            anyhow::bail!(
                "key `rootfs.margin_mib` is {}; give MiB of free space (at most 1048576)",
                m.rootfs.margin_mib
            );
        }
        crate::recipe::check_package_names("rootfs.packages", &m.rootfs.packages)?;
        for f in &m.rootfs.files {
            crate::recipe::check_path("rootfs.files.path", &f.path)?;
        }
        for f in &m.kernel.features {
            if f.is_empty() || f.contains('/') || f.contains("..") {
                anyhow::bail!(
                    "key `kernel.features`: `{f}` is not a fragment name (use names like `vsock`)"
                );
            }
        }
        if m.rootfs.verity && !m.kernel.features.iter().any(|f| f == "verity") {
            anyhow::bail!(
                "key `rootfs.verity` is true, but `kernel.features` lacks \"verity\": the kernel could not open the root (add \"verity\" to kernel.features)"
            );
        }
        Ok(m)
    }

    /// The arches `sel` picks, checked against what the image supports.
    pub fn select_arches(&self, sel: ArchSel) -> anyhow::Result<Vec<Arch>> {
        match sel {
            ArchSel::All => Ok(self.arches.clone()),
            ArchSel::One(a) if self.arches.contains(&a) => Ok(vec![a]),
            ArchSel::One(a) => anyhow::bail!(
                "image `{}` is not built for {a}: its manifest lists arches {:?}; add `{a}` to `arches` in image-manifests/{}.toml",
                self.name,
                self.arches.iter().map(|a| a.name()).collect::<Vec<_>>(),
                self.name
            ),
        }
    }

    /// Kernel command line for `arch` (console first, then the spec's).
    pub fn cmdline(&self, arch: Arch) -> String {
        format!("console={} {}", arch.console(), self.boot.cmdline.trim())
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
        let m = ImageSpec::parse(GOOD, "minimal").unwrap();
        assert_eq!(m.arches, vec![Arch::X86_64]);
        assert_eq!(m.cmdline(Arch::X86_64), "console=ttyS0 quiet");
    }

    #[test]
    fn arch_selection_is_checked_against_the_spec() {
        let m = ImageSpec::parse(GOOD, "minimal").unwrap();
        assert_eq!(m.select_arches(ArchSel::All).unwrap(), vec![Arch::X86_64]);
        let err = format!(
            "{:#}",
            m.select_arches(ArchSel::One(Arch::S390x)).unwrap_err()
        );
        assert!(err.contains("s390x") && err.contains("arches"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let bad = GOOD.replace("recipe =", "recipee =");
        let err = format!("{:#}", ImageSpec::parse(&bad, "minimal").unwrap_err());
        assert!(err.contains("recipee"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = format!(
            "{:#}",
            ImageSpec::parse(&GOOD.replace("\"gzip\"", "\"lzma9\""), "minimal").unwrap_err()
        );
        assert!(
            err.contains("compression") && err.contains("lzma9"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            ImageSpec::parse(&GOOD.replace("\"x86_64\"]", "\"mips\"]"), "minimal").unwrap_err()
        );
        assert!(err.contains("mips"), "{err}");
        let err = format!("{:#}", ImageSpec::parse(GOOD, "other").unwrap_err());
        assert!(err.contains("`name`"), "{err}");
        let err = format!(
            "{:#}",
            ImageSpec::parse(&GOOD.replace("\"vsock\"", "\"../x\""), "minimal").unwrap_err()
        );
        assert!(err.contains("kernel.features"), "{err}");
        let verity = format!("{GOOD}[rootfs]\nverity = true\n");
        let err = format!("{:#}", ImageSpec::parse(&verity, "minimal").unwrap_err());
        assert!(
            err.contains("rootfs.verity") && err.contains("add \"verity\""),
            "{err}"
        );
        let ok = verity.replace("[\"vsock\"]", "[\"vsock\", \"verity\"]");
        assert!(ImageSpec::parse(&ok, "minimal").unwrap().rootfs.verity);
    }
}
