//! The pipeline as a library: every stage and input parser, so `main.rs` (flag
//! parsing and dispatch), the unit tests and the fuzz targets (`fuzz/`) reach
//! the same code.

pub mod arch;
pub mod busybox;
pub mod cache;
pub mod cmd;
pub mod ctx;
pub mod elf;
pub mod hash;
pub mod image_spec;
pub mod local_registry;
pub mod oci;
pub mod recipe;
pub mod remote_cache;
pub mod stage;
pub mod ui;

use clap::Args;

use crate::arch::ArchSel;

/// Flags every task understands.
#[derive(Args, Clone, Debug, Default)]
pub struct GlobalFlags {
    /// Do not install missing host tools; only report what is missing.
    #[arg(long, global = true)]
    pub no_setup: bool,
    /// Never reach the network (apt, cargo): fail naming the missing input instead.
    #[arg(long, global = true)]
    pub offline: bool,
    /// Build kernels without the patch series in kernel-configs/patches/<series>/.
    #[arg(long, global = true)]
    pub no_patches: bool,
    /// Share stage results through an OCI registry: oci://HOST[:PORT]/REPO
    /// (default: $KILN_CACHE_REMOTE). A hit is verified, then used instead of building.
    #[arg(long, global = true, value_name = "oci://HOST[:PORT]/REPO")]
    pub cache_remote: Option<String>,
    /// Also push what this run built or found locally to --cache-remote
    /// (default: KILN_CACHE_PUSH=1). Read-only consumers leave it off.
    #[arg(long, global = true)]
    pub cache_push: bool,
    /// Talk plain HTTP to the --cache-remote / --push registry (a loopback or LAN
    /// registry you trust); default: KILN_INSECURE_REGISTRY=1.
    #[arg(long, global = true)]
    pub insecure_registry: bool,
}

#[derive(Args, Clone, Debug)]
pub struct TestFlags {
    /// Only the unit tests (no image build, no VM).
    #[arg(long)]
    pub unit_only: bool,
    /// Arches whose `minimal` image is booted and checked in the guest. With
    /// `all` (the default) the container, erofs and debian tests run on the
    /// host's arch; naming one arch runs them for it.
    #[arg(long, default_value = "all")]
    pub arch: ArchSel,
    /// Full-size stress tests: 1,000 execs, 50 container cycles, 20 VMs in a row.
    #[arg(long)]
    pub stress: bool,
    /// Seconds each fuzz target runs in the last step (0 skips fuzzing).
    #[arg(long, default_value_t = 15)]
    pub fuzz_seconds: u64,
}
