//! Stage `kernel`: a guest kernel built from `kernel-configs/` fragments.
//!
//! Flow: identify the source by content → stage key → (cached? return) →
//! extract the source once per content hash → configure out of tree (tinyconfig + fragments) →
//! verify every requested option against the final `.config` → `make <image>`
//! → copy image, config and release string into the cache with a stamp.
//!
//! Cache layout (under `ctx.cache`, shared by every checkout on the machine):
//! - `kernel/src-hashes.json`: tarball path → (size, mtime, sha256), so a
//!   150 MB tarball is hashed once, not on every run.
//! - `kernel/src/<srchash>/`: the extracted tarball (one per content hash; all
//!   arches and configs build from it with `O=`, so it stays pristine).
//! - `kernel/build/<key>/`: the `O=` build tree of one stage key. Kept after a
//!   build (incremental retry after a failure, `vmlinux` for debugging); safe to delete.
//! - `kernel/out/<key>/{<image>,config,release}` plus `.kernel.stamp`.
//!
//! Decisions worth knowing:
//! - Configuration is tinyconfig's inputs (`tiny-base.config`, `tiny.config`,
//!   the arch's `tiny.config`) with the fragments laid over them, applied by one
//!   `KCONFIG_ALLCONFIG=… make allnoconfig` (what `make tinyconfig` and
//!   `merge_config.sh -n` do), then `olddefconfig`. Options that only become
//!   visible through a fragment (IPv6 once INET is on, IA32 emulation once
//!   64BIT is on, …) start at `n` instead of their defaults, so the kernel holds
//!   tinyconfig's floor plus what the fragments ask for, nothing else.
//! - The key covers the source hash, arch, each fragment's name and *parsed*
//!   settings (editing a comment does not cost a rebuild), the compiler's
//!   version line and [`STAGE_VERSION`]. The allow-list is not a build input: a
//!   cached kernel is re-verified against the current fragments and allow-list
//!   on every run (microseconds), so allow-list edits take effect at once.
//! - A source directory (instead of a tarball) is identified by its Makefile
//!   plus a listing of every file's path, size and mtime (a full content hash of
//!   a kernel tree costs seconds on every run). It must be clean (no in-tree `.config`).
//! - `KBUILD_BUILD_TIMESTAMP` is the source's top-level Makefile mtime, not
//!   `SOURCE_DATE_EPOCH`: the latter moves with every commit and would make the
//!   kernel's bytes depend on which commit happened to fill the cache. Same
//!   source + same key ⇒ same bytes.

pub mod compare;
pub mod dotconfig;
pub mod kconfig;
pub mod modules;
mod patches;
mod verify;

use patches::PatchSeries;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::Context;
use kiln_manifest::PatchRecord;
use serde::{Deserialize, Serialize};

use self::dotconfig::ConfigFile;
use self::verify::{AllowList, Comparison};
use crate::arch::{Arch, CrossTools};
use crate::cache::{copy_atomic, write_atomic, Stamp};
use crate::cmd;
use crate::ctx::Ctx;
use crate::hash::{sha256_file, KeyHasher};
use crate::image_spec::ImageSpec;
use crate::ui::Step;

/// Bump when the way kiln configures or builds a kernel changes, so every
/// cached kernel is rebuilt.
const STAGE_VERSION: &str = "kernel-1";
const STAMP: &str = "kernel";
/// Length of the hash prefixes used as directory names (the stamp holds the full key).
const DIR_HASH_LEN: usize = 16;

/// What to build: made from an image spec by [`KernelRequest::for_image`].
#[derive(Debug, Clone)]
pub struct KernelRequest {
    pub arch: Arch,
    /// Kernel series the fragments were written for, e.g. "6.12".
    pub series: String,
    /// Fragments in merge order; later ones win.
    pub fragments: Vec<PathBuf>,
    /// A tarball (.tar.xz/.tar.gz/.tar) or an unpacked tree; default Debian's linux-source.
    pub kernel_src: Option<PathBuf>,
    /// Patch series directory to apply (None: `--no-patches`).
    pub patches: Option<PathBuf>,
}

impl KernelRequest {
    /// The request for `image`'s kernel on `arch`. Fragments in order: common
    /// base, arch base, then each feature's common and arch-specific parts.
    /// Later fragments win.
    pub fn for_image(
        ctx: &Ctx,
        image: &ImageSpec,
        arch: Arch,
        kernel_src: Option<PathBuf>,
    ) -> anyhow::Result<KernelRequest> {
        let dir = ctx.root.join("kernel-configs");
        let mut fragments = vec![dir.join("common").join("base.conf")];
        let arch_base = dir.join(arch.fragment_dir()).join("base.conf");
        if arch_base.exists() {
            fragments.push(arch_base);
        }
        for f in &image.kernel.features {
            let common = dir.join("features").join(format!("{f}.conf"));
            let arch_part = dir.join(arch.fragment_dir()).join(format!("{f}.conf"));
            if !common.exists() && !arch_part.exists() {
                anyhow::bail!(
                    "image `{}` asks for kernel feature `{f}`, but neither {} nor {} exists",
                    image.name,
                    ctx.rel(&common).display(),
                    ctx.rel(&arch_part).display()
                );
            }
            fragments.extend([common, arch_part].into_iter().filter(|p| p.exists()));
        }
        for f in &fragments {
            if !f.exists() {
                anyhow::bail!("kernel fragment {} is missing", ctx.rel(f).display());
            }
        }
        let patches = ctx
            .root
            .join("kernel-configs")
            .join("patches")
            .join(&image.kernel.series);
        Ok(KernelRequest {
            arch,
            series: image.kernel.series.clone(),
            fragments,
            kernel_src,
            patches: (!ctx.no_patches).then_some(patches),
        })
    }

