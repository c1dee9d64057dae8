//! Host set-up: the Debian packages, Rust targets and cargo-installed tools the
//! pipeline and the tests need. Idempotent, and quick when all is there (one
//! dpkg-query, one rustup call, one PATH lookup).

use std::collections::BTreeSet;

use anyhow::Context;

use crate::arch::{Arch, CrossTools};
use crate::cmd;
use crate::ctx::Ctx;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Install,
    CheckOnly,
}

/// Packages every build needs, whatever the arch.
const COMMON_PACKAGES: &[&str] = &[
    // kernel build
    "linux-source-6.12",
    "make",
    "gcc",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
    // tests and images
    "busybox-static",
    "cpio",
    "zstd",
    "e2fsprogs",
    // rootfs images: erofs flavour, and Debian trees for the debian recipe
    "erofs-utils",
    "mmdebstrap",
    // `cargo xtask test` checks every dm-verity tree with veritysetup verify
    "cryptsetup-bin",
    // the SBOM check in `cargo xtask test` (spdx-tools from PyPI, in a venv)
    "python3-venv",
    // `release --sign-key` and its test (ssh-keygen -Y sign/verify)
    "openssh-client",
    // the remote-cache and release-distribution tests: the CNCF distribution
    // registry on a loopback port, and htpasswd for its basic-auth variant
    "docker-registry",
    "apache2-utils",
    // and the certificates of its TLS variant
    "openssl",
    // to build virtiofsd (cargo install)
    "pkg-config",
    "libseccomp-dev",
    "libcap-ng-dev",
];

/// Tools installed with `cargo install` (name of the crate = name of the binary).
/// vhost-device-vsock: the vhost-user vsock backend (no /dev/vhost-vsock here);
/// virtiofsd: the virtio-fs backend for container rootfs sharing;
/// cargo-fuzz: `cargo xtask fuzz` (the last step of `cargo xtask test`).
const CARGO_TOOLS: &[&str] = &["vhost-device-vsock", "virtiofsd", "cargo-fuzz"];

/// Toolchains besides the default one: nightly for cargo-fuzz's sanitizer and
/// coverage flags (the fuzz/ workspace only; everything else builds on stable).
const TOOLCHAINS: &[&str] = &["nightly"];

pub fn packages_for(arches: &[Arch]) -> BTreeSet<&'static str> {
    let mut set: BTreeSet<&str> = COMMON_PACKAGES.iter().copied().collect();
    for a in arches {
        set.insert(a.qemu_package());
        if *a == Arch::Aarch64 {
            // edk2 for QEMU's virt: an aarch64 NVDIMM (DAX) is described by
            // ACPI, which the guest gets only through UEFI firmware.
            set.insert("qemu-efi-aarch64");
        }
        set.extend(a.cross_gcc_package());
        set.extend(a.cross_libc_package());
        set.extend(a.cross_c_program_libc_package());
    }
    set
}

// Defined here, not in ctx.rs, so the context does not import the stage that
// uses it (ctx -> setup -> ctx was a cycle).
impl Ctx {
    /// Makes sure host tools for `arches` are there (installing them unless
    /// `--no-setup`/`--offline`), or fails naming what is missing.
    pub fn ensure_setup(&self, arches: &[Arch]) -> anyhow::Result<()> {
        let mode = if self.no_setup {
            Mode::CheckOnly
        } else {
            Mode::Install
        };
        run(self, arches, mode)
    }
}

