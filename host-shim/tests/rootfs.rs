//! End-to-end: boot images from their `rootfs.img` instead of the initrd, as
//! an NVDIMM with DAX (x86_64) and as virtio-blk, and prove DAX from inside
//! the guest through `kiln.Diagnostics/GuestFacts` (the root mount's options
//! and statx's STATX_ATTR_DAX on files).
//!
//! Images with a dm-verity tree boot through it: the guest reports the root
//! hash it verifies against, and a copy of the image with one byte changed
//! fails the read of that byte's file (a changed tree fails the boot).
//!
//! The Debian image also runs a container, from the `shell` container rootfs
//! built for its arch (KILN_E2E_SHELL_ROOTFS) on a virtio-blk disk.
//!
//! `cargo xtask test` builds the images and runs these with KILN_E2E_MANIFEST
//! (minimal), KILN_E2E_EROFS_MANIFEST (minimal-erofs) and
//! KILN_E2E_DEBIAN_MANIFEST (debian) set.

use std::time::Duration;

use kiln_shim::config::ShimConfig;
use kiln_shim::image::BootImage;
use kiln_shim::vm::{BootOptions, Vm};
use kiln_testsupport::vm::manifest_var as manifest;

/// Boots `image` with its rootfs attached as `mode` (dm-verity as `verity`:
/// "auto", "on", "off"); returns the VM and the agent, or the launch error
/// with the guest console's tail.
async fn boot(
    image: &BootImage,
    mode: &str,
    verity: &str,
) -> (Vm, Result<kiln_shim::vm::Ready, String>, tempfile::TempDir) {
    boot_with_container_disk(image, mode, verity, None).await
}

/// [`boot`], with a container rootfs directory attached as a virtio-blk disk.
async fn boot_with_container_disk(
    image: &BootImage,
    mode: &str,
    verity: &str,
    container: Option<&std::path::Path>,
) -> (Vm, Result<kiln_shim::vm::Ready, String>, tempfile::TempDir) {
    let run_base = tempfile::tempdir().unwrap();
    std::env::set_var("KILN_RUN_DIR", run_base.path());
    let mut cfg = ShimConfig::default();
    // systemd under TCG takes a while; the minimal image is ready in seconds.
    cfg.agent.boot_timeout = 600;
    let opts = BootOptions {
        rootfs: Some(mode.to_string()),
        verity: Some(verity.to_string()),
        rootfs_disk: container.map(std::path::Path::to_path_buf),
        ..Default::default()
    };
    let mut vm = Vm::launch(image, &cfg, &opts).unwrap();
    let ready = vm.wait_ready(&cfg).await.map_err(|e| format!("{e:#}"));
    if let Ok(r) = &ready {
        eprintln!(
            "figure: {} {} rootfs={mode} verity={verity}: agent ready {:.2} s after QEMU launch ({})",
            image.manifest.image,
            image.manifest.arch,
            r.elapsed.as_secs_f64(),
            vm.rootfs_note.as_deref().unwrap_or_default()
        );
    }
    (vm, ready, run_base)
}

