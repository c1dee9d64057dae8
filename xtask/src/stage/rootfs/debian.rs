//! The Debian base tree of a recipe: mmdebstrap's tarball, made once per
//! (recipe's `[debian]` section, extra packages, arch, mirrors, mmdebstrap
//! version) and kept in the cache outside the checkout, with the installed
//! package list (from dpkg's status file) beside it.
//!
//! The mirror comes from the host's apt sources (only that one is reachable
//! on kiln's build machines); nothing here names a Debian server.
//!
//! For the host's own arch mmdebstrap installs the variant for real (maintainer
//! scripts run). For a foreign arch nothing of the target may run (no
//! emulation), so the same package set is only unpacked (`--variant=extract`)
//! and [`super::postinst`] does the few post-install steps the image needs;
//! the package list then comes from the downloaded .deb files' names.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_manifest::Package;

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
/// Package name → declared licence, read once from the tarball's copyright
/// files (derived from the stamped tarball, so not an output of its stamp),
/// in `licenses-<hash of the reader's source>.json`: a changed reader reads again.
fn licenses_file() -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(include_str!("copyright.rs"));
    format!("licenses-{}.json", &hex::encode(h)[..16])
}

/// The cached bootstrap.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub tarball: PathBuf,
    /// What the base is, for downstream keys and manifest.json: the bootstrap
    /// key plus the installed package list (names, versions, arches). Not the
    /// tarball's hash: two mmdebstrap runs of one package set give tarballs
    /// that differ in noise the recipe removes (the owner of apt's `partial`
    /// directories is root in one run and `_apt` in the next), and that noise
    /// must not reach the keys recorded in a reproducible manifest.
    pub identity: String,
    pub packages: Vec<Package>,
    /// Input key: section, packages, arch, mirrors, mmdebstrap version.
    pub key: String,
    /// Unpacked only (`--variant=extract`): post-install steps still to do.
    pub extracted: bool,
    /// The recipe's `bootstrap_epoch` (dates what the post-install steps write).
    pub epoch: u64,
}

/// One `deb` source from the host's apt configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    pub uri: String,
    pub suites: Vec<String>,
}

/// The `deb` lines for the recipe's suite and extra suites, from the host's
/// apt sources (the one reachable mirror); an extra suite the host lacks is
/// left out with a note.
fn apt_sources(ctx: &Ctx, debian: &DebianSection) -> anyhow::Result<Vec<String>> {
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
    Ok(sources)
}

/// The installed packages of a fresh tarball (dpkg's status, or the .deb
/// names when only extracted), written to packages.json beside it.
fn write_package_list(dir: &Path, extracted: bool) -> anyhow::Result<Vec<Package>> {
    // A new tarball: licences are read again from its copyright files.
    let _ = std::fs::remove_file(dir.join(licenses_file()));
    let list = if extracted {
        packages_from_debs(&member_names(&dir.join(TARBALL))?)
    } else {
        let status = read_member(&dir.join(TARBALL), "var/lib/dpkg/status")?
            .context("mmdebstrap's tarball has no var/lib/dpkg/status")?;
        parse_dpkg_status(&String::from_utf8_lossy(&status))
    };
    if list.is_empty() {
        anyhow::bail!("mmdebstrap's tarball lists no installed packages");
    }
    let mut text = serde_json::to_string_pretty(&list)?;
    text.push('\n');
    write_atomic(&dir.join(PACKAGES), text.as_bytes())?;
    Ok(list)
}

