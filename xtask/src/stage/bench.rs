//! `cargo xtask bench`: the figures behind kiln's speed and size claims.
//! Prints a table and writes `target/kiln/bench.json`. Comparisons are measured
//! side by side in one run (these machines are noisy); nothing here passes or
//! fails on time.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use kiln_manifest::role;
use serde::Serialize;

use crate::arch::{self, Arch};
use crate::cache::write_atomic;
use crate::ctx::Ctx;
use crate::image_spec::ImageSpec;
use crate::stage::image;

mod agent;
mod initrd_cost;
mod kernel_cost;
mod remote_cache;

/// Marker the probe /init prints.
const PROBE_MARKER: &str = "KILN-USERSPACE-READY";

#[derive(Serialize, Default)]
pub struct Report {
    /// Sizes in bytes: artifact name → size.
    pub sizes: Vec<Row>,
    pub boot: Vec<Row>,
    pub initrd_packing: Vec<Row>,
    pub build: Vec<Row>,
    /// Agent RSS/fds idle and after execs, exec round trip percentiles.
    pub agent: Vec<Row>,
}

#[derive(Serialize, Clone)]
pub struct Row {
    pub name: String,
    pub value: f64,
    pub unit: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

fn row(name: impl Into<String>, value: f64, unit: &str, note: impl Into<String>) -> Row {
    Row {
        name: name.into(),
        value,
        unit: unit.into(),
        note: note.into(),
    }
}

/// `cargo xtask bench`.
#[derive(Args, Clone, Debug)]
pub struct BenchFlags {
    /// Boot rounds per variant (median reported; at least 1).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Skip the warm-rebuild measurement (it edits and restores agent/src/main.rs).
    #[arg(long)]
    pub skip_rebuild: bool,
    /// Only measure what the `workload` kernel feature costs: kernel size,
    /// launch→agent-ready and idle guest memory of the minimal image's kernel
    /// against the same kernel without `workload` (built on first use,
    /// 5-16 min per arch), per arch (--arch).
    #[arg(long)]
    pub kernel_cost: bool,
    /// Only measure the remote stage cache: `build-image` on the host arch with
    /// an empty kiln cache against a warm loopback registry (docker-registry),
    /// bytes pulled, and the same build from the local kernel cache.
    #[arg(long, conflicts_with = "kernel_cost")]
    pub remote_cache: bool,
    /// Only measure what the initrd's compression costs at boot: the minimal
    /// image's initrd rewritten as none, gzip and zstd (same cpio, same
    /// kernel), size and launch→agent-ready each, per arch (--arch).
    #[arg(long, conflicts_with_all = ["kernel_cost", "remote_cache"])]
    pub initrd_cost: bool,
    /// Arches for --kernel-cost and --initrd-cost: x86_64, aarch64, ppc64le, s390x or all.
    #[arg(long, default_value = "all")]
    pub arch: crate::arch::ArchSel,
}

pub fn run(ctx: &Ctx, flags: &BenchFlags) -> anyhow::Result<()> {
    if flags.kernel_cost {
        return run_kernel_cost(ctx, &flags.arch.arches(), flags.rounds.max(1));
    }
    if flags.initrd_cost {
        let shim = shim_binary(ctx)?;
        let rows = initrd_cost::measure(ctx, &shim, &flags.arch.arches(), flags.rounds.max(1))?;
        println!("\n== cost of the initrd's compression at boot");
        print_rows(&rows);
        return merge_section(ctx, "initrd_cost", &rows);
    }
    if flags.remote_cache {
        ctx.ensure_setup(&[Arch::host()])?;
        let rows = remote_cache::measure(ctx, flags.rounds.max(1))?;
        println!("\n== remote stage cache (loopback docker-registry)");
        print_rows(&rows);
        return merge_section(ctx, "remote_cache", &rows);
    }
    let mut report = Report::default();
    let image = ImageSpec::load(ctx, "minimal")?;
    ctx.ensure_setup(&[Arch::X86_64])?;
    let manifest = image::build(ctx, &image, Arch::X86_64, None)?;

    sizes(ctx, &mut report)?;
    boot(ctx, &manifest, flags.rounds.max(1), &mut report)?;
    verity_cost(ctx, &manifest, flags.rounds.max(1), &mut report)?;
    report.agent = agent::measure(ctx, &shim_binary(ctx)?, &manifest)?;
    packing(ctx, &mut report)?;
    build_times(ctx, &mut report);
    if !flags.skip_rebuild {
        warm_rebuild(ctx, &image, &mut report)?;
        dev_cycle(ctx, &mut report)?;
    }

    print_report(&report);
    let path = ctx.out.join("bench.json");
    write_atomic(&path, &serde_json::to_vec_pretty(&report)?)?;
    println!("\nwritten to {}", ctx.rel(&path).display());
    Ok(())
}

/// `--kernel-cost`: measures, prints, and writes the rows into bench.json's
/// `kernel_cost` (other sections of an earlier run are kept).
fn run_kernel_cost(ctx: &Ctx, arches: &[Arch], rounds: usize) -> anyhow::Result<()> {
    let shim = shim_binary(ctx)?;
    let rows = kernel_cost::measure(ctx, &shim, arches, rounds)?;
    println!("\n== cost of the `{}` kernel feature", kernel_cost::FEATURE);
    print_rows(&rows);
    merge_section(ctx, "kernel_cost", &rows)
}

/// Writes `rows` into bench.json under `section`, keeping the other sections
/// of an earlier run.
fn merge_section(ctx: &Ctx, section: &str, rows: &[Row]) -> anyhow::Result<()> {
    let path = ctx.out.join("bench.json");
    let mut doc: serde_json::Value = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| serde_json::json!({}));
    doc[section] = serde_json::to_value(rows)?;
    write_atomic(&path, &serde_json::to_vec_pretty(&doc)?)?;
    println!("\nwritten to {} ({section})", ctx.rel(&path).display());
    Ok(())
}

