//! Kernel patch series: `kernel-configs/patches/<series>/*.patch`, applied in
//! file-name order with `patch -p1` to a copy of the pristine tree.
//!
//! The patched tree lives next to the pristine one in the cache, named by
//! source hash + series hash, so patching happens once per series. The copy
//! is made of hard links (`cp -al`): `patch` replaces files rather than
//! writing through them, so the pristine tree is never changed.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_manifest::PatchRecord;

use crate::cmd;
use crate::ctx::Ctx;
use crate::hash::{sha256_file, KeyHasher};

#[derive(Debug, Clone, Default)]
pub struct PatchSeries {
    dir: PathBuf,
    pub patches: Vec<PatchRecord>,
}

/// Marker written into a patched tree once every patch applied.
const DONE: &str = ".kiln-patched";

impl PatchSeries {
    /// Reads the series in `dir`; a missing directory is an empty series.
    pub fn load(dir: &Path) -> anyhow::Result<PatchSeries> {
        let mut patches = Vec::new();
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(PatchSeries {
                    dir: dir.to_path_buf(),
                    patches,
                })
            }
            Err(e) => {
                return Err(e).with_context(|| format!("reading patch series {}", dir.display()))
            }
        };
        let mut names: Vec<String> = Vec::new();
        for e in entries {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".patch") || name.ends_with(".diff") {
                names.push(name);
            } else if !name.starts_with('.') && name != "README.md" && name != "series" {
                anyhow::bail!(
                    "{}: `{name}` is not a patch; name patches NNNN-what.patch (or .diff)",
                    dir.display()
                );
            }
        }
        names.sort();
        for name in names {
            let sha256 = sha256_file(&dir.join(&name))?;
            patches.push(PatchRecord { name, sha256 });
        }
        Ok(PatchSeries {
            dir: dir.to_path_buf(),
            patches,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.patches.is_empty()
    }

    /// Hash of the series (names and contents, in order); empty for no patches.
    pub fn hash(&self) -> String {
        if self.is_empty() {
            return String::new();
        }
        let mut h = KeyHasher::new("patches");
        for p in &self.patches {
            h.str(&p.name, &p.sha256);
        }
        h.finish()
    }

    /// Suffix for the kernel release, so `uname -r` and /proc/version show
    /// that (and which) patches are in: `+kiln.<8 hex of the series hash>`.
    pub fn localversion(&self) -> String {
        if self.is_empty() {
            String::new()
        } else {
            format!("+kiln.{}", &self.hash()[..8])
        }
    }

    /// Returns the tree to build: `pristine` for an empty series, else a
    /// patched copy (made once, in a temp dir renamed into place).
    pub fn apply(&self, ctx: &Ctx, pristine: &Path, log: &str) -> anyhow::Result<PathBuf> {
        if self.is_empty() {
            return Ok(pristine.to_path_buf());
        }
        let parent = pristine.parent().context("pristine tree has no parent")?;
        let base = pristine
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dest = parent.join(format!("{base}-p{}", &self.hash()[..16]));
        if dest.join(DONE).is_file() {
            return Ok(dest);
        }
        let tmp = tempfile::Builder::new()
            .prefix(".patch-")
            .tempdir_in(parent)
            .with_context(|| format!("creating a temp dir in {}", parent.display()))?;
        let work = tmp.path().join("linux");
        cmd::run_logged(
            ctx,
            log,
            "copying the kernel tree (hard links)",
            duct::cmd!("cp", "-al", pristine, &work),
        )?;
        for p in &self.patches {
            let file = self.dir.join(&p.name);
            let out = duct::cmd!(
                "patch",
                "-p1",
                "--batch",
                "--forward",
                "--no-backup-if-mismatch",
                "-d",
                &work,
                "-i",
                &file
            )
            .stderr_to_stdout()
            .stdout_capture()
            .unchecked()
            .run()
            .context("running `patch` (apt-get install patch, or `cargo xtask setup`)")?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if !out.status.success() {
                anyhow::bail!("{}", rejection_message(&p.name, &text, &work));
            }
        }
        fs::write(work.join(DONE), self.hash())?;
        if let Err(e) = fs::rename(&work, &dest) {
            if !dest.join(DONE).is_file() {
                return Err(e)
                    .with_context(|| format!("moving the patched tree to {}", dest.display()));
            }
        }
        Ok(dest)
    }
}