/// Builds (or finds in the cache) the base tree for `arch`.
pub fn bootstrap(
    ctx: &Ctx,
    debian: &DebianSection,
    extra_packages: &[String],
    arch: Arch,
) -> anyhow::Result<Bootstrap> {
    let mut sources = apt_sources(ctx, debian)?;
    let mut packages: Vec<String> = debian.packages.clone();
    packages.extend(extra_packages.iter().cloned());
    packages.sort();
    packages.dedup();
    let mmdebstrap_version = cmd::read(
        "mmdebstrap --version",
        duct::cmd!("mmdebstrap", "--version"),
    )
    .context("mmdebstrap is needed for Debian recipes (`cargo xtask setup` installs it)")?;
    let extracted = arch != Arch::host();
    let step = ctx.ui.stage(&format!("debian {arch}"));
    let key_of = |sources: &[String]| {
        KeyHasher::new("debian-bootstrap")
            .str("arch", arch.debian_arch())
            .str("extracted", &extracted.to_string())
            .str("variant", &debian.variant)
            .str("sources", &sources.join("\n"))
            .str("packages", &packages.join(","))
            .str("path_exclude", &debian.path_exclude.join("\n"))
            .str("path_include", &debian.path_include.join("\n"))
            .str("epoch", &debian.bootstrap_epoch.to_string())
            .str("merged_usr", &debian.merged_usr.to_string())
            .str("mmdebstrap", &mmdebstrap_version)
            .finish()
    };
    let dir_of = |key: &str| ctx.cache.join("rootfs").join(&key[..16]);
    if ctx.offline {
        // No mirror: a cached base with every extra suite the host carries,
        // or one built without the suites a broken mirror could not serve.
        for candidate in without_extra_suites(&sources, &debian.extra_suites) {
            let key = key_of(&candidate);
            let dir = dir_of(&key);
            if Stamp::fresh(&dir, "bootstrap", &key).is_some() {
                step.cached(&format!("{}", dir.display()));
                return cached(&dir, key, extracted, debian);
            }
        }
        let key = key_of(&sources);
        anyhow::bail!(
            "--offline: the Debian base for {arch} (recipe `[debian]`, suite {}, {} packages, key {}) is not in \
             the cache {} and building it needs the mirror ({}); build it once without --offline, or copy \
             that cache directory from a machine that has it",
            debian.suite,
            packages.len(),
            &key[..16],
            dir_of(&key).display(),
            sources.first().map_or("", String::as_str)
        );
    }
    loop {
        let key = key_of(&sources);
        let dir = dir_of(&key);
        let fresh = Stamp::fresh(&dir, "bootstrap", &key).is_some();
        if fresh {
            ctx.remote_offer(&dir, "bootstrap", &key);
        }
        if fresh || ctx.remote_fetch(&dir, "bootstrap", &key) {
            step.cached(&format!("{}", dir.display()));
            return cached(&dir, key, extracted, debian);
        }
        Stamp::invalidate(&dir, "bootstrap");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        step.message(&format!(
            "mmdebstrap --variant={} {} ({} packages)",
            if extracted {
                "extract"
            } else {
                debian.variant.as_str()
            },
            debian.suite,
            packages.len()
        ));
        if let Err(e) = run_mmdebstrap(ctx, debian, &packages, &sources, arch, extracted, &dir) {
            // An extra suite the mirror cannot serve for this arch is treated
            // like one the host does not carry: left out, loudly, under its
            // own key (so a repaired mirror is used again).
            let text = format!("{e:#}");
            let broken = debian.extra_suites.iter().find(|s| {
                text.contains("Failed to fetch") && text.contains(&format!("dists/{s}/"))
            });
            match broken {
                Some(suite) => {
                    ctx.ui.println(&format!(
                        "warning: the mirror's `{suite}` index for {} cannot be fetched (see target/kiln/logs/debian-{arch}.log); \
                         building {arch} without `{suite}` (recipe key `debian.extra_suites`)",
                        arch.debian_arch()
                    ));
                    sources.retain(|l| !l.contains(&format!(" {suite} ")));
                    continue;
                }
                None => return Err(e),
            }
        }
        let list = write_package_list(&dir, extracted)?;
        let stamp = Stamp::record(&dir, "bootstrap", &key, &[TARBALL, PACKAGES])?;
        ctx.remote_offer(&dir, "bootstrap", &key);
        step.done(&format!(
            "{} packages, {}",
            list.len(),
            short(&stamp.outputs[TARBALL])
        ));
        return cached(&dir, key, extracted, debian);
    }
}

/// `sources` with each subset of the extra suites left out, fewest first
/// (the full list first): the keys an online build may have cached under.
fn without_extra_suites(sources: &[String], extra: &[String]) -> Vec<Vec<String>> {
    let present: Vec<&String> = extra
        .iter()
        .filter(|s| sources.iter().any(|l| l.contains(&format!(" {s} "))))
        .collect();
    let mut masks: Vec<u32> = (0..1u32 << present.len().min(8)).collect();
    masks.sort_by_key(|m| m.count_ones());
    masks
        .into_iter()
        .map(|m| {
            sources
                .iter()
                .filter(|l| {
                    !present
                        .iter()
                        .enumerate()
                        .any(|(i, s)| m & (1 << i) != 0 && l.contains(&format!(" {s} ")))
                })
                .cloned()
                .collect()
        })
        .collect()
}

