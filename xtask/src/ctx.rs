//! Paths and settings shared by every stage.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::arch::Arch;
use crate::remote_cache::{short_key, Lookup, RemoteCache, Said};
use crate::ui::Ui;
use crate::GlobalFlags;

pub struct Ctx {
    /// Workspace root (the checkout).
    pub root: PathBuf,
    /// `target/kiln`: per-checkout outputs.
    pub out: PathBuf,
    /// Content-keyed cache outside the checkout for large inputs and outputs
    /// (kernel sources and builds), shared by every checkout on the machine.
    pub cache: PathBuf,
    /// Timestamp for every file in every artifact.
    pub source_date_epoch: u64,
    pub no_setup: bool,
    pub offline: bool,
    /// Build kernels without the kernel-configs/patches series.
    pub no_patches: bool,
    /// Which cargo profile the agent stage builds: release for images,
    /// `agent-dev` for `cargo xtask dev` (see [`Ctx::for_dev`]).
    pub agent_profile: AgentProfile,
    /// `--cache-remote`: stage results shared through an OCI registry.
    pub remote: Option<Arc<RemoteCache>>,
    /// `--insecure-registry`: plain HTTP to the registry (cache, push, pull).
    pub insecure_registry: bool,
    pub ui: Ui,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentProfile {
    /// `--release`: LTO, size-optimised; what images ship.
    Release,
    /// `--profile agent-dev`: unoptimised and incremental, compiles in seconds.
    Dev,
}

impl Ctx {
    /// The context unit tests use: this checkout, no set-up step.
    #[cfg(test)]
    pub fn for_tests() -> Ctx {
        Ctx::new(&GlobalFlags {
            no_setup: true,
            ..Default::default()
        })
        .expect("a Ctx for this checkout")
    }

    pub fn new(flags: &GlobalFlags) -> anyhow::Result<Ctx> {
        let root = workspace_root()?;
        // KILN_OUT_DIR: outputs elsewhere (a packager's build tree; the
        // build-fault tests, which must not disturb the checkout's images).
        let out = match std::env::var_os("KILN_OUT_DIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => root.join("target").join("kiln"),
        };
        let cache = cache_dir()?;
        let timings = out.join("timings.json");
        let source_date_epoch = source_date_epoch(&root)?;
        let insecure_registry = flags.insecure_registry || env_on("KILN_INSECURE_REGISTRY");
        let remote = remote_cache(flags, insecure_registry)?.map(Arc::new);
        Ok(Ctx {
            root,
            out,
            cache,
            source_date_epoch,
            no_setup: flags.no_setup || flags.offline,
            offline: flags.offline,
            no_patches: flags.no_patches,
            agent_profile: AgentProfile::Release,
            remote,
            insecure_registry,
            ui: Ui::new().with_timings(timings),
        })
    }

    /// The context of `cargo xtask dev`: outputs under `target/kiln/dev/`, so
    /// the developer's images never replace the release ones, and the agent
    /// built with `profile` (the kernel cache is shared).
    pub fn for_dev(&self, profile: AgentProfile) -> Ctx {
        Ctx {
            root: self.root.clone(),
            out: self.out.join("dev"),
            cache: self.cache.clone(),
            source_date_epoch: self.source_date_epoch,
            no_setup: self.no_setup,
            offline: self.offline,
            no_patches: self.no_patches,
            agent_profile: profile,
            remote: self.remote.clone(),
            insecure_registry: self.insecure_registry,
            ui: Ui::new(),
        }
    }

    /// Asks the remote cache for `stage`'s result under `key` and installs a
    /// verified hit into `dir`; true when `dir` now holds it. Prints one line
    /// for a hit, one for a miss and one for a problem.
    pub fn remote_fetch(&self, dir: &Path, stage: &str, key: &str) -> bool {
        let Some(remote) = &self.remote else {
            return false;
        };
        match remote.fetch(dir, stage, key, &|line| self.ui.println(line)) {
            Lookup::Hit { files, bytes } => {
                self.ui.println(&format!(
                    "remote cache: {stage} {} {} {} ({files} files, {} KiB, verified)",
                    short_key(key),
                    Said::Pulled.words(),
                    remote.address(),
                    bytes / 1024
                ));
                true
            }
            Lookup::Miss => {
                self.ui.println(&format!(
                    "remote cache: {stage} {} {} {}; building it here",
                    short_key(key),
                    Said::Missed.words(),
                    remote.address()
                ));
                false
            }
            Lookup::Failed => false,
        }
    }

    /// Offers `stage`'s fresh result in `dir` to the remote cache (only with `--cache-push`).
    pub fn remote_offer(&self, dir: &Path, stage: &str, key: &str) {
        if let Some(remote) = &self.remote {
            if remote.offer(dir, stage, key, &|line| self.ui.println(line)) {
                self.ui.println(&format!(
                    "remote cache: {stage} {} {} {}",
                    short_key(key),
                    Said::Pushed.words(),
                    remote.address()
                ));
            }
        }
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.out.join("logs").join(format!("{name}.log"))
    }

    /// Output directory of one image for one arch.
    pub fn image_dir(&self, image: &str, arch: Arch) -> PathBuf {
        self.out.join(image).join(arch.name())
    }

    /// Path relative to the checkout, for messages and manifests (never a host path in an artifact).
    pub fn rel<'a>(&self, p: &'a Path) -> &'a Path {
        p.strip_prefix(&self.root).unwrap_or(p)
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    // xtask lives in <root>/xtask; cargo tells us where at build time.
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf();
    Ok(root)
}

/// `--cache-remote` or `$KILN_CACHE_REMOTE` (a checkout can set it in
/// `.cargo/config.toml`'s `[env]`), with the push and insecure switches.
fn remote_cache(flags: &GlobalFlags, insecure: bool) -> anyhow::Result<Option<RemoteCache>> {
    let address = flags
        .cache_remote
        .clone()
        .or_else(|| std::env::var("KILN_CACHE_REMOTE").ok())
        .filter(|a| !a.is_empty());
    let Some(address) = address else {
        return Ok(None);
    };
    if flags.offline {
        eprintln!("--offline: not using the remote cache {address}");
        return Ok(None);
    }
    let push = flags.cache_push || env_on("KILN_CACHE_PUSH");
    RemoteCache::connect(&address, push, insecure).map(Some)
}

/// An environment switch: `1` or `true`.
fn env_on(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1" || v == "true")
}

/// `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KILN_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("kiln"));
    }
    let home = std::env::var_os("HOME")
        .context("neither KILN_CACHE_DIR, XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("kiln"))
}

/// `SOURCE_DATE_EPOCH` if set, else the last commit's time, so two checkouts of
/// one commit stamp identical times into their artifacts.
fn source_date_epoch(root: &Path) -> anyhow::Result<u64> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v.trim().parse().with_context(|| {
            format!("SOURCE_DATE_EPOCH=`{v}` is not a number of seconds since 1970")
        });
    }
    let out = duct::cmd!("git", "-C", root, "log", "-1", "--format=%ct")
        .stderr_null()
        .stdout_capture()
        .unchecked()
        .run();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            text.trim().parse().with_context(|| format!("git gave a commit time `{}`", text.trim()))
        }
        _ => anyhow::bail!(
            "cannot tell the build time: set SOURCE_DATE_EPOCH (seconds since 1970), or build from a git checkout with at least one commit"
        ),
    }
}
