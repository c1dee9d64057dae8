//! Rootfs recipes (`rootfs-recipes/<name>.toml`): the data saying which files
//! go into an image. Code never hard-codes an image's content.

use anyhow::Context;
use serde::Deserialize;

use crate::ctx::Ctx;

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    /// For humans reading the recipe; not used by the build.
    #[serde(default)]
    #[allow(dead_code)]
    pub description: String,
    /// Where the agent goes in the tree; "init" makes it PID 1. Empty (left
    /// out) only in container rootfs recipes, which carry no agent.
    #[serde(default)]
    pub agent_path: String,
    /// Empty directories to create (mode 0755).
    #[serde(default)]
    pub directories: Vec<String>,
    /// Device nodes the kernel needs before devtmpfs is mounted.
    #[serde(default)]
    pub nodes: Vec<Node>,
    /// Small literal files.
    #[serde(default)]
    pub files: Vec<LiteralFile>,
    /// Symlinks: path → target.
    #[serde(default)]
    pub symlinks: Vec<Symlink>,
    /// PID 1 when the rootfs image (not the initrd) is booted, relative to the
    /// root; passed as `init=/<path>`. Empty: the kernel's default, /sbin/init.
    #[serde(default)]
    pub init: String,
    /// Add a static busybox as bin/busybox with bin/sh, a shell for the
    /// agent's debug console (host arch only: it comes from busybox-static).
    #[serde(default)]
    pub busybox: bool,
    /// Start from a Debian tree made by mmdebstrap instead of an empty one.
    #[serde(default)]
    pub debian: Option<DebianSection>,
    /// C programs built static for the tree's arch with Debian's (cross) gcc
    /// (container rootfs recipes only).
    #[serde(default)]
    pub programs: Vec<Program>,
    /// Paths deleted from the tree before the recipe's own entries are added
    /// (caches, logs, host-specific files); missing ones are fine.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Directories whose contents are deleted; the directories stay.
    #[serde(default)]
    pub empty_dirs: Vec<String>,
}

/// How mmdebstrap builds the base tree. The mirror is not here: it comes from
/// the host's apt sources, because only that one is reachable where kiln builds.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct DebianSection {
    /// Debian suite, e.g. "bookworm".
    pub suite: String,
    /// More suites from the same archive family (e.g. "bookworm-updates",
    /// "bookworm-security"); each must be in the host's apt sources.
    #[serde(default)]
    pub extra_suites: Vec<String>,
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    /// mmdebstrap variant: "minbase", "essential", "required", "important" or "standard".
    pub variant: String,
    /// Packages on top of the variant.
    pub packages: Vec<String>,
    /// dpkg `path-exclude` patterns (e.g. "/usr/share/man/*"): never unpacked.
    #[serde(default)]
    pub path_exclude: Vec<String>,
    /// dpkg `path-include` patterns that win over `path_exclude` (e.g. copyright files).
    #[serde(default)]
    pub path_include: Vec<String>,
    /// Merged /usr made the way debootstrap does (mmdebstrap's merged-usr
    /// hook, which also installs usr-is-merged), instead of through the
    /// usrmerge package and the perl it needs.
    #[serde(default)]
    pub merged_usr: bool,
    /// SOURCE_DATE_EPOCH for mmdebstrap. Fixed here, not the commit's time, so
    /// the cached bootstrap survives commits; the image's own timestamps still
    /// come from the build's SOURCE_DATE_EPOCH.
    pub bootstrap_epoch: u64,
}

fn default_components() -> Vec<String> {
    vec!["main".to_string()]
}