fn identity(key: &str, packages: &[Package]) -> String {
    let mut h = KeyHasher::new("debian-base");
    h.str("key", key);
    for p in packages {
        h.str("package", &format!("{p:?}"));
    }
    h.finish()
}

/// The bootstrap recorded in `dir`.
fn cached(
    dir: &Path,
    key: String,
    extracted: bool,
    debian: &DebianSection,
) -> anyhow::Result<Bootstrap> {
    let list = std::fs::read_to_string(dir.join(PACKAGES))?;
    let mut packages: Vec<Package> = serde_json::from_str(&list)?;
    let licenses = licenses(dir)?;
    for p in &mut packages {
        p.license = licenses.get(&p.name).cloned();
    }
    Ok(Bootstrap {
        tarball: dir.join(TARBALL),
        identity: identity(&key, &packages),
        packages,
        key,
        extracted,
        epoch: debian.bootstrap_epoch,
    })
}

/// The declared licences of the base's packages, from licenses.json or, the
/// first time, from the copyright files in the tarball.
fn licenses(dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let path = dir.join(licenses_file());
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(map) = serde_json::from_str(&text) {
            return Ok(map);
        }
    }
    let map = super::copyright::from_tarball(&dir.join(TARBALL))?;
    let mut text = serde_json::to_string_pretty(&map)?;
    text.push('\n');
    write_atomic(&path, text.as_bytes())?;
    Ok(map)
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
    extracted: bool,
    dir: &Path,
) -> anyhow::Result<()> {
    // mmdebstrap picks the output format from the name; write next to the
    // final place and rename, so a crash leaves no trusted half tarball.
    let work = tempfile::Builder::new()
        .prefix(".mmdebstrap-")
        .tempdir_in(dir)?;
    let out = work.path().join("out.tar");
    let mut args: Vec<String> = vec![
        format!("--architectures={}", arch.debian_arch()),
        format!("--components={}", debian.components.join(",")),
    ];
    if extracted {
        args.push("--variant=extract".into());
        // The variant's package set, as apt patterns (one per --include: a
        // comma list of patterns is not split).
        for p in variant_patterns(&debian.variant) {
            args.push(format!("--include={p}"));
        }
        // The .deb files stay in the tarball: their names are the package list.
        args.push("--skip=cleanup/apt/cache".into());
        if debian.merged_usr {
            // The setup hook makes the /usr symlinks (and a dummy usr-is-merged
            // package that satisfies init-system-helpers); its essential hook
            // would have to run target binaries.
            args.push(format!("--setup-hook={MERGED_USR_HOOKS}/setup00.sh"));
        }
    } else {
        args.push(format!("--variant={}", debian.variant));
        if debian.merged_usr {
            args.push(format!("--hook-dir={MERGED_USR_HOOKS}"));
        }
    }
    if !packages.is_empty() {
        args.push(format!("--include={}", packages.join(",")));
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
    let run = || {
        cmd::run_logged(
            ctx,
            &format!("debian-{arch}"),
            "mmdebstrap",
            duct::cmd("mmdebstrap", &args)
                .env("SOURCE_DATE_EPOCH", debian.bootstrap_epoch.to_string())
                .env("TMPDIR", work.path()),
        )
    };
    // Mirrors fail transiently ("Mirror sync in progress?"): one more try.
    if let Err(first) = run() {
        ctx.ui.println(&format!(
            "note: mmdebstrap for {arch} failed; trying once more ({})",
            first.to_string().lines().next().unwrap_or("")
        ));
        run()?;
    }
    std::fs::rename(&out, dir.join(TARBALL))
        .with_context(|| format!("moving mmdebstrap's output into {}", dir.display()))?;
    Ok(())
}

/// The package set of a variant, as apt patterns for `--variant=extract`
/// (what mmdebstrap's manual gives as each variant's equivalent).
fn variant_patterns(variant: &str) -> Vec<&'static str> {
    let mut p = vec!["?essential"];
    let prio = [
        "?priority(required)",
        "?priority(important)",
        "?priority(standard)",
    ];
    let n = match variant {
        "essential" => 0,
        "minbase" | "required" => 1,
        "important" => 2,
        _ => 3,
    };
    p.extend(&prio[..n]);
    if variant == "minbase" {
        p.push("apt");
    }
    p
}

