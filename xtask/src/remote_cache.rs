//! The remote stage cache: a stage's outputs and stamp, shared through an OCI
//! registry under a tag derived from the stage's input key.
//!
//! One stage result is one OCI image manifest:
//! - tag `<stage>-<key>` (the full 64-hex key, so a tag never stands for two inputs);
//! - config blob: the stamp (`.<stage>.stamp`: key plus each output's sha256);
//! - one layer per output file, titled with its path in the stage directory;
//! - annotations `dev.kiln.cache.stage` and `dev.kiln.cache.key`.
//!
//! Invariant: nothing from the registry reaches the local cache unverified. A
//! pulled result is installed only when the manifest's key annotation and the
//! stamp's key equal the local key, every layer's digest equals the stamp's
//! sha256 for that file, and every pulled byte hashes to that digest. Files are
//! pulled into a staging directory, renamed into place, and the stamp is
//! written last, so an interruption leaves an untrusted leftover, never a
//! trusted half.
//!
//! Invariant: the remote cache is never needed and never fatal. Every failure
//! (registry down, credentials refused, a bad blob, a key mismatch) prints one
//! line and the stage builds locally; after the registry proves unreachable it
//! is not asked again in this run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use anyhow::Context;
use oci_client::client::{Config, ImageLayer};
use oci_client::manifest::OciImageManifest;

use crate::cache::Stamp;
use crate::hash::sha256_file;
use crate::oci::{self, Address, Registry};

/// Media type of the stamp (the manifest's config blob).
pub const STAMP_MEDIA_TYPE: &str = "application/vnd.kiln.stamp.v1+json";
/// Media type of an output file (a layer, stored as is).
pub const FILE_MEDIA_TYPE: &str = "application/vnd.kiln.file.v1";
/// The manifest's artifactType.
pub const ARTIFACT_TYPE: &str = "application/vnd.kiln.stage.v1";
pub const KEY_ANNOTATION: &str = "dev.kiln.cache.key";
pub const STAGE_ANNOTATION: &str = "dev.kiln.cache.stage";
const TITLE: &str = "org.opencontainers.image.title";

/// Where `--cache-remote` points, and whether this run may push.
pub struct RemoteCache {
    registry: Registry,
    push: bool,
    /// Set once the registry proved unreachable or refused us: later stages do not ask again.
    gone: Mutex<bool>,
    pulled: AtomicU64,
    pushed: AtomicU64,
}

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Installed into the stage directory: files and bytes pulled.
    Hit { files: usize, bytes: u64 },
    /// The registry has nothing for this key.
    Miss,
    /// The registry could not be used (already reported); build locally.
    Failed,
}

/// What a run printed about one stage's lookup or push: the words after the
/// key in [`crate::ctx::Ctx::remote_fetch`]'s and `remote_offer`'s lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Said {
    Pulled,
    Missed,
    Pushed,
}

impl Said {
    pub fn words(self) -> &'static str {
        match self {
            Said::Pulled => "pulled from",
            Said::Missed => "not on",
            Said::Pushed => "pushed to",
        }
    }
}

/// The first 16 hex digits of a key, as messages show it.
pub fn short_key(key: &str) -> &str {
    &key[..key.len().min(16)]
}

/// Whether a run's output (`output`) has the line saying `stage` was `what`
/// (for tests and benchmarks reading a run's output).
pub fn said(output: &str, stage: &str, what: Said) -> bool {
    let prefix = format!("remote cache: {stage} ");
    output.lines().any(|l| {
        l.strip_prefix(&prefix)
            .and_then(|rest| rest.split_once(' '))
            .is_some_and(|(key, rest)| {
                key.len() == 16
                    && key.bytes().all(|b| b.is_ascii_hexdigit())
                    && rest.starts_with(what.words())
            })
    })
}

impl RemoteCache {
    pub fn connect(address: &str, push: bool, insecure: bool) -> anyhow::Result<RemoteCache> {
        let address = Address::parse(address).context("--cache-remote / KILN_CACHE_REMOTE")?;
        if address.reference.is_some() {
            anyhow::bail!(
                "--cache-remote {address}: name only the repository (kiln derives each tag from a stage's input key)"
            );
        }
        Ok(RemoteCache {
            registry: Registry::connect(address, insecure)?,
            push,
            gone: Mutex::new(false),
            pulled: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
        })
    }

    pub fn address(&self) -> &Address {
        &self.registry.address
    }

    pub fn pushes(&self) -> bool {
        self.push
    }

    /// Bytes pulled and pushed so far in this run.
    pub fn traffic(&self) -> (u64, u64) {
        (
            self.pulled.load(Ordering::Relaxed),
            self.pushed.load(Ordering::Relaxed),
        )
    }

