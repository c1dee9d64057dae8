//! `cargo xtask release`: every image flavour for every arch, plus kiln-shim,
//! packed into one reproducible `kiln-<version>-<arch>.tar.zst` per arch under
//! `target/kiln/dist/`, with `SHA256SUMS` and `release.json`.
//!
//! Tarball layout (FHS, relative to `/`):
//!   usr/bin/kiln-shim
//!   usr/share/kiln/configuration.toml        default shim configuration
//!   usr/share/kiln/<image>/manifest.json     and the artifacts it lists
//!   usr/share/kiln/<image>/sbom.spdx.json    the image's SBOM (SPDX 2.3)
//!   usr/share/doc/kiln/README.md
//!
//! Beside the tarballs: `SHA256SUMS`, `release.json` and
//! `provenance.intoto.json` (see [`provenance`]).
//!
//! Invariant: a tarball's bytes depend only on its inputs: entries sorted,
//! owner 0:0, mode 0755/0644, mtime SOURCE_DATE_EPOCH, zstd single-threaded.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::arch::{Arch, ArchSel};
use crate::cache::write_atomic;
use crate::cmd;
use crate::ctx::Ctx;
use crate::hash::sha256_file;
use kiln_manifest::Manifest;

use crate::image_spec::ImageSpec;
use crate::stage::{image, provenance, sbom};

pub const DIST: &str = "dist";
const SHIM: &str = "kiln-shim";
/// zstd level of release tarballs.
const TAR_ZSTD_LEVEL: i32 = 19;

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct ReleaseManifest {
    pub version: String,
    pub git_commit: String,
    pub source_date_epoch: u64,
    /// "<image>/<arch>" → that image's input hashes.
    pub inputs: BTreeMap<String, BTreeMap<String, String>>,
    /// Tarball file name → record.
    pub artifacts: BTreeMap<String, kiln_manifest::ArtifactRecord>,
}

/// One file to put into a tarball.
struct Member {
    /// Path inside the tarball, e.g. `usr/bin/kiln-shim`.
    path: String,
    source: Source,
    executable: bool,
}

