//! The image's SBOM: `sbom.spdx.json` (SPDX 2.3, JSON) beside manifest.json,
//! derived from it plus the agent's resolved crates, so it says what is in
//! the image, not what might be: the artifacts (SHA-1 and SHA-256, as SPDX
//! asks of files), the kernel (version, source hash, patches), the crates
//! statically linked into the agent (from `cargo metadata` for the agent's
//! target, checksums from Cargo.lock) and the image's Debian packages.
//!
//! Invariant: the document is a function of its inputs. Its creation time
//! is `SOURCE_DATE_EPOCH` and its namespace comes from manifest.json's hash,
//! so a second build writes the same bytes (checked with the artifacts
//! across checkouts).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_manifest::{Arch, Manifest};
use serde_json::{json, Value};
use sha1::Digest as _;

use crate::cache::{write_atomic, Stamp};
use crate::ctx::Ctx;
use crate::hash::KeyHasher;

pub const FILE: &str = "sbom.spdx.json";

/// One crate linked into the agent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Crate {
    pub name: String,
    pub version: String,
    /// Cargo.lock's checksum of the .crate file (registry crates only).
    pub checksum: Option<String>,
    /// The crate's `license` field, as written.
    pub license: Option<String>,
    /// From crates.io (else a workspace member).
    pub registry: bool,
}

/// Writes `dir/sbom.spdx.json` for the image `manifest` (whose JSON text is
/// `manifest_text`), keyed like every stage output.
pub fn write(
    ctx: &Ctx,
    dir: &Path,
    manifest: &Manifest,
    manifest_text: &str,
) -> anyhow::Result<PathBuf> {
    let path = dir.join(FILE);
    // Derived from manifest.json alone (plus the agent's crates): the kernel
    // source's hash is one of its recorded inputs.
    let kernel_source = manifest.inputs.get("kernel_source").with_context(|| {
        format!(
            "{}: manifest.json records no `kernel_source` input; rebuild the image",
            dir.display()
        )
    })?;
    let key = KeyHasher::new("sbom")
        .str("manifest", manifest_text)
        .str("xtask", &crate::hash::xtask_self_hash(&ctx.root))
        .finish();
    let step = ctx.ui.stage(&format!("sbom {}", manifest.arch));
    if Stamp::fresh(dir, "sbom", &key).is_some() {
        step.cached(&ctx.rel(&path).display().to_string());
        return Ok(path);
    }
    Stamp::invalidate(dir, "sbom");
    let crates = agent_crates(ctx, manifest.arch)?;
    let mut files = Vec::new();
    for (role, rec) in &manifest.artifacts {
        files.push(FileSums {
            role: role.clone(),
            name: rec.file.clone(),
            sha1: sha1_file(&dir.join(&rec.file))?,
            sha256: rec.sha256.clone(),
        });
    }
    let doc = document(
        manifest,
        &hex::encode(sha2::Sha256::digest(manifest_text.as_bytes())),
        kernel_source,
        &crates,
        &files,
    );
    let mut text = serde_json::to_string_pretty(&doc)?;
    text.push('\n');
    write_atomic(&path, text.as_bytes())?;
    Stamp::record(dir, "sbom", &key, &[FILE])?;
    step.done(&format!(
        "{} ({} crates, {} packages)",
        ctx.rel(&path).display(),
        crates.len(),
        manifest.packages.len()
    ));
    Ok(path)
}

/// An artifact's file name and digests.
pub struct FileSums {
    pub role: String,
    pub name: String,
    pub sha1: String,
    pub sha256: String,
}

