//! Release distribution as OCI artifacts: `cargo xtask release --push
//! oci://…/kiln:VERSION` publishes `target/kiln/dist/`, and `cargo xtask pull
//! oci://…@sha256:… --dest DIR` fetches and verifies it, the way Kata ships its
//! payloads through a registry.
//!
//! Shape: one OCI image index (tag VERSION) with one image manifest per arch
//! (platform linux/<GOARCH>). Each manifest has `release.json` as its config
//! and, as layers, the arch's tarball (a real `tar+zstd` layer), `SHA256SUMS`,
//! and the provenance statement and signatures when present, each titled with
//! its file name. Annotations use the `org.opencontainers.image.*` keys.
//!
//! Invariant: `pull` writes nothing into `--dest` that it has not checked: every
//! manifest and blob against its digest (the index too when pulled by digest),
//! every tarball against SHA256SUMS and release.json; files are staged, then
//! renamed in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use oci_client::client::{Config, ImageLayer};
use oci_client::manifest::{
    ImageIndexEntry, OciDescriptor, OciImageIndex, OciImageManifest, Platform,
    OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use sha2::Digest;

use crate::arch::Arch;
use crate::ctx::Ctx;
use crate::hash::sha256_file;
use crate::oci::{Address, Registry};
use crate::stage::provenance;
use crate::stage::release::ReleaseManifest;

pub const ARTIFACT_TYPE: &str = "application/vnd.kiln.release.v1";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.kiln.release.config.v1+json";
const TARBALL_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const FILE_MEDIA_TYPE: &str = "application/vnd.kiln.file.v1";
const TITLE: &str = "org.opencontainers.image.title";

/// The GOARCH name OCI platforms use.
pub fn oci_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "amd64",
        Arch::Aarch64 => "arm64",
        Arch::Ppc64le => "ppc64le",
        Arch::S390x => "s390x",
    }
}

fn annotations(release: &ReleaseManifest) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("org.opencontainers.image.title".into(), "kiln".into()),
        (
            "org.opencontainers.image.description".into(),
            "kiln guest images (kernel, initrd, rootfs, agent) and kiln-shim".into(),
        ),
        (
            "org.opencontainers.image.version".into(),
            release.version.clone(),
        ),
        (
            "org.opencontainers.image.revision".into(),
            release.git_commit.clone(),
        ),
        (
            "org.opencontainers.image.created".into(),
            // From SOURCE_DATE_EPOCH: the index is as reproducible as the tarballs.
            crate::stage::sbom::rfc3339_utc(release.source_date_epoch),
        ),
        (
            "org.opencontainers.image.licenses".into(),
            env!("CARGO_PKG_LICENSE").into(),
        ),
    ])
}