    /// The tag of one stage result.
    pub fn tag(stage: &str, key: &str) -> String {
        format!("{stage}-{key}")
    }

    /// Looks `key` up and, on a verified hit, installs the result into `dir`.
    /// Never fails: a problem is reported through `warn` and gives [`Lookup::Failed`].
    pub fn fetch(&self, dir: &Path, stage: &str, key: &str, warn: &dyn Fn(&str)) -> Lookup {
        if *self.gone.lock().unwrap_or_else(|e| e.into_inner()) {
            return Lookup::Failed;
        }
        match self.try_fetch(dir, stage, key) {
            Ok(found) => found,
            Err(e) => {
                self.note_failure(&e);
                warn(&format!(
                    "warning: remote cache: {stage} {}: {e:#}; building it locally",
                    short_key(key)
                ));
                Lookup::Failed
            }
        }
    }

    /// Pushes the stage result in `dir` (its stamp must be fresh for `key`)
    /// unless pushing is off or the registry already has it. Never fails.
    pub fn offer(&self, dir: &Path, stage: &str, key: &str, warn: &dyn Fn(&str)) -> bool {
        if !self.push || *self.gone.lock().unwrap_or_else(|e| e.into_inner()) {
            return false;
        }
        match self.try_offer(dir, stage, key) {
            Ok(pushed) => pushed,
            Err(e) => {
                self.note_failure(&e);
                warn(&format!(
                    "warning: remote cache: pushing {stage} {}: {e:#}; the local build is unaffected",
                    short_key(key)
                ));
                false
            }
        }
    }

    fn note_failure(&self, e: &anyhow::Error) {
        if oci::hopeless(e) {
            *self.gone.lock().unwrap_or_else(|e| e.into_inner()) = true;
        }
    }

    fn try_fetch(&self, dir: &Path, stage: &str, key: &str) -> anyhow::Result<Lookup> {
        let tag = Self::tag(stage, key);
        let Some(found) = self.registry.manifest(&tag)? else {
            return Ok(Lookup::Miss);
        };
        let m = &found.manifest;
        let notes = m.annotations.clone().unwrap_or_default();
        let their_key = notes
            .get(KEY_ANNOTATION)
            .map(String::as_str)
            .unwrap_or("none");
        if their_key != key || notes.get(STAGE_ANNOTATION).map(String::as_str) != Some(stage) {
            anyhow::bail!(
                "the registry's {tag} records key {their_key} for stage {}, not this build's; ignored",
                notes.get(STAGE_ANNOTATION).map_or("none", String::as_str)
            );
        }
        if m.config.media_type != STAMP_MEDIA_TYPE {
            anyhow::bail!(
                "{tag} is not a kiln stage result (config type {})",
                m.config.media_type
            );
        }
        let stamp: Stamp = serde_json::from_slice(&self.registry.blob(&m.config)?)
            .with_context(|| format!("{tag}: its stamp is not valid JSON"))?;
        if stamp.key != key {
            anyhow::bail!(
                "{tag}: its stamp records key {}, not this build's",
                stamp.key
            );
        }
        let plan = plan_layers(m, &stamp)?;

        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let staging = tempfile::Builder::new()
            .prefix(".remote-")
            .tempdir_in(dir)
            .with_context(|| format!("making a staging directory in {}", dir.display()))?;
        let mut bytes = 0;
        for (i, (name, desc)) in plan.iter().enumerate() {
            let part = staging.path().join(i.to_string());
            self.registry.blob_to_file(desc, &part)?;
            // oci-client checked the digest while streaming; check the file as written.
            let sha = sha256_file(&part)?;
            if sha != stamp.outputs[*name] {
                anyhow::bail!(
                    "{tag}: {name} arrived with sha256 {sha}, the stamp says {}",
                    stamp.outputs[*name]
                );
            }
            bytes += std::fs::metadata(&part)?.len();
        }
        Stamp::invalidate(dir, stage);
        // Output subdirectories (a kernel's modules/) are replaced whole, so no
        // file from an older result stays beside the pulled ones.
        let subdirs: BTreeSet<&str> = plan
            .iter()
            .filter_map(|(name, _)| name.split_once('/').map(|(top, _)| top))
            .collect();
        for sub in subdirs {
            let _ = std::fs::remove_dir_all(dir.join(sub));
        }
        for (i, (name, _)) in plan.iter().enumerate() {
            let dest = dir.join(name);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(staging.path().join(i.to_string()), &dest)
                .with_context(|| format!("placing {}", dest.display()))?;
        }
        Stamp::install(dir, stage, &stamp)?;
        self.pulled.fetch_add(bytes, Ordering::Relaxed);
        Ok(Lookup::Hit {
            files: plan.len(),
            bytes,
        })
    }