/// The SPDX document for `manifest`. Pure, for the unit tests.
pub fn document(
    manifest: &Manifest,
    manifest_sha256: &str,
    kernel_source_sha256: &str,
    crates: &[Crate],
    files: &[FileSums],
) -> Value {
    let arch = manifest.arch;
    let image_id = "SPDXRef-Image";
    let kernel_id = "SPDXRef-Package-linux";
    let mut packages = vec![
        json!({
            "SPDXID": image_id,
            "name": format!("kiln-{}", manifest.image),
            "versionInfo": env!("CARGO_PKG_VERSION"),
            "downloadLocation": "NOASSERTION",
            // The artifacts are the image's files (SPDX 2.3 §7.9: contained
            // files need filesAnalyzed and a verification code).
            "filesAnalyzed": true,
            "packageVerificationCode": {"packageVerificationCodeValue": verification_code(files)},
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "primaryPackagePurpose": "OPERATING-SYSTEM",
            "comment": format!("the {} guest image for {}, described by manifest.json (sha256 {manifest_sha256})", manifest.image, arch.name()),
        }),
        json!({
            "SPDXID": kernel_id,
            "name": "linux",
            "versionInfo": manifest.kernel_version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "checksums": [{"algorithm": "SHA256", "checksumValue": kernel_source_sha256}],
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "GPL-2.0-only",
            "copyrightText": "NOASSERTION",
            "primaryPackagePurpose": "OPERATING-SYSTEM",
            "comment": kernel_comment(manifest),
        }),
    ];
    let mut relationships = vec![rel("SPDXRef-DOCUMENT", "DESCRIBES", image_id)];
    relationships.push(rel(image_id, "CONTAINS", kernel_id));

    let mut ids = BTreeSet::new();
    let agent_id = crate_id("kiln-agent", env!("CARGO_PKG_VERSION"));
    for c in crates {
        let id = crate_id(&c.name, &c.version);
        if !ids.insert(id.clone()) {
            continue;
        }
        let mut p = json!({
            "SPDXID": id,
            "name": c.name,
            "versionInfo": c.version,
            "downloadLocation": if c.registry {
                format!("https://crates.io/api/v1/crates/{}/{}/download", c.name, c.version)
            } else {
                "NOASSERTION".to_string()
            },
            "filesAnalyzed": false,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": c.license.as_deref().map_or("NOASSERTION".into(), spdx_license),
            "copyrightText": "NOASSERTION",
            "primaryPackagePurpose": if c.name == "kiln-agent" { "APPLICATION" } else { "LIBRARY" },
        });
        if c.registry {
            p["externalRefs"] = json!([purl(&format!("pkg:cargo/{}@{}", c.name, c.version))]);
        }
        if let Some(sum) = &c.checksum {
            p["checksums"] = json!([{"algorithm": "SHA256", "checksumValue": sum}]);
        }
        packages.push(p);
        if c.name == "kiln-agent" {
            relationships.push(rel(image_id, "CONTAINS", &id));
        } else {
            relationships.push(rel(&agent_id, "STATIC_LINK", &id));
        }
    }
    // Licences without an SPDX id, declared once for the whole document.
    let mut refs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for pkg in &manifest.packages {
        let id = sanitize(&format!("SPDXRef-Package-deb-{}-{}", pkg.name, pkg.version));
        if let Some(l) = &pkg.license {
            for word in l.split([' ', '(', ')']) {
                if word.starts_with(crate::stage::rootfs::copyright::REF_PREFIX) {
                    refs.entry(word.to_string())
                        .or_default()
                        .insert(pkg.name.clone());
                }
            }
        }
        packages.push(json!({
            "SPDXID": id,
            "name": pkg.name,
            "versionInfo": pkg.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": pkg.license.as_deref().unwrap_or("NOASSERTION"),
            "copyrightText": "NOASSERTION",
            "externalRefs": [purl(&format!(
                "pkg:deb/debian/{}@{}?arch={}",
                pkg.name,
                purl_escape(&pkg.version),
                pkg.architecture
            ))],
        }));
        relationships.push(rel(image_id, "CONTAINS", &id));
    }

    let mut spdx_files = Vec::new();
    for f in files {
        let id = sanitize(&format!("SPDXRef-File-{}", f.role));
        spdx_files.push(json!({
            "SPDXID": id,
            "fileName": format!("./{}", f.name),
            "checksums": [
                {"algorithm": "SHA1", "checksumValue": f.sha1},
                {"algorithm": "SHA256", "checksumValue": f.sha256},
            ],
            "licenseConcluded": "NOASSERTION",
            "copyrightText": "NOASSERTION",
        }));
        relationships.push(rel(image_id, "CONTAINS", &id));
        let source = match f.role.as_str() {
            kiln_manifest::role::KERNEL | kiln_manifest::role::KERNEL_CONFIG => {
                Some(kernel_id.to_string())
            }
            kiln_manifest::role::AGENT => Some(agent_id.clone()),
            _ => None,
        };
        if let Some(source) = source.filter(|s| s == kernel_id || ids.contains(s)) {
            relationships.push(rel(&id, "GENERATED_FROM", &source));
        }
    }

    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("kiln-{}-{}", manifest.image, arch.name()),
        "documentNamespace": format!(
            "https://spdx.kiln.invalid/{}/{}/{manifest_sha256}",
            manifest.image,
            arch.name()
        ),
        "creationInfo": {
            "created": rfc3339_utc(manifest.source_date_epoch),
            "creators": [format!("Tool: kiln-xtask-{}", env!("CARGO_PKG_VERSION"))],
        },
        "packages": packages,
        "files": spdx_files,
        "relationships": relationships,
        "hasExtractedLicensingInfos": refs.iter().map(|(id, pkgs)| json!({
            "licenseId": id,
            "name": id.trim_start_matches(crate::stage::rootfs::copyright::REF_PREFIX),
            "extractedText": format!(
                "A licence Debian names `{}` and SPDX has no identifier for; its text is in the \
                 copyright file of each package that uses it, /usr/share/doc/<package>/copyright \
                 in the image: {}",
                id.trim_start_matches(crate::stage::rootfs::copyright::REF_PREFIX),
                pkgs.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        })).collect::<Vec<_>>(),
    })
}

