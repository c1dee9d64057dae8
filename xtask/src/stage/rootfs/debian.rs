//! The Debian base tree of a recipe: mmdebstrap's tarball, made once per
//! (recipe's `[debian]` section, extra packages, arch, mirrors, mmdebstrap
//! version) and kept in the cache outside the checkout, with the installed
//! package list (from dpkg's status file) beside it.
//!
//! The mirror comes from the host's apt sources (only that one is reachable
//! on kiln's build machines); nothing here names a Debian server.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::arch::Arch;
use crate::cache::{write_atomic, Stamp};
use crate::cmd;
use crate::ctx::Ctx;
use crate::hash::KeyHasher;
use crate::recipe::DebianSection;

pub const TARBALL: &str = "rootfs.tar";
/// The hooks mmdebstrap ships for a debootstrap-style merged /usr.
const MERGED_USR_HOOKS: &str = "/usr/share/mmdebstrap/hooks/merged-usr";
pub const PACKAGES: &str = "packages.json";

/// One installed package, as dpkg records it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
}

/// The cached bootstrap.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub tarball: PathBuf,
    pub tarball_sha256: String,
    pub packages: Vec<Package>,
    /// Input key: section, packages, arch, mirrors, mmdebstrap version.
    pub key: String,
}

/// One `deb` source from the host's apt configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    pub uri: String,
    pub suites: Vec<String>,
}

/// Builds (or finds in the cache) the base tree for `arch`.
pub fn bootstrap(
    ctx: &Ctx,
    debian: &DebianSection,
    extra_packages: &[String],
    arch: Arch,
) -> anyhow::Result<Bootstrap> {
    let host = host_apt_sources()?;
    let mut sources = Vec::new();
    let components = debian.components.join(" ");
    for (i, suite) in std::iter::once(&debian.suite)
        .chain(&debian.extra_suites)
        .enumerate()
    {
        match host.iter().find(|s| s.suites.contains(suite)) {
            Some(s) => sources.push(format!("deb {} {suite} {components}", s.uri)),
            None if i == 0 => anyhow::bail!(
                "recipe key `debian.suite` = `{suite}`, but no `deb` entry of the host's apt sources \
                 (/etc/apt/sources.list, /etc/apt/sources.list.d/) carries that suite; add one for a \
                 reachable Debian mirror"
            ),
            None => ctx.ui.println(&format!(
                "note: `{suite}` (recipe key `debian.extra_suites`) is not in the host's apt sources; building without it"
            )),
        }
    }
    let mut packages: Vec<String> = debian.packages.clone();
    packages.extend(extra_packages.iter().cloned());
    packages.sort();
    packages.dedup();
    let mmdebstrap_version = cmd::read(
        "mmdebstrap --version",
        duct::cmd!("mmdebstrap", "--version"),
    )
    .context("mmdebstrap is needed for Debian recipes (`cargo xtask setup` installs it)")?;
    let key = KeyHasher::new("debian-bootstrap")
        .str("arch", arch.debian_arch())
        .str("variant", &debian.variant)
        .str("sources", &sources.join("\n"))
        .str("packages", &packages.join(","))
        .str("path_exclude", &debian.path_exclude.join("\n"))
        .str("path_include", &debian.path_include.join("\n"))
        .str("epoch", &debian.bootstrap_epoch.to_string())
        .str("merged_usr", &debian.merged_usr.to_string())
        .str("mmdebstrap", &mmdebstrap_version)
        .finish();
    let dir = ctx.cache.join("rootfs").join(&key[..16]);
    let step = ctx.ui.stage(&format!("debian {arch}"));
    if Stamp::fresh(&dir, "bootstrap", &key).is_none() {
        Stamp::invalidate(&dir, "bootstrap");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        step.message(&format!(
            "mmdebstrap --variant={} {} ({} packages)",
            debian.variant,
            debian.suite,
            packages.len()
        ));
        run_mmdebstrap(ctx, debian, &packages, &sources, arch, &dir)?;
        let status = read_member(&dir.join(TARBALL), "var/lib/dpkg/status")?
            .context("mmdebstrap's tarball has no var/lib/dpkg/status")?;
        let list = parse_dpkg_status(&String::from_utf8_lossy(&status));
        let mut text = serde_json::to_string_pretty(&list)?;
        text.push('\n');
        write_atomic(&dir.join(PACKAGES), text.as_bytes())?;
        let stamp = Stamp::record(&dir, "bootstrap", &key, &[TARBALL, PACKAGES])?;
        step.done(&format!("{} packages, {}", list.len(), short(&stamp.outputs[TARBALL])));
    } else {
        step.cached(&format!("{}", dir.display()));
    }
    let stamp = Stamp::fresh(&dir, "bootstrap", &key)
        .context("the bootstrap cache changed while it was read")?;
    let packages: Vec<Package> =
        serde_json::from_str(&std::fs::read_to_string(dir.join(PACKAGES))?)?;
    Ok(Bootstrap {
        tarball: dir.join(TARBALL),
        tarball_sha256: stamp.outputs[TARBALL].clone(),
        packages,
        key,
    })
}