/// "patch X does not apply: <first failed hunk>", with the hunk's text from
/// the .rej file when there is one.
fn rejection_message(name: &str, output: &str, tree: &Path) -> String {
    let failed = output
        .lines()
        .find(|l| l.contains("FAILED") || l.contains("can't find file") || l.contains("malformed"));
    let file = output
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("patching file "))
        .map(|f| f.trim().trim_matches('\'').to_string());
    let mut msg = format!("kernel patch {name} does not apply");
    match (failed, &file) {
        (Some(h), Some(f)) => msg.push_str(&format!(": {f}: {}", h.trim())),
        (Some(h), None) => msg.push_str(&format!(": {}", h.trim())),
        (None, _) => msg.push_str(&format!(
            ": {}",
            output.lines().last().unwrap_or("patch failed").trim()
        )),
    }
    if let Some(f) = file {
        if let Ok(rej) = fs::read_to_string(tree.join(format!("{f}.rej"))) {
            let hunk: Vec<&str> = rej
                .lines()
                .skip_while(|l| !l.starts_with("@@"))
                .take(12)
                .collect();
            if !hunk.is_empty() {
                msg.push_str(&format!(
                    "\nfirst rejected hunk:\n    {}",
                    hunk.join("\n    ")
                ));
            }
        }
    }
    msg.push_str(
        "\nRefresh the patch against this kernel, or build without patches (--no-patches).",
    );
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_missing_series_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let s = PatchSeries::load(&dir.path().join("none")).unwrap();
        assert!(s.is_empty() && s.hash().is_empty() && s.localversion().is_empty());
    }

    #[test]
    fn series_is_ordered_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("0002-b.patch"), "b").unwrap();
        fs::write(dir.path().join("0001-a.patch"), "a").unwrap();
        let s = PatchSeries::load(dir.path()).unwrap();
        let names: Vec<_> = s.patches.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["0001-a.patch", "0002-b.patch"]);
        let h1 = s.hash();
        assert!(s.localversion().starts_with("+kiln."));
        fs::write(dir.path().join("0002-b.patch"), "b2").unwrap();
        assert_ne!(
            PatchSeries::load(dir.path()).unwrap().hash(),
            h1,
            "content is part of the hash"
        );
    }

    #[test]
    fn stray_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("fix.txt"), "x").unwrap();
        let e = PatchSeries::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("fix.txt"), "{e}");
    }

    #[test]
    fn rejection_names_patch_file_and_hunk() {
        let tree = tempfile::tempdir().unwrap();
        fs::create_dir_all(tree.path().join("init")).unwrap();
        fs::write(
            tree.path().join("init/Kconfig.rej"),
            "--- init/Kconfig\n+++ init/Kconfig\n@@ -1,3 +1,4 @@\n-old\n+new\n",
        )
        .unwrap();
        let out = "patching file init/Kconfig\nHunk #1 FAILED at 1.\n1 out of 1 hunk FAILED -- saving rejects to file init/Kconfig.rej\n";
        let m = rejection_message("0001-x.patch", out, tree.path());
        assert!(
            m.contains("0001-x.patch")
                && m.contains("init/Kconfig")
                && m.contains("Hunk #1 FAILED at 1"),
            "{m}"
        );
        assert!(m.contains("@@ -1,3 +1,4 @@") && m.contains("+new"), "{m}");
    }
}

/// Against the real kernel source (extracted in the cache by an earlier
/// build): a good test-only patch adds a Kconfig symbol that then survives
/// into the configured kernel; a broken one is refused by name.
#[cfg(test)]
mod real_source_tests {
    use crate::arch::Arch;
    use crate::ctx::Ctx;
    use crate::stage::kernel::{self, KernelRequest};

    const GOOD: &str = "--- a/init/Kconfig\n+++ b/init/Kconfig\n@@ -1,4 +1,8 @@\n # SPDX-License-Identifier: GPL-2.0-only\n+config KILN_TEST_PATCH\n+\tdef_bool y\n+\thelp\n+\t  Present only when kiln's test patch is applied.\n config CC_VERSION_TEXT\n \tstring\n \tdefault \"$(CC_VERSION_TEXT)\"\n";

    /// The minimal image's kernel request, with a test fragment and series.
    fn request(ctx: &Ctx, patches: &std::path::Path, extra: &std::path::Path) -> KernelRequest {
        let image = crate::image_spec::ImageSpec::load(ctx, "minimal").unwrap();
        let mut req = KernelRequest::for_image(ctx, &image, Arch::X86_64, None).unwrap();
        req.fragments.push(extra.to_path_buf());
        req.patches = Some(patches.to_path_buf());
        req
    }

    #[test]
    #[ignore = "configures the real kernel source; run by `cargo xtask test`"]
    fn test_patch_is_applied_and_broken_patch_rejected() {
        let ctx = Ctx::for_tests();
        let dir = tempfile::tempdir().unwrap();
        let frag = dir.path().join("test.conf");
        std::fs::write(
            &frag,
            "CONFIG_KILN_TEST_PATCH=y   # exists only with the test patch\n",
        )
        .unwrap();

        let good = dir.path().join("good");
        std::fs::create_dir(&good).unwrap();
        std::fs::write(good.join("0001-kiln-test-symbol.patch"), GOOD).unwrap();
        kernel::check(&ctx, &request(&ctx, &good, &frag))
            .expect("the patched Kconfig symbol is in the configured kernel");

        // Without the patch the symbol does not exist, and the check says so.
        let none = dir.path().join("none");
        let err = format!(
            "{:#}",
            kernel::check(&ctx, &request(&ctx, &none, &frag)).unwrap_err()
        );
        assert!(err.contains("did not survive"), "{err}");

        let broken = dir.path().join("broken");
        std::fs::create_dir(&broken).unwrap();
        std::fs::write(
            broken.join("0001-kiln-broken.patch"),
            GOOD.replace(" config CC_VERSION_TEXT", " config CC_VERSION_TXT"),
        )
        .unwrap();
        let err = format!(
            "{:#}",
            kernel::check(&ctx, &request(&ctx, &broken, &frag)).unwrap_err()
        );
        assert!(
            err.contains("0001-kiln-broken.patch")
                && err.contains("init/Kconfig")
                && err.contains("FAILED"),
            "{err}"
        );
        assert!(
            err.contains("config CC_VERSION_TXT"),
            "the rejected hunk is shown: {err}"
        );
    }
}
