//! End-to-end: boot images from their `rootfs.img` instead of the initrd, as
//! an NVDIMM with DAX (x86_64) and as virtio-blk, and prove DAX from inside
//! the guest through `kiln.Diagnostics/GuestFacts` (the root mount's options
//! and statx's STATX_ATTR_DAX on files).
//!
//! `cargo xtask test` builds the images and runs these with KILN_E2E_MANIFEST
//! (minimal), KILN_E2E_EROFS_MANIFEST (minimal-erofs) and
//! KILN_E2E_DEBIAN_MANIFEST (debian) set.

use std::time::Duration;

use kiln_shim::config::ShimConfig;
use kiln_shim::image::BootImage;
use kiln_shim::vm::{BootOptions, Vm};
use kiln_testsupport::vm::manifest_var as manifest;

/// Boots `image` with its rootfs attached as `mode`, loads `modules` through
/// CreateSandbox.kernel_modules; returns the agent's init_daemon flag, the
/// guest facts for `paths` (loaded modules included), and the shim's note.
async fn boot_and_look(
    image: &BootImage,
    mode: &str,
    paths: &[&str],
    modules: &[&str],
) -> (bool, kiln_protocol::kiln::GuestFacts, String) {
    let run_base = tempfile::tempdir().unwrap();
    std::env::set_var("KILN_RUN_DIR", run_base.path());
    let mut cfg = ShimConfig::default();
    // systemd under TCG takes a while; the minimal image is ready in seconds.
    cfg.agent.boot_timeout = 600;
    let opts = BootOptions {
        rootfs: Some(mode.to_string()),
        ..Default::default()
    };
    let mut vm = Vm::launch(image, &cfg, &opts).unwrap();
    let ready = match vm.wait_ready(&cfg).await {
        Ok(r) => r,
        Err(e) => panic!("{} with rootfs={mode}: {e:#}", image.manifest.image),
    };
    let note = vm.rootfs_note.clone().unwrap_or_default();
    eprintln!(
        "figure: {} {} rootfs={mode}: agent ready {:.2} s after QEMU launch ({note})",
        image.manifest.image,
        image.manifest.arch,
        ready.elapsed.as_secs_f64()
    );
    let details = ready.client.guest_details().await.unwrap();
    if !modules.is_empty() {
        let mut req = kiln_protocol::agent::CreateSandboxRequest::new();
        req.sandbox_id = "modules".into();
        for name in modules {
            let mut m = kiln_protocol::agent::KernelModule::new();
            m.name = name.to_string();
            req.kernel_modules.push(m);
        }
        let c = &ready.client;
        if let Err(e) = c.agent.create_sandbox(c.ctx(), &req).await {
            panic!("loading {modules:?} from the image's rootfs={mode}: {e:?}");
        }
    }
    // pmem registers asynchronously; it is the root here, so it is there, but
    // sysfs attributes may lag a moment behind the mount.
    let mut facts = ready.client.guest_facts(&[], paths).await.unwrap();
    for _ in 0..50 {
        if mode != "nvdimm" || !facts.pmem.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        facts = ready.client.guest_facts(&[], paths).await.unwrap();
    }
    eprintln!("{mode}: {facts:?}");
    drop(ready);
    vm.shutdown();
    (details.agent_details.init_daemon, facts, note)
}

fn assert_modules(facts: &kiln_protocol::kiln::GuestFacts, want: &[&str]) {
    for m in want {
        assert!(
            facts.modules.iter().any(|l| l == m),
            "{m} in /proc/modules: {:?}",
            facts.modules
        );
    }
}

