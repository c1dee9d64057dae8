//! The release's provenance: `provenance.intoto.json` in dist/, an in-toto
//! Statement (v1) with a SLSA v1 provenance predicate. Its subjects are every
//! other file in dist/ with its sha256; its resolved dependencies are every
//! input kiln hashed for the release: the git commit, Cargo.lock, and each
//! image's input hashes per arch (stage keys, recipes, the kernel source and
//! the Debian base identity, as manifest.json records them).
//!
//! Invariant: no time and no host path in it (the build's only clock is
//! `SOURCE_DATE_EPOCH`, an internal parameter), so `--verify-reproducible`
//! compares it like every other dist file.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::stage::release::ReleaseManifest;

pub const FILE: &str = "provenance.intoto.json";

/// Where the statement says kiln's releases are defined.
const BUILD_TYPE: &str = "https://kiln.invalid/provenance/release/v1";
const BUILDER: &str = "https://kiln.invalid/builder/cargo-xtask-release";

/// The statement for `release`, whose dist files are `subjects` (name →
/// sha256) and whose Cargo.lock hashes to `cargo_lock_sha256`. Pure.
pub fn statement(
    release: &ReleaseManifest,
    arches: &[&str],
    subjects: &BTreeMap<String, String>,
    cargo_lock_sha256: &str,
) -> Value {
    let subject: Vec<Value> = subjects
        .iter()
        .map(|(name, sha)| json!({"name": name, "digest": {"sha256": sha}}))
        .collect();
    let mut deps = vec![
        json!({"uri": "git+kiln", "digest": {"gitCommit": release.git_commit}}),
        json!({"name": "Cargo.lock", "digest": {"sha256": cargo_lock_sha256}}),
    ];
    for (image_arch, inputs) in &release.inputs {
        for (input, hash) in inputs {
            deps.push(json!({
                "name": format!("{image_arch}/{input}"),
                "digest": {"sha256": hash},
            }));
        }
    }
    json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": subject,
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "version": release.version,
                    "arches": arches,
                },
                "internalParameters": {
                    "source_date_epoch": release.source_date_epoch,
                },
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": BUILDER},
            },
        },
    })
}

/// The release's dist files (its tarballs, SHA256SUMS, release.json) with
/// their sha256: what the statement is about. Not a directory listing, as
/// dist/ may still hold other versions' or arches' tarballs.
pub fn release_subjects(
    release: &ReleaseManifest,
    dist: &Path,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out: BTreeMap<String, String> = release
        .artifacts
        .iter()
        .map(|(name, rec)| (name.clone(), rec.sha256.clone()))
        .collect();
    for name in ["SHA256SUMS", "release.json"] {
        out.insert(
            name.to_string(),
            crate::hash::sha256_file(&dist.join(name))?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_lists_subjects_and_every_input() {
        let release = ReleaseManifest {
            version: "0.1.0".into(),
            git_commit: "abc".into(),
            source_date_epoch: 7,
            inputs: BTreeMap::from([(
                "minimal/x86_64".to_string(),
                BTreeMap::from([
                    ("kernel".to_string(), "k1".to_string()),
                    ("kernel_source".to_string(), "s1".to_string()),
                ]),
            )]),
            artifacts: BTreeMap::new(),
        };
        let subjects = BTreeMap::from([
            ("SHA256SUMS".to_string(), "aa".to_string()),
            ("kiln-0.1.0-x86_64.tar.zst".to_string(), "bb".to_string()),
        ]);
        let s = statement(&release, &["x86_64"], &subjects, "ll");
        assert_eq!(s, statement(&release, &["x86_64"], &subjects, "ll"));
        assert_eq!(s["_type"], "https://in-toto.io/Statement/v1");
        assert_eq!(s["predicateType"], "https://slsa.dev/provenance/v1");
        assert_eq!(s["subject"][1]["name"], "kiln-0.1.0-x86_64.tar.zst");
        assert_eq!(s["subject"][1]["digest"]["sha256"], "bb");
        let deps = s["predicate"]["buildDefinition"]["resolvedDependencies"]
            .as_array()
            .unwrap();
        let names: Vec<&str> = deps.iter().filter_map(|d| d["name"].as_str()).collect();
        assert_eq!(
            names,
            [
                "Cargo.lock",
                "minimal/x86_64/kernel",
                "minimal/x86_64/kernel_source"
            ]
        );
        assert_eq!(deps[0]["digest"]["gitCommit"], "abc");
        assert_eq!(
            s["predicate"]["buildDefinition"]["internalParameters"]["source_date_epoch"],
            7
        );
    }

    #[test]
    fn subjects_are_the_release_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("SHA256SUMS"), "x").unwrap();
        std::fs::write(d.path().join("release.json"), "x").unwrap();
        std::fs::write(d.path().join("kiln-0.0.9-x86_64.tar.zst"), "old").unwrap();
        let release = ReleaseManifest {
            version: "0.1.0".into(),
            git_commit: "abc".into(),
            source_date_epoch: 7,
            inputs: BTreeMap::new(),
            artifacts: BTreeMap::from([(
                "kiln-0.1.0-x86_64.tar.zst".to_string(),
                kiln_manifest::ArtifactRecord {
                    file: "kiln-0.1.0-x86_64.tar.zst".into(),
                    size: 1,
                    sha256: "bb".into(),
                },
            )]),
        };
        let s = release_subjects(&release, d.path()).unwrap();
        assert_eq!(
            s.keys().collect::<Vec<_>>(),
            ["SHA256SUMS", "kiln-0.1.0-x86_64.tar.zst", "release.json"]
        );
        let x = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";
        assert_eq!(
            (s["SHA256SUMS"].as_str(), s["release.json"].as_str()),
            (x, x)
        );
    }
}
