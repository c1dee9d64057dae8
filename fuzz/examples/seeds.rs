//! Writes the `agent_requests` seed corpus: one real, encoded request per RPC
//! (selector byte + protobuf), shaped like what Kata's runtime and kiln-shim
//! send. Run from `fuzz/`: `cargo run --example seeds`. The other targets'
//! seeds are copies of the repository's own inputs (see README.md).

use kiln_fuzz::Rpc;
use kiln_protocol::{agent, health, kiln, oci, types};
use protobuf::MessageField;

const RUN: &str = "/run/kata-containers";

fn spec() -> oci::Spec {
    let mut s = oci::Spec::new();
    s.Version = "1.0.2".into();
    s.Hostname = "c1".into();
    let mut root = oci::Root::new();
    root.Path = format!("{RUN}/shared/containers/c1/rootfs");
    s.Root = MessageField::some(root);
    s.Process = MessageField::some(process(&["sh", "-c", "echo hi"]));
    let mut m = oci::Mount::new();
    m.destination = "/proc".into();
    m.source = "proc".into();
    m.type_ = "proc".into();
    m.options = vec!["nosuid".into(), "noexec".into(), "nodev".into()];
    s.Mounts.push(m);
    let mut m = oci::Mount::new();
    m.destination = "/data".into();
    m.source = format!("{RUN}/sandbox/local/data");
    m.type_ = "bind".into();
    m.options = vec!["rbind".into(), "ro".into()];
    s.Mounts.push(m);
    let mut linux = oci::Linux::new();
    for t in ["pid", "ipc", "uts", "mount"] {
        let mut ns = oci::LinuxNamespace::new();
        ns.Type = t.into();
        linux.Namespaces.push(ns);
    }
    linux.Resources = MessageField::some(resources());
    linux.MaskedPaths = vec!["/proc/kcore".into()];
    linux.ReadonlyPaths = vec!["/proc/sys".into()];
    s.Linux = MessageField::some(linux);
    s
}

fn process(args: &[&str]) -> oci::Process {
    let mut p = oci::Process::new();
    p.Args = args.iter().map(|a| a.to_string()).collect();
    p.Env = vec![
        "PATH=/bin:/usr/bin".into(),
        "PCIDEVICE_VENDOR_COM_GPU=0000:01:00.0".into(),
        r#"PCIDEVICE_VENDOR_COM_GPU_INFO={"0000:01:00.0":{"generic":{"deviceID":"0000:01:00.0"}}}"#
            .into(),
    ];
    p.Cwd = "/".into();
    p
}

fn resources() -> oci::LinuxResources {
    let mut r = oci::LinuxResources::new();
    let mut mem = oci::LinuxMemory::new();
    mem.Limit = 256 << 20;
    r.Memory = MessageField::some(mem);
    let mut cpu = oci::LinuxCPU::new();
    cpu.Shares = 1024;
    cpu.Quota = 50_000;
    cpu.Period = 100_000;
    cpu.Cpus = "0-1".into();
    r.CPU = MessageField::some(cpu);
    r
}

fn storage(
    driver: &str,
    source: &str,
    fstype: &str,
    mount_point: &str,
    options: &[&str],
) -> agent::Storage {
    let mut s = agent::Storage::new();
    s.driver = driver.into();
    s.source = source.into();
    s.fstype = fstype.into();
    s.mount_point = mount_point.into();
    s.options = options.iter().map(|o| o.to_string()).collect();
    s
}

