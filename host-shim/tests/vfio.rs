//! End-to-end VFIO passthrough under TCG: the guest gets a virtual IOMMU
//! (`intel-iommu` on x86_64, `virtio-iommu-pci` on aarch64, on ppc64le a
//! second PHB, whose sPAPR TCE IOMMU gives it a group of its own) and an
//! emulated `edu` device (1234:11e8; on s390x, whose QEMU has no edu, a
//! virtio-rng function, each zPCI function being its own domain and IOMMU
//! group there), which the shim
//! presents to the agent as host device 0000:ab:00.0 passed through
//! (`--emulated-vfio`). The agent binds it to vfio-pci in the guest, the
//! container gets `/dev/vfio/<group>` and `/dev/vfio/vfio`, and a small
//! static program (examples/vfio_probe.rs) drives the VFIO API on it.
//! Once cold (behind a root port the shim made, through `kiln-shim run`) and
//! once hot-plugged through QMP while CreateContainer waits for it (not on
//! ppc64le and s390x: kiln-shim hot-plugs into PCIe root ports, which
//! pseries and s390-ccw-virtio lack).
//!
//! `cargo xtask test` builds the image and runs these with KILN_E2E_MANIFEST
//! (and, for aarch64, KILN_E2E_SHELL_ROOTFS: the container rootfs).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_protocol::agent;
use kiln_shim::config::ShimConfig;
use kiln_shim::image::BootImage;
use kiln_shim::vfio::{Backend, GuestMode, VfioOptions};
use kiln_shim::vm::{BootOptions, Vm};
use kiln_testsupport::vm::manifest;
use protobuf::MessageField;

const HOST_BDF: &str = "0000:ab:00.0";

/// The guest VFIO path needs a guest IOMMU (`kiln_shim::qemu::supports_guest_vfio`):
/// every arch's default machine has one.
fn vfio_arch() -> bool {
    let arch = BootImage::load(&manifest()).unwrap().manifest.arch;
    let ok = kiln_shim::qemu::supports_guest_vfio(arch, arch.qemu_machine());
    if !ok {
        eprintln!("skipping: {arch}: kiln offers no guest IOMMU there, so no guest VFIO path");
    }
    ok
}

/// The emulated device passed and its `vendor:device`: QEMU's edu, except
/// on s390x, whose QEMU has none (nor pci-testdev): a virtio-rng function.
fn passed_device() -> (&'static str, &'static str) {
    match BootImage::load(&manifest()).unwrap().manifest.arch {
        kiln_manifest::Arch::S390x => ("virtio-rng-pci-non-transitional", "0x1af4:0x1044"),
        _ => ("edu", "0x1234:0x11e8"),
    }
}

/// Hot-plug goes into a free PCIe root port: x86_64 q35 and aarch64 virt.
/// (This test also shares the rootfs over virtio-fs, which serves neither a
/// ppc64le nor an s390x guest from an x86_64 host.)
fn hotplug_arch() -> bool {
    let arch = BootImage::load(&manifest()).unwrap().manifest.arch;
    let machine = arch.qemu_machine();
    let ok = vfio_arch() && kiln_shim::qemu::has_pcie_root_ports(arch, machine);
    if !ok {
        eprintln!(
            "skipping: {arch} {machine}: kiln-shim hot-plugs VFIO devices into PCIe root ports only, which this machine has not (pseries' PHB slots and s390x zPCI hot-plug are not driven)"
        );
    }
    ok
}

/// The container rootfs with `/vfio_probe`, built statically for the guest:
/// the host's busybox on x86_64, the `shell` rootfs built for the arch elsewhere.
fn rootfs_with_probe() -> tempfile::TempDir {
    let arch = BootImage::load(&manifest()).unwrap().manifest.arch;
    let dir = if arch == kiln_manifest::Arch::host() {
        let dir = tempfile::tempdir().unwrap();
        kiln_testsupport::vm::write_busybox_rootfs(dir.path()).unwrap();
        dir
    } else {
        kiln_testsupport::vm::rootfs_copy("KILN_E2E_SHELL_ROOTFS", "usr/bin/dash")
    };
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/vfio_probe.rs");
    kiln_testsupport::vm::build_static(&src, &dir.path().join("vfio_probe"), arch);
    dir
}