    /// Appends fragments from outside the tree (`--fragment`), after the
    /// image's, so their settings win. They are part of the key like any other
    /// fragment, named by file name so two machines share a build.
    pub fn with_extra_fragments(mut self, extra: &[PathBuf]) -> anyhow::Result<KernelRequest> {
        for f in extra {
            let path = fs::canonicalize(f).ok().filter(|p| p.is_file());
            let Some(path) = path else {
                anyhow::bail!(
                    "--fragment {}: no such file; give a kernel config fragment, lines such as `CONFIG_DUMMY=y` or `# CONFIG_DUMMY is not set`",
                    f.display()
                );
            };
            self.fragments.push(path);
        }
        Ok(self)
    }
}

/// A fragment's name in the key and in messages: its path in the checkout, or
/// `extra/<file name>` for one given with `--fragment` (never a host path).
fn fragment_name(ctx: &Ctx, path: &Path) -> String {
    match path.strip_prefix(&ctx.root) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => format!(
            "extra/{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        ),
    }
}

#[derive(Debug, Clone)]
pub struct KernelArtifact {
    /// Boot image in the cache (bzImage, Image or vmlinux).
    pub image: PathBuf,
    /// Final `.config` in the cache.
    pub config: PathBuf,
    /// Kernel release, e.g. `6.12.57` (what `uname -r` prints in the guest).
    pub version: String,
    /// Stage key (hex sha256).
    pub key: String,
    /// The source's content hash (the tarball's sha256, or the hash of an
    /// unpacked tree's listing), for the SBOM.
    pub source_sha256: String,
    /// Patches applied to the source, in order.
    pub patches: Vec<PatchRecord>,
    /// The loadable modules (`modules.dep`, `modules.builtin`, `kernel/**.ko`)
    /// when the config has CONFIG_MODULES.
    pub modules: Option<PathBuf>,
}

/// Builds (or finds in the cache) the kernel for `req`.
pub fn build(ctx: &Ctx, req: &KernelRequest) -> anyhow::Result<KernelArtifact> {
    let step = ctx.ui.stage(&format!("kernel {}", req.arch));
    let plan = Plan::new(ctx, req)?;
    let _lock = crate::cache::lock_entry(&plan.build_dir.with_extension("lock"), || {
        step.message("waiting for another kiln process building this kernel")
    })?;
    if let Some(art) = plan.cached()? {
        step.cached(&format!("{} {}", art.version, plan.image_name()));
        ctx.remote_offer(&plan.out_dir, STAMP, &plan.key);
        return Ok(art);
    }
    if ctx.remote_fetch(&plan.out_dir, STAMP, &plan.key) {
        if let Some(art) = plan.cached()? {
            step.cached(&format!(
                "{} {} (remote cache)",
                art.version,
                plan.image_name()
            ));
            return Ok(art);
        }
    }
    Stamp::invalidate(&plan.out_dir, STAMP);
    let _ = fs::remove_file(ctx.log_path(&plan.log_name()));
    plan.print_overrides(ctx);
    let tree = plan.source.tree(ctx, &plan.log_name(), &step)?;
    step.message("applying kernel patches");
    let tree = plan.patches.apply(ctx, &tree, &plan.log_name())?;
    let actual = plan.configure(ctx, &tree, &step)?;
    let comparison = plan.compare(&actual);
    plan.report_allowed(ctx, &comparison);
    if !comparison.failures().is_empty() {
        anyhow::bail!(plan.failure_message(&tree, &actual, &comparison));
    }

    let (target, built) = req.arch.kernel_image();
    let jobs = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1);
    let with_modules = actual.get("MODULES") == Some(&dotconfig::Value::Yes);
    let mut targets = vec![format!("-j{jobs}"), target.to_string()];
    if with_modules {
        targets.push("modules".into());
    }
    step.message(&format!("make {}", targets.join(" ")));
    cmd::run_logged(
        ctx,
        &plan.log_name(),
        &format!("make {target} for {}", req.arch),
        plan.make(&tree, &targets)?,
    )?;

    let release_file = plan.build_dir.join("include/config/kernel.release");
    let release = fs::read_to_string(&release_file)
        .with_context(|| format!("make did not write {}", release_file.display()))?
        .trim()
        .to_string();
    copy_atomic(
        &plan.build_dir.join(built),
        &plan.out_dir.join(plan.image_name()),
    )?;
    copy_atomic(
        &plan.build_dir.join(".config"),
        &plan.out_dir.join("config"),
    )?;
    write_atomic(
        &plan.out_dir.join("release"),
        format!("{release}\n").as_bytes(),
    )?;
    let mut outputs = vec![
        plan.image_name().to_string(),
        "config".into(),
        "release".into(),
    ];
    if with_modules {
        step.message("make modules_install");
        let staging = tempfile::Builder::new()
            .prefix(".modules-")
            .tempdir_in(&plan.build_dir)?;
        cmd::run_logged(
            ctx,
            &plan.log_name(),
            &format!("make modules_install for {}", req.arch),
            plan.make(
                &tree,
                &[
                    "modules_install".into(),
                    format!("INSTALL_MOD_PATH={}", staging.path().display()),
                    "INSTALL_MOD_STRIP=1".into(),
                    // kiln writes modules.dep itself (modules::collect).
                    "DEPMOD=true".into(),
                ],
            )?,
        )?;
        let installed = staging.path().join("lib/modules").join(&release);
        outputs.extend(modules::collect(
            &plan.build_dir,
            &installed,
            &plan.out_dir.join(modules::DIR),
        )?);
    } else {
        let _ = fs::remove_dir_all(plan.out_dir.join(modules::DIR));
    }
    let outputs: Vec<&str> = outputs.iter().map(String::as_str).collect();
    Stamp::record(&plan.out_dir, STAMP, &plan.key, &outputs)?;
    ctx.remote_offer(&plan.out_dir, STAMP, &plan.key);
    let art = plan.artifact(release);
    let size = fs::metadata(&art.image).map(|m| m.len()).unwrap_or(0);
    step.done(&format!(
        "{} {}, {} KiB, {} options on",
        art.version,
        plan.image_name(),
        size / 1024,
        actual.enabled_count()
    ));
    Ok(art)
}