fn seeds() -> Vec<(&'static str, Rpc, Vec<u8>)> {
    let mut out: Vec<(&'static str, Rpc, Vec<u8>)> = Vec::new();
    let mut add = |name, rpc, m: &dyn protobuf::MessageDyn| {
        out.push((name, rpc, m.write_to_bytes_dyn().expect("encodes")));
    };
    let (cid, eid) = ("c1".to_string(), "e1".to_string());

    let mut check = health::CheckRequest::new();
    check.service = "grpc.AgentService".into();
    add("health-check", Rpc::HealthCheck, &check);
    add("health-version", Rpc::HealthVersion, &check);

    let mut r = agent::GuestDetailsRequest::new();
    r.mem_block_size = true;
    r.mem_hotplug_probe = true;
    add("guest-details", Rpc::GetGuestDetails, &r);

    let mut r = agent::CreateSandboxRequest::new();
    r.hostname = "kiln".into();
    r.dns = vec!["nameserver 10.0.2.3".into()];
    r.sandbox_id = "sb1".into();
    r.sandbox_pidns = true;
    r.storages = vec![
        storage(
            "virtio-fs",
            "kataShared",
            "virtiofs",
            &format!("{RUN}/shared/containers"),
            &["nodev"],
        ),
        storage(
            "local",
            "local",
            "local",
            &format!("{RUN}/sandbox/local/data"),
            &["mode=0750"],
        ),
    ];
    let mut km = agent::KernelModule::new();
    km.name = "vfio-pci".into();
    km.parameters = vec!["ids=10de:1db6".into()];
    r.kernel_modules.push(km);
    add("create-sandbox", Rpc::CreateSandbox, &r);
    add(
        "destroy-sandbox",
        Rpc::DestroySandbox,
        &agent::DestroySandboxRequest::new(),
    );

    let mut r = agent::CreateContainerRequest::new();
    r.container_id = cid.clone();
    r.exec_id = cid.clone();
    r.OCI = MessageField::some(spec());
    let mut d = agent::Device::new();
    d.type_ = "vfio-pci".into();
    d.container_path = "/dev/vfio/12".into();
    d.options = vec!["0000:01:00.0=02/00".into()];
    r.devices.push(d);
    r.storages = vec![
        storage(
            "ephemeral",
            "tmpfs",
            "tmpfs",
            &format!("{RUN}/sandbox/ephemeral/scratch"),
            &["size=64m"],
        ),
        storage(
            "virtio-blk",
            "02/01.0",
            "ext4",
            &format!("{RUN}/sandbox/blk/disk0"),
            &["ro", "noatime"],
        ),
        storage(
            "pmem",
            "/dev/pmem0",
            "ext4",
            &format!("{RUN}/sandbox/pmem0"),
            &["dax"],
        ),
    ];
    r.sandbox_pidns = true;
    add("create-container", Rpc::CreateContainer, &r);

    let mut r = agent::StartContainerRequest::new();
    r.container_id = cid.clone();
    add("start-container", Rpc::StartContainer, &r);
    let mut r = agent::RemoveContainerRequest::new();
    r.container_id = cid.clone();
    r.timeout = 5;
    add("remove-container", Rpc::RemoveContainer, &r);

    let mut r = agent::ExecProcessRequest::new();
    r.container_id = cid.clone();
    r.exec_id = eid.clone();
    r.process = MessageField::some(process(&["cat", "/etc/hostname"]));
    add("exec-process", Rpc::ExecProcess, &r);
    let mut r = agent::SignalProcessRequest::new();
    r.container_id = cid.clone();
    r.exec_id = eid.clone();
    r.signal = 15;
    add("signal-process", Rpc::SignalProcess, &r);
    let mut r = agent::WaitProcessRequest::new();
    r.container_id = cid.clone();
    r.exec_id = eid.clone();
    add("wait-process", Rpc::WaitProcess, &r);
    let mut r = agent::ReadStreamRequest::new();
    r.container_id = cid.clone();
    r.exec_id = eid.clone();
    r.len = 4096;
    add("read-stdout", Rpc::ReadStdout, &r);
    add("read-stderr", Rpc::ReadStderr, &r);
    let mut r = agent::WriteStreamRequest::new();
    r.container_id = cid.clone();
    r.exec_id = eid.clone();
    r.data = b"hello\n".to_vec();
    add("write-stdin", Rpc::WriteStdin, &r);
    let mut r = agent::CloseStdinRequest::new();
    r.container_id = cid.clone();
    r.exec_id = eid.clone();
    add("close-stdin", Rpc::CloseStdin, &r);
    let mut r = agent::TtyWinResizeRequest::new();
    r.container_id = cid.clone();
    r.exec_id = eid.clone();
    r.row = 24;
    r.column = 80;
    add("tty-win-resize", Rpc::TtyWinResize, &r);

    let mut r = agent::UpdateContainerRequest::new();
    r.container_id = cid.clone();
    r.resources = MessageField::some(resources());
    add("update-container", Rpc::UpdateContainer, &r);
    let mut r = agent::StatsContainerRequest::new();
    r.container_id = cid.clone();
    add("stats-container", Rpc::StatsContainer, &r);
    let mut r = agent::PauseContainerRequest::new();
    r.container_id = cid.clone();
    add("pause-container", Rpc::PauseContainer, &r);
    let mut r = agent::ResumeContainerRequest::new();
    r.container_id = cid.clone();
    add("resume-container", Rpc::ResumeContainer, &r);
    add(
        "get-oom-event",
        Rpc::GetOomEvent,
        &agent::GetOOMEventRequest::new(),
    );

    let mut r = agent::CopyFileRequest::new();
    r.path = format!("{RUN}/shared/containers/{cid}/hostname");
    r.data = b"kiln\n".to_vec();
    r.file_size = 5;
    r.file_mode = 0o100644;
    r.dir_mode = 0o755;
    add("copy-file", Rpc::CopyFile, &r);
    let mut r = agent::CopyFileRequest::new();
    r.path = format!("{RUN}/shared/containers/{cid}/resolv.conf");
    r.data = b"hostname".to_vec();
    r.file_mode = 0o120777;
    add("copy-file-symlink", Rpc::CopyFile, &r);
    let mut r = agent::CopyFileRequest::new();
    r.path = format!("{RUN}/shared/containers/{cid}/etc");
    r.file_mode = 0o040755;
    add("copy-file-dir", Rpc::CopyFile, &r);

    let mut r = agent::SetGuestDateTimeRequest::new();
    r.Sec = 1_700_000_000;
    r.Usec = 250_000;
    add("set-guest-date-time", Rpc::SetGuestDateTime, &r);
    add(
        "online-cpu-mem",
        Rpc::OnlineCpuMem,
        &agent::OnlineCPUMemRequest::new(),
    );
    let mut r = agent::MemHotplugByProbeRequest::new();
    r.memHotplugProbeAddr = vec![0x1_0000_0000];
    add("mem-hotplug-by-probe", Rpc::MemHotplugByProbe, &r);
    add(
        "get-metrics",
        Rpc::GetMetrics,
        &agent::GetMetricsRequest::new(),
    );
    let mut r = agent::VolumeStatsRequest::new();
    r.volume_guest_path = "/tmp".into();
    add("get-volume-stats", Rpc::GetVolumeStats, &r);

    let mut i = types::Interface::new();
    i.device = "eth0".into();
    i.name = "eth0".into();
    i.mtu = 1500;
    i.hwAddr = "02:42:ac:11:00:02".into();
    let mut a = types::IPAddress::new();
    a.address = "10.0.2.15".into();
    a.mask = "24".into();
    i.IPAddresses.push(a);
    let mut a = types::IPAddress::new();
    a.address = "fd00::2".into();
    a.mask = "64".into();
    i.IPAddresses.push(a);
    let mut r = agent::UpdateInterfaceRequest::new();
    r.interface = MessageField::some(i);
    add("update-interface", Rpc::UpdateInterface, &r);

    let mut routes = agent::Routes::new();
    let mut rt = types::Route::new();
    rt.dest = "default".into();
    rt.gateway = "10.0.2.2".into();
    rt.device = "eth0".into();
    routes.Routes.push(rt);
    let mut rt = types::Route::new();
    rt.dest = "10.0.2.0/24".into();
    rt.device = "eth0".into();
    rt.source = "10.0.2.15".into();
    rt.scope = 253;
    routes.Routes.push(rt);
    let mut r = agent::UpdateRoutesRequest::new();
    r.routes = MessageField::some(routes);
    add("update-routes", Rpc::UpdateRoutes, &r);
    add(
        "list-interfaces",
        Rpc::ListInterfaces,
        &agent::ListInterfacesRequest::new(),
    );
    add(
        "list-routes",
        Rpc::ListRoutes,
        &agent::ListRoutesRequest::new(),
    );

    let mut n = types::ARPNeighbor::new();
    let mut a = types::IPAddress::new();
    a.address = "10.0.2.2".into();
    n.toIPAddress = MessageField::some(a);
    n.device = "eth0".into();
    n.lladdr = "52:55:0a:00:02:02".into();
    n.state = 128;
    let mut list = agent::ARPNeighbors::new();
    list.ARPNeighbors.push(n);
    let mut r = agent::AddARPNeighborsRequest::new();
    r.neighbors = MessageField::some(list);
    add("add-arp-neighbors", Rpc::AddArpNeighbors, &r);

    let mut r = kiln::GuestFactsRequest::new();
    r.config_options = vec!["VSOCKETS".into(), "VIRTIO_FS".into(), "FS_DAX".into()];
    r.statx_paths = vec!["/".into()];
    add("guest-facts", Rpc::GuestFacts, &r);
    out
}

fn main() -> std::io::Result<()> {
    let dir = std::path::Path::new("corpus/agent_requests");
    std::fs::create_dir_all(dir)?;
    for (name, rpc, body) in seeds() {
        let mut bytes = vec![rpc.byte()];
        bytes.extend(body);
        std::fs::write(dir.join(name), bytes)?;
    }
    let mut cmdline = vec![Rpc::KernelCmdline.byte()];
    cmdline.extend_from_slice(
        b"console=ttyS0 agent.log=debug agent.hotplug_timeout=10s agent.server_addr=vsock://-1:1024 \
          agent.container_pipe_size=65536 agent.debug_console agent.debug_console_vport=1026 agent.devmode=off",
    );
    std::fs::write(dir.join("kernel-cmdline"), cmdline)?;
    Ok(())
}