pub fn run(ctx: &Ctx, arches: &[Arch], mode: Mode) -> anyhow::Result<()> {
    let wanted = packages_for(arches);
    let missing_pkgs = missing_packages(&wanted)?;
    let missing_targets = missing_rust_targets(arches)?;
    let missing_tools: Vec<&str> = CARGO_TOOLS
        .iter()
        .copied()
        .filter(|t| cmd::which(t).is_none())
        .collect();
    let missing_toolchains = missing_toolchains()?;
    if missing_pkgs.is_empty()
        && missing_targets.is_empty()
        && missing_tools.is_empty()
        && missing_toolchains.is_empty()
    {
        return Ok(());
    }
    if mode == Mode::CheckOnly {
        let mut lines = Vec::new();
        if !missing_pkgs.is_empty() {
            lines.push(format!(
                "  Debian packages: apt-get install {}",
                missing_pkgs.join(" ")
            ));
        }
        if !missing_targets.is_empty() {
            lines.push(format!(
                "  Rust targets: rustup target add {}",
                missing_targets.join(" ")
            ));
        }
        if !missing_tools.is_empty() {
            lines.push(format!(
                "  cargo tools: cargo install --locked {}",
                missing_tools.join(" ")
            ));
        }
        for t in &missing_toolchains {
            lines.push(format!(
                "  Rust toolchain: rustup toolchain install {t} --profile minimal"
            ));
        }
        anyhow::bail!(
            "missing host tools (setup is off with --no-setup/--offline):\n{}\nor run `cargo xtask setup`",
            lines.join("\n")
        );
    }
    let step = ctx.ui.stage("setup");
    if !missing_pkgs.is_empty() {
        step.message(&format!("apt-get install {}", missing_pkgs.join(" ")));
        apt_install(ctx, &missing_pkgs)?;
    }
    for t in &missing_targets {
        step.message(&format!("rustup target add {t}"));
        cmd::run_logged(
            ctx,
            "setup",
            "rustup target add",
            duct::cmd!("rustup", "target", "add", t),
        )?;
    }
    for t in &missing_toolchains {
        step.message(&format!("rustup toolchain install {t}"));
        cmd::run_logged(
            ctx,
            "setup",
            "rustup toolchain install",
            duct::cmd!("rustup", "toolchain", "install", t, "--profile", "minimal"),
        )?;
    }
    for t in &missing_tools {
        step.message(&format!("cargo install {t}"));
        cmd::run_logged(
            ctx,
            "setup",
            "cargo install",
            duct::cmd!("cargo", "install", "--locked", t),
        )?;
    }
    step.done(&format!(
        "installed {} package(s), {} target(s), {} toolchain(s), {} tool(s)",
        missing_pkgs.len(),
        missing_targets.len(),
        missing_toolchains.len(),
        missing_tools.len()
    ));
    Ok(())
}

/// Toolchains from [`TOOLCHAINS`] that rustup does not have.
pub fn missing_toolchains() -> anyhow::Result<Vec<String>> {
    let installed = cmd::read(
        "rustup toolchain list",
        duct::cmd!("rustup", "toolchain", "list"),
    )
    .context("rustup is needed to install the nightly toolchain cargo-fuzz uses")?;
    Ok(TOOLCHAINS
        .iter()
        .filter(|t| !installed.lines().any(|l| l.starts_with(&format!("{t}-"))))
        .map(|t| t.to_string())
        .collect())
}

fn missing_packages(wanted: &BTreeSet<&str>) -> anyhow::Result<Vec<String>> {
    let mut args = vec![
        "-W".to_string(),
        "-f=${Package} ${db:Status-Abbrev}\n".to_string(),
    ];
    args.extend(wanted.iter().map(|s| s.to_string()));
    // dpkg-query exits 1 when some package is unknown; its stdout still lists the known ones.
    let out = duct::cmd("dpkg-query", &args)
        .stderr_null()
        .stdout_capture()
        .unchecked()
        .run()
        .context("dpkg-query is missing: kiln's set-up needs a Debian-based host (or use --no-setup and install the tools yourself)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?;
            let status = it.next()?;
            (status == "ii").then_some(name)
        })
        .collect();
    Ok(wanted
        .iter()
        .filter(|p| !installed.contains(**p))
        .map(|p| p.to_string())
        .collect())
}

fn missing_rust_targets(arches: &[Arch]) -> anyhow::Result<Vec<String>> {
    let installed = cmd::read(
        "rustup target list --installed",
        duct::cmd!("rustup", "target", "list", "--installed"),
    )
    .context("rustup is needed to add the agent's static targets")?;
    let have: BTreeSet<&str> = installed.lines().map(str::trim).collect();
    Ok(arches
        .iter()
        .map(|a| a.rust_target())
        .filter(|t| !have.contains(t))
        .map(str::to_string)
        .collect())
}

