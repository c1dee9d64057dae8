//! `--offline` builds (what a distro packager's sandbox runs): a missing input
//! fails the build with a message naming it and the way out, before any
//! long stage runs and without reaching for apt, cargo's registry or a mirror.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn xtask(out: &Path, cache: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.arg("--offline")
        .args(args)
        .env("KILN_OUT_DIR", out)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap())
        .stdin(Stdio::null());
    if let Some(cache) = cache {
        c.env("KILN_CACHE_DIR", cache);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
#[ignore = "runs the pipeline; run by `cargo xtask test`"]
fn a_missing_kernel_source_is_named() {
    let out = tempfile::tempdir().unwrap();
    let missing = "/nonexistent/linux-6.12.tar.xz";
    let o = xtask(
        out.path(),
        None,
        &["build-kernel", "--arch", "x86_64", "--kernel-src", missing],
    );
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains(missing) && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
#[ignore = "runs the pipeline; run by `cargo xtask test`"]
fn a_debian_base_not_in_the_cache_is_named_instead_of_fetched() {
    let out = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let o = xtask(
        out.path(),
        Some(cache.path()),
        &["build-rootfs", "--image", "debian", "--arch", "x86_64"],
    );
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("--offline: the Debian base for x86_64")
            && err.contains("build it once without --offline"),
        "{err}"
    );
    assert!(
        !err.contains("mmdebstrap --variant"),
        "no mirror was tried: {err}"
    );
    // Nothing half-made: the empty cache holds no bootstrap, the output dir no image.
    let leftovers: Vec<_> = walk(cache.path());
    assert!(
        leftovers
            .iter()
            .all(|p| !p.ends_with(".tar") && !p.contains("bootstrap")),
        "{leftovers:?}"
    );
    assert!(!out.path().join("debian").exists());
}

fn walk(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            v.push(e.path().display().to_string());
            if e.path().is_dir() {
                v.extend(walk(&e.path()));
            }
        }
    }
    v
}