/// What the container runs: print the env and the group, then probe.
const SCRIPT: &str = r#"
g=$(ls /dev/vfio | grep -v '^vfio$')
echo "PCIDEVICE_TEST=$PCIDEVICE_TEST"
echo "group=$g"
echo "ids=$(cat /sys/bus/pci/devices/$PCIDEVICE_TEST/vendor):$(cat /sys/bus/pci/devices/$PCIDEVICE_TEST/device)"
ls -l /dev/vfio
exec /vfio_probe /dev/vfio/$g "$PCIDEVICE_TEST"
"#;

/// Checks the container's output: the guest address replaced the host's,
/// the device is the one passed, and VFIO_DEVICE_GET_INFO reported regions.
fn check_output(out: &str) {
    let field = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in:\n{out}"))
            .trim()
            .to_string()
    };
    let guest_bdf = field("PCIDEVICE_TEST=");
    assert_ne!(guest_bdf, HOST_BDF, "PCIDEVICE_TEST not rewritten:\n{out}");
    // 0000:..: behind a root port; 0001:00:..: on pseries' second PHB;
    // 0018:00:..: the zPCI function's own domain (its uid) on s390x.
    let domain = match BootImage::load(&manifest()).unwrap().manifest.arch {
        kiln_manifest::Arch::Ppc64le => "0001:00:",
        kiln_manifest::Arch::S390x => "0018:00:",
        _ => "0000:",
    };
    assert!(
        guest_bdf.len() == 12 && guest_bdf.starts_with(domain),
        "PCIDEVICE_TEST is not a guest PCI address in {domain}:\n{out}"
    );
    let (driver, ids) = passed_device();
    assert_eq!(field("ids="), ids, "not the {driver} device:\n{out}");
    assert!(!field("group=").is_empty(), "no /dev/vfio/<group>:\n{out}");
    assert!(out.contains("viable=true"), "{out}");
    assert!(out.contains(&format!("device={guest_bdf} ")), "{out}");
    let regions: u32 = field("device=")
        .split_whitespace()
        .find_map(|w| w.strip_prefix("num_regions="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no num_regions in:\n{out}"));
    assert!(regions > 0, "{out}");
}

#[test]
#[ignore = "boots a VM; run through `cargo xtask test`"]
fn cold_plugged_edu_is_a_vfio_device_in_the_container() {
    if !vfio_arch() {
        return;
    }
    let rootfs = rootfs_with_probe();
    let base = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln-shim"))
        .env("KILN_RUN_DIR", base.path())
        .args(["run", "--image"])
        .arg(manifest())
        .arg("--rootfs")
        .arg(rootfs.path())
        .args([
            "--emulated-vfio",
            &format!("{}@{HOST_BDF}", passed_device().0),
        ])
        .args(["-e", &format!("PCIDEVICE_TEST={HOST_BDF}")])
        .args(["--", "sh", "-c", SCRIPT])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "figure: run with a cold-plugged {} as vfio-pci, launch to exit: {:.2} s\n{stdout}",
        passed_device().0,
        started.elapsed().as_secs_f64()
    );
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    check_output(&stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM; run through `cargo xtask test`"]
async fn hot_plugged_edu_is_awaited_by_create_container() {
    if !hotplug_arch() {
        return;
    }
    let run_base = tempfile::tempdir().unwrap();
    std::env::set_var("KILN_RUN_DIR", run_base.path());
    let rootfs = rootfs_with_probe();
    let mut cfg = ShimConfig::default();
    // PCIe hot-plug under TCG takes seconds; the agent must wait long enough.
    cfg.hypervisor.qemu.kernel_params = "agent.hotplug_timeout=90".into();
    cfg.agent.boot_timeout = 60;
    let image = BootImage::load(&manifest()).unwrap();
    let opts = BootOptions {
        share_rootfs: Some(("share".into(), rootfs.path().to_path_buf())),
        vfio: VfioOptions {
            viommu: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut vm = Vm::launch(&image, &cfg, &opts).unwrap();
    let ready = match vm.wait_ready(&cfg).await {
        Ok(r) => r,
        Err(e) => panic!("the agent never answered: {e:#}"),
    };
    eprintln!("agent ready after {:.2} s", ready.elapsed.as_secs_f64());
    let c = ready.client;
    let mut sb = agent::CreateSandboxRequest::new();
    sb.sandbox_id = "sb".into();
    sb.storages.push(kiln_shim::run::share_storage());
    c.agent
        .create_sandbox(c.ctx(), &sb)
        .await
        .unwrap_or_else(|e| panic!("CreateSandbox: {e:?}{}", vm.diagnostics()));

    // What the shim will plug: edu into free root port 0, as host 0000:ab:00.0.
    let edu = Backend::Emulated {
        driver: "edu".into(),
        pretend: HOST_BDF.parse().unwrap(),
    };
    let planned = kiln_shim::vfio::PassedDevice {
        backend: edu.clone(),
        mode: GuestMode::Vfio,
        host_group: kiln_shim::vfio::emulated_group(0),
        pci_path: kiln_shim::qemu::root_port_device_path(0),
    };
    // The init only waits; the probe runs as an exec (whose PCIDEVICE_TEST
    // goes through ExecProcess's rewrite; `kiln-shim run` above covers
    // CreateContainer's).
    let args: Vec<String> = vec!["sleep".into(), "3600".into()];
    let spec = kiln_shim::spec::default_spec(&args, &[format!("PCIDEVICE_TEST={HOST_BDF}")], false)
        .unwrap();
    let mut req = agent::CreateContainerRequest::new();
    req.container_id = "vfio".into();
    req.exec_id = "vfio".into();
    req.OCI = MessageField::some(kiln_shim::run::protocol_spec(&spec, "share").unwrap());
    req.devices.push(planned.agent_device());

    let long = || ttrpc::context::with_timeout(Duration::from_secs(180).as_nanos() as i64);
    let agent_client = c.agent.clone();
    let t0 = Instant::now();
    let create = tokio::spawn(async move { agent_client.create_container(long(), &req).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !create.is_finished(),
        "CreateContainer returned before the device existed: {:?}",
        create.await
    );
    let plugged = vm
        .hotplug_vfio(0, edu, GuestMode::Vfio, planned.host_group)
        .unwrap();
    assert_eq!(plugged, planned);
    create
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("CreateContainer: {e:?}{}", vm.diagnostics()));
    eprintln!(
        "figure: CreateContainer with a hot-plugged edu (plugged 2 s in): {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let mut start = agent::StartContainerRequest::new();
    start.container_id = "vfio".into();
    c.agent.start_container(c.ctx(), &start).await.unwrap();
    let mut ex = agent::ExecProcessRequest::new();
    ex.container_id = "vfio".into();
    ex.exec_id = "probe".into();
    let mut p = kiln_protocol::oci::Process::new();
    p.Args = vec!["sh".into(), "-c".into(), SCRIPT.into()];
    p.Env = vec![format!("PCIDEVICE_TEST={HOST_BDF}"), "PATH=/bin".into()];
    p.Cwd = "/".into();
    ex.process = MessageField::some(p);
    c.agent
        .exec_process(c.ctx(), &ex)
        .await
        .unwrap_or_else(|e| panic!("ExecProcess: {e:?}{}", vm.diagnostics()));
    let stream = |id: &str| {
        let mut r = agent::ReadStreamRequest::new();
        r.container_id = "vfio".into();
        r.exec_id = id.into();
        r.len = 64 * 1024;
        r
    };
    let mut out = Vec::new();
    loop {
        let d = c
            .agent
            .read_stdout(long(), &stream("probe"))
            .await
            .unwrap()
            .data;
        if d.is_empty() {
            break;
        }
        out.extend(d);
    }
    let mut w = agent::WaitProcessRequest::new();
    w.container_id = "vfio".into();
    w.exec_id = "probe".into();
    let status = c.agent.wait_process(long(), &w).await.unwrap().status;
    let out = String::from_utf8_lossy(&out).into_owned();
    eprintln!("{out}");
    let err = c
        .agent
        .read_stderr(long(), &stream("probe"))
        .await
        .map(|r| r.data)
        .unwrap_or_default();
    assert_eq!(status, 0, "stderr: {}", String::from_utf8_lossy(&err));
    check_output(&out);
    drop(c);
    vm.shutdown();
}