/// Where a member's bytes come from: a built file, or text kiln carries
/// (so nothing scratch is written beside the tarballs in dist/).
enum Source {
    File(PathBuf),
    Text(&'static str),
}

pub fn run(ctx: &Ctx, sel: ArchSel, sign_key: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(key) = sign_key.filter(|k| !k.is_file()) {
        anyhow::bail!(
            "--sign-key {}: no such file (give an OpenSSH private key, e.g. from `ssh-keygen -t ed25519`)",
            key.display()
        );
    }
    let dist = ctx.out.join(DIST);
    let arches = sel.arches();
    let images = all_images(ctx)?;
    let version = env!("CARGO_PKG_VERSION").to_string();
    let mut release = ReleaseManifest {
        version: version.clone(),
        git_commit: git_commit(ctx),
        source_date_epoch: ctx.source_date_epoch,
        inputs: BTreeMap::new(),
        artifacts: BTreeMap::new(),
    };
    std::fs::create_dir_all(&dist)?;
    for arch in &arches {
        ctx.ensure_setup(&[*arch])?;
        let mut members = Vec::new();
        for img in images.iter().filter(|i| i.arches.contains(arch)) {
            let manifest_path = image::build(ctx, img, *arch, None)?;
            let built: Manifest = serde_json::from_str(&std::fs::read_to_string(&manifest_path)?)?;
            let dir = manifest_path.parent().context("manifest has a directory")?;
            let prefix = format!("usr/share/kiln/{}", img.name);
            members.push(Member {
                path: format!("{prefix}/{}", image::MANIFEST),
                source: Source::File(manifest_path.clone()),
                executable: false,
            });
            members.push(Member {
                path: format!("{prefix}/{}", sbom::FILE),
                source: Source::File(dir.join(sbom::FILE)),
                executable: false,
            });
            for art in built.artifacts.values() {
                members.push(Member {
                    path: format!("{prefix}/{}", art.file),
                    source: Source::File(dir.join(&art.file)),
                    executable: art.file == "kiln-agent",
                });
            }
            release
                .inputs
                .insert(format!("{}/{arch}", img.name), built.inputs.clone());
        }
        let shim = build_shim(ctx, *arch)?;
        members.push(Member {
            path: format!("usr/bin/{SHIM}"),
            source: Source::File(shim),
            executable: true,
        });
        members.push(Member {
            path: "usr/share/kiln/configuration.toml".into(),
            source: Source::Text(default_shim_config()),
            executable: false,
        });
        members.push(Member {
            path: "usr/share/doc/kiln/README.md".into(),
            source: Source::File(ctx.root.join("README.md")),
            executable: false,
        });

        let name = format!("kiln-{version}-{arch}.tar.zst");
        let step = ctx.ui.stage(&format!("release {arch}"));
        let path = dist.join(&name);
        write_tarball(&path, &mut members, ctx.source_date_epoch)?;
        let rec = crate::hash::artifact_record(&dist, &name)?;
        step.done(&format!("{name}, {} KiB", rec.size / 1024));
        release.artifacts.insert(name, rec);
    }
    // SHA256SUMS and release.json cover every tarball present for this version.
    let mut sums = String::new();
    for (name, rec) in &release.artifacts {
        sums.push_str(&format!("{}  {name}\n", rec.sha256));
    }
    write_atomic(&dist.join("SHA256SUMS"), sums.as_bytes())?;
    let mut json = serde_json::to_string_pretty(&release)?;
    json.push('\n');
    write_atomic(&dist.join("release.json"), json.as_bytes())?;
    let subjects = provenance::release_subjects(&release, &dist)?;
    let arch_names: Vec<&str> = arches.iter().map(|a| a.name()).collect();
    let cargo_lock = crate::hash::sha256_file(&ctx.root.join("Cargo.lock"))?;
    let statement = provenance::statement(&release, &arch_names, &subjects, &cargo_lock);
    let mut text = serde_json::to_string_pretty(&statement)?;
    text.push('\n');
    write_atomic(&dist.join(provenance::FILE), text.as_bytes())?;
    for name in ["SHA256SUMS", "release.json", provenance::FILE] {
        world_readable(&dist.join(name))?;
    }
    sign(ctx, &dist, &["SHA256SUMS", provenance::FILE], sign_key)?;
    ctx.ui
        .println(&format!("release written to {}", ctx.rel(&dist).display()));
    Ok(dist)
}

/// The namespace of kiln's release signatures (`ssh-keygen -Y verify -n`).
pub const SIGNATURE_NAMESPACE: &str = "kiln-release";

/// Signs each of `names` in `dist` with the packager's OpenSSH key into
/// `<name>.sig` (made beside a copy in a temp dir, then renamed in: ssh-keygen
/// would ask before overwriting). Without a key, removes stale signatures,
/// which would no longer match.
fn sign(ctx: &Ctx, dist: &Path, names: &[&str], key: Option<&Path>) -> anyhow::Result<()> {
    for name in names {
        let sig = dist.join(format!("{name}.sig"));
        let Some(key) = key else {
            match std::fs::remove_file(&sig) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => continue,
            }
        };
        let tmp = tempfile::tempdir_in(dist)?;
        let copy = tmp.path().join(name);
        std::fs::copy(dist.join(name), &copy)?;
        cmd::run_logged(
            ctx,
            "release",
            "ssh-keygen -Y sign",
            duct::cmd!(
                "ssh-keygen",
                "-Y",
                "sign",
                "-f",
                key,
                "-n",
                SIGNATURE_NAMESPACE,
                &copy
            )
            .stdin_null(),
        )
        .with_context(|| {
            format!(
                "signing {name} with {} (an OpenSSH private key without a passphrase; \
                 ssh-keygen comes with openssh-client)",
                key.display()
            )
        })?;
        std::fs::rename(tmp.path().join(format!("{name}.sig")), &sig)?;
        world_readable(&sig)?;
    }
    Ok(())
}

/// Every image manifest in image-manifests/, sorted by name.
pub fn all_images(ctx: &Ctx) -> anyhow::Result<Vec<ImageSpec>> {
    let mut names: Vec<String> = std::fs::read_dir(ctx.root.join("image-manifests"))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".toml"))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names.iter().map(|n| ImageSpec::load(ctx, n)).collect()
}