/// The variants mmdebstrap knows (`extract` and `custom` need post-processing
/// kiln does not do).
const VARIANTS: &[&str] = &["essential", "minbase", "required", "important", "standard"];

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub path: String,
    /// "char" or "block".
    pub kind: String,
    pub major: u32,
    pub minor: u32,
    pub mode: u32,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LiteralFile {
    pub path: String,
    pub content: String,
    #[serde(default = "default_file_mode")]
    pub mode: u32,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Program {
    /// Where the binary goes in the tree.
    pub path: String,
    /// The C source, relative to the checkout.
    pub source: String,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Symlink {
    pub path: String,
    pub target: String,
}

fn default_file_mode() -> u32 {
    0o644
}

impl Recipe {
    /// Reads and checks `rootfs-recipes/<name>.toml`; also returns its path.
    pub fn load(ctx: &Ctx, name: &str) -> anyhow::Result<(Recipe, std::path::PathBuf)> {
        let path = ctx.root.join("rootfs-recipes").join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no rootfs recipe `{name}`: {} is missing",
                ctx.rel(&path).display()
            )
        })?;
        let recipe =
            Self::parse(&text, name).with_context(|| format!("in {}", ctx.rel(&path).display()))?;
        Ok((recipe, path))
    }

    pub fn parse(text: &str, expected_name: &str) -> anyhow::Result<Recipe> {
        let r: Recipe = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        if r.name != expected_name {
            anyhow::bail!(
                "key `name` is `{}` but the file is named `{expected_name}.toml`",
                r.name
            );
        }
        if !r.agent_path.is_empty() {
            check_path("agent_path", &r.agent_path)?;
        }
        for p in &r.programs {
            check_path("programs.path", &p.path)?;
            check_path("programs.source", &p.source)?;
        }
        for d in &r.directories {
            check_path("directories", d)?;
        }
        for n in &r.nodes {
            check_path("nodes.path", &n.path)?;
            if n.kind != "char" && n.kind != "block" {
                anyhow::bail!(
                    "key `nodes.kind` of `{}` is `{}`; use \"char\" or \"block\"",
                    n.path,
                    n.kind
                );
            }
            if n.mode > 0o7777 {
                anyhow::bail!(
                    "key `nodes.mode` of `{}` is {:o}; give permission bits only (e.g. 0o600)",
                    n.path,
                    n.mode
                );
            }
        }
        for f in &r.files {
            check_path("files.path", &f.path)?;
        }
        for s in &r.symlinks {
            check_path("symlinks.path", &s.path)?;
        }
        if !r.init.is_empty() {
            check_path("init", &r.init)?;
        }
        for p in &r.remove {
            check_path("remove", p)?;
        }
        for p in &r.empty_dirs {
            check_path("empty_dirs", p)?;
        }
        if let Some(d) = &r.debian {
            d.check()?;
        }
        Ok(r)
    }
}

impl DebianSection {
    fn check(&self) -> anyhow::Result<()> {
        for s in std::iter::once(&self.suite).chain(&self.extra_suites) {
            if !is_debian_word(s) {
                anyhow::bail!("key `debian.suite`/`debian.extra_suites`: `{s}` is not a suite name (like `bookworm` or `bookworm-updates`)");
            }
        }
        if self.components.is_empty() || !self.components.iter().all(|c| is_debian_word(c)) {
            anyhow::bail!(
                "key `debian.components`: {:?} must list components such as \"main\"",
                self.components
            );
        }
        if !VARIANTS.contains(&self.variant.as_str()) {
            anyhow::bail!(
                "key `debian.variant` is `{}`; use one of {}",
                self.variant,
                VARIANTS.join(", ")
            );
        }
        check_package_names("debian.packages", &self.packages)?;
        for p in self.path_exclude.iter().chain(&self.path_include) {
            if !p.starts_with('/') || p.contains(char::is_whitespace) {
                anyhow::bail!("key `debian.path_exclude`/`debian.path_include`: `{p}` must be an absolute dpkg path pattern without spaces (e.g. \"/usr/share/man/*\")");
            }
        }
        Ok(())
    }
}

/// Debian package names: lower case letters, digits, `+ - .`, at least two
/// characters, starting with a letter or digit (Debian policy 5.6.1).
pub fn check_package_names(key: &str, names: &[String]) -> anyhow::Result<()> {
    for n in names {
        let ok = n.len() >= 2
            && n.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
        if !ok {
            anyhow::bail!("key `{key}`: `{n}` is not a Debian package name");
        }
    }
    Ok(())
}