fn assert_dax_root(facts: &kiln_protocol::kiln::GuestFacts, fs: &str) {
    let root = facts.root_mount.as_ref().expect("a mount on /");
    assert_eq!(root.fstype, fs, "{root:?}");
    let opts: Vec<&str> = root.options.split(',').collect();
    assert!(opts.contains(&"ro"), "read-only root: {root:?}");
    assert!(
        opts.iter().any(|o| *o == "dax" || o.starts_with("dax=")),
        "the root is mounted with DAX: {root:?}"
    );
    let pmem0 = facts
        .pmem
        .iter()
        .find(|p| p.name == "pmem0")
        .unwrap_or_else(|| panic!("no pmem0: {facts:?}"));
    assert!(pmem0.dax && pmem0.mode == "fsdax", "{pmem0:?}");
    for p in &facts.paths {
        assert!(p.exists, "statx {}: {}", p.path, p.error);
        assert!(p.dax, "STATX_ATTR_DAX on {}: {p:?}", p.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM; run through `cargo xtask test`"]
async fn minimal_boots_from_its_rootfs_image() {
    let image = BootImage::load(&manifest("KILN_E2E_MANIFEST")).unwrap();
    let arch = image.manifest.arch;
    let layout = image
        .manifest
        .rootfs
        .clone()
        .expect("manifest.json describes rootfs_image");
    assert_eq!(
        layout.init.as_deref(),
        Some("/init"),
        "the agent is PID 1 of the image too"
    );
    if arch == kiln_manifest::Arch::X86_64 {
        let (init, facts, note) = boot_and_look(&image, "nvdimm", &["/init"], &[]).await;
        assert!(init, "the agent is PID 1");
        assert!(note.contains("DAX"), "{note}");
        assert_dax_root(&facts, &layout.filesystem);
    }
    let (init, facts, note) = boot_and_look(&image, "virtio-blk", &["/init"], &["bridge"]).await;
    assert!(init);
    assert_modules(&facts, &["llc", "stp", "bridge"]);
    assert!(note.contains("virtio-blk"), "{note}");
    let root = facts.root_mount.as_ref().expect("a mount on /");
    assert_eq!(root.fstype, layout.filesystem);
    assert!(
        !root.options.contains("dax"),
        "no DAX through virtio-blk: {root:?}"
    );
    assert!(root.options.split(',').any(|o| o == "ro"), "{root:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM; run through `cargo xtask test`"]
async fn erofs_image_boots_with_dax() {
    let image = BootImage::load(&manifest("KILN_E2E_EROFS_MANIFEST")).unwrap();
    let layout = image
        .manifest
        .rootfs
        .clone()
        .expect("manifest.json describes rootfs_image");
    assert_eq!(layout.filesystem, "erofs");
    let (init, facts, _) = boot_and_look(&image, "nvdimm", &["/init", "/etc/hostname"], &[]).await;
    assert!(init);
    // Every file is DAX-mapped: erofs without tail packing stores no inline data.
    assert_dax_root(&facts, "erofs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM; run through `cargo xtask test`"]
async fn debian_boots_systemd_and_the_agent_service_from_dax() {
    let image = BootImage::load(&manifest("KILN_E2E_DEBIAN_MANIFEST")).unwrap();
    assert!(
        image.manifest.packages.iter().any(|p| p.name == "systemd"),
        "manifest.json lists the Debian packages with versions"
    );
    let layout = image
        .manifest
        .rootfs
        .clone()
        .expect("manifest.json describes rootfs_image");
    let paths = ["/usr/bin/kiln-agent", "/usr/lib/systemd/systemd"];
    // "image": DAX on an NVDIMM where the machine has one, virtio-blk elsewhere.
    // Modules sit under /usr/lib/modules (merged /usr) here.
    let (init, facts, note) = boot_and_look(&image, "image", &paths, &["dummy", "bridge"]).await;
    assert!(!init, "systemd is PID 1; the agent runs as its service");
    assert_modules(&facts, &["dummy", "llc", "stp", "bridge"]);
    if image.manifest.arch == kiln_manifest::Arch::X86_64 {
        assert!(note.contains("NVDIMM"), "{note}");
        assert_dax_root(&facts, &layout.filesystem);
    } else {
        let root = facts.root_mount.as_ref().expect("a mount on /");
        assert_eq!(root.fstype, layout.filesystem);
    }
}