/// Pushes `dist` (as written by `release::run` for `arches`) to `target`,
/// which must name a tag. Returns the index digest.
pub fn push(
    ctx: &Ctx,
    dist: &Path,
    arches: &[Arch],
    target: &str,
    insecure: bool,
) -> anyhow::Result<String> {
    let address = Address::parse(target).context("release --push")?;
    let tag = match address.reference.clone() {
        Some(t) if !t.starts_with("sha256:") => t,
        _ => anyhow::bail!(
            "release --push {target}: name a tag to publish under, e.g. {}:{}",
            Address {
                reference: None,
                ..address.clone()
            },
            env!("CARGO_PKG_VERSION")
        ),
    };
    let step = ctx.ui.stage(&format!("push {address}"));
    let registry = Registry::connect(address.clone(), insecure)?;
    let release_json = std::fs::read(dist.join("release.json")).context("release.json in dist/")?;
    let release: ReleaseManifest = serde_json::from_slice(&release_json)?;
    let notes = annotations(&release);
    let mut entries = Vec::new();
    let mut total = 0u64;
    for arch in arches {
        let name = format!("kiln-{}-{arch}.tar.zst", release.version);
        if !release.artifacts.contains_key(&name) {
            anyhow::bail!("dist/ has no {name} in release.json; run `cargo xtask release --arch {arch}` first");
        }
        let mut files = vec![name.clone(), "SHA256SUMS".to_string()];
        for extra in [
            "SHA256SUMS.sig",
            provenance::FILE,
            &format!("{}.sig", provenance::FILE),
        ] {
            if dist.join(extra).is_file() {
                files.push(extra.to_string());
            }
        }
        let mut layers = Vec::new();
        for f in &files {
            let data = std::fs::read(dist.join(f))
                .with_context(|| format!("reading {}", dist.join(f).display()))?;
            total += data.len() as u64;
            let media = if *f == name {
                TARBALL_MEDIA_TYPE
            } else {
                FILE_MEDIA_TYPE
            };
            layers.push(ImageLayer::new(
                data,
                media.to_string(),
                Some(BTreeMap::from([(TITLE.to_string(), f.clone())])),
            ));
        }
        let config = Config::new(release_json.clone(), CONFIG_MEDIA_TYPE.to_string(), None);
        let mut manifest = OciImageManifest::build(&layers, &config, Some(notes.clone()));
        manifest.artifact_type = Some(ARTIFACT_TYPE.to_string());
        let arch_tag = format!("{tag}-{}", oci_arch(*arch));
        step.message(&format!("{arch}: {} files", files.len()));
        registry.push(&arch_tag, &layers, config, manifest)?;
        // The registry's digest of what it stored, read back rather than recomputed.
        let (bytes, digest) = registry.manifest_raw(&arch_tag, &[OCI_IMAGE_MEDIA_TYPE])?;
        entries.push(ImageIndexEntry {
            media_type: OCI_IMAGE_MEDIA_TYPE.to_string(),
            digest,
            size: bytes.len() as i64,
            platform: Some(Platform {
                architecture: oci_arch(*arch).into(),
                os: "linux".into(),
                os_version: None,
                os_features: None,
                variant: None,
                features: None,
            }),
            annotations: None,
            artifact_type: Some(ARTIFACT_TYPE.to_string()),
        });
    }
    let index = OciImageIndex {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_INDEX_MEDIA_TYPE.to_string()),
        manifests: entries,
        artifact_type: Some(ARTIFACT_TYPE.to_string()),
        annotations: Some(notes),
    };
    let body = serde_json::to_vec(&index)?;
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)));
    registry.push_manifest_raw(&tag, body, OCI_IMAGE_INDEX_MEDIA_TYPE)?;
    step.done(&format!("{} KiB, index {digest}", total / 1024));
    ctx.ui.println(&format!(
        "pushed {} (pull it with: cargo xtask pull {}@{digest} --dest DIR)",
        Address {
            reference: Some(tag),
            ..address.clone()
        },
        Address {
            reference: None,
            ..address
        }
    ));
    Ok(digest)
}

