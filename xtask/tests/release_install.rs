//! What a packager gets: `cargo xtask release --arch x86_64 --sign-key K`
//! writes a tarball whose SHA256SUMS, release.json, provenance and the
//! signatures of the first and the last (`ssh-keygen -Y verify`) hold, whose entries are an FHS
//! tree under usr/ with root owners, fixed modes and SOURCE_DATE_EPOCH
//! mtimes; `cargo xtask install --destdir` puts the very same tree into a
//! staging root; and the installed kiln-shim boots the installed image with
//! no flags at all (paths relative to its own executable). `release --push`
//! publishes it to a real registry and `pull` brings back every byte, and
//! refuses a tampered blob.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn xtask(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("--no-setup")
        .args(args)
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo xtask {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))
}

/// Every file under `dir`, relative path → (mode, bytes' sha256).
fn tree(dir: &Path) -> BTreeMap<String, (u32, String)> {
    use std::os::unix::fs::PermissionsExt;
    let mut m = BTreeMap::new();
    for e in walkdir::WalkDir::new(dir) {
        let e = e.unwrap();
        if e.file_type().is_file() {
            let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
            let mode = e.metadata().unwrap().permissions().mode() & 0o7777;
            m.insert(rel, (mode, sha256(&std::fs::read(e.path()).unwrap())));
        }
    }
    m
}

/// `ssh-keygen -Y verify` accepts SHA256SUMS.sig and the statement's
/// signature for the packager's key, and refuses them for a changed file.
fn signatures_verify(dist: &Path, public: &Path, scratch: &Path) {
    let allowed = scratch.join("allowed_signers");
    let pubkey = std::fs::read_to_string(public).unwrap();
    std::fs::write(
        &allowed,
        format!("packager namespaces=\"kiln-release\" {pubkey}"),
    )
    .unwrap();
    let verify = |data: &[u8], sig: &Path| {
        let mut child = Command::new("ssh-keygen")
            .args(["-Y", "verify", "-I", "packager", "-n", "kiln-release", "-f"])
            .arg(&allowed)
            .arg("-s")
            .arg(sig)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(data).unwrap();
        child.wait().unwrap().success()
    };
    for name in ["SHA256SUMS", "provenance.intoto.json"] {
        let data = std::fs::read(dist.join(name)).unwrap();
        let sig = dist.join(format!("{name}.sig"));
        assert!(verify(&data, &sig), "{name}.sig verifies");
        let mut changed = data.clone();
        changed.extend_from_slice(b"\n");
        assert!(
            !verify(&changed, &sig),
            "{name}.sig refuses a changed {name}"
        );
    }
}