/// Where the list of options kiln leaves off on purpose lives (data read by
/// `--compare` only; not a fragment, not part of any key).
const OMITTED_LIST: &str = "kernel-configs/omitted.toml";

/// `kernel-check --compare`: kiln's final `.config` for `req` (the cached
/// build's, or configured now without building) against the configuration(s)
/// at `others`; prints the report.
pub fn compare_with(ctx: &Ctx, req: &KernelRequest, others: &[PathBuf]) -> anyhow::Result<()> {
    let theirs = compare::OtherConfig::load(others)?;
    let omitted_path = ctx.root.join(OMITTED_LIST);
    let omitted = match fs::read_to_string(&omitted_path) {
        Ok(text) => compare::OmittedList::parse(&text, OMITTED_LIST)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => compare::OmittedList::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", omitted_path.display())),
    };
    let step = ctx
        .ui
        .stage(&format!("kernel-check {} --compare", req.arch));
    let plan = Plan::new(ctx, req)?;
    // The source is needed anyway to know which of their options exist here.
    let tree = plan.source.tree(ctx, &plan.log_name(), &step)?;
    let tree = plan.patches.apply(ctx, &tree, &plan.log_name())?;
    let actual = if Stamp::fresh(&plan.out_dir, STAMP, &plan.key).is_some() {
        read_config(&plan.out_dir.join("config"))?
    } else {
        plan.print_overrides(ctx);
        plan.configure(ctx, &tree, &step)?
    };
    step.message("reading the Kconfig tree");
    let index = kconfig::KconfigIndex::load(&tree, req.arch.kernel_arch());
    let d = compare::diff(&actual, &plan.requested, &theirs.config, &omitted, |n| {
        index.defs.contains_key(n)
    });
    let closest: BTreeMap<String, Vec<String>> = d
        .unknown
        .iter()
        .map(|r| (r.name.clone(), index.closest(&r.name, 2)))
        .collect();
    step.done(&format!(
        "{} left off on purpose, {} not decided",
        d.omitted.len(),
        d.undecided.len()
    ));
    println!(
        "kiln's kernel config for {} (fragments: {}) against {} ({} file(s))",
        req.arch,
        plan.fragment_names().join(", "),
        others
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(" + "),
        theirs.files.len()
    );
    if let Some(first) = theirs.skipped.first() {
        println!(
            "note: skipped {} line(s) that are not kernel config syntax, e.g. {first}",
            theirs.skipped.len()
        );
    }
    let base = (others.len() == 1 && others[0].is_dir()).then(|| others[0].as_path());
    print!("{}", d.render("kiln", "theirs", base, &closest));
    Ok(())
}