fn short(sha: &str) -> String {
    format!("sha256 {}…", &sha[..12.min(sha.len())])
}

fn run_mmdebstrap(
    ctx: &Ctx,
    debian: &DebianSection,
    packages: &[String],
    sources: &[String],
    arch: Arch,
    dir: &Path,
) -> anyhow::Result<()> {
    // mmdebstrap picks the output format from the name; write next to the
    // final place and rename, so a crash leaves no trusted half tarball.
    let work = tempfile::Builder::new()
        .prefix(".mmdebstrap-")
        .tempdir_in(dir)?;
    let out = work.path().join("out.tar");
    let mut args: Vec<String> = vec![
        format!("--variant={}", debian.variant),
        format!("--architectures={}", arch.debian_arch()),
        format!("--components={}", debian.components.join(",")),
    ];
    if !packages.is_empty() {
        args.push(format!("--include={}", packages.join(",")));
    }
    if debian.merged_usr {
        args.push(format!("--hook-dir={MERGED_USR_HOOKS}"));
    }
    for p in &debian.path_exclude {
        args.push(format!("--dpkgopt=path-exclude={p}"));
    }
    for p in &debian.path_include {
        args.push(format!("--dpkgopt=path-include={p}"));
    }
    args.push(debian.suite.clone());
    args.push(out.display().to_string());
    args.extend(sources.iter().cloned());
    cmd::run_logged(
        ctx,
        &format!("debian-{arch}"),
        "mmdebstrap",
        duct::cmd("mmdebstrap", &args)
            .env("SOURCE_DATE_EPOCH", debian.bootstrap_epoch.to_string())
            .env("TMPDIR", work.path()),
    )?;
    std::fs::rename(&out, dir.join(TARBALL))
        .with_context(|| format!("moving mmdebstrap's output into {}", dir.display()))?;
    Ok(())
}

/// The content of one regular file of a tar archive, if it is there.
fn read_member(tar_path: &Path, member: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let file = std::fs::File::open(tar_path)
        .with_context(|| format!("opening {}", tar_path.display()))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        if name.trim_start_matches("./") == member {
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// Installed packages from dpkg's status file, sorted by name.
pub fn parse_dpkg_status(text: &str) -> Vec<Package> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let mut fields = BTreeMap::new();
        for line in para.lines() {
            if line.starts_with([' ', '\t']) {
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                fields.insert(k.trim(), v.trim());
            }
        }
        let installed = fields
            .get("Status")
            .is_some_and(|s| s.ends_with(" installed"));
        if let (true, Some(name), Some(version)) =
            (installed, fields.get("Package"), fields.get("Version"))
        {
            out.push(Package {
                name: name.to_string(),
                version: version.to_string(),
                architecture: fields.get("Architecture").unwrap_or(&"").to_string(),
            });
        }
    }
    out.sort();
    out
}