/// `cargo xtask pull REF@sha256:… --dest D` gives back dist/'s files byte for
/// byte; after one stored byte of the tarball is changed, the pull fails and
/// leaves no tarball in its destination.
fn pull_round_trips(said: &str, dist: &Path, registry: &xtask::local_registry::LocalRegistry) {
    let pinned = said
        .lines()
        .find_map(|l| l.split("cargo xtask pull ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("release --push printed no pull reference:\n{said}"))
        .to_string();
    assert!(pinned.contains("@sha256:"), "{pinned}");
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path().to_str().unwrap();
    xtask(&["--insecure-registry", "pull", &pinned, "--dest", d]);
    let mut names: Vec<String> = std::fs::read_dir(dest.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let version = env!("CARGO_PKG_VERSION");
    let tarball = format!("kiln-{version}-x86_64.tar.zst");
    for must in [
        tarball.as_str(),
        "SHA256SUMS",
        "SHA256SUMS.sig",
        "release.json",
        "provenance.intoto.json",
    ] {
        assert!(
            names.iter().any(|n| n == must),
            "pulled {names:?}, not {must}"
        );
    }
    for n in &names {
        let (a, b) = (
            std::fs::read(dest.path().join(n)).unwrap(),
            std::fs::read(dist.join(n)).unwrap(),
        );
        assert!(a == b, "pulled {n} differs from dist/{n}");
    }

    // One changed byte in the registry's copy of the tarball.
    let sha = sha256(&std::fs::read(dist.join(&tarball)).unwrap());
    let blob = registry.blob_path(&sha);
    kiln_testsupport::tamper::flip_byte(&blob, 4096, 1).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "--no-setup",
            "--insecure-registry",
            "pull",
            &pinned,
            "--dest",
        ])
        .arg(dest.path())
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a tampered tarball was accepted");
    assert!(err.contains("sha256") || err.contains("digest"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dest.path()).unwrap().collect();
    assert!(left.is_empty(), "a failed pull left {left:?}");
}

#[test]
#[ignore = "builds a release and boots it; run by `cargo xtask test`"]
fn release_tarball_and_destdir_install_give_one_bootable_tree() {
    // The packager's signing key (OpenSSH, as `ssh-keygen -Y sign` takes).
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("packager");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "packager", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success(), "ssh-keygen -t ed25519");
    let registry = xtask::local_registry::LocalRegistry::start(None).unwrap();
    let push_to = format!("{}:{}", registry.url_for("kiln"), env!("CARGO_PKG_VERSION"));
    let said = xtask(&[
        "--insecure-registry",
        "release",
        "--arch",
        "x86_64",
        "--sign-key",
        key.to_str().unwrap(),
        "--push",
        &push_to,
    ]);
    let dist = root().join("target/kiln/dist");
    signatures_verify(&dist, &key.with_extension("pub"), keys.path());
    pull_round_trips(&said, &dist, &registry);
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("kiln-{version}-x86_64.tar.zst");
    let bytes = std::fs::read(dist.join(&name)).unwrap();

    let sums = std::fs::read_to_string(dist.join("SHA256SUMS")).unwrap();
    assert!(
        sums.lines()
            .any(|l| l == format!("{}  {name}", sha256(&bytes))),
        "SHA256SUMS covers {name}:\n{sums}"
    );
    let release: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dist.join("release.json")).unwrap()).unwrap();
    assert_eq!(release["version"], version);
    assert_eq!(release["artifacts"][&name]["sha256"], sha256(&bytes));
    let epoch = release["source_date_epoch"].as_u64().unwrap();

    // The provenance statement names every file of the release with its
    // digest, and the inputs (commit, kernel source, Debian base) behind it.
    let prov: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dist.join("provenance.intoto.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(prov["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(prov["predicateType"], "https://slsa.dev/provenance/v1");
    let subjects: BTreeMap<String, String> = prov["subject"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let name = s["name"].as_str().unwrap().to_string();
            (name, s["digest"]["sha256"].as_str().unwrap().to_string())
        })
        .collect();
    for file in [name.as_str(), "SHA256SUMS", "release.json"] {
        let bytes = std::fs::read(dist.join(file)).unwrap();
        assert_eq!(
            subjects.get(file),
            Some(&sha256(&bytes)),
            "provenance subject {file}"
        );
    }
    let deps = prov["predicate"]["buildDefinition"]["resolvedDependencies"].to_string();
    for input in [
        "minimal/x86_64/kernel_source",
        "debian/x86_64/debian_base",
        "Cargo.lock",
        "gitCommit",
    ] {
        assert!(deps.contains(input), "provenance lists {input}: {deps}");
    }

    // Unpack as a packager's tooling would, checking every header on the way.
    let unpacked = tempfile::tempdir().unwrap();
    let mut archive = tar::Archive::new(zstd::Decoder::new(&bytes[..]).unwrap());
    let mut from_tar = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        let h = entry.header();
        assert!(path.starts_with("usr/"), "{path} is under usr/");
        assert_eq!(
            (h.uid().unwrap(), h.gid().unwrap()),
            (0, 0),
            "{path} owned by root"
        );
        assert_eq!(h.mtime().unwrap(), epoch, "{path} dated SOURCE_DATE_EPOCH");
        let mode = h.mode().unwrap();
        if h.entry_type().is_file() {
            assert!(mode == 0o644 || mode == 0o755, "{path}: mode {mode:o}");
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            from_tar.insert(path.clone(), (mode, sha256(&data)));
            let dest = unpacked.path().join(&path);
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::write(dest, data).unwrap();
        }
    }
    for must in [
        "usr/bin/kiln-shim",
        "usr/share/kiln/configuration.toml",
        "usr/share/doc/kiln/README.md",
        "usr/share/kiln/minimal/manifest.json",
        "usr/share/kiln/debian/manifest.json",
        "usr/share/kiln/minimal/sbom.spdx.json",
        "usr/share/kiln/debian/sbom.spdx.json",
    ] {
        assert!(from_tar.contains_key(must), "{must} in the tarball");
    }
    // Each image's files are the ones its manifest lists, with those hashes.
    for image in ["minimal", "minimal-erofs", "debian"] {
        let dir = format!("usr/share/kiln/{image}");
        let manifest: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(unpacked.path().join(&dir).join("manifest.json")).unwrap(),
        )
        .unwrap();
        for (role, art) in manifest["artifacts"].as_object().unwrap() {
            let file = format!("{dir}/{}", art["file"].as_str().unwrap());
            let (_, sha) = from_tar
                .get(&file)
                .unwrap_or_else(|| panic!("{image}'s {role} ({file}) is in the tarball"));
            assert_eq!(art["sha256"].as_str().unwrap(), sha, "{file}");
        }
    }

    // `install --destdir` gives the same files, modes and bytes.
    let destdir = tempfile::tempdir().unwrap();
    let d = destdir.path().display().to_string();
    xtask(&[
        "install",
        "--destdir",
        &d,
        "--prefix",
        "/usr",
        "--arch",
        "x86_64",
    ]);
    assert_eq!(
        tree(destdir.path()),
        from_tar,
        "install --destdir == the tarball's tree"
    );

    // The installed shim finds the installed minimal image and its config itself.
    let out = Command::new(destdir.path().join("usr/bin/kiln-shim"))
        .args(["boot", "--json"])
        .env("KILN_RUN_DIR", destdir.path().join("run"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "installed kiln-shim boot:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("installed boot: {answer}");
    assert_eq!(answer["image"], "minimal", "{answer}");
    assert_eq!(answer["agent_version"], version, "{answer}");
}