/// Configures (without building, unless a build is cached) and prints the
/// requested/actual table; fails if a requested option did not survive.
pub fn check(ctx: &Ctx, req: &KernelRequest) -> anyhow::Result<()> {
    let step = ctx.ui.stage(&format!("kernel-check {}", req.arch));
    let plan = Plan::new(ctx, req)?;
    let cached_config = plan.out_dir.join("config");
    let (actual, tree) = if Stamp::fresh(&plan.out_dir, STAMP, &plan.key).is_some() {
        (read_config(&cached_config)?, None)
    } else {
        plan.print_overrides(ctx);
        let tree = plan.source.tree(ctx, &plan.log_name(), &step)?;
        let tree = plan.patches.apply(ctx, &tree, &plan.log_name())?;
        let actual = plan.configure(ctx, &tree, &step)?;
        (actual, Some(tree))
    };
    let comparison = plan.compare(&actual);
    let failures = comparison.failures();
    let hints = if failures.is_empty() {
        BTreeMap::new()
    } else {
        let tree = match tree {
            Some(t) => t,
            None => {
                let pristine = plan.source.tree(ctx, &plan.log_name(), &step)?;
                plan.patches.apply(ctx, &pristine, &plan.log_name())?
            }
        };
        plan.hints(&tree, &actual, &comparison)
    };
    step.done(&format!(
        "{} requested, {} failing",
        comparison.rows.len(),
        failures.len()
    ));
    let all: Vec<_> = comparison.rows.iter().collect();
    println!(
        "kernel config for {} (fragments: {})",
        req.arch,
        plan.fragment_names().join(", ")
    );
    print!("{}", verify::render_table(&all, &hints));
    println!(
        "{} requested: {} ok, {} allowed, {} failing; the final .config turns on {} options",
        comparison.rows.len(),
        comparison.rows.len() - failures.len() - comparison.allowed().len(),
        comparison.allowed().len(),
        failures.len(),
        actual.enabled_count()
    );
    for name in &comparison.stale_allows {
        println!(
            "note: CONFIG_{name} is allow-listed for {} but came through; the entry may be stale",
            req.arch
        );
    }
    if !failures.is_empty() {
        anyhow::bail!(
            "{} requested option(s) did not survive Kconfig for {} (see the table above)",
            failures.len(),
            req.arch
        );
    }
    Ok(())
}

/// Everything decided before running a tool: parsed inputs, key and paths.
struct Plan {
    arch: Arch,
    series: String,
    /// (name relative to the checkout, parsed fragment), in merge order.
    fragments: Vec<(String, ConfigFile)>,
    requested: ConfigFile,
    overrides: Vec<dotconfig::Override>,
    allow: AllowList,
    source: Source,
    patches: PatchSeries,
    key: String,
    build_dir: PathBuf,
    out_dir: PathBuf,
}

impl Plan {
    fn new(ctx: &Ctx, req: &KernelRequest) -> anyhow::Result<Plan> {
        let mut fragments = Vec::new();
        for path in &req.fragments {
            let name = fragment_name(ctx, path);
            let text = fs::read_to_string(path)
                .with_context(|| format!("reading kernel fragment {name}"))?;
            fragments.push((name.clone(), ConfigFile::parse(&text, &name)?));
        }
        let parsed: Vec<ConfigFile> = fragments.iter().map(|(_, f)| f.clone()).collect();
        let (requested, overrides) = dotconfig::merge(&parsed);
        let allow_path = ctx.root.join("kernel-configs").join("allowlist.toml");
        let allow = match fs::read_to_string(&allow_path) {
            Ok(text) => AllowList::parse(&text, &ctx.rel(&allow_path).display().to_string())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => AllowList::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", allow_path.display())),
        };
        let source = Source::identify(ctx, req)?;
        let patches = match &req.patches {
            Some(dir) => PatchSeries::load(dir)?,
            None => PatchSeries::default(),
        };
        let gcc = compiler_version(req.arch)?;

        let mut h = KeyHasher::new("kernel");
        h.str("stage-version", STAGE_VERSION)
            .str("source", &source.hash)
            .str("arch", req.arch.name())
            .str("gcc", &gcc)
            .str("patches", &patches.hash());
        for (name, frag) in &fragments {
            h.str("fragment-name", name).str("fragment", &frag.render());
        }
        let key = h.finish();
        let short = &key[..DIR_HASH_LEN];
        let kernel_cache = ctx.cache.join("kernel");
        Ok(Plan {
            arch: req.arch,
            series: req.series.clone(),
            fragments,
            requested,
            overrides,
            allow,
            source,
            patches,
            build_dir: kernel_cache.join("build").join(short),
            out_dir: kernel_cache.join("out").join(short),
            key,
        })
    }

    fn log_name(&self) -> String {
        format!("kernel-{}", self.arch)
    }