/// `cargo xtask pull`: fetches the release at `source` into `dest`, every byte
/// verified; `arch` limits it to one platform.
pub fn pull(
    ctx: &Ctx,
    source: &str,
    dest: &Path,
    arch: Option<Arch>,
    insecure: bool,
) -> anyhow::Result<Vec<PathBuf>> {
    let address = Address::parse(source).context("pull")?;
    let Some(reference) = address.reference.clone() else {
        anyhow::bail!("pull {source}: name a tag (…:VERSION) or, better, a digest (…@sha256:…)");
    };
    let step = ctx.ui.stage(&format!("pull {address}"));
    let registry = Registry::connect(address, insecure)?;
    let (index_bytes, index_digest) =
        registry.manifest_raw(&reference, &[OCI_IMAGE_INDEX_MEDIA_TYPE])?;
    let actual = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&index_bytes)));
    if reference.starts_with("sha256:") && actual != reference {
        anyhow::bail!(
            "the registry served an index whose sha256 is {actual}, not the {reference} asked for"
        );
    }
    if actual != index_digest {
        anyhow::bail!("the registry says the index is {index_digest}, its bytes hash to {actual}");
    }
    let index: OciImageIndex = serde_json::from_slice(&index_bytes)
        .context("the release index is not an OCI image index")?;
    if index.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
        anyhow::bail!(
            "{source} is not a kiln release (artifactType {:?})",
            index.artifact_type
        );
    }
    let wanted: Vec<&ImageIndexEntry> = index
        .manifests
        .iter()
        .filter(|e| {
            arch.is_none_or(|a| {
                e.platform
                    .as_ref()
                    .is_some_and(|p| p.architecture.to_string() == oci_arch(a))
            })
        })
        .collect();
    if wanted.is_empty() {
        anyhow::bail!(
            "{source} has no manifest for {}",
            arch.map_or("any platform".to_string(), |a| format!(
                "linux/{}",
                oci_arch(a)
            ))
        );
    }
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let staging = tempfile::Builder::new().prefix(".pull-").tempdir_in(dest)?;
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut release_json: Option<Vec<u8>> = None;
    for entry in wanted {
        let (bytes, _) = registry.manifest_raw(&entry.digest, &[OCI_IMAGE_MEDIA_TYPE])?;
        let got = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)));
        if got != entry.digest {
            anyhow::bail!("manifest {} arrived with sha256 {got}", entry.digest);
        }
        let manifest: OciImageManifest = serde_json::from_slice(&bytes)?;
        let config = registry.blob(&manifest.config)?;
        match &release_json {
            Some(prev) if *prev != config => {
                anyhow::bail!("the arches' manifests carry different release.json files")
            }
            _ => release_json = Some(config),
        }
        for layer in &manifest.layers {
            let name = title(layer)?;
            let part = staging.path().join(&name);
            if files.contains_key(&name) {
                // SHA256SUMS and the provenance are in every arch's manifest: same digest, same bytes.
                if sha256_file(&part)? != layer.digest.trim_start_matches("sha256:") {
                    anyhow::bail!("{name} differs between the arches' manifests");
                }
                continue;
            }
            step.message(&format!("{name} ({} KiB)", layer.size / 1024));
            registry.blob_to_file(layer, &part)?;
            files.insert(name, part);
        }
    }
    let release_json = release_json.context("no manifest")?;
    let release: ReleaseManifest = serde_json::from_slice(&release_json).context("release.json")?;
    let sums = std::fs::read_to_string(
        files
            .get("SHA256SUMS")
            .context("the release has no SHA256SUMS")?,
    )?;
    for (name, path) in &files {
        if !name.ends_with(".tar.zst") {
            continue;
        }
        let sha = sha256_file(path)?;
        if !sums.lines().any(|l| l == format!("{sha}  {name}")) {
            anyhow::bail!("{name} (sha256 {sha}) is not in the release's SHA256SUMS");
        }
        if release.artifacts.get(name).map(|r| r.sha256.as_str()) != Some(sha.as_str()) {
            anyhow::bail!("{name} (sha256 {sha}) does not match release.json");
        }
    }
    std::fs::write(staging.path().join("release.json"), &release_json)?;
    files.insert("release.json".into(), staging.path().join("release.json"));
    let mut placed = Vec::new();
    for (name, path) in files {
        let to = dest.join(&name);
        std::fs::rename(&path, &to).with_context(|| format!("placing {}", to.display()))?;
        placed.push(to);
    }
    step.done(&format!(
        "{} files into {}, verified",
        placed.len(),
        dest.display()
    ));
    Ok(placed)
}

/// A layer's file name: its title, a plain name with no directory part.
fn title(layer: &OciDescriptor) -> anyhow::Result<String> {
    let name = layer
        .annotations
        .as_ref()
        .and_then(|a| a.get(TITLE))
        .with_context(|| format!("layer {} has no {TITLE}", layer.digest))?;
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.starts_with(".pull-");
    if !plain {
        anyhow::bail!("layer title `{name}` is not a plain file name");
    }
    Ok(name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_use_goarch_names() {
        let names: Vec<_> = crate::arch::ALL.iter().map(|a| oci_arch(*a)).collect();
        assert_eq!(names, ["amd64", "arm64", "ppc64le", "s390x"]);
    }

    #[test]
    fn titles_must_be_plain_file_names() {
        let desc = |t: &str| OciDescriptor {
            annotations: Some(BTreeMap::from([(TITLE.to_string(), t.to_string())])),
            ..Default::default()
        };
        assert_eq!(title(&desc("SHA256SUMS")).unwrap(), "SHA256SUMS");
        for bad in ["", "..", "a/b", "/etc/passwd", ".pull-x"] {
            assert!(title(&desc(bad)).is_err(), "{bad}");
        }
        assert!(title(&OciDescriptor::default()).is_err());
    }
}