fn is_debian_word(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
}

/// Paths in recipes are relative to the image root and may not climb out of it.
pub fn check_path(key: &str, p: &str) -> anyhow::Result<()> {
    if p.is_empty()
        || p.starts_with('/')
        || p.split('/').any(|c| c == ".." || c == "." || c.is_empty())
    {
        anyhow::bail!("key `{key}`: `{p}` must be a relative path inside the image (no leading /, no . or .. parts)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "minimal"
agent_path = "init"
directories = ["proc", "sys"]
[[nodes]]
path = "dev/console"
kind = "char"
major = 5
minor = 1
mode = 0o600
"#;

    #[test]
    fn parses() {
        let r = Recipe::parse(GOOD, "minimal").unwrap();
        assert_eq!(r.nodes[0].mode, 0o600);
    }

    #[test]
    fn errors_name_the_key() {
        let e = format!(
            "{:#}",
            Recipe::parse(&GOOD.replace("\"char\"", "\"pipe\""), "minimal").unwrap_err()
        );
        assert!(e.contains("nodes.kind"), "{e}");
        let e = format!(
            "{:#}",
            Recipe::parse(&GOOD.replace("\"proc\"", "\"../etc\""), "minimal").unwrap_err()
        );
        assert!(e.contains("directories"), "{e}");
        let e = format!(
            "{:#}",
            Recipe::parse(&GOOD.replace("agent_path", "agent_pth"), "minimal").unwrap_err()
        );
        assert!(e.contains("agent_pth"), "{e}");
    }

    const DEBIAN: &str = r#"
name = "debian"
agent_path = "usr/bin/kiln-agent"
remove = ["var/cache/debconf/templates.dat-old"]
empty_dirs = ["var/log"]
[debian]
suite = "bookworm"
extra_suites = ["bookworm-updates"]
variant = "minbase"
packages = ["systemd", "systemd-sysv", "libseccomp2"]
path_exclude = ["/usr/share/man/*"]
bootstrap_epoch = 1700000000
"#;

    #[test]
    fn parses_the_shipped_recipes() {
        for name in ["minimal", "debian", "workload"] {
            let path = format!(
                "{}/../rootfs-recipes/{name}.toml",
                env!("CARGO_MANIFEST_DIR")
            );
            let text = std::fs::read_to_string(&path).unwrap();
            Recipe::parse(&text, name).unwrap_or_else(|e| panic!("{path}: {e:#}"));
        }
        let r = Recipe::parse(DEBIAN, "debian").unwrap();
        let d = r.debian.unwrap();
        assert_eq!(d.components, vec!["main"]);
        assert_eq!(d.packages.len(), 3);
    }

    #[test]
    fn broken_debian_recipes_name_the_key() {
        let cases = [
            ("\"minbase\"", "\"tiny\"", "debian.variant"),
            ("\"libseccomp2\"", "\"Lib Seccomp\"", "debian.packages"),
            (
                "\"/usr/share/man/*\"",
                "\"usr/share/man\"",
                "debian.path_exclude",
            ),
            ("\"var/log\"", "\"/var/log\"", "empty_dirs"),
            (
                "\"var/cache/debconf/templates.dat-old\"",
                "\"../x\"",
                "remove",
            ),
            ("suite = ", "suit = ", "suit"),
            (
                "bootstrap_epoch = 1700000000",
                "bootstrap_epoch = \"soon\"",
                "bootstrap_epoch",
            ),
        ];
        for (from, to, key) in cases {
            let bad = DEBIAN.replace(from, to);
            assert_ne!(bad, DEBIAN, "{from}");
            let e = format!("{:#}", Recipe::parse(&bad, "debian").unwrap_err());
            assert!(e.contains(key), "{key}: {e}");
        }
    }
}