    fn image_name(&self) -> &'static str {
        let (_, path) = self.arch.kernel_image();
        path.rsplit('/').next().unwrap_or(path)
    }

    fn fragment_names(&self) -> Vec<String> {
        self.fragments
            .iter()
            .map(|(n, _)| n.trim_start_matches("kernel-configs/").to_string())
            .collect()
    }

    fn artifact(&self, version: String) -> KernelArtifact {
        KernelArtifact {
            image: self.out_dir.join(self.image_name()),
            config: self.out_dir.join("config"),
            version,
            key: self.key.clone(),
            source_sha256: self.source.hash.clone(),
            patches: self.patches.patches.clone(),
            modules: Some(self.out_dir.join(modules::DIR))
                .filter(|d| d.join(modules::DEP).exists()),
        }
    }

    /// The cached kernel, if its stamp is fresh and its config still satisfies
    /// the request and the current allow-list.
    fn cached(&self) -> anyhow::Result<Option<KernelArtifact>> {
        if Stamp::fresh(&self.out_dir, STAMP, &self.key).is_none() {
            return Ok(None);
        }
        let config = read_config(&self.out_dir.join("config"))?;
        if !self.compare(&config).failures().is_empty() {
            return Ok(None); // the allow-list changed; the normal path explains
        }
        let release = fs::read_to_string(self.out_dir.join("release"))?
            .trim()
            .to_string();
        Ok(Some(self.artifact(release)))
    }

    fn compare(&self, actual: &ConfigFile) -> Comparison {
        verify::compare(&self.requested, actual, &self.allow, self.arch)
    }

    /// `make O=<build> ARCH=… [CROSS_COMPILE=…] LOCALVERSION= <args>` in `tree`.
    fn make(&self, tree: &Path, args: &[String]) -> anyhow::Result<duct::Expression> {
        let mut argv = vec![
            format!("O={}", self.build_dir.display()),
            format!("ARCH={}", self.arch.kernel_arch()),
            // Set (empty without patches): no `+` suffix from scripts/setlocalversion;
            // with patches, `+kiln.<series hash>` shows in uname -r and /proc/version.
            format!("LOCALVERSION={}", self.patches.localversion()),
        ];
        if let Some(prefix) = self.arch.cross_prefix() {
            argv.push(format!("CROSS_COMPILE={prefix}"));
        }
        argv.extend(args.iter().cloned());
        fs::create_dir_all(&self.build_dir)
            .with_context(|| format!("creating {}", self.build_dir.display()))?;
        Ok(duct::cmd("make", argv)
            .dir(tree)
            .env("KBUILD_BUILD_TIMESTAMP", build_timestamp(tree)?)
            .env("KBUILD_BUILD_USER", "kiln")
            .env("KBUILD_BUILD_HOST", "kiln")
            .env("KBUILD_BUILD_VERSION", "1")
            .env("LC_ALL", "C")
            // A caller's make (CI scripts) must not hand us its jobserver or variables.
            .env_remove("MAKEFLAGS")
            .env_remove("MFLAGS")
            .env_remove("MAKELEVEL")
            .env_remove("KCONFIG_CONFIG"))
    }

    /// tinyconfig's inputs with the fragments over them, applied by one
    /// `allnoconfig`, then `olddefconfig`. Returns the final `.config`.
    fn configure(&self, ctx: &Ctx, tree: &Path, step: &Step) -> anyhow::Result<ConfigFile> {
        let version = makefile_version(tree)?;
        if version != self.series && !version.starts_with(&format!("{}.", self.series)) {
            anyhow::bail!(
                "kernel source {} is Linux {version}, but the image's fragments are written for series {}; \
                 pass a {} source with --kernel-src or change `kernel.series` in the image manifest",
                self.source.describe(),
                self.series,
                self.series
            );
        }
        let tiny = tinyconfig_inputs(tree, self.arch.kernel_arch())?;
        let allconfig = self.build_dir.join("kiln.allconfig");
        fs::create_dir_all(&self.build_dir)
            .with_context(|| format!("creating {}", self.build_dir.display()))?;
        write_atomic(
            &allconfig,
            tiny.overlay(&self.requested).render().as_bytes(),
        )?;
        let log = self.log_name();
        let what = |t: &str| format!("make {t} for {}", self.arch);
        step.message("make allnoconfig (tinyconfig + fragments)");
        let allno = self
            .make(tree, &["allnoconfig".into()])?
            .env("KCONFIG_ALLCONFIG", &allconfig);
        cmd::run_logged(ctx, &log, &what("allnoconfig"), allno)?;
        step.message("make olddefconfig");
        cmd::run_logged(
            ctx,
            &log,
            &what("olddefconfig"),
            self.make(tree, &["olddefconfig".into()])?,
        )?;
        read_config(&self.build_dir.join(".config"))
    }

    fn hints(
        &self,
        tree: &Path,
        actual: &ConfigFile,
        comparison: &Comparison,
    ) -> BTreeMap<String, Vec<String>> {
        let srcarch = self.arch.kernel_arch();
        let index = kconfig::KconfigIndex::load(tree, srcarch);
        let failures = comparison.failures();
        let everywhere = if failures.iter().any(|r| !index.defs.contains_key(&r.name)) {
            kconfig::scan_all_definitions(tree)
        } else {
            BTreeMap::new()
        };
        let explainer = verify::Explainer {
            index: &index,
            everywhere: &everywhere,
            actual,
            requested: &self.requested,
            srcarch,
        };
        failures
            .iter()
            .map(|r| (r.name.clone(), explainer.explain(r)))
            .collect()
    }

    fn failure_message(&self, tree: &Path, actual: &ConfigFile, comparison: &Comparison) -> String {
        let failures = comparison.failures();
        let hints = self.hints(tree, actual, comparison);
        format!(
            "kernel config for {arch}: {n} of {total} requested option(s) did not survive Kconfig \
             (final config: {config}):\n{table}\
             Fix the fragments, or list an option that cannot exist on {arch} in kernel-configs/allowlist.toml. \
             `cargo xtask kernel-check --arch {arch}` prints the whole table.",
            arch = self.arch,
            n = failures.len(),
            total = comparison.rows.len(),
            config = self.build_dir.join(".config").display(),
            table = verify::render_table(&failures, &hints),
        )
    }

    fn print_overrides(&self, ctx: &Ctx) {
        for o in &self.overrides {
            ctx.ui.println(&format!(
                "note: CONFIG_{} = {} ({}) overrides {} ({})",
                o.name, o.later.value, o.later.origin, o.earlier.value, o.earlier.origin
            ));
        }
    }

    fn report_allowed(&self, ctx: &Ctx, comparison: &Comparison) {
        for r in comparison.allowed() {
            ctx.ui.println(&format!(
                "note: CONFIG_{} requested {} is {} on {}; allow-listed: {}",
                r.name,
                r.requested,
                r.actual
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_else(|| "unset".into()),
                self.arch,
                r.allowed.as_deref().unwrap_or_default()
            ));
        }
        for name in &comparison.stale_allows {
            ctx.ui.println(&format!("note: CONFIG_{name} is allow-listed for {} but came through; the entry may be stale", self.arch));
        }
    }
}

