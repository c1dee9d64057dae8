//! `cargo xtask bench --kernel-cost`: what the `workload` kernel feature
//! costs, per arch. The minimal image's kernel (every default feature) against
//! the same fragments without `workload` (removed here, in code: no fragment
//! file exists for the variant), both booting the same initrd with the same
//! QEMU command line, alternating rounds: kernel image size, launch to
//! agent-ready (median), and the idle guest's memory right after agent-ready
//! (MemTotal − MemAvailable and MemTotal, from the agent's GetMetrics).

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use super::{median, row, Row};
use crate::arch::Arch;
use crate::cache::copy_atomic;
use crate::ctx::Ctx;
use crate::image_spec::ImageSpec;
use crate::stage::{image, kernel};
use kiln_manifest::role;

/// The feature whose cost is measured.
pub const FEATURE: &str = "workload";
const IMAGE: &str = "minimal";

/// What `kiln-shim boot --json` prints (the fields used here).
#[derive(Debug, Deserialize)]
struct BootJson {
    agent_ready_seconds: f64,
    guest_memory_used_bytes: Option<u64>,
    guest_memory_total_bytes: Option<u64>,
}

/// One boot's figures.
#[derive(Debug, Clone, Copy)]
struct Boot {
    ready: f64,
    used: f64,
    total: f64,
}

/// Both variants' medians for one arch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variant {
    pub kernel_bytes: f64,
    pub ready_seconds: f64,
    pub used_bytes: f64,
    pub total_bytes: f64,
}

/// The image without `feature`: its kernel request is what the variant builds.
pub fn without_feature(image: &ImageSpec, feature: &str) -> anyhow::Result<ImageSpec> {
    if !image.kernel.features.iter().any(|f| f == feature) {
        anyhow::bail!(
            "image `{}` has no kernel feature `{feature}` (its features: {}), so there is no cost to measure",
            image.name,
            image.kernel.features.join(", ")
        );
    }
    let mut without = image.clone();
    without.kernel.features.retain(|f| f != feature);
    Ok(without)
}

pub fn measure(ctx: &Ctx, shim: &Path, arches: &[Arch], rounds: usize) -> anyhow::Result<Vec<Row>> {
    let image = ImageSpec::load(ctx, IMAGE)?;
    let without = without_feature(&image, FEATURE)?;
    let mut rows = Vec::new();
    rows.push(row(
        "machine load (1-min average) at start",
        super::loadavg(),
        "load",
        "",
    ));
    for &arch in arches {
        ctx.ensure_setup(&[arch])?;
        let with_manifest = image::build(ctx, &image, arch, None)?;
        let step = ctx.ui.stage(&format!("kernel without {FEATURE} {arch}"));
        step.message("cached or built now (5-16 min per arch on 2 cores)");
        let k = kernel::build(
            ctx,
            &kernel::KernelRequest::for_image(ctx, &without, arch, None)?,
        )?;
        step.done(&k.version);
        let without_manifest = variant_image(ctx, &with_manifest, &k.image, arch)?;

        let (mut with, mut wo) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let step = ctx
                .ui
                .stage(&format!("bench kernel cost {arch} {}/{rounds}", round + 1));
            with.push(boot(shim, &with_manifest)?);
            wo.push(boot(shim, &without_manifest)?);
            step.done(&format!(
                "with {:.2} s {} MiB used, without {:.2} s {} MiB used",
                with[round].ready,
                (with[round].used / 1048576.0).round(),
                wo[round].ready,
                (wo[round].used / 1048576.0).round()
            ));
        }
        let a = summarise(
            &mut with,
            super::artifact_size(&with_manifest, role::KERNEL)?,
        );
        let b = summarise(&mut wo, std::fs::metadata(&k.image)?.len() as f64);
        rows.extend(arch_rows(arch, &a, &b, rounds));
    }
    rows.push(row(
        "machine load (1-min average) at end",
        super::loadavg(),
        "load",
        "",
    ));
    Ok(rows)
}