/// Loads kernel modules from the guest's root the Kata way
/// (CreateSandbox.kernel_modules).
async fn load_modules(
    client: &kiln_shim::client::AgentClient,
    modules: &[&str],
) -> Result<(), String> {
    let mut req = kiln_protocol::agent::CreateSandboxRequest::new();
    req.sandbox_id = "modules".into();
    for name in modules {
        let mut m = kiln_protocol::agent::KernelModule::new();
        m.name = name.to_string();
        req.kernel_modules.push(m);
    }
    client
        .agent
        .create_sandbox(client.ctx(), &req)
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

/// Boots `image` with its rootfs attached as `mode`, loads `modules` through
/// CreateSandbox.kernel_modules; returns the agent's init_daemon flag, the
/// guest facts for `paths` (loaded modules included), and the shim's note.
async fn boot_and_look(
    image: &BootImage,
    mode: &str,
    verity: &str,
    paths: &[&str],
    modules: &[&str],
) -> (bool, kiln_protocol::kiln::GuestFacts, String) {
    let (init, facts, note, _) = boot_look_and_run(image, mode, verity, paths, modules, None).await;
    (init, facts, note)
}

/// [`boot_and_look`], and when `container` names a rootfs directory, a
/// container from it on a virtio-blk disk (the sandbox the modules were
/// loaded with) running `sh -c` [`CONTAINER_SCRIPT`]: its (status, stdout).
async fn boot_look_and_run(
    image: &BootImage,
    mode: &str,
    verity: &str,
    paths: &[&str],
    modules: &[&str],
    container: Option<&std::path::Path>,
) -> (
    bool,
    kiln_protocol::kiln::GuestFacts,
    String,
    Option<(i32, String)>,
) {
    let (vm, ready, _run) = boot_with_container_disk(image, mode, verity, container).await;
    let ready =
        ready.unwrap_or_else(|e| panic!("{} with rootfs={mode}: {e}", image.manifest.image));
    let note = vm.rootfs_note.clone().unwrap_or_default();
    let details = ready.client.guest_details().await.unwrap();
    if !modules.is_empty() {
        if let Err(e) = load_modules(&ready.client, modules).await {
            panic!("loading {modules:?} from the image's rootfs={mode}: {e}");
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
    let ran = match &vm.container_disk {
        Some(disk) => Some(
            run_container(&ready.client, disk)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "a container in {}: {e:#}{}",
                        image.manifest.image,
                        vm.diagnostics()
                    )
                }),
        ),
        None => None,
    };
    drop(ready);
    vm.shutdown();
    (details.agent_details.init_daemon, facts, note, ran)
}

/// What the container in the Debian image runs: its arch, its Debian
/// release, and a write to its (writable) root.
const CONTAINER_SCRIPT: &str =
    "uname -m; cat /etc/debian_version; echo written > /tmp/x; cat /tmp/x";

/// Container `c` on the rootfs disk, in the current sandbox: (status, stdout).
async fn run_container(
    client: &kiln_shim::client::AgentClient,
    disk: &kiln_shim::rootfs_disk::GuestDisk,
) -> anyhow::Result<(i32, String)> {
    let mut spec = kiln_testsupport::vm::shim_spec(&["/bin/sh", "-c", CONTAINER_SCRIPT], "c");
    spec.Root.mut_or_insert_default().Readonly = false;
    let extras = kiln_shim::client::ContainerExtras {
        storages: vec![kiln_shim::run::rootfs_disk_storage(disk, "c")],
        ..Default::default()
    };
    client.create_container("c", spec, extras).await?;
    client.start_container("c").await?;
    let out = kiln_testsupport::streams::read_to_eof(
        &client.agent,
        kiln_testsupport::vm::long,
        "c",
        "c",
        kiln_testsupport::streams::Stream::Stdout,
        64 * 1024,
    )
    .await?;
    let status = client.wait_process("c", "c").await?;
    Ok((status, String::from_utf8_lossy(&out).into_owned()))
}