/// SPDX's package verification code: the SHA-1 of the package's files'
/// SHA-1s (lowercase hex), sorted and concatenated.
fn verification_code(files: &[FileSums]) -> String {
    let mut sums: Vec<&str> = files.iter().map(|f| f.sha1.as_str()).collect();
    sums.sort_unstable();
    hex::encode(sha1::Sha1::digest(sums.concat().as_bytes()))
}

fn kernel_comment(manifest: &Manifest) -> String {
    let patches: Vec<String> = manifest
        .kernel_patches
        .iter()
        .map(|p| format!("{} (sha256 {})", p.name, p.sha256))
        .collect();
    let config = manifest
        .artifact(kiln_manifest::role::KERNEL_CONFIG)
        .map_or("none".to_string(), |a| a.sha256.clone());
    format!(
        "checksum: the source tarball; .config sha256 {config}; patches: {}",
        if patches.is_empty() {
            "none".to_string()
        } else {
            patches.join(", ")
        }
    )
}

fn rel(from: &str, kind: &str, to: &str) -> Value {
    json!({"spdxElementId": from, "relationshipType": kind, "relatedSpdxElement": to})
}

fn purl(locator: &str) -> Value {
    json!({"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl", "referenceLocator": locator})
}

fn crate_id(name: &str, version: &str) -> String {
    sanitize(&format!("SPDXRef-Package-cargo-{name}-{version}"))
}

/// SPDX ids allow letters, digits, `.` and `-` only.
fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Percent-encodes what a purl version may not hold as is (e.g. an epoch's `:`).
fn purl_escape(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._~-+".contains(c) {
                c.to_string()
            } else {
                format!("%{:02X}", c as u32)
            }
        })
        .collect()
}

/// Cargo's `license` field as an SPDX expression: the old `A/B` form
/// means `A OR B`.
fn spdx_license(cargo: &str) -> String {
    cargo
        .split('/')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// `1970-01-01T00:00:00Z` form of a Unix time (UTC, no leap seconds).
pub(crate) fn rfc3339_utc(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn sha1_file(path: &Path) -> anyhow::Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = sha1::Sha1::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(hasher.finalize()))
}