/// kiln-shim for `arch`, static like the agent (same targets), so one binary
/// runs on any distribution of that arch.
pub fn build_shim(ctx: &Ctx, arch: Arch) -> anyhow::Result<PathBuf> {
    let step = ctx.ui.stage(&format!("kiln-shim {arch}"));
    let mut args = vec![
        "build",
        "--release",
        "--locked",
        "--package",
        "kiln-shim",
        "--target",
        arch.rust_target(),
    ];
    if ctx.offline {
        args.push("--offline");
    }
    cmd::run_logged(
        ctx,
        &format!("shim-{arch}"),
        "cargo build of kiln-shim",
        duct::cmd("cargo", &args).dir(&ctx.root).env(
            "CARGO_ENCODED_RUSTFLAGS",
            crate::stage::agent::rustflags(ctx),
        ),
    )?;
    let bin = ctx
        .root
        .join("target")
        .join(arch.rust_target())
        .join("release")
        .join(SHIM);
    crate::elf::require_static(
        &format!("kiln-shim for {arch}"),
        &std::fs::read(&bin)?,
        arch,
    )?;
    step.done(&format!(
        "{} KiB, static",
        std::fs::metadata(&bin)?.len() / 1024
    ));
    Ok(bin)
}

/// The configuration a package installs (host-shim/configuration.toml).
pub fn default_shim_config() -> &'static str {
    include_str!("../../../host-shim/configuration.toml")
}

/// Writes a reproducible tar.zst: sorted members, parent directories
/// included, owner root, fixed modes and mtime.
fn write_tarball(dest: &Path, members: &mut [Member], mtime: u64) -> anyhow::Result<()> {
    members.sort_by(|a, b| a.path.cmp(&b.path));
    if let Some(w) = members.windows(2).find(|w| w[0].path == w[1].path) {
        anyhow::bail!("two release files would land at {}", w[0].path);
    }
    let dir = dest.parent().context("tarball has a directory")?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    {
        let file = std::io::BufWriter::new(tmp.as_file());
        let mut enc = zstd::Encoder::new(file, TAR_ZSTD_LEVEL)?;
        enc.include_checksum(true)?;
        let mut tar = tar::Builder::new(enc);
        tar.mode(tar::HeaderMode::Deterministic);
        let mut dirs_done = std::collections::BTreeSet::new();
        for m in members.iter() {
            // Parent directories first, once each.
            let mut parents: Vec<&str> = Vec::new();
            let mut p = m.path.as_str();
            while let Some((parent, _)) = p.rsplit_once('/') {
                parents.push(parent);
                p = parent;
            }
            for d in parents.into_iter().rev() {
                if dirs_done.insert(d.to_string()) {
                    let mut h = header(tar::EntryType::Directory, 0o755, 0, mtime);
                    tar.append_data(&mut h, format!("{d}/"), std::io::empty())?;
                }
            }
            let data = match &m.source {
                Source::File(f) => {
                    std::fs::read(f).with_context(|| format!("reading {}", f.display()))?
                }
                Source::Text(t) => t.as_bytes().to_vec(),
            };
            let mode = if m.executable { 0o755 } else { 0o644 };
            let mut h = header(tar::EntryType::Regular, mode, data.len() as u64, mtime);
            tar.append_data(&mut h, &m.path, data.as_slice())?;
        }
        let enc = tar.into_inner()?;
        let mut file = enc.finish()?;
        file.flush()?;
    }
    tmp.as_file().sync_all()?;
    world_readable(tmp.path())?;
    tmp.persist(dest)
        .with_context(|| format!("renaming into {}", dest.display()))?;
    Ok(())
}

/// dist/ is published (uploaded, served, packaged by another user): 0644,
/// not the 0600 a temp file starts with.
fn world_readable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("making {} readable", path.display()))
}

fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    let _ = h.set_username("root");
    let _ = h.set_groupname("root");
    h
}

fn git_commit(ctx: &Ctx) -> String {
    cmd::read(
        "git rev-parse HEAD",
        duct::cmd!("git", "-C", &ctx.root, "rev-parse", "HEAD"),
    )
    .unwrap_or_else(|_| "unknown".into())
}