/// Every `deb` source of the host's apt configuration, in apt's order
/// (sources.list, then sources.list.d/ by name; *.list one-line and
/// *.sources deb822 files).
pub fn host_apt_sources() -> anyhow::Result<Vec<AptSource>> {
    let etc = Path::new("/etc/apt");
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string(etc.join("sources.list")) {
        out.extend(parse_one_line(&text));
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(etc.join("sources.list.d"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    names.sort();
    for p in names {
        let Ok(text) = std::fs::read_to_string(&p) else { continue };
        match p.extension().and_then(|e| e.to_str()) {
            Some("list") => out.extend(parse_one_line(&text)),
            Some("sources") => out.extend(parse_deb822(&text)),
            _ => {}
        }
    }
    Ok(out)
}

/// `deb [options] URI SUITE [COMPONENT...]` lines.
pub fn parse_one_line(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ").or_else(|| line.strip_prefix("deb\t")) else {
            continue;
        };
        let mut rest = rest.trim_start();
        if rest.starts_with('[') {
            match rest.find(']') {
                Some(i) => rest = rest[i + 1..].trim_start(),
                None => continue,
            }
        }
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(AptSource {
                uri: uri.trim_end_matches('/').to_string(),
                suites: vec![suite.to_string()],
            });
        }
    }
    out
}

/// deb822 stanzas: `Types`, `URIs`, `Suites`, `Enabled`.
pub fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    let mut stanza: BTreeMap<String, String> = BTreeMap::new();
    let mut last_key = String::new();
    let mut flush = |stanza: &mut BTreeMap<String, String>| {
        let get = |k: &str| stanza.get(&k.to_ascii_lowercase()).cloned().unwrap_or_default();
        let is_deb = get("Types").split_whitespace().any(|t| t == "deb");
        let enabled = !get("Enabled").trim().eq_ignore_ascii_case("no");
        if is_deb && enabled {
            let suites: Vec<String> = get("Suites").split_whitespace().map(str::to_string).collect();
            for uri in get("URIs").split_whitespace() {
                out.push(AptSource {
                    uri: uri.trim_end_matches('/').to_string(),
                    suites: suites.clone(),
                });
            }
        }
        stanza.clear();
    };
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            flush(&mut stanza);
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(v) = stanza.get_mut(&last_key) {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            last_key = k.trim().to_ascii_lowercase();
            stanza.insert(last_key.clone(), v.trim().to_string());
        }
    }
    flush(&mut stanza);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_sources() {
        let text = "# comment\ndeb http://deb.example/debian bookworm main contrib\n\
                    deb-src http://src.example bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://sec.example/debian-security/ bookworm-security main # tail\n\
                    debx nonsense\n";
        let s = parse_one_line(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].uri, "http://deb.example/debian");
        assert_eq!(s[1].uri, "http://sec.example/debian-security");
        assert_eq!(s[1].suites, vec!["bookworm-security"]);
    }

    #[test]
    fn deb822_sources() {
        let text = "Types: deb\n# http://snapshot.example/archive\nURIs: http://deb.example/debian\n\
                    Suites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/k.gpg\n\n\
                    Types: deb-src\nURIs: http://src.example\nSuites: bookworm\n\n\
                    Types: deb\nURIs: http://off.example\nSuites: trixie\nEnabled: no\n\n\
                    Types: deb deb-src\nURIs: http://sec.example/debian-security\nSuites:\n bookworm-security\n";
        let s = parse_deb822(text);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].suites, vec!["bookworm", "bookworm-updates"]);
        assert_eq!(s[1].uri, "http://sec.example/debian-security");
        assert_eq!(s[1].suites, vec!["bookworm-security"]);
    }

    #[test]
    fn dpkg_status_lists_installed_packages() {
        let text = "Package: zlib1g\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1:1.2.13\n\
                    Description: compression\n long text: with colon\n\n\
                    Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                    Package: bash\nStatus: install ok installed\nArchitecture: amd64\nVersion: 5.2.15-2+b2\n";
        let p = parse_dpkg_status(text);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "bash");
        assert_eq!(p[1].version, "1:1.2.13");
    }
}
