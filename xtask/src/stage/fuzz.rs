//! `cargo xtask fuzz`: every cargo-fuzz target under `fuzz/` for a bounded
//! time (CI runs it as the last step of `cargo xtask test`).
//!
//! One `cargo +nightly fuzz build` serves all targets. Each run reads the
//! seeds committed in `fuzz/corpus/<target>/` but writes what it discovers to
//! `target/kiln/fuzz/corpus/<target>/`, so the repository's corpus only grows
//! when someone copies inputs over on purpose. A crash fails the run, naming
//! the reproducer under `fuzz/artifacts/<target>/`.

use std::path::Path;

use anyhow::Context;

use crate::arch::Arch;
use crate::cmd;
use crate::ctx::Ctx;
use crate::stage::setup;

/// The targets, in `fuzz/fuzz_targets/<name>.rs`.
pub const TARGETS: &[&str] = &[
    "agent_requests",
    "kernel_config",
    "manifest_recipe",
    "cpio_reader",
];

/// Build flags for `build` and `run` alike (a difference would rebuild).
/// No sanitizer: the fuzzed code is safe Rust, where what fuzzing finds is a
/// panic or an overflow (debug assertions are on); AddressSanitizer would
/// double the build time CI pays. Run `cargo fuzz` by hand for ASan.
const BUILD_FLAGS: [&str; 2] = ["--sanitizer", "none"];

/// libFuzzer's memory cap per target (MiB): a leak or a huge allocation fails
/// the run rather than the machine.
const RSS_LIMIT_MB: u32 = 2048;

/// What is missing to fuzz, as install commands (empty when all is there).
fn missing_tools() -> anyhow::Result<Vec<String>> {
    let mut missing: Vec<String> = setup::missing_toolchains()?
        .iter()
        .map(|t| format!("rustup toolchain install {t} --profile minimal"))
        .collect();
    if cmd::which("cargo-fuzz").is_none() {
        missing.push("cargo install --locked cargo-fuzz".to_string());
    }
    Ok(missing)
}

pub fn run(ctx: &Ctx, seconds: u64, only: &[String]) -> anyhow::Result<()> {
    for t in only {
        if !TARGETS.contains(&t.as_str()) {
            anyhow::bail!(
                "no fuzz target `{t}`; the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    let targets: Vec<&str> = if only.is_empty() {
        TARGETS.to_vec()
    } else {
        only.iter().map(String::as_str).collect()
    };
    let missing = missing_tools()?;
    if !missing.is_empty() {
        if ctx.no_setup {
            anyhow::bail!(
                "fuzzing needs a nightly toolchain and cargo-fuzz; missing (setup is off with --no-setup/--offline):\n  {}\nor run `cargo xtask setup`",
                missing.join("\n  ")
            );
        }
        ctx.ensure_setup(&[Arch::host()])?;
    }
    let out = ctx.out.join("fuzz");
    let step = ctx.ui.stage("fuzz build");
    cmd::run_logged(
        ctx,
        "fuzz-build",
        "cargo +nightly fuzz build",
        fuzz_cmd(&["build", BUILD_FLAGS[0], BUILD_FLAGS[1]], &ctx.root),
    )?;
    step.done("all targets");
    for t in targets {
        let corpus = out.join("corpus").join(t);
        let seeds = ctx.root.join("fuzz/corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        // The agent target's test environment lives under TMPDIR and outlives
        // the process (a static): give each run a directory removed after it.
        let tmp = tempfile::Builder::new().prefix("tmp-").tempdir_in(&out)?;
        let step = ctx.ui.stage(&format!("fuzz {t}"));
        let log = ctx.log_path(&format!("fuzz-{t}"));
        let _ = std::fs::remove_file(&log);
        let max_time = format!("-max_total_time={seconds}");
        let rss = format!("-rss_limit_mb={RSS_LIMIT_MB}");
        let corpus_s = corpus.to_string_lossy();
        let seeds_s = seeds.to_string_lossy();
        let args = [
            "run",
            BUILD_FLAGS[0],
            BUILD_FLAGS[1],
            t,
            &corpus_s,
            &seeds_s,
            "--",
            &max_time,
            &rss,
            "-print_final_stats=1",
        ];
        let result = cmd::run_logged_to(
            &log,
            &format!("fuzzing {t}"),
            fuzz_cmd(&args, &ctx.root).env("TMPDIR", tmp.path()),
        );
        drop(tmp);
        result.with_context(|| {
            format!(
                "fuzz target {t} failed; a crash is saved under fuzz/artifacts/{t}/ (replay: `cargo +nightly fuzz run -s none {t} fuzz/artifacts/{t}/<file>`)"
            )
        })?;
        step.done(&format!(
            "{} runs",
            stat(&log, "stat::number_of_executed_units").unwrap_or_else(|| "?".into())
        ));
    }
    Ok(())
}

fn fuzz_cmd(args: &[&str], root: &Path) -> duct::Expression {
    let mut all = vec!["+nightly", "fuzz"];
    all.extend_from_slice(args);
    duct::cmd("cargo", all)
        .dir(root)
        // `+nightly` picks the toolchain; drop the one rustup chose for
        // `cargo xtask` so nothing below cargo-fuzz can fall back to it.
        .env_remove("RUSTUP_TOOLCHAIN")
}

/// A libFuzzer `-print_final_stats` value from a run's log.
fn stat(log: &Path, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim_start_matches([':', ' ']).to_string())
}
