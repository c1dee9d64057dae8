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
    /// Where the agent goes in the tree; "init" makes it PID 1.
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
}

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
pub struct Symlink {
    pub path: String,
    pub target: String,
}

fn default_file_mode() -> u32 {
    0o644
}

impl Recipe {
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
        check_path("agent_path", &r.agent_path)?;
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
        Ok(r)
    }
}

/// Paths in recipes are relative to the image root and may not climb out of it.
fn check_path(key: &str, p: &str) -> anyhow::Result<()> {
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
}