/// Listing of a tar.zst: (path, mode, size, sha256 of content), for diffs.
pub fn listing(path: &Path) -> anyhow::Result<Vec<(String, u32, u64, String)>> {
    let file = std::fs::File::open(path)?;
    let dec = zstd::Decoder::new(file)?;
    let mut ar = tar::Archive::new(dec);
    let mut out = Vec::new();
    for e in ar.entries()? {
        let mut e = e?;
        let p = e.path()?.display().to_string();
        let mode = e.header().mode()?;
        let size = e.header().size()?;
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut buf)?;
        out.push((
            p,
            mode,
            size,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&buf)),
        ));
    }
    Ok(out)
}

/// Builds the release twice, in two fresh clones of HEAD with different
/// umask, TZ, locale and path, the second with an empty cache (so kernels are
/// rebuilt too), and compares every artifact byte for byte.
pub fn verify_reproducible(ctx: &Ctx, arch_arg: &str) -> anyhow::Result<()> {
    let base = tempfile::Builder::new()
        .prefix("kiln-repro-")
        .tempdir_in(ctx.out.parent().unwrap_or(&ctx.out))?;
    let variants = [
        ("a", "0022", "UTC", "C.UTF-8", None),
        (
            "b-other-path",
            "0077",
            "Pacific/Chatham",
            "POSIX",
            Some(base.path().join("cache-b")),
        ),
    ];
    let mut dists = Vec::new();
    for (name, umask, tz, lang, cache) in variants {
        let checkout = base.path().join(name).join("kiln");
        let step = ctx.ui.stage(&format!("repro clone {name}"));
        cmd::run_logged(
            ctx,
            "release-repro",
            "git clone",
            duct::cmd!(
                "git",
                "clone",
                "--quiet",
                "--no-hardlinks",
                &ctx.root,
                &checkout
            ),
        )?;
        step.done(&checkout.display().to_string());
        let step = ctx.ui.stage(&format!("repro build {name}"));
        step.message(&format!("umask {umask}, TZ={tz}, LANG={lang}"));
        // `sh -c` only to set the umask for the build; arguments are passed, not spliced.
        let mut expr = duct::cmd!(
            "sh",
            "-c",
            "umask \"$1\" && shift && exec \"$@\"",
            "sh",
            umask,
            "cargo",
            "xtask",
            "--no-setup",
            "release",
            "--arch",
            arch_arg
        )
        .dir(&checkout)
        .env("TZ", tz)
        .env("LANG", lang)
        .env("LC_ALL", lang)
        .env("SOURCE_DATE_EPOCH", ctx.source_date_epoch.to_string());
        if let Some(c) = &cache {
            expr = expr.env("KILN_CACHE_DIR", c);
        }
        cmd::run_logged(
            ctx,
            &format!("release-repro-{name}"),
            &format!("release build {name}"),
            expr,
        )?;
        step.done("");
        dists.push(checkout.join("target").join("kiln").join(DIST));
    }
    compare_dists(&dists[0], &dists[1])?;
    // The checked artifacts are the release: publish them where `release`
    // puts its own (CI uploads dist/), before the scratch builds go away.
    let dist = ctx.out.join(DIST);
    publish_dist(&dists[0], &dist)?;
    ctx.ui
        .println(&format!("release written to {}", ctx.rel(&dist).display()));
    Ok(())
}