/// Sizes of every built artifact under target/kiln/<image>/<arch>/.
fn sizes(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(&ctx.out)?.flatten() {
        let image_dir = entry.path();
        let image_name = entry.file_name().to_string_lossy().into_owned();
        if !image_dir.join(arch::ALL[0].name()).exists()
            && !arch::ALL.iter().any(|a| image_dir.join(a.name()).exists())
        {
            continue;
        }
        for a in arch::ALL {
            let m = image_dir.join(a.name()).join(image::MANIFEST);
            let Ok(text) = std::fs::read_to_string(&m) else {
                continue;
            };
            let built: kiln_manifest::Manifest = serde_json::from_str(&text)?;
            for (role, art) in &built.artifacts {
                if role == role::KERNEL_CONFIG {
                    continue;
                }
                report.sizes.push(row(
                    format!("{image_name}/{a} {role}"),
                    art.size as f64,
                    "bytes",
                    "",
                ));
            }
            if let Some(initrd) = built.artifact(role::INITRD) {
                let bytes = std::fs::read(image_dir.join(a.name()).join(&initrd.file))?;
                let raw = kiln_initrd::reader::decompress(&bytes, 1 << 30)?;
                report.sizes.push(row(
                    format!("{image_name}/{a} initrd uncompressed"),
                    raw.len() as f64,
                    "bytes",
                    format!("{:.2}x compression", raw.len() as f64 / bytes.len() as f64),
                ));
            }
        }
    }
    Ok(())
}

/// Launch-to-agent-ready against launch-to-first-userspace of a trivial /init,
/// same kernel, same QEMU command line, alternating rounds.
fn boot(ctx: &Ctx, manifest: &Path, rounds: usize, report: &mut Report) -> anyhow::Result<()> {
    let probe = probe_image(ctx, manifest)?;
    let shim = shim_binary(ctx)?;
    let (mut agent, mut first) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let step = ctx.ui.stage(&format!("bench boot {}/{rounds}", round + 1));
        first.push(shim_seconds(
            &shim,
            &probe,
            &["--until-console", PROBE_MARKER],
        )?);
        agent.push(shim_seconds(&shim, manifest, &[])?);
        step.done(&format!(
            "probe {:.2} s, agent {:.2} s",
            first[round], agent[round]
        ));
    }
    let (a, f) = (median(&mut agent), median(&mut first));
    report.boot.push(row(
        "launch to first userspace (trivial /init)",
        f,
        "s",
        format!("median of {rounds}"),
    ));
    report.boot.push(row(
        "launch to agent ready (Check answered)",
        a,
        "s",
        format!("median of {rounds}"),
    ));
    report.boot.push(row(
        "agent-ready / first-userspace",
        a / f,
        "ratio",
        "target < 1.1",
    ));
    Ok(())
}

