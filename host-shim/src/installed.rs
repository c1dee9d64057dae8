//! Where an installed kiln-shim finds its configuration and images: relative
//! to its own executable (`<prefix>/bin/kiln-shim` → `<prefix>/share/kiln/`),
//! so a package installed under any prefix, or unpacked from a release
//! tarball into any directory, works without flags. `/etc/kiln/` overrides the
//! shipped configuration, as `/etc/kata-containers/` does for Kata.

use std::path::{Path, PathBuf};

/// The administrator's configuration, read before the shipped one.
pub const ETC_CONFIG: &str = "/etc/kiln/configuration.toml";
/// The image `boot` and `run` use when `--image` is not given.
pub const DEFAULT_IMAGE: &str = "minimal";

/// `<prefix>` when `exe` is `<prefix>/bin/<name>`.
pub fn prefix_of(exe: &Path) -> Option<PathBuf> {
    let bin = exe.parent()?;
    (bin.file_name()? == "bin").then(|| bin.parent().map(Path::to_path_buf))?
}

fn share() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(prefix_of(&exe)?.join("share/kiln"))
}

/// `--config` if given, else /etc/kiln/configuration.toml, else the shipped
/// `<prefix>/share/kiln/configuration.toml`; None: built-in defaults.
pub fn config(explicit: Option<PathBuf>) -> Option<PathBuf> {
    config_in(explicit, Path::new(ETC_CONFIG), share().as_deref())
}

fn config_in(explicit: Option<PathBuf>, etc: &Path, share: Option<&Path>) -> Option<PathBuf> {
    explicit
        .or_else(|| etc.is_file().then(|| etc.to_path_buf()))
        .or_else(|| {
            share
                .map(|s| s.join("configuration.toml"))
                .filter(|p| p.is_file())
        })
}

/// `--image` if given, else the installed minimal image.
pub fn image(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    image_in(explicit, share().as_deref())
}

fn image_in(explicit: Option<PathBuf>, share: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let candidate = share.map(|s| s.join(DEFAULT_IMAGE).join("manifest.json"));
    match candidate {
        Some(p) if p.is_file() => Ok(p),
        Some(p) => anyhow::bail!(
            "no --image given and no installed image at {}; pass --image <manifest.json> \
             (e.g. target/kiln/minimal/x86_64/manifest.json after `cargo xtask build-image`)",
            p.display()
        ),
        None => anyhow::bail!(
            "no --image given and kiln-shim is not installed as <prefix>/bin/kiln-shim; pass --image \
             <manifest.json> (e.g. target/kiln/minimal/x86_64/manifest.json after `cargo xtask build-image`)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_from_the_executable() {
        assert_eq!(
            prefix_of(Path::new("/usr/bin/kiln-shim")),
            Some(PathBuf::from("/usr"))
        );
        assert_eq!(
            prefix_of(Path::new("/tmp/d/usr/local/bin/kiln-shim")),
            Some(PathBuf::from("/tmp/d/usr/local"))
        );
        assert_eq!(prefix_of(Path::new("/w/target/debug/kiln-shim")), None);
    }

    #[test]
    fn config_order_explicit_etc_share() {
        let d = tempfile::tempdir().unwrap();
        let (etc, share) = (d.path().join("etc.toml"), d.path().join("share"));
        std::fs::create_dir_all(&share).unwrap();
        assert_eq!(config_in(None, &etc, Some(&share)), None);
        std::fs::write(share.join("configuration.toml"), "").unwrap();
        assert_eq!(
            config_in(None, &etc, Some(&share)),
            Some(share.join("configuration.toml"))
        );
        std::fs::write(&etc, "").unwrap();
        assert_eq!(config_in(None, &etc, Some(&share)), Some(etc.clone()));
        let x = PathBuf::from("/x.toml");
        assert_eq!(config_in(Some(x.clone()), &etc, Some(&share)), Some(x));
    }

    #[test]
    fn image_default_or_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let e = image_in(None, Some(d.path())).unwrap_err().to_string();
        assert!(
            e.contains("minimal/manifest.json") && e.contains("--image"),
            "{e}"
        );
        let e = image_in(None, None).unwrap_err().to_string();
        assert!(e.contains("not installed"), "{e}");
        let m = d.path().join("minimal/manifest.json");
        std::fs::create_dir_all(m.parent().unwrap()).unwrap();
        std::fs::write(&m, "{}").unwrap();
        assert_eq!(image_in(None, Some(d.path())).unwrap(), m);
    }
}
