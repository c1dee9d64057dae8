//! `cargo xtask bench --remote-cache`: what a warm registry saves a machine
//! with an empty kiln cache. A throwaway loopback registry is seeded from this
//! machine's cache (`--cache-push`), then `build-image` runs in a fresh output
//! directory with an empty `KILN_CACHE_DIR` against it, alternating with the
//! same build that may only use the local cache for the kernel, so the figure
//! that remains is the registry's own cost next to the kernel compile it replaces.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use super::{median, row, Row};
use crate::arch::Arch;
use crate::ctx::Ctx;
use crate::local_registry::LocalRegistry;

/// `cargo xtask <args>` as a child, outputs in `out`, cache in `cache` (None: the machine's).
fn xtask(
    ctx: &Ctx,
    out: &Path,
    cache: Option<&Path>,
    args: &[&str],
) -> anyhow::Result<(f64, String)> {
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let mut cmd = duct::cmd(exe, args)
        .dir(&ctx.root)
        .env("KILN_OUT_DIR", out)
        .env_remove("KILN_CACHE_REMOTE")
        .stdin_null()
        .stderr_to_stdout()
        .stdout_capture()
        .unchecked();
    if let Some(cache) = cache {
        cmd = cmd.env("KILN_CACHE_DIR", cache);
    }
    let start = Instant::now();
    let o = crate::cmd::tied(cmd).run()?;
    let secs = start.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    if !o.status.success() {
        anyhow::bail!("cargo xtask {} failed:\n{text}", args.join(" "));
    }
    Ok((secs, text))
}

/// The `remote cache: pulled N KiB` total a run prints at its end.
fn pulled_kib(text: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("remote cache: this run pulled "))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .sum()
}

pub fn measure(ctx: &Ctx, rounds: usize) -> anyhow::Result<Vec<Row>> {
    let registry = LocalRegistry::start(None)?;
    let url = registry.url();
    let arch = Arch::host();
    let base = [
        "--no-setup",
        "--insecure-registry",
        "--cache-remote",
        url.as_str(),
    ];
    let build = ["build-image", "--arch", arch.name()];
    let seed_out = tempfile::tempdir()?;
    let mut seed: Vec<&str> = base.to_vec();
    seed.push("--cache-push");
    seed.extend(build);
    let (seed_secs, _) = xtask(ctx, seed_out.path(), None, &seed)?;
    let read: Vec<&str> = base.iter().chain(build.iter()).copied().collect();
    let mut local: Vec<&str> = vec!["--no-setup"];
    local.extend(build);

    let (mut remote_times, mut local_times, mut kib) = (Vec::new(), Vec::new(), 0.0);
    for _ in 0..rounds {
        let (out, cache) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let (secs, text) = xtask(ctx, out.path(), Some(cache.path()), &read)?;
        if text.contains("make ")
            || !crate::remote_cache::said(&text, "kernel", crate::remote_cache::Said::Pulled)
        {
            anyhow::bail!(
                "the empty-cache build did not take its kernel from the registry:\n{text}"
            );
        }
        remote_times.push(secs);
        kib = pulled_kib(&text);
        // Same fresh outputs, the machine's warm kernel cache, no registry:
        // agent, initrd and rootfs.img are built here.
        let out = tempfile::tempdir()?;
        local_times.push(xtask(ctx, out.path(), None, &local)?.0);
    }
    let remote = median(&mut remote_times);
    let local = median(&mut local_times);
    Ok(vec![
        row(
            format!("remote-cache {arch}: seed (push from this machine's cache)"),
            seed_secs,
            "s",
            "",
        ),
        row(
            format!("remote-cache {arch}: build-image, empty kiln cache, warm registry"),
            remote,
            "s",
            format!("median of {rounds}; no kernel compiled or unpacked"),
        ),
        row(
            format!("remote-cache {arch}: bytes pulled"),
            kib / 1024.0,
            "MiB",
            "",
        ),
        row(
            format!("remote-cache {arch}: build-image, warm local kernel cache, no registry"),
            local,
            "s",
            format!(
                "agent, initrd, rootfs.img built; ×{:.2} of the registry build",
                local / remote.max(0.001)
            ),
        ),
    ])
}