/// What dm-verity costs the minimal image: the tree's bytes against the
/// filesystem's, and launch → agent-ready from rootfs.img on virtio-blk with
/// and without verification, rounds alternating so load drifts hit both.
fn verity_cost(
    ctx: &Ctx,
    manifest: &Path,
    rounds: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    let built: kiln_manifest::Manifest = serde_json::from_str(&std::fs::read_to_string(manifest)?)?;
    let Some(v) = built.rootfs.as_ref().and_then(|r| r.verity.clone()) else {
        ctx.ui
            .println("note: the minimal image has no dm-verity tree; no verity figures");
        return Ok(());
    };
    let tree = v.hash_blocks * v.hash_block_size;
    let data = v.data_blocks * v.data_block_size;
    report.boot.push(row(
        "dm-verity tree / filesystem (minimal x86_64)",
        tree as f64 / data as f64,
        "ratio",
        format!(
            "{} KiB tree for {} KiB of filesystem",
            tree >> 10,
            data >> 10
        ),
    ));
    let shim = shim_binary(ctx)?;
    let secs = |verity: &str| {
        shim_seconds(
            &shim,
            manifest,
            &["--rootfs", "virtio-blk", "--verity", verity],
        )
    };
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let step = ctx
            .ui
            .stage(&format!("bench verity {}/{rounds}", round + 1));
        off.push(secs("off")?);
        on.push(secs("on")?);
        step.done(&format!(
            "plain {:.2} s, verified {:.2} s",
            off[round], on[round]
        ));
    }
    let (off, on) = (median(&mut off), median(&mut on));
    report.boot.push(row(
        "launch to agent ready, rootfs.img on virtio-blk, no verity",
        off,
        "s",
        format!("median of {rounds}"),
    ));
    report.boot.push(row(
        "launch to agent ready, rootfs.img on virtio-blk, dm-verity",
        on,
        "s",
        format!("median of {rounds}"),
    ));
    report.boot.push(row(
        "dm-verity / plain (agent ready)",
        on / off,
        "ratio",
        "cost of verification",
    ));
    Ok(())
}

/// A boot-only image under `target/kiln/bench/<variant>/<arch>/`: the image at
/// `manifest` (its command line, kernel and initrd), with the artifact `role`
/// (kernel or initrd) replaced by what `write` puts into the directory under
/// the file name it returns. No rootfs: the variant boots from its initrd.
fn variant_image(
    ctx: &Ctx,
    manifest: &Path,
    variant: &str,
    arch: Arch,
    role: &str,
    write: impl FnOnce(&Path, &kiln_manifest::ArtifactRecord) -> anyhow::Result<String>,
) -> anyhow::Result<PathBuf> {
    let dir = ctx.out.join("bench").join(variant).join(arch.name());
    std::fs::create_dir_all(&dir)?;
    let mut built: kiln_manifest::Manifest =
        serde_json::from_str(&std::fs::read_to_string(manifest)?)?;
    let image_dir = manifest.parent().context("manifest has a directory")?;
    let kept = if role == role::KERNEL {
        role::INITRD
    } else {
        role::KERNEL
    };
    let keep = built
        .artifacts
        .get(kept)
        .with_context(|| format!("no {kept}"))?;
    crate::cache::copy_atomic(&image_dir.join(&keep.file), &dir.join(&keep.file))?;
    let old = built
        .artifacts
        .get(role)
        .with_context(|| format!("no {role}"))?;
    let file = write(&dir, old)?;
    built.image = format!("{}-{variant}", built.image);
    built.artifacts.retain(|k, _| k == kept);
    built
        .artifacts
        .insert(role.into(), crate::hash::artifact_record(&dir, &file)?);
    built.rootfs = None;
    let path = dir.join(image::MANIFEST);
    write_atomic(&path, &serde_json::to_vec_pretty(&built)?)?;
    Ok(path)
}