/// The crates linked into the agent for `arch`: `cargo metadata`'s resolve
/// from kiln-agent over normal dependencies (no build or dev ones) on the
/// agent's target, with Cargo.lock's checksums.
pub fn agent_crates(ctx: &Ctx, arch: Arch) -> anyhow::Result<Vec<Crate>> {
    let manifest_path = ctx.root.join("Cargo.toml");
    let text = crate::cmd::read(
        "cargo metadata",
        duct::cmd!(
            "cargo",
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--offline",
            "--filter-platform",
            arch.rust_target(),
            "--manifest-path",
            &manifest_path
        ),
    )?;
    let meta: Value = serde_json::from_str(&text).context("parsing cargo metadata")?;
    let lock =
        std::fs::read_to_string(ctx.root.join("Cargo.lock")).context("reading Cargo.lock")?;
    linked_crates(&meta, &lock_checksums(&lock)?, "kiln-agent")
}

/// (name, version) → checksum, from Cargo.lock.
fn lock_checksums(lock: &str) -> anyhow::Result<BTreeMap<(String, String), String>> {
    #[derive(serde::Deserialize)]
    struct Lock {
        #[serde(default)]
        package: Vec<LockPackage>,
    }
    #[derive(serde::Deserialize)]
    struct LockPackage {
        name: String,
        version: String,
        checksum: Option<String>,
    }
    let lock: Lock = toml::from_str(lock).context("parsing Cargo.lock")?;
    Ok(lock
        .package
        .into_iter()
        .filter_map(|p| Some(((p.name, p.version), p.checksum?)))
        .collect())
}

