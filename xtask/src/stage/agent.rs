//! Stage `agent`: the static guest agent for one arch.
//!
//! Keyed by the agent's and protocol crate's sources, the lock file, cargo
//! configuration and the exact rustc, so an unchanged tree never even starts cargo.

use std::path::PathBuf;

use anyhow::Context;

use crate::arch::Arch;
use crate::cache::{copy_atomic, Stamp};
use crate::cmd;
use crate::ctx::{AgentProfile, Ctx};
use crate::elf;
use crate::hash::KeyHasher;

pub const BINARY: &str = "kiln-agent";

#[derive(Debug, Clone)]
pub struct AgentArtifact {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub key: String,
}

pub fn build(ctx: &Ctx, arch: Arch) -> anyhow::Result<AgentArtifact> {
    let dir = ctx.out.join("agent").join(arch.name());
    let key = input_key(ctx, arch)?;
    let step = ctx.ui.stage(&format!("agent {arch}"));
    if let Some(stamp) = Stamp::fresh(&dir, "agent", &key) {
        let art = artifact(&dir, &key, &stamp.outputs[BINARY])?;
        step.cached(&format!("{} KiB", art.size / 1024));
        ctx.remote_offer(&dir, "agent", &key);
        return Ok(art);
    }
    if ctx.remote_fetch(&dir, "agent", &key) {
        if let Some(stamp) = Stamp::fresh(&dir, "agent", &key) {
            let art = artifact(&dir, &key, &stamp.outputs[BINARY])?;
            step.cached(&format!("{} KiB (remote cache)", art.size / 1024));
            return Ok(art);
        }
    }
    Stamp::invalidate(&dir, "agent");
    step.message(&format!(
        "cargo build --{} --target {}",
        cargo_profile_flag(ctx),
        arch.rust_target()
    ));
    let cargo_start = std::time::Instant::now();
    cmd::run_logged(
        ctx,
        &format!("agent-{arch}"),
        "cargo build of kiln-agent",
        cargo_build(ctx, arch),
    )?;
    // How long cargo itself took, so `cargo xtask bench` can tell the
    // pipeline's own overhead apart from the compile.
    let _ = crate::cache::write_atomic(
        &ctx.out.join("agent-cargo-seconds"),
        format!("{:.3}\n", cargo_start.elapsed().as_secs_f64()).as_bytes(),
    );

    let built = ctx
        .root
        .join("target")
        .join(arch.rust_target())
        .join(profile_dir(ctx))
        .join(BINARY);
    let bytes = std::fs::read(&built)
        .with_context(|| format!("cargo did not produce {}", built.display()))?;
    elf::require_static(&format!("kiln-agent for {arch}"), &bytes, arch)?;
    copy_atomic(&built, &dir.join(BINARY))?;
    let stamp = Stamp::record(&dir, "agent", &key, &[BINARY])?;
    ctx.remote_offer(&dir, "agent", &key);
    let art = artifact(&dir, &key, &stamp.outputs[BINARY])?;
    match ctx.agent_profile {
        AgentProfile::Release => step.done(&format!("{} KiB, static", art.size / 1024)),
        AgentProfile::Dev => step.done(&format!(
            "{} KiB, static; an unoptimised dev build: sizes differ from release",
            art.size / 1024
        )),
    }
    Ok(art)
}

fn artifact(dir: &std::path::Path, key: &str, sha: &str) -> anyhow::Result<AgentArtifact> {
    let path = dir.join(BINARY);
    let size = std::fs::metadata(&path)?.len();
    Ok(AgentArtifact {
        path,
        sha256: sha.to_string(),
        size,
        key: key.to_string(),
    })
}

/// rustc flags for the agent; part of the stage key, since they shape the binary.
pub fn rustflags(ctx: &Ctx) -> String {
    // Panic locations embed source paths: registry sources under CARGO_HOME and
    // generated protocol code under the checkout's target/. Map both to fixed
    // names so the binary depends neither on $HOME nor on where the checkout is.
    let cargo_home = std::env::var("CARGO_HOME")
        .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
    [
        "-Ctarget-feature=+crt-static".to_string(),
        format!("--remap-path-prefix={cargo_home}=/cargo"),
        format!("--remap-path-prefix={}=/kiln", ctx.root.display()),
    ]
    .join("\x1f")
}

/// `release`, or `profile agent-dev` (for messages).
fn cargo_profile_flag(ctx: &Ctx) -> &'static str {
    match ctx.agent_profile {
        AgentProfile::Release => "release",
        AgentProfile::Dev => "profile agent-dev",
    }
}

/// Cargo's output directory of the profile, under target/<triple>/.
fn profile_dir(ctx: &Ctx) -> &'static str {
    match ctx.agent_profile {
        AgentProfile::Release => "release",
        AgentProfile::Dev => "agent-dev",
    }
}

fn cargo_build(ctx: &Ctx, arch: Arch) -> duct::Expression {
    let profile: &[&str] = match ctx.agent_profile {
        AgentProfile::Release => &["--release"],
        AgentProfile::Dev => &["--profile", "agent-dev"],
    };
    let mut args = vec!["build"];
    args.extend_from_slice(profile);
    args.extend([
        "--locked",
        "--package",
        "kiln-agent",
        "--target",
        arch.rust_target(),
    ]);
    if ctx.offline {
        // Packagers' builds: crates must come from the local registry cache or `cargo vendor`.
        args.push("--offline");
    }
    let build = duct::cmd("cargo", &args)
        .dir(&ctx.root)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags(ctx))
        .env("SOURCE_DATE_EPOCH", ctx.source_date_epoch.to_string());
    match ctx.agent_profile {
        // The dev loop's seconds come from incremental builds, even where the
        // environment turns them off (CI's `.ci/run` does, to save disk).
        AgentProfile::Dev => build.env("CARGO_INCREMENTAL", "1"),
        AgentProfile::Release => build,
    }
}

fn input_key(ctx: &Ctx, arch: Arch) -> anyhow::Result<String> {
    let rustc = cmd::read("rustc -vV", duct::cmd!("rustc", "-vV"))?;
    let mut h = KeyHasher::new("agent");
    h.str("arch", arch.name())
        .str("target", arch.rust_target())
        .str("rustc", &rustc);
    if ctx.agent_profile == AgentProfile::Dev {
        // Only dev builds name their profile, so release keys stay as they were.
        h.str("profile", "agent-dev");
    }
    // The flags minus the checkout path, which is remapped away and must not
    // make two checkouts' keys differ.
    h.str(
        "rustflags",
        &rustflags(ctx).replace(&ctx.root.display().to_string(), "<root>"),
    );
    h.tree("agent", &ctx.root.join("agent"), &["target"])?;
    h.file("Cargo.lock", &ctx.root.join("Cargo.lock"))?;
    h.file("Cargo.toml", &ctx.root.join("Cargo.toml"))?;
    h.file("cargo-config", &ctx.root.join(".cargo/config.toml"))?;
    Ok(h.finish())
}