    fn try_offer(&self, dir: &Path, stage: &str, key: &str) -> anyhow::Result<bool> {
        let tag = Self::tag(stage, key);
        let stamp = Stamp::fresh(dir, stage, key)
            .with_context(|| format!("{} holds no fresh {stage} result", dir.display()))?;
        if self.published(&tag, key)? {
            return Ok(false); // already there (pushed by us or another machine)
        }
        let (layers, config, manifest) = artifact(dir, stage, &stamp)?;
        let total: u64 = layers.iter().map(|l| l.data.len() as u64).sum();
        // Two machines uploading one blob at the same moment can make the
        // registry refuse a manifest that names it (distribution answers
        // BLOB_UNKNOWN / DIGEST_INVALID while the other upload commits; seen
        // in the concurrent-push test). Pushes are content-addressed and
        // idempotent: if the other push has landed we are done, else push again.
        let mut attempt = 0;
        loop {
            match self
                .registry
                .push(&tag, &layers, config.clone(), manifest.clone())
            {
                Ok(_) => break,
                Err(e) if attempt < PUSH_ATTEMPTS && !oci::hopeless(&e) => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(250 * attempt));
                    if self.published(&tag, key)? {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.pushed.fetch_add(total, Ordering::Relaxed);
        Ok(true)
    }

    /// The registry already has `key`'s result under `tag`.
    fn published(&self, tag: &str, key: &str) -> anyhow::Result<bool> {
        Ok(self.registry.manifest(tag)?.is_some_and(|found| {
            let notes = found.manifest.annotations.unwrap_or_default();
            notes.get(KEY_ANNOTATION).map(String::as_str) == Some(key)
        }))
    }
}

/// Retries of one push that lost a race with another machine's push of the same blobs.
const PUSH_ATTEMPTS: u64 = 3;

/// Checks a manifest's layers against the stamp: each is titled with a plain
/// relative path the stamp lists, carries that file's sha256 as its digest,
/// and every output is present exactly once. Returns (name, layer) pairs.
fn plan_layers<'a>(
    m: &'a OciImageManifest,
    stamp: &'a Stamp,
) -> anyhow::Result<Vec<(&'a str, &'a oci_client::manifest::OciDescriptor)>> {
    let mut plan = Vec::new();
    let mut seen = BTreeSet::new();
    for layer in &m.layers {
        let name = layer
            .annotations
            .as_ref()
            .and_then(|a| a.get(TITLE))
            .with_context(|| format!("layer {} has no {TITLE}", layer.digest))?;
        if !safe_relative(name) {
            anyhow::bail!("layer title `{name}` is not a plain relative path");
        }
        let Some((stamp_name, sha)) = stamp.outputs.get_key_value(name.as_str()) else {
            anyhow::bail!("layer `{name}` is not an output the stamp lists");
        };
        if layer.digest != format!("sha256:{sha}") {
            anyhow::bail!(
                "layer `{name}` has digest {}, the stamp says sha256:{sha}",
                layer.digest
            );
        }
        if !seen.insert(stamp_name.as_str()) {
            anyhow::bail!("layer `{name}` appears twice");
        }
        plan.push((stamp_name.as_str(), layer));
    }
    if let Some(missing) = stamp.outputs.keys().find(|k| !seen.contains(k.as_str())) {
        anyhow::bail!("the stamp lists `{missing}` but no layer carries it");
    }
    Ok(plan)
}

/// Only `a/b/c`: no root, no `.`/`..`, nothing that could leave the stage directory.
fn safe_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\\')
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// The OCI form of one stage result in `dir`: layers, config and manifest.
pub fn artifact(
    dir: &Path,
    stage: &str,
    stamp: &Stamp,
) -> anyhow::Result<(Vec<ImageLayer>, Config, OciImageManifest)> {
    let mut layers = Vec::new();
    for name in stamp.outputs.keys() {
        let data = std::fs::read(dir.join(name))
            .with_context(|| format!("reading {}", dir.join(name).display()))?;
        layers.push(ImageLayer::new(
            data,
            FILE_MEDIA_TYPE.to_string(),
            Some(BTreeMap::from([(TITLE.to_string(), name.clone())])),
        ));
    }
    let config = Config::new(
        serde_json::to_vec(stamp)?,
        STAMP_MEDIA_TYPE.to_string(),
        None,
    );
    let mut manifest = OciImageManifest::build(
        &layers,
        &config,
        Some(BTreeMap::from([
            (KEY_ANNOTATION.to_string(), stamp.key.clone()),
            (STAGE_ANNOTATION.to_string(), stage.to_string()),
        ])),
    );
    manifest.artifact_type = Some(ARTIFACT_TYPE.to_string());
    Ok((layers, config, manifest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::write_atomic;

    #[test]
    fn said_reads_only_the_line_for_that_stage_and_event() {
        let out = "remote cache: kernel 0123456789abcdef pulled from oci://r/k (3 files, 9 KiB, verified)\n\
                   remote cache: initrd fedcba9876543210 not on oci://r/k; building it here\n\
                   warning: remote cache: disk 0011223344556677: refused; building it locally\n";
        assert!(said(out, "kernel", Said::Pulled));
        assert!(!said(out, "kernel", Said::Missed));
        assert!(said(out, "initrd", Said::Missed));
        assert!(!said(out, "initrd", Said::Pulled));
        assert!(!said(out, "disk", Said::Pulled) && !said(out, "disk", Said::Missed));
        assert!(!said(out, "agent", Said::Pushed));
    }

    fn stage_dir() -> (tempfile::TempDir, Stamp) {
        let d = tempfile::tempdir().unwrap();
        write_atomic(&d.path().join("bzImage"), b"kernel bytes").unwrap();
        write_atomic(&d.path().join("modules/kernel/a.ko"), b"module").unwrap();
        let stamp = Stamp::record(
            d.path(),
            "kernel",
            &"ab".repeat(32),
            &["bzImage", "modules/kernel/a.ko"],
        )
        .unwrap();
        (d, stamp)
    }

    #[test]
    fn a_result_becomes_a_manifest_the_stamp_vouches_for() {
        let (d, stamp) = stage_dir();
        let (layers, config, m) = artifact(d.path(), "kernel", &stamp).unwrap();
        assert_eq!(layers.len(), 2);
        assert_eq!(m.artifact_type.as_deref(), Some(ARTIFACT_TYPE));
        assert_eq!(m.annotations.as_ref().unwrap()[KEY_ANNOTATION], stamp.key);
        assert_eq!(m.config.media_type, STAMP_MEDIA_TYPE);
        let back: Stamp = serde_json::from_slice(&config.data).unwrap();
        assert_eq!(back, stamp);
        let plan = plan_layers(&m, &stamp).unwrap();
        assert_eq!(
            plan.iter().map(|p| p.0).collect::<Vec<_>>(),
            ["bzImage", "modules/kernel/a.ko"]
        );
        // Same input, same manifest: concurrent pushes write identical bytes.
        let (_, _, again) = artifact(d.path(), "kernel", &stamp).unwrap();
        assert_eq!(
            serde_json::to_vec(&m).unwrap(),
            serde_json::to_vec(&again).unwrap()
        );
    }

    #[test]
    fn layers_that_disagree_with_the_stamp_are_refused() {
        let (d, stamp) = stage_dir();
        let (_, _, m) = artifact(d.path(), "kernel", &stamp).unwrap();
        type Change = Box<dyn Fn(&mut OciImageManifest)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "not a plain relative path",
                Box::new(|m| {
                    m.layers[0]
                        .annotations
                        .as_mut()
                        .unwrap()
                        .insert(TITLE.into(), "../../etc/passwd".into());
                }),
            ),
            (
                "not an output the stamp lists",
                Box::new(|m| {
                    m.layers[0]
                        .annotations
                        .as_mut()
                        .unwrap()
                        .insert(TITLE.into(), "other".into());
                }),
            ),
            (
                "has digest",
                Box::new(|m| m.layers[0].digest = format!("sha256:{}", "00".repeat(32))),
            ),
            (
                "no layer carries it",
                Box::new(|m| {
                    m.layers.pop();
                }),
            ),
            (
                "appears twice",
                Box::new(|m| {
                    let l = m.layers[0].clone();
                    m.layers.push(l);
                }),
            ),
            ("has no", Box::new(|m| m.layers[1].annotations = None)),
        ];
        for (says, change) in cases {
            let mut bad = m.clone();
            change(&mut bad);
            let e = plan_layers(&bad, &stamp).unwrap_err().to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
    }

    #[test]
    fn only_plain_relative_titles_pass() {
        assert!(safe_relative("modules/kernel/a.ko"));
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./a", "a\\b"] {
            assert!(!safe_relative(bad), "{bad}");
        }
    }

    #[test]
    fn tags_are_valid_for_every_stage() {
        for stage in ["kernel", "bootstrap", "agent", "initrd", "disk"] {
            assert!(oci::valid_tag(&RemoteCache::tag(stage, &"f".repeat(64))));
        }
    }
}