/// Replaces `dest` with the files of `src` (0644): copied into a sibling
/// temp directory first, so `dest` is never half-written.
fn publish_dist(src: &Path, dest: &Path) -> anyhow::Result<()> {
    let parent = dest.parent().context("dist has a parent directory")?;
    std::fs::create_dir_all(parent)?;
    let staged = tempfile::Builder::new()
        .prefix(".dist-")
        .tempdir_in(parent)?;
    for e in std::fs::read_dir(src)?.flatten() {
        let name = e.file_name();
        if e.file_type()?.is_file() && !name.to_string_lossy().starts_with('.') {
            std::fs::copy(e.path(), staged.path().join(&name))
                .with_context(|| format!("copying {}", e.path().display()))?;
            world_readable(&staged.path().join(&name))?;
        }
    }
    let old = parent.join(".dist-old");
    let _ = std::fs::remove_dir_all(&old);
    if dest.exists() {
        std::fs::rename(dest, &old)?;
    }
    // The TempDir, renamed away, finds nothing to remove when dropped.
    std::fs::rename(staged.path(), dest)
        .with_context(|| format!("renaming into {}", dest.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Compares two dist directories file by file; on a difference, names the
/// artifact and shows diffoscope's report (when installed) or a listing diff.
pub fn compare_dists(a: &Path, b: &Path) -> anyhow::Result<()> {
    let names = |d: &Path| -> anyhow::Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(d)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        Ok(v)
    };
    let (na, nb) = (names(a)?, names(b)?);
    if na != nb {
        anyhow::bail!("the two builds produced different file sets: {na:?} vs {nb:?}");
    }
    let mut differing = Vec::new();
    for n in &na {
        if sha256_file(&a.join(n))? != sha256_file(&b.join(n))? {
            differing.push(n.clone());
        }
    }
    if differing.is_empty() {
        println!(
            "reproducible: {} artifacts identical ({})",
            na.len(),
            na.join(", ")
        );
        return Ok(());
    }
    let mut report = String::new();
    for n in &differing {
        report.push_str(&format!("\n{n} differs:\n"));
        if cmd::which("diffoscope").is_some() {
            let out = duct::cmd!("diffoscope", "--text", "-", a.join(n), b.join(n))
                .stderr_to_stdout()
                .stdout_capture()
                .unchecked()
                .run()?;
            report.push_str(
                &String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .take(80)
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
        } else if n.ends_with(".tar.zst") {
            let (la, lb) = (listing(&a.join(n))?, listing(&b.join(n))?);
            for (x, y) in la.iter().zip(lb.iter()).filter(|(x, y)| x != y) {
                report.push_str(&format!(
                    "  - {} mode {:o} size {} sha256 {}\n  + {} mode {:o} size {} sha256 {}\n",
                    x.0, x.1, x.2, x.3, y.0, y.1, y.2, y.3
                ));
            }
            if la.len() != lb.len() {
                report.push_str(&format!("  member count {} vs {}\n", la.len(), lb.len()));
            }
        } else {
            report.push_str(&format!(
                "  sha256 {} vs {}\n",
                sha256_file(&a.join(n))?,
                sha256_file(&b.join(n))?
            ));
        }
    }
    anyhow::bail!(
        "not reproducible: {} artifact(s) differ:{report}",
        differing.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tarballs_are_reproducible_and_sorted_with_parents() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let mut outs = Vec::new();
        for (i, dir) in [a.path(), b.path()].into_iter().enumerate() {
            std::fs::write(dir.join("shim"), b"\x7fELF shim").unwrap();
            std::fs::write(dir.join("m.json"), b"{}").unwrap();
            // Host permissions and times must not leak into the tarball.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                dir.join("m.json"),
                std::fs::Permissions::from_mode(if i == 0 { 0o600 } else { 0o664 }),
            )
            .unwrap();
            let mut members = vec![
                Member {
                    path: "usr/share/kiln/minimal/manifest.json".into(),
                    source: Source::File(dir.join("m.json")),
                    executable: false,
                },
                Member {
                    path: "usr/bin/kiln-shim".into(),
                    source: Source::File(dir.join("shim")),
                    executable: true,
                },
            ];
            let out = dir.join("x.tar.zst");
            write_tarball(&out, &mut members, 1_700_000_000).unwrap();
            outs.push(std::fs::read(&out).unwrap());
        }
        assert_eq!(outs[0], outs[1], "same inputs, same bytes");
        use std::os::unix::fs::PermissionsExt;
        let on_disk = std::fs::metadata(a.path().join("x.tar.zst")).unwrap();
        assert_eq!(
            on_disk.permissions().mode() & 0o777,
            0o644,
            "dist is readable"
        );
        let list = listing(&a.path().join("x.tar.zst")).unwrap();
        let paths: Vec<_> = list.iter().map(|(p, ..)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "usr/",
                "usr/bin/",
                "usr/bin/kiln-shim",
                "usr/share/",
                "usr/share/kiln/",
                "usr/share/kiln/minimal/",
                "usr/share/kiln/minimal/manifest.json"
            ]
        );
        let shim = list
            .iter()
            .find(|(p, ..)| p == "usr/bin/kiln-shim")
            .unwrap();
        assert_eq!(shim.1, 0o755);
        let m = list
            .iter()
            .find(|(p, ..)| p.ends_with("manifest.json"))
            .unwrap();
        assert_eq!(m.1, 0o644);
    }

    #[test]
    fn a_differing_artifact_is_named_with_the_member_that_differs() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let src = tempfile::tempdir().unwrap();
        for (dir, agent) in [(a.path(), &b"agent one"[..]), (b.path(), &b"agent two"[..])] {
            std::fs::write(src.path().join("agent"), agent).unwrap();
            std::fs::write(src.path().join("readme"), b"same").unwrap();
            let mut members = vec![
                Member {
                    path: "usr/share/kiln/minimal/kiln-agent".into(),
                    source: Source::File(src.path().join("agent")),
                    executable: true,
                },
                Member {
                    path: "usr/share/doc/kiln/README.md".into(),
                    source: Source::File(src.path().join("readme")),
                    executable: false,
                },
            ];
            write_tarball(&dir.join("kiln-0-x86_64.tar.zst"), &mut members, 1).unwrap();
            std::fs::write(dir.join("SHA256SUMS"), b"same").unwrap();
        }
        let e = compare_dists(a.path(), b.path()).unwrap_err().to_string();
        assert!(e.contains("1 artifact(s) differ"), "{e}");
        assert!(e.contains("kiln-0-x86_64.tar.zst differs"), "{e}");
        assert!(
            e.contains("usr/share/kiln/minimal/kiln-agent"),
            "the member is named: {e}"
        );
        assert!(!e.contains("SHA256SUMS differs"), "{e}");
        // Identical dists pass.
        compare_dists(a.path(), a.path()).unwrap();
    }

    /// The hosted workflow stays a thin wrapper over what `.ci/run` runs here:
    /// the same test entry point, `ci/release` per arch, every arch kiln knows.
    #[test]
    fn hosted_workflow_calls_the_same_scripts_for_every_arch() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let wf = std::fs::read_to_string(root.join(".github/workflows/release.yml")).unwrap();
        let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
        assert!(
            wf.contains("run: bash .ci/run"),
            "the test job runs .ci/run"
        );
        assert!(wf.contains("run: ci/release --arch ${{ matrix.arch }}"));
        assert!(wf.contains("path: target/kiln/dist/"), "dist/ is uploaded");
        let names: Vec<&str> = crate::arch::ALL.iter().map(|a| a.name()).collect();
        assert!(
            wf.contains(&format!("arch: [{}]", names.join(", "))),
            "the matrix lists {names:?}"
        );
        assert!(ci.contains("cargo xtask setup --arch all") && ci.contains("cargo xtask test"));
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        assert!(
            readme.contains("cargo xtask test"),
            "README names the test command .ci/run calls"
        );
    }

    #[test]
    fn a_verified_dist_replaces_the_old_one_whole() {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join(DIST);
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(dest.join("kiln-old-x86_64.tar.zst"), b"stale").unwrap();
        std::fs::write(src.path().join("kiln-0-x86_64.tar.zst"), b"tar").unwrap();
        std::fs::write(src.path().join("SHA256SUMS"), b"sums").unwrap();
        std::fs::write(src.path().join(".scratch"), b"x").unwrap();
        publish_dist(src.path(), &dest).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(&dest)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["SHA256SUMS", "kiln-0-x86_64.tar.zst"]);
        assert_eq!(std::fs::read(dest.join("SHA256SUMS")).unwrap(), b"sums");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dest.join("SHA256SUMS"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        // Nothing staged is left beside it.
        let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn duplicate_member_paths_are_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let mut members = vec![
            Member {
                path: "usr/bin/x".into(),
                source: Source::File(d.path().join("f")),
                executable: true,
            },
            Member {
                path: "usr/bin/x".into(),
                source: Source::File(d.path().join("f")),
                executable: true,
            },
        ];
        assert!(write_tarball(&d.path().join("t.tar.zst"), &mut members, 0).is_err());
    }

    #[test]
    fn default_config_parses_as_shim_config_keys() {
        let v: toml::Value = toml::from_str(default_shim_config()).unwrap();
        assert_eq!(v["hypervisor"]["qemu"]["accel"].as_str(), Some("auto"));
        assert_eq!(v["agent"]["port"].as_integer(), Some(1024));
    }
}