/// What `make tinyconfig` feeds Kconfig: `kernel/configs/tiny-base.config`,
/// `kernel/configs/tiny.config` and the arch's `configs/tiny.config`, merged.
/// kiln uses these inputs rather than tinyconfig's output, whose derived values
/// (e.g. `NR_CPUS=1` from a non-SMP config) would otherwise be pinned as if requested.
fn tinyconfig_inputs(tree: &Path, srcarch: &str) -> anyhow::Result<ConfigFile> {
    let mut parts = Vec::new();
    for rel in [
        "kernel/configs/tiny-base.config",
        "kernel/configs/tiny.config",
        &format!("arch/{srcarch}/configs/tiny.config"),
    ] {
        let path = tree.join(rel);
        match fs::read_to_string(&path) {
            Ok(text) => parts.push(ConfigFile::parse(&text, rel)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && rel.starts_with("arch/") => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading {} (part of tinyconfig)", path.display()))
            }
        }
    }
    Ok(dotconfig::merge(&parts).0)
}

fn read_config(path: &Path) -> anyhow::Result<ConfigFile> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(ConfigFile::parse(&text, &path.display().to_string())?)
}

/// First line of `<cross>gcc --version`: part of the key, since another
/// compiler makes another kernel.
fn compiler_version(arch: Arch) -> anyhow::Result<String> {
    let gcc = format!("{}gcc", arch.cross_prefix().unwrap_or(""));
    let out = cmd::read(&format!("{gcc} --version"), duct::cmd!(&gcc, "--version")).with_context(|| match arch.cross_gcc_package() {
        Some(pkg) => format!("the {arch} kernel needs {gcc}: apt-get install {pkg} (or `cargo xtask setup --arch {arch}`)"),
        None => "the kernel needs gcc: apt-get install gcc (or `cargo xtask setup`)".to_string(),
    })?;
    Ok(out.lines().next().unwrap_or_default().to_string())
}

