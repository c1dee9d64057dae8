//! `cargo xtask bench --initrd-cost`: what the initrd's compression costs at
//! boot, per arch. Under TCG the guest kernel's own decompressor is emulated
//! too, so the smallest initrd is not the fastest to boot. The minimal image's
//! initrd is rewritten in every compression kiln offers (the cpio stream
//! unchanged, `kiln_initrd::recompress`), each booted with the image's own
//! kernel and command line in alternating rounds: initrd size and launch to
//! agent-ready (median).

use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_initrd::{Compression, WriteOptions};

use super::{median, row, Row};
use crate::arch::Arch;
use crate::cache::write_atomic;
use crate::ctx::Ctx;
use crate::image_spec::ImageSpec;
use crate::stage::image;
use kiln_manifest::role;

const IMAGE: &str = "minimal";

pub fn measure(ctx: &Ctx, shim: &Path, arches: &[Arch], rounds: usize) -> anyhow::Result<Vec<Row>> {
    let spec = ImageSpec::load(ctx, IMAGE)?;
    let shipped: Compression = spec
        .compression
        .parse()
        .with_context(|| format!("image-manifests/{IMAGE}.toml: compression"))?;
    let mut rows = vec![row(
        "machine load (1-min average) at start",
        super::loadavg(),
        "load",
        "",
    )];
    for &arch in arches {
        ctx.ensure_setup(&[arch])?;
        let built = image::build(ctx, &spec, arch, None)?;
        let variants = Compression::ALL
            .into_iter()
            .map(|c| Ok((c, variant_image(ctx, &spec, &built, arch, c)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut ready: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
        for round in 0..rounds {
            let step = ctx
                .ui
                .stage(&format!("bench initrd cost {arch} {}/{rounds}", round + 1));
            let mut line = Vec::new();
            for (i, (c, manifest)) in variants.iter().enumerate() {
                let s = super::shim_seconds(shim, manifest, &[])?;
                ready[i].push(s);
                line.push(format!("{c} {s:.2} s"));
            }
            step.done(&line.join(", "));
        }
        let medians: Vec<f64> = ready.iter_mut().map(|v| median(v)).collect();
        let base = variants
            .iter()
            .position(|(c, _)| *c == shipped)
            .map_or(0.0, |i| medians[i]);
        for (i, (c, manifest)) in variants.iter().enumerate() {
            rows.push(row(
                format!("{arch} initrd {c}"),
                super::artifact_size(manifest, role::INITRD)?,
                "bytes",
                "",
            ));
            rows.push(row(
                format!("{arch} launch to agent ready, initrd {c}"),
                medians[i],
                "s",
                format!("median of {rounds}"),
            ));
            if base > 0.0 {
                rows.push(row(
                    format!("{arch} launch to agent ready, initrd {c}/{shipped}"),
                    medians[i] / base,
                    "ratio",
                    "",
                ));
            }
        }
    }
    rows.push(row(
        "machine load (1-min average) at end",
        super::loadavg(),
        "load",
        "",
    ));
    Ok(rows)
}

/// The image at `manifest` with its initrd in `compression`: same kernel,
/// same command line, booted from the initrd.
fn variant_image(
    ctx: &Ctx,
    spec: &ImageSpec,
    manifest: &Path,
    arch: Arch,
    compression: Compression,
) -> anyhow::Result<PathBuf> {
    let mut opts = WriteOptions::new(ctx.source_date_epoch).compression(compression);
    if let Some(level) = spec.compression_level {
        opts = opts.zstd_level(level);
    }
    let variant = format!("initrd-{compression}");
    super::variant_image(
        ctx,
        manifest,
        &variant,
        arch,
        role::INITRD,
        |dir, initrd| {
            let image_dir = manifest.parent().context("manifest has a directory")?;
            let data = std::fs::read(image_dir.join(&initrd.file))?;
            let bytes = kiln_initrd::recompress(&data, &opts)
                .with_context(|| format!("rewriting {} as {compression}", initrd.file))?;
            write_atomic(&dir.join(&initrd.file), &bytes)?;
            Ok(initrd.file.clone())
        },
    )
}