fn summarise(boots: &mut [Boot], kernel_bytes: f64) -> Variant {
    let col = |f: fn(&Boot) -> f64| -> Vec<f64> { boots.iter().map(f).collect() };
    Variant {
        kernel_bytes,
        ready_seconds: median(&mut col(|b| b.ready)),
        used_bytes: median(&mut col(|b| b.used)),
        total_bytes: median(&mut col(|b| b.total)),
    }
}

/// The table rows for one arch: each figure with and without, and the ratio.
pub fn arch_rows(arch: Arch, with: &Variant, without: &Variant, rounds: usize) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut three = |what: &str, unit: &str, w: f64, wo: f64, note: &str| {
        rows.push(row(format!("{arch} {what} with {FEATURE}"), w, unit, note));
        rows.push(row(
            format!("{arch} {what} without {FEATURE}"),
            wo,
            unit,
            note,
        ));
        rows.push(row(
            format!("{arch} {what} with/without"),
            if wo > 0.0 { w / wo } else { 0.0 },
            "ratio",
            "",
        ));
    };
    three(
        "kernel image",
        "bytes",
        with.kernel_bytes,
        without.kernel_bytes,
        "",
    );
    let median = format!("median of {rounds}");
    three(
        "launch to agent ready",
        "s",
        with.ready_seconds,
        without.ready_seconds,
        &median,
    );
    three(
        "idle guest memory used (MemTotal-MemAvailable)",
        "bytes",
        with.used_bytes,
        without.used_bytes,
        &median,
    );
    three(
        "guest MemTotal",
        "bytes",
        with.total_bytes,
        without.total_bytes,
        &median,
    );
    rows
}

/// The image at `manifest` with `kernel` instead of its own: same initrd,
/// same command line, booted from the initrd.
fn variant_image(ctx: &Ctx, manifest: &Path, kernel: &Path, arch: Arch) -> anyhow::Result<PathBuf> {
    let variant = format!("without-{FEATURE}");
    super::variant_image(ctx, manifest, &variant, arch, role::KERNEL, |dir, _| {
        let file = image::kernel_file_name(arch);
        copy_atomic(kernel, &dir.join(file))?;
        Ok(file.to_string())
    })
}

fn boot(shim: &Path, manifest: &Path) -> anyhow::Result<Boot> {
    let b: BootJson = serde_json::from_value(super::shim_boot_json(shim, manifest, &[])?)
        .context("kiln-shim boot --json printed no agent_ready_seconds")?;
    Ok(Boot {
        ready: b.agent_ready_seconds,
        used: b
            .guest_memory_used_bytes
            .context("kiln-shim boot --json printed no guest memory (GetMetrics failed)")?
            as f64,
        total: b.guest_memory_total_bytes.unwrap_or(0) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_and_ratios() {
        let with = Variant {
            kernel_bytes: 2200.0,
            ready_seconds: 1.1,
            used_bytes: 300.0,
            total_bytes: 1000.0,
        };
        let without = Variant {
            kernel_bytes: 2000.0,
            ready_seconds: 1.0,
            used_bytes: 200.0,
            total_bytes: 1010.0,
        };
        let rows = arch_rows(Arch::Aarch64, &with, &without, 5);
        assert_eq!(rows.len(), 12);
        assert_eq!(rows[0].name, "aarch64 kernel image with workload");
        assert_eq!(rows[1].name, "aarch64 kernel image without workload");
        assert!((rows[2].value - 1.1).abs() < 1e-9, "{}", rows[2].value);
        assert_eq!(rows[3].note, "median of 5");
        assert!((rows[8].value - 1.5).abs() < 1e-9);
    }

    #[test]
    fn the_feature_is_removed_or_its_absence_is_an_error() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../image-manifests/minimal.toml"),
        )
        .unwrap();
        let image = ImageSpec::parse(&text, "minimal").unwrap();
        let without = without_feature(&image, FEATURE).unwrap();
        assert!(!without.kernel.features.iter().any(|f| f == FEATURE));
        assert_eq!(
            without.kernel.features.len() + 1,
            image.kernel.features.len()
        );
        let e = without_feature(&without, FEATURE).unwrap_err().to_string();
        assert!(e.contains("no kernel feature `workload`"), "{e}");
    }
}
