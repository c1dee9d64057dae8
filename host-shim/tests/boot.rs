//! End-to-end: boot a real image in real QEMU (TCG here) and talk to the real
//! agent over real vsock. Needs a built image; `cargo xtask test` builds one
//! and runs these with KILN_E2E_MANIFEST set.

use std::path::PathBuf;
use std::process::Command;

use kiln_protocol::agent;
use kiln_shim::config::ShimConfig;
use kiln_shim::image::BootImage;
use kiln_shim::vm::{BootOptions, Vm};
use kiln_testsupport::vm::manifest;

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; count it as gone only when reaped or dead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.split_whitespace().nth(2).is_none_or(|s| s != "Z"),
        Err(_) => false,
    }
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && alive(pid) {
                hits.push(format!("{pid}: {cmd}"));
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM; run through `cargo xtask test`"]
async fn agent_answers_health_details_and_kata_only_errors() {
    let run_base = tempfile::tempdir().unwrap();
    std::env::set_var("KILN_RUN_DIR", run_base.path());
    let image = BootImage::load(&manifest()).unwrap();
    let cfg = ShimConfig::default();
    let mut vm = Vm::launch(&image, &cfg, &BootOptions::default()).unwrap();
    let pids = vm.pids();
    assert_eq!(pids.len(), 2, "qemu and the vsock backend run");
    let ready = vm.wait_ready(&cfg).await.unwrap();
    eprintln!(
        "agent ready after {:.2} s ({})",
        ready.elapsed.as_secs_f64(),
        vm.accel_note
    );

    let c = &ready.client;
    let version = c.version().await.unwrap();
    assert_eq!(
        version.agent_version,
        env!("CARGO_PKG_VERSION"),
        "agent and shim come from one workspace version"
    );

    let details = c.guest_details().await.unwrap();
    assert!(
        details.agent_details.init_daemon,
        "the minimal image runs the agent as PID 1"
    );
    assert_eq!(details.agent_details.version, version.agent_version);
    assert!(
        details.mem_block_size_bytes.is_power_of_two() && details.mem_block_size_bytes >= 1 << 20,
        "memory block size from the guest's sysfs: {}",
        details.mem_block_size_bytes
    );

    // Every method is implemented: a Kata-only one answers with its own
    // error (no filesystem at that path), not UNIMPLEMENTED.
    let mut req = agent::ResizeVolumeRequest::new();
    req.volume_guest_path = "/run/kiln/none".into();
    match c.agent.resize_volume(c.ctx(), &req).await {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::NOT_FOUND, "{s:?}");
            assert!(s.message().contains("/run/kiln/none"), "{}", s.message());
        }
        other => panic!("expected NOT_FOUND, got {other:?}"),
    }
    // The agent keeps serving after that.
    assert!(c.check().await.is_ok());

    // QEMU is under QMP control.
    let mut qmp = vm.qmp().unwrap();
    assert_eq!(qmp.status().unwrap(), "running");

    // The human client reaches the same agent through the run directory.
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-shim"))
        .args(["agent", "--vm"])
        .arg(vm.run_dir.path())
        .args(["GetGuestDetails", r#"{"memBlockSize": true}"#])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["agentDetails"]["initDaemon"], true, "{answer}");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-shim"))
        .args(["agent", "--vm"])
        .arg(vm.run_dir.path())
        .args(["ResizeVolume", "{}"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("INVALID_ARGUMENT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let run_dir = vm.run_dir.path().to_path_buf();
    drop(ready);
    vm.shutdown();
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived the VM");
    }
    assert!(!run_dir.exists(), "run dir {} removed", run_dir.display());
}

#[test]
#[ignore = "boots a VM; run through `cargo xtask test`"]
fn shim_boot_command_reports_and_cleans_up() {
    let run_base = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-shim"))
        .args(["boot", "--json", "--image"])
        .arg(manifest())
        .env("KILN_RUN_DIR", run_base.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kiln-shim boot failed: {stderr}");
    assert!(
        stderr.contains("TCG") || stderr.contains("KVM"),
        "accelerator choice is logged: {stderr}"
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{json}");
    assert_eq!(json["image"], "minimal");
    assert_eq!(json["init_daemon"], true);
    assert!(json["agent_ready_seconds"].as_f64().unwrap() > 0.0);
    // The idle guest's memory, from GetMetrics (what `bench --kernel-cost` reads).
    let (used, total) = (
        json["guest_memory_used_bytes"].as_u64().unwrap_or(0),
        json["guest_memory_total_bytes"].as_u64().unwrap_or(0),
    );
    assert!(
        used > 0 && used < total,
        "guest memory used {used} of {total}"
    );
    // Nothing is left: no process mentions the run directory, which is empty.
    let needle = run_base.path().to_string_lossy().to_string();
    let left = processes_mentioning(&needle);
    assert!(left.is_empty(), "left behind: {left:?}");
    let entries: Vec<_> = std::fs::read_dir(run_base.path()).unwrap().collect();
    assert!(entries.is_empty(), "run dirs left: {entries:?}");
}

#[test]
#[ignore = "boots a VM; run through `cargo xtask test`"]
fn check_reports_a_runnable_host_with_a_bounded_kvm_probe() {
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-shim"))
        .args(["check", "--json", "--image"])
        .arg(manifest())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check says no VM can run: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["can_run"], true);
    let checks = v["checks"].as_array().unwrap();
    let kvm = checks
        .iter()
        .find(|c| c["name"] == "kvm")
        .expect("a kvm line");
    if kvm["ok"] == false {
        assert!(kvm["detail"].as_str().unwrap().contains("TCG"), "{kvm}");
    }
    for name in ["qemu", "vsock backend", "memory", "accelerator"] {
        let c = checks.iter().find(|c| c["name"] == name).unwrap();
        assert_eq!(c["ok"], true, "{c}");
    }
    // The probe is bounded (10 s): a KVM that hangs guests costs seconds, not forever.
    eprintln!(
        "figure: kiln-shim check took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Kernel options the `minimal` image's fragments ask for on every arch
/// (IKCONFIG_PROC proves itself by being readable at all).
const FEATURE_OPTIONS: &[&str] = &[
    "IKCONFIG_PROC",
    "MODULES",
    "VIRTIO_PCI",
    "VIRTIO_VSOCKETS",
    "VIRTIO_FS",
    "VFIO",
    "VFIO_PCI",
    "LIBNVDIMM",
    "MEMORY_HOTPLUG",
    "HOTPLUG_CPU",
    "OVERLAY_FS",
    "EROFS_FS",
    "DM_VERITY",
    "DM_INIT",
];

/// A pmem image with an NVDIMM PFN info block (what makes the namespace
/// DAX-capable), laid out by kiln-disk around 1 MiB of empty filesystem
/// space; on pseries 256 MiB (QEMU's NVDIMM block) followed by the namespace
/// labels its label-aware DIMM needs. Returns the path and the size pmem0
/// must have: the namespace minus the 2 MiB PFN reserve.
fn pmem_image(dir: &std::path::Path, arch: kiln_manifest::Arch) -> (PathBuf, u64) {
    use kiln_disk::layout::{self, DiskIds, Geometry};
    use std::io::Write;
    let path = dir.join("pmem.img");
    let pseries = arch == kiln_manifest::Arch::Ppc64le;
    let namespace = if pseries {
        kiln_shim::qemu::PSERIES_NVDIMM_BLOCK
    } else {
        4 << 20
    };
    let fs_len = namespace - layout::FS_OFFSET;
    let geometry = Geometry::for_content(fs_len, 0).unwrap();
    assert_eq!(geometry.image_size(), namespace);
    let mut file = std::fs::File::create(&path).unwrap();
    let mut zeros = std::io::repeat(0);
    layout::write_image(
        &mut file,
        &mut zeros,
        fs_len,
        &geometry,
        &DiskIds::from_seed(&[7; 32]).in_namespace(if pseries { [7; 16] } else { [0; 16] }),
    )
    .unwrap();
    if pseries {
        let cookie = kiln_disk::nslabel::papr_cookie(&kiln_disk::nslabel::KILN_DIMM_UUID);
        let labels = kiln_disk::nslabel::label_area(&[7; 16], namespace, cookie).unwrap();
        file.write_all(&labels).unwrap();
    }
    (path, namespace - (2 << 20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM; run through `cargo xtask test`"]
async fn guest_facts_prove_the_kernel_features() {
    let run_base = tempfile::tempdir().unwrap();
    std::env::set_var("KILN_RUN_DIR", run_base.path());
    let image = BootImage::load(&manifest()).unwrap();
    let arch = image.manifest.arch;
    let mut cfg = ShimConfig::default();
    let scratch = tempfile::tempdir().unwrap();
    let machine = kiln_shim::qemu::profile(arch).machine;
    // A direct kernel boot (no firmware): aarch64's NVDIMM needs a UEFI
    // boot, which the rootfs suite's DAX check makes.
    let with_pmem = kiln_shim::qemu::supports_pmem(arch, machine, false);
    let mut pmem_size = 0;
    if with_pmem {
        let (path, size) = pmem_image(scratch.path(), arch);
        cfg.hypervisor.qemu.pmem_file = path.display().to_string();
        pmem_size = size;
    } else {
        eprintln!("{arch} {machine}: no persistent-memory device with a direct -kernel boot; pmem/DAX not checked here");
    }
    let mut vm = Vm::launch(&image, &cfg, &BootOptions::default()).unwrap();
    // Answering at all proves vsock: the only channel to the agent is vhost-user vsock.
    let ready = vm.wait_ready(&cfg).await.unwrap();
    eprintln!(
        "{arch}: agent ready after {:.2} s ({})",
        ready.elapsed.as_secs_f64(),
        vm.accel_note
    );
    let facts = ready
        .client
        .guest_facts(
            &[FEATURE_OPTIONS, &["BRIDGE", "VSOCKETS_LOOPBACK"]].concat(),
            &["/init"],
        )
        .await
        .unwrap();
    eprintln!("{arch}: {facts:?}");

    assert_eq!(facts.machine, arch.name(), "uname -m");
    assert_eq!(facts.kernel_release, image.manifest.kernel_version);
    assert!(
        facts.config_available,
        "IKCONFIG_PROC: {}",
        facts.config_error
    );
    for option in FEATURE_OPTIONS {
        assert_eq!(
            facts.config.get(*option).map(String::as_str),
            Some("y"),
            "CONFIG_{option} in /proc/config.gz"
        );
    }
    assert!(facts.vfio_container, "/dev/vfio/vfio exists");
    for fs in ["virtiofs", "ext4", "erofs", "overlay", "tmpfs"] {
        assert!(
            facts.filesystems.iter().any(|f| f == fs),
            "{fs} in /proc/filesystems: {:?}",
            facts.filesystems
        );
    }
    assert!(facts.vsock_device, "/dev/vsock exists");
    // No loopback transport: a container cannot reach the agent through CID 1.
    assert_eq!(
        facts.config.get("VSOCKETS_LOOPBACK").map(String::as_str),
        Some("n"),
        "CONFIG_VSOCKETS_LOOPBACK is not set"
    );
    assert_eq!(
        facts.vsock_transports,
        ["virtio"],
        "the vsock device is bound to the virtio transport"
    );
    let root = facts.root_mount.as_ref().expect("a mount on /");
    // The minimal image boots from its initramfs, and the agent (PID 1)
    // moved it onto a tmpfs first, so containers can pivot_root.
    assert_eq!(
        (root.source.as_str(), root.fstype.as_str()),
        ("tmpfs", "tmpfs"),
        "PID 1 left the initramfs (rootfs) for a tmpfs root"
    );
    assert!(
        facts.paths[0].exists,
        "statx /init: {}",
        facts.paths[0].error
    );

    // Modules from the image manifest's `rootfs.modules`, loaded the Kata way
    // (CreateSandbox.kernel_modules): bridge brings stp and llc first.
    assert_eq!(
        facts.config.get("BRIDGE").map(String::as_str),
        Some("m"),
        "CONFIG_BRIDGE=m"
    );
    assert!(
        !facts.modules.iter().any(|m| m == "bridge"),
        "nothing loaded before asked: {:?}",
        facts.modules
    );
    let mut sandbox = agent::CreateSandboxRequest::new();
    sandbox.sandbox_id = "modules".into();
    for (name, params) in [
        ("bridge", vec![]),
        ("dummy", vec!["numdummies=2".to_string()]),
    ] {
        let mut m = agent::KernelModule::new();
        m.name = name.into();
        m.parameters = params;
        sandbox.kernel_modules.push(m);
    }
    let c = &ready.client;
    c.agent
        .create_sandbox(c.ctx(), &sandbox)
        .await
        .expect("CreateSandbox loads bridge and dummy");
    let loaded = c.guest_facts(&[], &[]).await.unwrap().modules;
    for m in ["llc", "stp", "bridge", "dummy"] {
        assert!(
            loaded.iter().any(|l| l == m),
            "{m} in /proc/modules: {loaded:?}"
        );
    }
    eprintln!("{arch}: modules loaded: {loaded:?}");
    // Asking again is fine (modprobe's behaviour); an unknown module is named.
    let mut again = agent::CreateSandboxRequest::new();
    again.sandbox_id = "modules-2".into();
    let mut m = agent::KernelModule::new();
    m.name = "bridge".into();
    again.kernel_modules.push(m.clone());
    c.agent
        .destroy_sandbox(c.ctx(), &agent::DestroySandboxRequest::new())
        .await
        .unwrap();
    c.agent
        .create_sandbox(c.ctx(), &again)
        .await
        .expect("a loaded module loads again");
    c.agent
        .destroy_sandbox(c.ctx(), &agent::DestroySandboxRequest::new())
        .await
        .unwrap();
    m.name = "nosuch".into();
    again.kernel_modules = vec![m];
    match c.agent.create_sandbox(c.ctx(), &again).await {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::NOT_FOUND, "{s:?}");
            assert!(
                s.message().contains("nosuch") && s.message().contains("rootfs.modules"),
                "{}",
                s.message()
            );
        }
        other => panic!("expected NOT_FOUND for an unknown module, got {other:?}"),
    }

    if with_pmem {
        // The device registers asynchronously; give it a moment after agent-ready.
        let mut facts = facts;
        for _ in 0..50 {
            if !facts.pmem.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            facts = ready.client.guest_facts(&[], &[]).await.unwrap();
        }
        let pmem0 = facts
            .pmem
            .first()
            .unwrap_or_else(|| panic!("no pmem device: {facts:?}"));
        assert_eq!(pmem0.name, "pmem0");
        assert!(pmem0.dax, "pmem0 supports DAX: {pmem0:?}");
        assert_eq!(
            pmem0.mode, "fsdax",
            "the PFN info block made it an fsdax namespace: {pmem0:?}"
        );
        assert_eq!(
            pmem0.size_bytes, pmem_size,
            "the namespace minus the 2 MiB PFN reserve: {pmem0:?}"
        );
    }
    drop(ready);
    vm.shutdown();
}