/// Walks `cargo metadata` output from package `root` over normal
/// dependencies; returns every crate reached (root included), sorted.
fn linked_crates(
    meta: &Value,
    checksums: &BTreeMap<(String, String), String>,
    root: &str,
) -> anyhow::Result<Vec<Crate>> {
    let packages: BTreeMap<&str, &Value> = meta["packages"]
        .as_array()
        .context("cargo metadata without packages")?
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p)))
        .collect();
    let nodes: BTreeMap<&str, &Value> = meta["resolve"]["nodes"]
        .as_array()
        .context("cargo metadata without a resolve graph")?
        .iter()
        .filter_map(|n| Some((n["id"].as_str()?, n)))
        .collect();
    let start = packages
        .iter()
        .find(|(_, p)| p["name"] == root && p["source"].is_null())
        .map(|(id, _)| *id)
        .with_context(|| format!("{root} is not a workspace member"))?;
    let mut seen = BTreeSet::from([start]);
    let mut todo = vec![start];
    while let Some(id) = todo.pop() {
        let deps = nodes.get(id).and_then(|n| n["deps"].as_array());
        for dep in deps.into_iter().flatten() {
            let normal = dep["dep_kinds"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k["kind"].is_null()));
            let Some(pkg) = dep["pkg"].as_str() else {
                continue;
            };
            // A proc macro runs in the compiler; nothing of it is linked.
            let proc_macro = packages.get(pkg).is_some_and(|p| {
                p["targets"].as_array().is_some_and(|ts| {
                    ts.iter().all(|t| {
                        t["kind"]
                            .as_array()
                            .is_some_and(|k| k.iter().any(|k| k == "proc-macro"))
                    })
                })
            });
            if normal && !proc_macro && seen.insert(pkg) {
                todo.push(pkg);
            }
        }
    }
    let mut out: Vec<Crate> = seen
        .into_iter()
        .filter_map(|id| packages.get(id))
        .map(|p| {
            let name = p["name"].as_str().unwrap_or_default().to_string();
            let version = p["version"].as_str().unwrap_or_default().to_string();
            Crate {
                checksum: checksums.get(&(name.clone(), version.clone())).cloned(),
                license: p["license"].as_str().map(str::to_string),
                registry: p["source"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("registry+")),
                name,
                version,
            }
        })
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_796_592_904), "2026-12-06T21:35:04Z");
        assert_eq!(rfc3339_utc(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn ids_purls_and_licenses() {
        assert_eq!(sanitize("SPDXRef-a_b+c:1"), "SPDXRef-a-b-c-1");
        assert_eq!(
            purl_escape("1:2.3+dfsg-1~deb12u1"),
            "1%3A2.3+dfsg-1~deb12u1"
        );
        assert_eq!(spdx_license("MIT/Apache-2.0"), "MIT OR Apache-2.0");
        assert_eq!(spdx_license("MIT OR Apache-2.0"), "MIT OR Apache-2.0");
    }

    /// A resolve graph where the agent links `a`, `a` links `b`, `c` is
    /// only a build dependency, `d` only a dev one and `e` a proc macro.
    #[test]
    fn linked_crates_follow_normal_dependencies_only() {
        let reg = "registry+https://github.com/rust-lang/crates.io-index";
        let pkg = |id: &str, name: &str, source: Option<&str>| json!({"id": id, "name": name, "version": "1.0.0", "source": source, "license": "MIT/Apache-2.0"});
        let dep =
            |pkg: &str, kind: Option<&str>| json!({"pkg": pkg, "dep_kinds": [{"kind": kind}]});
        let meta = json!({
            "packages": [
                pkg("agent", "kiln-agent", None),
                pkg("a", "a", Some(reg)),
                pkg("b", "b", Some(reg)),
                pkg("c", "c", Some(reg)),
                pkg("d", "d", Some(reg)),
                json!({"id": "e", "name": "e", "version": "1.0.0", "source": reg,
                       "targets": [{"kind": ["proc-macro"]}]}),
            ],
            "resolve": {"nodes": [
                {"id": "agent", "deps": [dep("a", None), dep("c", Some("build")), dep("d", Some("dev")), dep("e", None)]},
                {"id": "a", "deps": [dep("b", None)]},
                {"id": "b", "deps": []},
                {"id": "c", "deps": []},
                {"id": "d", "deps": []},
            ]},
        });
        let sums = BTreeMap::from([(("a".to_string(), "1.0.0".to_string()), "aa".to_string())]);
        let crates = linked_crates(&meta, &sums, "kiln-agent").unwrap();
        let names: Vec<&str> = crates.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "kiln-agent"]);
        assert_eq!(crates[0].checksum.as_deref(), Some("aa"));
        assert!(crates[0].registry && !crates[2].registry);
    }

    /// A two-artifact Debian-based manifest through `document`: every
    /// relationship names a declared element, ids are unique, files carry
    /// both digests and the image its verification code, purls are escaped,
    /// and the same input gives the same bytes.
    #[test]
    fn document_is_self_consistent_and_deterministic() {
        let art = |file: &str, sha: &str| kiln_manifest::ArtifactRecord {
            file: file.into(),
            size: 1,
            sha256: sha.into(),
        };
        let manifest = Manifest {
            kiln_manifest: kiln_manifest::FORMAT,
            image: "debian".into(),
            arch: Arch::Aarch64,
            kernel_version: "6.12.1".into(),
            kernel_patches: vec![kiln_manifest::PatchRecord {
                name: "0001-x.patch".into(),
                sha256: "pp".into(),
            }],
            cmdline: String::new(),
            source_date_epoch: 0,
            artifacts: BTreeMap::from([
                ("agent".to_string(), art("kiln-agent", "a256")),
                ("kernel".to_string(), art("Image", "k256")),
            ]),
            inputs: BTreeMap::new(),
            rootfs: None,
            packages: vec![kiln_manifest::Package {
                name: "libc6".into(),
                version: "1:2.36-9".into(),
                architecture: "arm64".into(),
                license: Some(
                    "(GPL-2.0-or-later OR LicenseRef-Debian-public-domain) AND MIT".into(),
                ),
            }],
            kernel_modules: vec![],
        };
        let crates = vec![
            Crate {
                name: "kiln-agent".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                checksum: None,
                license: None,
                registry: false,
            },
            Crate {
                name: "libc".into(),
                version: "0.2.1".into(),
                checksum: Some("cc".into()),
                license: Some("MIT/Apache-2.0".into()),
                registry: true,
            },
        ];
        let files =
            [("agent", "kiln-agent", "a1"), ("kernel", "Image", "k1")].map(|(role, name, sha1)| {
                FileSums {
                    role: role.into(),
                    name: name.into(),
                    sha1: sha1.into(),
                    sha256: format!("{}256", &sha1[..1]),
                }
            });
        let doc = document(&manifest, "m256", "src256", &crates, &files);
        assert_eq!(doc, document(&manifest, "m256", "src256", &crates, &files));
        assert_eq!(doc["creationInfo"]["created"], "1970-01-01T00:00:00Z");
        assert_eq!(
            doc["documentNamespace"],
            "https://spdx.kiln.invalid/debian/aarch64/m256"
        );

        let mut ids = BTreeSet::from(["SPDXRef-DOCUMENT".to_string()]);
        for el in doc["packages"]
            .as_array()
            .unwrap()
            .iter()
            .chain(doc["files"].as_array().unwrap())
        {
            assert!(
                ids.insert(el["SPDXID"].as_str().unwrap().to_string()),
                "{el}"
            );
        }
        let rels = doc["relationships"].as_array().unwrap();
        for r in rels {
            for end in ["spdxElementId", "relatedSpdxElement"] {
                assert!(ids.contains(r[end].as_str().unwrap()), "{r}");
            }
        }
        let has = |from: &str, kind: &str, to: &str| {
            rels.iter().any(|r| {
                r["spdxElementId"] == from
                    && r["relationshipType"] == kind
                    && r["relatedSpdxElement"] == to
            })
        };
        let agent = crate_id("kiln-agent", env!("CARGO_PKG_VERSION"));
        assert!(has("SPDXRef-DOCUMENT", "DESCRIBES", "SPDXRef-Image"));
        assert!(has(
            &agent,
            "STATIC_LINK",
            "SPDXRef-Package-cargo-libc-0.2.1"
        ));
        assert!(has(
            "SPDXRef-File-kernel",
            "GENERATED_FROM",
            "SPDXRef-Package-linux"
        ));
        assert!(has("SPDXRef-File-agent", "GENERATED_FROM", &agent));
        assert!(has(
            "SPDXRef-Image",
            "CONTAINS",
            "SPDXRef-Package-deb-libc6-1-2.36-9"
        ));

        let text = doc.to_string();
        assert!(
            text.contains("pkg:deb/debian/libc6@1%3A2.36-9?arch=arm64"),
            "{text}"
        );
        assert!(text.contains("pkg:cargo/libc@0.2.1"));
        assert!(text.contains("\"MIT OR Apache-2.0\""));
        assert!(text.contains("0001-x.patch (sha256 pp)"));
        // The Debian package's declared licence, and its LicenseRef declared once.
        let libc6 = doc["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "libc6")
            .unwrap();
        assert_eq!(
            libc6["licenseDeclared"],
            "(GPL-2.0-or-later OR LicenseRef-Debian-public-domain) AND MIT"
        );
        let refs = doc["hasExtractedLicensingInfos"].as_array().unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0]["licenseId"], "LicenseRef-Debian-public-domain");
        assert!(refs[0]["extractedText"].as_str().unwrap().contains("libc6"));
        let image = &doc["packages"][0];
        assert_eq!(
            image["packageVerificationCode"]["packageVerificationCodeValue"],
            hex::encode(sha1::Sha1::digest(b"a1k1"))
        );
        for f in doc["files"].as_array().unwrap() {
            let algos: Vec<&str> = f["checksums"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["algorithm"].as_str().unwrap())
                .collect();
            assert_eq!(algos, ["SHA1", "SHA256"]);
        }
    }

    #[test]
    fn lock_checksums_skip_workspace_members() {
        let lock = "version = 4\n\n[[package]]\nname = \"a\"\nversion = \"1.0.0\"\nsource = \"registry+x\"\nchecksum = \"ff\"\n\n[[package]]\nname = \"kiln-agent\"\nversion = \"0.1.0\"\n";
        let sums = lock_checksums(lock).unwrap();
        assert_eq!(sums.len(), 1);
        assert_eq!(sums[&("a".into(), "1.0.0".into())], "ff");
    }
}