/// `VERSION.PATCHLEVEL.SUBLEVEL` from the tree's top-level Makefile.
fn makefile_version(tree: &Path) -> anyhow::Result<String> {
    let path = tree.join("Makefile");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let field = |key: &str| {
        text.lines().take(20).find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    match (field("VERSION"), field("PATCHLEVEL"), field("SUBLEVEL")) {
        (Some(v), Some(p), Some(s)) => Ok(format!(
            "{v}.{p}.{s}{}",
            field("EXTRAVERSION").unwrap_or_default()
        )),
        _ => anyhow::bail!(
            "{} has no VERSION/PATCHLEVEL/SUBLEVEL lines: is this a Linux source tree?",
            path.display()
        ),
    }
}

/// The source release date (top Makefile's mtime, which tar preserves), as `date -u` prints it.
fn build_timestamp(tree: &Path) -> anyhow::Result<String> {
    let path = tree.join("Makefile");
    let mtime = fs::metadata(&path)
        .and_then(|m| m.modified())
        .with_context(|| format!("reading the mtime of {}", path.display()))?;
    let secs = mtime
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    cmd::read(
        "date",
        duct::cmd!("date", "-u", "-d", format!("@{secs}")).env("LC_ALL", "C"),
    )
}

// ---------------------------------------------------------------------------
// Kernel source

enum SourceKind {
    Tarball(PathBuf),
    Dir(PathBuf),
}

struct Source {
    kind: SourceKind,
    /// Content hash (tarball sha256, or the directory listing's hash).
    hash: String,
}

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
struct MemoEntry {
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

impl Source {
    fn identify(ctx: &Ctx, req: &KernelRequest) -> anyhow::Result<Source> {
        let path = match &req.kernel_src {
            Some(p) => p.clone(),
            None => {
                let default = PathBuf::from(format!("/usr/src/linux-source-{}.tar.xz", req.series));
                if !default.exists() {
                    anyhow::bail!(
                        "no kernel source: {} is missing; install it with `apt-get install linux-source-{}` \
                         (or `cargo xtask setup`), or pass --kernel-src <tarball or tree>",
                        default.display(),
                        req.series
                    );
                }
                default
            }
        };
        let meta = fs::metadata(&path)
            .with_context(|| format!("kernel source {} does not exist", path.display()))?;
        if meta.is_dir() {
            if path.join(".config").exists() || path.join("include/config/auto.conf").exists() {
                anyhow::bail!(
                    "kernel source {} was configured in-tree; kiln builds out of tree (O=) and needs a clean tree: \
                     run `make mrproper` there, or pass a tarball",
                    path.display()
                );
            }
            let hash = hash_dir(&path)?;
            return Ok(Source {
                kind: SourceKind::Dir(path),
                hash,
            });
        }
        let hash = tarball_hash(ctx, &path, &meta)?;
        Ok(Source {
            kind: SourceKind::Tarball(path),
            hash,
        })
    }

    fn describe(&self) -> String {
        match &self.kind {
            SourceKind::Tarball(p) | SourceKind::Dir(p) => p.display().to_string(),
        }
    }

    /// The unpacked tree: the directory itself, or the tarball extracted once
    /// into `kernel/src/<hash>/` (to a temp dir first, then renamed into place).
    fn tree(&self, ctx: &Ctx, log: &str, step: &Step) -> anyhow::Result<PathBuf> {
        let tarball = match &self.kind {
            SourceKind::Dir(p) => return Ok(p.clone()),
            SourceKind::Tarball(p) => p,
        };
        let parent = ctx.cache.join("kernel").join("src");
        let dest = parent.join(&self.hash[..DIR_HASH_LEN]);
        if dest.join("Makefile").is_file() {
            return Ok(dest);
        }
        fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(".extract-")
            .tempdir_in(&parent)
            .with_context(|| format!("creating a temp dir in {}", parent.display()))?;
        let name = tarball
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        step.message(&format!("extracting {name}"));
        let tar = duct::cmd!(
            "tar",
            "-xf",
            tarball,
            "-C",
            tmp.path(),
            "--no-same-owner",
            "--no-same-permissions"
        );
        cmd::run_logged(ctx, log, &format!("extracting {}", tarball.display()), tar)?;
        let top = top_dir(tmp.path()).with_context(|| {
            format!(
                "{} does not hold a kernel tree (no top-level Makefile)",
                tarball.display()
            )
        })?;
        if let Err(e) = fs::rename(&top, &dest) {
            // Another kiln may have finished the same extraction first.
            if !dest.join("Makefile").is_file() {
                return Err(e)
                    .with_context(|| format!("moving the extracted source to {}", dest.display()));
            }
        }
        Ok(dest)
    }
}

/// The extracted tree: `dir` itself or its single subdirectory, whichever has a Makefile.
fn top_dir(dir: &Path) -> Option<PathBuf> {
    if dir.join("Makefile").is_file() {
        // Renaming the temp dir itself would leave TempDir nothing to clean; move
        // its content into a child first so the layout is uniform.
        let child = dir.join("linux");
        fs::create_dir(&child).ok()?;
        for entry in fs::read_dir(dir).ok()?.flatten() {
            if entry.path() != child {
                fs::rename(entry.path(), child.join(entry.file_name())).ok()?;
            }
        }
        return Some(child);
    }
    let subdirs: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    match subdirs.as_slice() {
        [only] if only.join("Makefile").is_file() => Some(only.clone()),
        _ => None,
    }
}

/// sha256 of a tarball, memoised by (path, size, mtime) in `kernel/src-hashes.json`.
fn tarball_hash(ctx: &Ctx, path: &Path, meta: &fs::Metadata) -> anyhow::Result<String> {
    let memo_path = ctx.cache.join("kernel").join("src-hashes.json");
    let abs = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let key = abs.display().to_string();
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut memo: BTreeMap<String, MemoEntry> = fs::read_to_string(&memo_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if let Some(e) = memo.get(&key) {
        if e.size == meta.len() && e.mtime_ns == mtime_ns {
            return Ok(e.sha256.clone());
        }
    }
    let sha256 = sha256_file(path)?;
    memo.insert(
        key,
        MemoEntry {
            size: meta.len(),
            mtime_ns,
            sha256: sha256.clone(),
        },
    );
    write_atomic(&memo_path, serde_json::to_string_pretty(&memo)?.as_bytes())?;
    Ok(sha256)
}

/// Identity of an unpacked tree: its Makefile plus every file's path, size and mtime.
fn hash_dir(dir: &Path) -> anyhow::Result<String> {
    let mut h = KeyHasher::new("kernel-source-dir");
    h.file("Makefile", &dir.join("Makefile"))?;
    let walker = walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.file_name() != ".git");
    for entry in walker {
        let entry = entry.with_context(|| format!("walking {}", dir.display()))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let meta = entry
            .metadata()
            .with_context(|| format!("reading {}", entry.path().display()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let rel = entry.path().strip_prefix(dir).unwrap_or(entry.path());
        h.str(
            &rel.display().to_string(),
            &format!("{} {mtime}", meta.len()),
        );
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel "tree" in `dir` with just enough (a Makefile) for a key.
    fn fake_source(dir: &Path) -> PathBuf {
        let src = dir.join("linux");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("Makefile"), "VERSION = 6\nPATCHLEVEL = 12\n").unwrap();
        src
    }

    /// The stage key (so the remote cache's tag) follows every fragment
    /// setting, and only the settings: a changed fragment misses every cache,
    /// an edited comment hits.
    #[test]
    fn the_key_follows_fragment_settings_not_comments() {
        let ctx = Ctx::for_tests();
        let d = tempfile::tempdir().unwrap();
        let src = fake_source(d.path());
        let frag = d.path().join("virtio.conf");
        let key = |text: &str| {
            fs::write(&frag, text).unwrap();
            let req = KernelRequest {
                arch: Arch::host(),
                series: "6.12".into(),
                fragments: vec![frag.clone()],
                kernel_src: Some(src.clone()),
                patches: None,
            };
            Plan::new(&ctx, &req).unwrap().key
        };
        let base = key("CONFIG_VIRTIO=y\n");
        assert_eq!(base, key("# why: virtio\nCONFIG_VIRTIO=y\n"), "a comment");
        assert_ne!(
            base,
            key("CONFIG_VIRTIO=y\nCONFIG_IPV6=y\n"),
            "an added option"
        );
        assert_ne!(base, key("# CONFIG_VIRTIO is not set\n"), "a changed value");
        assert_eq!(
            base.len(),
            64,
            "the full sha256: the remote tag carries all of it"
        );
    }

    /// `--fragment` files count in the key by name and content, not by where
    /// they lie on this machine, and a missing one is named.
    #[test]
    fn extra_fragments_are_keyed_by_name_and_content_not_host_path() {
        let ctx = Ctx::for_tests();
        let d = tempfile::tempdir().unwrap();
        let src = fake_source(d.path());
        let base = ctx.root.join("kernel-configs/common/base.conf");
        let req = || KernelRequest {
            arch: Arch::host(),
            series: "6.12".into(),
            fragments: vec![base.clone()],
            kernel_src: Some(src.clone()),
            patches: None,
        };
        let key_with = |dir: &str, text: &str| {
            let f = d.path().join(dir).join("local.conf");
            fs::create_dir_all(f.parent().unwrap()).unwrap();
            fs::write(&f, text).unwrap();
            let req = req().with_extra_fragments(&[f]).unwrap();
            assert_eq!(
                fragment_name(&ctx, req.fragments.last().unwrap()),
                "extra/local.conf"
            );
            Plan::new(&ctx, &req).unwrap().key
        };
        let plain = Plan::new(&ctx, &req()).unwrap().key;
        let one = key_with("a", "CONFIG_DUMMY=y\n");
        assert_ne!(plain, one, "an extra fragment changes the key");
        assert_eq!(one, key_with("elsewhere/b", "CONFIG_DUMMY=y\n"));
        assert_ne!(one, key_with("a", "CONFIG_DUMMY=m\n"));
        assert_eq!(
            fragment_name(&ctx, &base),
            "kernel-configs/common/base.conf",
            "the tree's fragments keep their checkout paths (and so their keys)"
        );
        let e = req()
            .with_extra_fragments(&[d.path().join("nope.conf")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--fragment") && e.contains("nope.conf"), "{e}");
    }

    #[test]
    fn reads_the_makefile_version() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("Makefile"),
            "# SPDX\nVERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 57\nEXTRAVERSION =\nNAME = x\n",
        )
        .unwrap();
        assert_eq!(makefile_version(dir.path()).unwrap(), "6.12.57");
        fs::write(dir.path().join("Makefile"), "all:\n").unwrap();
        assert!(makefile_version(dir.path())
            .unwrap_err()
            .to_string()
            .contains("Linux source tree"));
    }

    #[test]
    fn finds_the_tree_in_an_extraction() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("linux-source-6.12/kernel")).unwrap();
        fs::write(dir.path().join("linux-source-6.12/Makefile"), "").unwrap();
        assert_eq!(
            top_dir(dir.path()).unwrap(),
            dir.path().join("linux-source-6.12")
        );

        let flat = tempfile::tempdir().unwrap();
        fs::write(flat.path().join("Makefile"), "").unwrap();
        fs::create_dir(flat.path().join("kernel")).unwrap();
        let top = top_dir(flat.path()).unwrap();
        assert!(top.join("Makefile").is_file() && top.join("kernel").is_dir());

        let junk = tempfile::tempdir().unwrap();
        fs::create_dir(junk.path().join("a")).unwrap();
        assert!(top_dir(junk.path()).is_none());
    }

    #[test]
    fn directory_identity_follows_content_and_ignores_git() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("Makefile"), "VERSION = 6\n").unwrap();
        fs::write(dir.path().join("a.c"), "int a;").unwrap();
        let one = hash_dir(dir.path()).unwrap();
        fs::create_dir(dir.path().join(".git")).unwrap();
        fs::write(dir.path().join(".git/HEAD"), "ref").unwrap();
        assert_eq!(hash_dir(dir.path()).unwrap(), one);
        fs::write(dir.path().join("a.c"), "int a, b;").unwrap();
        assert_ne!(hash_dir(dir.path()).unwrap(), one);
    }
}