fn apt_install(ctx: &Ctx, pkgs: &[String]) -> anyhow::Result<()> {
    let is_root = cmd::read("id -u", duct::cmd!("id", "-u"))
        .map(|s| s == "0")
        .unwrap_or(false);
    if !is_root {
        anyhow::bail!("these Debian packages are missing and installing them needs root: sudo apt-get install {}", pkgs.join(" "));
    }
    let install = |ctx: &Ctx, pkgs: &[&str]| {
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(pkgs);
        cmd::run_logged(
            ctx,
            "setup",
            "apt-get install",
            duct::cmd("apt-get", &args).env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    let all: Vec<&str> = pkgs.iter().map(String::as_str).collect();
    if install(ctx, &all).is_ok() {
        return Ok(());
    }
    // A fresh machine has no package lists yet: update once and retry.
    cmd::run_logged(
        ctx,
        "setup",
        "apt-get update",
        duct::cmd!("apt-get", "update", "-q"),
    )?;
    if install(ctx, &all).is_ok() {
        return Ok(());
    }
    // Several QEMU packages in one call have been seen to report broken
    // packages where one call per package works.
    for p in &all {
        install(ctx, &[p]).with_context(|| format!("installing the Debian package {p}"))?;
    }
    Ok(())
}

/// The independent SPDX validator `cargo xtask test` checks SBOMs with:
/// PyPI's spdx-tools, pinned, in a venv in the cache (venvs cannot move, so
/// it is made in place and marked complete last; an unmarked one is redone).
pub const SPDX_TOOLS: &str = "spdx-tools==0.8.5";

/// `pyspdxtools` from [`SPDX_TOOLS`], installed into the cache if missing
/// (unless setup is off, then the error says what to run).
pub fn spdx_validator(ctx: &Ctx) -> anyhow::Result<std::path::PathBuf> {
    let venv = ctx.cache.join("tools").join(SPDX_TOOLS.replace("==", "-"));
    let tool = venv.join("bin/pyspdxtools");
    let done = venv.join(".complete");
    if done.exists() {
        return Ok(tool);
    }
    if ctx.no_setup {
        anyhow::bail!(
            "the SBOM validator is not installed (setup is off with --no-setup/--offline): \
             run `python3 -m venv {v} && {v}/bin/pip install {SPDX_TOOLS} && touch {v}/.complete`, \
             or drop --no-setup",
            v = venv.display()
        );
    }
    let step = ctx.ui.stage("setup");
    step.message(&format!("pip install {SPDX_TOOLS} (SBOM validator)"));
    if venv.exists() {
        std::fs::remove_dir_all(&venv)?;
    }
    cmd::run_logged(
        ctx,
        "setup",
        "python3 -m venv",
        duct::cmd!("python3", "-m", "venv", &venv),
    )
    .context("making the SBOM validator's venv (Debian: apt-get install python3-venv)")?;
    cmd::run_logged(
        ctx,
        "setup",
        "pip install spdx-tools",
        duct::cmd!(venv.join("bin/pip"), "install", "--quiet", SPDX_TOOLS),
    )
    .context("installing spdx-tools from PyPI")?;
    std::fs::write(&done, SPDX_TOOLS)?;
    step.done(SPDX_TOOLS);
    Ok(tool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_arches_add_their_compiler_and_emulator() {
        let p = packages_for(&[Arch::S390x]);
        assert!(p.contains("gcc-s390x-linux-gnu") && p.contains("qemu-system-misc"));
        assert!(
            p.contains("libc6-dev-s390x-cross"),
            "static glibc agent link: {p:?}"
        );
        assert!(!p.contains("qemu-efi-aarch64"));
        let p = packages_for(&[Arch::Aarch64, Arch::Ppc64le]);
        assert!(
            p.contains("qemu-efi-aarch64"),
            "the NVDIMM's UEFI boot: {p:?}"
        );
        assert!(
            p.contains("qemu-system-arm") && p.contains("qemu-system-ppc"),
            "{p:?}"
        );
        assert!(
            p.contains("libc6-dev-ppc64el-cross") && p.contains("libc6-dev-arm64-cross"),
            "static glibc for the agent (ppc64le) and the workload rootfs's C programs: {p:?}"
        );
        let p = packages_for(&[Arch::X86_64]);
        assert!(p.contains("qemu-system-x86") && !p.iter().any(|x| x.starts_with("gcc-x86-64")));
    }
}