/// The root is the dm-verity device kiln-shim asked for, holding the root
/// hash manifest.json records, and has seen no corruption.
fn assert_verity_root(facts: &kiln_protocol::kiln::GuestFacts, image: &BootImage) {
    let want = image
        .manifest
        .rootfs
        .as_ref()
        .and_then(|r| r.verity.as_ref())
        .expect("manifest.json records the image's dm-verity tree");
    let dm = facts
        .root_dm
        .as_ref()
        .unwrap_or_else(|| panic!("/ is not on a device-mapper device: {facts:?}"));
    assert_eq!(
        (dm.name.as_str(), dm.target.as_str()),
        ("kiln-root", "verity"),
        "{dm:?}"
    );
    assert!(dm.error.is_empty(), "{dm:?}");
    assert_eq!(
        dm.verity_root_hash, want.root_hash,
        "the guest verifies against the manifest's root hash: {dm:?}"
    );
    assert_eq!(dm.status, "V", "no corrupted block seen: {dm:?}");
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
        // dm-verity over the NVDIMM's partition: verified, and so not DAX
        // (dm-verity cannot map DAX); the erofs and debian images prove DAX.
        let (init, facts, note) = boot_and_look(&image, "nvdimm", "auto", &["/init"], &[]).await;
        assert!(init, "the agent is PID 1");
        assert!(
            note.contains("DAX off") && note.contains("dm-verity"),
            "{note}"
        );
        assert_verity_root(&facts, &image);
        let root = facts.root_mount.as_ref().expect("a mount on /");
        assert!(!root.options.contains("dax"), "{root:?}");
        assert!(
            facts.paths.iter().all(|p| p.exists && !p.dax),
            "{:?}",
            facts.paths
        );
    }
    if matches!(
        arch,
        kiln_manifest::Arch::Aarch64 | kiln_manifest::Arch::Ppc64le
    ) {
        // aarch64: an NVDIMM on virt is described by ACPI's NFIT, so the shim
        // boots the kernel through Debian's edk2. ppc64le: a label-aware
        // spapr-nvdimm, whose namespace labels follow the image. Without
        // dm-verity (which cannot map DAX), the root is DAX.
        let (init, facts, note) = boot_and_look(&image, "nvdimm", "off", &["/init"], &[]).await;
        assert!(init, "the agent is PID 1");
        assert!(note.contains("NVDIMM"), "{note}");
        assert_dax_root(&facts, &layout.filesystem);
    }
    let (init, facts, note) =
        boot_and_look(&image, "virtio-blk", "on", &["/init"], &["bridge"]).await;
    assert!(init);
    assert_modules(&facts, &["llc", "stp", "bridge"]);
    assert!(
        note.contains("virtio-blk") && note.contains("dm-verity"),
        "{note}"
    );
    assert_verity_root(&facts, &image);
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
    // DAX needs the partition itself: dm-verity off.
    let (init, facts, _) =
        boot_and_look(&image, "nvdimm", "off", &["/init", "/etc/hostname"], &[]).await;
    assert!(init);
    // Every file is DAX-mapped: erofs without tail packing stores no inline data.
    assert_dax_root(&facts, "erofs");
    assert!(facts.root_dm.is_none(), "verity off: / is the partition");
    // The same image verified by dm-verity, on virtio-blk.
    let (_, facts, _) = boot_and_look(&image, "virtio-blk", "on", &["/etc/hostname"], &[]).await;
    assert_eq!(facts.root_mount.as_ref().unwrap().fstype, "erofs");
    assert_verity_root(&facts, &image);
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
    // A container from the `shell` rootfs built for this arch, on a disk.
    let container = kiln_testsupport::vm::rootfs_copy("KILN_E2E_SHELL_ROOTFS", "usr/bin/dash");
    let (init, facts, note, ran) = boot_look_and_run(
        &image,
        "image",
        "auto",
        &paths,
        &["dummy", "bridge"],
        Some(container.path()),
    )
    .await;
    assert!(!init, "systemd is PID 1; the agent runs as its service");
    let (status, out) = ran.expect("the container ran");
    // Arch names are `uname -m`'s.
    let machine = image.manifest.arch.name();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(status, 0, "{out}");
    assert_eq!(lines.first(), Some(&machine), "{out}");
    assert!(
        lines.get(1).is_some_and(|v| v.starts_with("12.")),
        "bookworm: {out}"
    );
    assert_eq!(lines.get(2), Some(&"written"), "{out}");
    assert_modules(&facts, &["dummy", "llc", "stp", "bridge"]);
    if matches!(
        image.manifest.arch,
        kiln_manifest::Arch::X86_64 | kiln_manifest::Arch::Ppc64le
    ) {
        assert!(note.contains("NVDIMM"), "{note}");
        assert_dax_root(&facts, &layout.filesystem);
    } else {
        let root = facts.root_mount.as_ref().expect("a mount on /");
        assert_eq!(root.fstype, layout.filesystem);
    }
}

/// The first filesystem block of `path` in the ext4 partition at `offset` of
/// `img` (debugfs reads the partition in place).
fn ext4_first_block(img: &std::path::Path, offset: u64, path: &str) -> u64 {
    let debugfs = |request: &str| {
        let out = std::process::Command::new("debugfs")
            .arg("-R")
            .arg(request)
            .arg(format!("{}?offset={offset}", img.display()))
            .output()
            .expect("debugfs (e2fsprogs) runs");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (text, err) = debugfs(&format!("blocks /{path}"));
    text.split_whitespace()
        .next()
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("debugfs found no block of {path}: {text} {err}"))
}