/// Names of all members of a tar archive.
fn member_names(tar_path: &Path) -> anyhow::Result<Vec<String>> {
    let file =
        std::fs::File::open(tar_path).with_context(|| format!("opening {}", tar_path.display()))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut out = Vec::new();
    for entry in archive.entries()? {
        out.push(entry?.path()?.to_string_lossy().into_owned());
    }
    Ok(out)
}

/// Packages from apt's downloaded files, `var/cache/apt/archives/NAME_VERSION_ARCH.deb`
/// (the version's `:` is stored as `%3a`).
pub fn packages_from_debs(names: &[String]) -> Vec<Package> {
    let mut out: Vec<Package> = names
        .iter()
        .filter_map(|n| {
            let file = n
                .trim_start_matches("./")
                .strip_prefix("var/cache/apt/archives/")?;
            let stem = file.strip_suffix(".deb")?;
            let mut parts = stem.splitn(3, '_');
            let (name, version, arch) = (parts.next()?, parts.next()?, parts.next()?);
            Some(Package {
                name: name.to_string(),
                version: version.replace("%3a", ":").replace("%3A", ":"),
                architecture: arch.to_string(),
                license: None,
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The content of one regular file of a tar archive, if it is there.
fn read_member(tar_path: &Path, member: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let file =
        std::fs::File::open(tar_path).with_context(|| format!("opening {}", tar_path.display()))?;
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
                license: None,
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
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
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
        let Some(rest) = line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        else {
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
        let get = |k: &str| {
            stanza
                .get(&k.to_ascii_lowercase())
                .cloned()
                .unwrap_or_default()
        };
        let is_deb = get("Types").split_whitespace().any(|t| t == "deb");
        let enabled = !get("Enabled").trim().eq_ignore_ascii_case("no");
        if is_deb && enabled {
            let suites: Vec<String> = get("Suites")
                .split_whitespace()
                .map(str::to_string)
                .collect();
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
    fn identity_follows_key_and_package_versions_only() {
        let pkg = |v: &str| Package {
            name: "systemd".into(),
            version: v.into(),
            architecture: "s390x".into(),
            license: None,
        };
        let a = identity("k", &[pkg("252.33-1~deb12u1")]);
        assert_eq!(a, identity("k", &[pkg("252.33-1~deb12u1")]));
        assert_ne!(
            a,
            identity("k", &[pkg("252.34-1~deb12u1")]),
            "a new version is a new base"
        );
        assert_ne!(a, identity("other key", &[pkg("252.33-1~deb12u1")]));
    }

    #[test]
    fn offline_candidates_drop_extra_suites_fewest_first() {
        let src: Vec<String> = [
            "deb M bookworm main",
            "deb M bookworm-updates main",
            "deb S bookworm-security main",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let extra = vec![
            "bookworm-updates".to_string(),
            "bookworm-security".to_string(),
        ];
        let c = without_extra_suites(&src, &extra);
        assert_eq!(c.len(), 4);
        assert_eq!(c[0], src);
        assert!(c[1..3].iter().all(|l| l.len() == 2));
        assert_eq!(c[3], vec!["deb M bookworm main".to_string()]);
    }

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
    fn package_list_from_deb_names() {
        let names: Vec<String> = [
            "./var/cache/apt/archives/",
            "./var/cache/apt/archives/libc6_2.36-9+deb12u10_arm64.deb",
            "./var/cache/apt/archives/tzdata_2025b-0+deb12u1_all.deb",
            "./var/cache/apt/archives/perl-base_5.36.0-7+deb12u2_arm64.deb",
            "./var/cache/apt/archives/libpam0g_1.5.2-6+deb12u1_arm64.deb",
            "./var/cache/apt/archives/ncurses-bin_6.4-4_arm64.deb",
            "./var/cache/apt/archives/bsdutils_1%3a2.38.1-5+deb12u3_arm64.deb",
            "./usr/share/x_1_2.deb",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = packages_from_debs(&names);
        assert_eq!(p.len(), 6);
        assert_eq!(p[0].name, "bsdutils");
        assert_eq!(p[0].version, "1:2.38.1-5+deb12u3");
        assert!(p
            .iter()
            .any(|x| x.name == "tzdata" && x.architecture == "all"));
    }

    #[test]
    fn variants_as_patterns() {
        assert_eq!(
            variant_patterns("minbase"),
            ["?essential", "?priority(required)", "apt"]
        );
        assert_eq!(variant_patterns("essential"), ["?essential"]);
        assert_eq!(variant_patterns("standard").len(), 4);
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