/// The size of `manifest`'s artifact `role`, as recorded in the manifest.
fn artifact_size(manifest: &Path, role: &str) -> anyhow::Result<f64> {
    let built: kiln_manifest::Manifest = serde_json::from_str(&std::fs::read_to_string(manifest)?)?;
    Ok(built
        .artifacts
        .get(role)
        .with_context(|| format!("{} has no {role}", manifest.display()))?
        .size as f64)
}

/// The 1-minute load average, printed beside timings (-1 if unreadable).
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(-1.0)
}

fn shim_binary(ctx: &Ctx) -> anyhow::Result<PathBuf> {
    crate::cmd::run_logged(
        ctx,
        "bench",
        "cargo build -p kiln-shim",
        duct::cmd!("cargo", "build", "--release", "--locked", "-p", "kiln-shim").dir(&ctx.root),
    )?;
    Ok(ctx.root.join("target/release/kiln-shim"))
}

/// `kiln-shim boot --json --image MANIFEST [extra...]`, its JSON answer.
fn shim_boot_json(
    shim: &Path,
    manifest: &Path,
    extra: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let mut args = vec![
        "boot".to_string(),
        "--json".into(),
        "--image".into(),
        manifest.display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let out = duct::cmd(shim, &args)
        .stderr_null()
        .stdout_capture()
        .unchecked()
        .run()?;
    if !out.status.success() {
        anyhow::bail!("kiln-shim {} failed", args.join(" "));
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "kiln-shim boot printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Seconds `kiln-shim boot --json` reports: to agent-ready, or to the
/// console marker when `extra` has `--until-console`.
fn shim_seconds(shim: &Path, manifest: &Path, extra: &[&str]) -> anyhow::Result<f64> {
    let v = shim_boot_json(shim, manifest, extra)?;
    v["agent_ready_seconds"]
        .as_f64()
        .or_else(|| v["console_marker_seconds"].as_f64())
        .context("kiln-shim printed no time")
}

/// An image with the same kernel as `manifest` and the probe as /init.
fn probe_image(ctx: &Ctx, manifest: &Path) -> anyhow::Result<PathBuf> {
    let dir = ctx.out.join("bench").join("probe").join("x86_64");
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("probe_init.c");
    write_atomic(&src, include_str!("bench/probe_init.c").as_bytes())?;
    let bin = dir.join("probe-init");
    crate::cmd::run_logged(
        ctx,
        "bench",
        "gcc -static probe_init.c",
        duct::cmd!("gcc", "-static", "-Os", "-s", "-o", &bin, &src),
    )?;
    let mut a = kiln_initrd::Archive::new();
    a.add_dir("dev", 0o755)?;
    a.add_char_device("dev/console", 0o600, 5, 1)?;
    a.add_file("init", 0o755, std::fs::read(&bin)?)?;
    a.write_to(
        dir.join("initrd.img"),
        &kiln_initrd::WriteOptions::new(ctx.source_date_epoch)
            .compression(kiln_initrd::Compression::Gzip),
    )?;

    let built: kiln_manifest::Manifest = serde_json::from_str(&std::fs::read_to_string(manifest)?)?;
    let image_dir = manifest.parent().context("manifest has a directory")?;
    let kernel = built.artifact(role::KERNEL).context("no kernel")?.clone();
    crate::cache::copy_atomic(&image_dir.join(&kernel.file), &dir.join(&kernel.file))?;
    // A manifest of its own for the probe image: the kernel's facts and the
    // two files it has, nothing carried over from the image it borrows from.
    let probe = kiln_manifest::Manifest {
        kiln_manifest: kiln_manifest::FORMAT,
        image: "bench-probe".into(),
        arch: built.arch,
        kernel_version: built.kernel_version,
        kernel_patches: built.kernel_patches,
        cmdline: built.cmdline,
        source_date_epoch: ctx.source_date_epoch,
        artifacts: [
            (role::KERNEL.to_string(), kernel),
            (
                role::INITRD.to_string(),
                crate::hash::artifact_record(&dir, "initrd.img")?,
            ),
        ]
        .into(),
        inputs: Default::default(),
        rootfs: None,
        packages: Vec::new(),
        kernel_modules: Vec::new(),
    };
    let path = dir.join(image::MANIFEST);
    write_atomic(&path, &serde_json::to_vec_pretty(&probe)?)?;
    Ok(path)
}

/// kiln-initrd against `find | cpio -o -H newc | gzip -9` on one tree, and zstd.
fn packing(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let tree = bench_tree(ctx)?;
    let out = tempfile::tempdir()?;
    let bytes_in = tree_bytes(&tree);
    let step = ctx.ui.stage("bench initrd packing");
    let mut timed =
        |name: &str, f: &mut dyn FnMut() -> anyhow::Result<u64>| -> anyhow::Result<()> {
            let t = Instant::now();
            let size = f()?;
            let secs = t.elapsed().as_secs_f64();
            report.initrd_packing.push(row(
                name,
                bytes_in as f64 / secs / 1e6,
                "MB/s",
                format!(
                    "{:.2} s, {:.1} MiB out",
                    secs,
                    size as f64 / (1 << 20) as f64
                ),
            ));
            Ok(())
        };
    let kiln = |c: kiln_initrd::Compression, workers: u32, level: i32| {
        let tree = tree.clone();
        let dest = out.path().join(format!("kiln-{}-{workers}.img", c.name()));
        move || -> anyhow::Result<u64> {
            let mut a = kiln_initrd::Archive::new();
            a.add_tree(&tree, "")?;
            let opts = kiln_initrd::WriteOptions::new(0)
                .compression(c)
                .zstd_level(level)
                .zstd_workers(workers);
            Ok(a.write_to(&dest, &opts)?.compressed_bytes)
        }
    };
    timed(
        "kiln-initrd newc + gzip -9",
        &mut kiln(kiln_initrd::Compression::Gzip, 0, 19),
    )?;
    let gz = out.path().join("cpio.gz");
    timed("find | cpio -o -H newc | gzip -9", &mut || {
        let p = duct::cmd!("find", ".")
            .pipe(duct::cmd!("sort"))
            .pipe(duct::cmd!("cpio", "-o", "-H", "newc", "--quiet"))
            .pipe(duct::cmd!("gzip", "-9", "-n"))
            .dir(&tree)
            .stdout_path(&gz);
        p.run()?;
        Ok(std::fs::metadata(&gz)?.len())
    })?;
    timed(
        "kiln-initrd newc + zstd -19",
        &mut kiln(kiln_initrd::Compression::Zstd, 0, 19),
    )?;
    timed(
        "kiln-initrd newc + zstd -19, 2 threads",
        &mut kiln(kiln_initrd::Compression::Zstd, 2, 19),
    )?;
    let zs = out.path().join("cpio.zst");
    timed("find | cpio -o -H newc | zstd -19", &mut || {
        duct::cmd!("find", ".")
            .pipe(duct::cmd!("sort"))
            .pipe(duct::cmd!("cpio", "-o", "-H", "newc", "--quiet"))
            .pipe(duct::cmd!("zstd", "-19", "-q", "-c"))
            .dir(&tree)
            .stdout_path(&zs)
            .run()?;
        Ok(std::fs::metadata(&zs)?.len())
    })?;
    step.done(&format!(
        "{:.1} MiB tree",
        bytes_in as f64 / (1 << 20) as f64
    ));
    Ok(())
}

/// A real tree to pack: part of the kernel source in the cache (text and
/// code, like an initrd's content), or the agent's sources as a fallback.
fn bench_tree(ctx: &Ctx) -> anyhow::Result<PathBuf> {
    let src = ctx.cache.join("kernel").join("src");
    if let Ok(entries) = std::fs::read_dir(&src) {
        for e in entries.flatten() {
            let t = e
                .path()
                .join("drivers")
                .join("net")
                .join("ethernet")
                .join("intel");
            if t.is_dir() {
                return Ok(t);
            }
        }
    }
    Ok(ctx.root.join("agent"))
}

fn tree_bytes(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Stage times recorded by the last builds that ran them (target/kiln/timings.json).
fn build_times(ctx: &Ctx, report: &mut Report) {
    let map: std::collections::BTreeMap<String, f64> = std::fs::read(ctx.out.join("timings.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for (stage, secs) in map {
        if stage.starts_with("bench") {
            continue;
        }
        report.build.push(row(
            format!("last run of stage `{stage}`"),
            secs,
            "s",
            "recorded by the build that ran it",
        ));
    }
}

/// A one-line change to the agent, then `build-image`: time outside cargo's
/// compile (hashing, initrd, manifest) and in all.
fn warm_rebuild(ctx: &Ctx, image: &ImageSpec, report: &mut Report) -> anyhow::Result<()> {
    let restore = Restore::edit_agent(ctx, "bench edit")?;
    ctx.ui.take_outcomes();
    let t = Instant::now();
    image::build(ctx, image, Arch::X86_64, None)?;
    let total = t.elapsed().as_secs_f64();
    let outcomes = ctx.ui.take_outcomes();
    let cargo = read_cargo_seconds(ctx);
    drop(restore);
    let ran: Vec<_> = outcomes
        .iter()
        .filter(|(_, r)| *r)
        .map(|(s, _)| s.clone())
        .collect();
    report.build.push(row(
        "warm rebuild after a one-line agent change",
        total,
        "s",
        format!("stages run: {}", ran.join(", ")),
    ));
    if let Some(c) = cargo {
        report.build.push(row(
            "  of which outside cargo's compile",
            total - c,
            "s",
            "target < 2 s",
        ));
    }
    // Put the tree back as it was (rebuilds the agent once more).
    image::build(ctx, image, Arch::X86_64, None)?;
    Ok(())
}

/// `cargo xtask dev --once` after a one-line agent change: edit → agent
/// ready without cargo's compile, against the VM's own boot time.
fn dev_cycle(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let restore = Restore::edit_agent(ctx, "bench dev edit")?;
    let out = duct::cmd(std::env::current_exe()?, ["dev", "--once"])
        .dir(&ctx.root)
        .stdin_null()
        .stderr_null()
        .stdout_capture()
        .unchecked()
        .run()?;
    drop(restore);
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().find_map(|l| l.strip_prefix("dev-report:")) else {
        anyhow::bail!("cargo xtask dev --once printed no report ({})", out.status);
    };
    let r: serde_json::Value = serde_json::from_str(line.trim())?;
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    report.build.push(row(
        "dev loop: agent-dev compile after a one-line change",
        f("cargo_seconds"),
        "s",
        "cargo, incremental, profile agent-dev",
    ));
    report.build.push(row(
        "dev loop: edit → agent ready without cargo",
        f("ready_outside_cargo_seconds"),
        "s",
        format!(
            "initrd+manifest {:.2} s, VM boot to agent-ready {:.2} s; target < boot + 1 s = {:.2} s",
            f("pipeline_seconds"),
            f("agent_ready_seconds"),
            f("agent_ready_seconds") + 1.0
        ),
    ));
    report.build.push(row(
        "dev loop: overhead over the VM's own boot",
        f("ready_outside_cargo_seconds") - f("agent_ready_seconds"),
        "s",
        "target < 1 s",
    ));
    Ok(())
}

fn read_cargo_seconds(ctx: &Ctx) -> Option<f64> {
    let text = std::fs::read_to_string(ctx.out.join("agent-cargo-seconds")).ok()?;
    text.trim().parse().ok()
}

struct Restore {
    path: PathBuf,
    text: String,
}

impl Restore {
    /// Appends a comment naming `tag` to agent/src/main.rs (a one-line
    /// change for the rebuild figures); the file is put back on drop.
    fn edit_agent(ctx: &Ctx, tag: &str) -> anyhow::Result<Restore> {
        let path = ctx.root.join("agent").join("src").join("main.rs");
        let text = std::fs::read_to_string(&path)?;
        let restore = Restore {
            path: path.clone(),
            text: text.clone(),
        };
        std::fs::write(&path, format!("{text}// {tag} {}\n", std::process::id()))?;
        Ok(restore)
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.text);
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn print_report(r: &Report) {
    for (title, rows) in [
        ("sizes", &r.sizes),
        ("boot (TCG)", &r.boot),
        ("agent (TCG)", &r.agent),
        ("initrd packing", &r.initrd_packing),
        ("build", &r.build),
    ] {
        println!("\n{title}");
        print_rows(rows);
    }
}

fn print_rows(rows: &[Row]) {
    for row in rows {
        let value = match row.unit.as_str() {
            "bytes" => format!("{:>10.1} KiB", row.value / 1024.0),
            "ratio" => format!("{:>10.3} x  ", row.value),
            u => format!("{:>10.2} {u:<4}", row.value),
        };
        println!("  {:<52} {value}  {}", row.name, row.note);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_middle() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut []), 0.0);
    }
}