/// The block size of the ext4 filesystem at `offset` of `img` (64 KiB on
/// ppc64le, whose images match its page size for DAX).
fn ext4_block_size(img: &std::path::Path, offset: u64) -> u64 {
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg("stats")
        .arg(format!("{}?offset={offset}", img.display()))
        .output()
        .expect("debugfs (e2fsprogs) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("debugfs stats shows no block size: {text}"))
}

/// A copy of the image whose rootfs.img has the byte at `at` flipped, and
/// whose manifest.json carries the copy's sha256, as if the host-side check
/// had been fooled or the disk changed after it: the guest's dm-verity is
/// what must catch it. The other artifacts are hard links.
fn tampered_copy(image: &BootImage, at: u64) -> (tempfile::TempDir, BootImage) {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let rootfs = image
        .manifest
        .artifact("rootfs_image")
        .unwrap()
        .file
        .clone();
    for a in image.manifest.artifacts.values() {
        let (from, to) = (image.dir.join(&a.file), dir.path().join(&a.file));
        // rootfs.img is changed below: a copy, never a link to the original.
        if a.file == rootfs || std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).unwrap();
        }
    }
    let img = dir.path().join(&rootfs);
    kiln_testsupport::tamper::flip_byte(&img, at, 0x20).unwrap();
    let sha: String = sha2::Sha256::digest(std::fs::read(&img).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(image.dir.join("manifest.json")).unwrap())
            .unwrap();
    m["artifacts"]["rootfs_image"]["sha256"] = serde_json::Value::String(sha);
    let manifest = dir.path().join("manifest.json");
    std::fs::write(&manifest, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    let copy = BootImage::load(&manifest).unwrap();
    (dir, copy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM; run through `cargo xtask test`"]
async fn minimal_verity_refuses_a_modified_image() {
    let image = BootImage::load(&manifest("KILN_E2E_MANIFEST")).unwrap();
    let layout = image.manifest.rootfs.clone().unwrap();
    let verity = layout
        .verity
        .clone()
        .expect("the minimal image has a dm-verity tree");
    let dummy = image
        .manifest
        .kernel_modules
        .iter()
        .find(|m| m.name == "dummy")
        .expect("dummy.ko is in the image (rootfs.modules)");
    let img = image.dir.join("rootfs.img");
    let block = ext4_first_block(&img, layout.partition_offset, &dummy.path);

    // One byte of dummy.ko's data: the guest boots (nothing it needs changed),
    // and reading that file fails with EIO, as loading it does.
    let block_size = ext4_block_size(&img, layout.partition_offset);
    let (_copy, bad) = tampered_copy(&image, layout.partition_offset + block * block_size + 100);
    let (vm, ready, _run) = boot(&bad, "virtio-blk", "on").await;
    let ready = ready.unwrap_or_else(|e| panic!("only dummy.ko changed, the rest must boot: {e}"));
    let err = load_modules(&ready.client, &["dummy"]).await.unwrap_err();
    assert!(
        err.contains("EIO") && err.contains("dummy.ko"),
        "loading the changed module: {err}"
    );
    let facts = ready.client.guest_facts(&[], &[]).await.unwrap();
    let dm = facts.root_dm.as_ref().expect("a dm root");
    assert_eq!(
        dm.status, "C",
        "dm-verity reports the corruption it saw: {dm:?}"
    );
    assert_eq!(dm.verity_root_hash, verity.root_hash);
    let console = std::fs::read_to_string(vm.console_log.as_ref().unwrap()).unwrap();
    drop(ready);
    vm.shutdown();
    let line = console
        .lines()
        .find(|l| l.contains("verity") && l.contains("data block") && l.contains("corrupted"))
        .unwrap_or_else(|| panic!("no dm-verity line on the console:\n{console}"));
    eprintln!("tampered data: {err}\n  console: {line}");

    // One byte of the hash tree's top block: no block can be verified, the
    // root cannot be mounted, and the shim's error names dm-verity's line.
    let (_copy, bad) = tampered_copy(
        &image,
        layout.partition_offset + verity.hash_start_block * verity.hash_block_size + 10,
    );
    let (vm, ready, _run) = boot(&bad, "virtio-blk", "on").await;
    let err = match ready {
        Ok(_) => panic!("an image with a changed hash tree booted to the agent"),
        Err(e) => e,
    };
    vm.shutdown();
    assert!(
        err.contains("dm-verity found the root image modified") && err.contains("metadata block"),
        "{err}"
    );
    eprintln!(
        "tampered tree: {}",
        err.lines()
            .find(|l| l.contains("dm-verity"))
            .unwrap_or_default()
    );
}
