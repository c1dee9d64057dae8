//! End-to-end: kiln-agent's container API in a real VM under TCG, driven
//! through kiln-shim's library and the agent's RPCs directly. A busybox
//! rootfs is shared from the host over virtio-fs (Kata's layout); every
//! container of a test uses it. Each test is one boot.
//!
//! `cargo xtask test` builds the image and runs these with KILN_E2E_MANIFEST.

use std::time::{Duration, Instant};

use kiln_protocol::{agent, oci, types};
use kiln_shim::config::ShimConfig;
use kiln_shim::run::{SANDBOX_STORAGE, SHARE_MOUNT_POINT};
use kiln_testsupport::spec::with_memory_limit;
use kiln_testsupport::vm::{bind, create_request, long, SandboxVm};
use protobuf::MessageField;
use sha2::Digest;

/// The container id under which the rootfs is shared (its directory in the share).
const SHARE: &str = "share";

/// A root filesystem with static busybox and its applets as symlinks, and
/// `/vsock_probe` (examples/vsock_probe.rs) for the vsock attack.
fn busybox_rootfs() -> tempfile::TempDir {
    let dir = kiln_testsupport::vm::busybox_rootfs();
    std::fs::write(
        dir.path().join("etc/kiln-rootfs"),
        "the shared busybox rootfs\n",
    )
    .unwrap();
    let probe = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/vsock_probe.rs");
    kiln_testsupport::vm::build_static_x86_64(&probe, &dir.path().join("vsock_probe"));
    dir
}

/// One booted VM with a sandbox, and the client to its agent; the shared
/// container calls come from [`SandboxVm`], this file's own from [`GuestExt`].
type Guest = SandboxVm;

trait GuestExt {
    async fn boot(cfg: &ShimConfig) -> Guest;
    async fn exec(&self, id: &str, exec: &str, args: &[&str], tty: Option<(u32, u32)>);
    async fn sh(&self, id: &str, exec: &str, args: &[&str]) -> (i32, String, String);
}

impl GuestExt for Guest {
    async fn boot(cfg: &ShimConfig) -> Guest {
        let mut sb = agent::CreateSandboxRequest::new();
        sb.sandbox_id = "sb".into();
        sb.hostname = "kiln-sandbox".into();
        SandboxVm::launch(cfg, busybox_rootfs(), SHARE, sb).await
    }

    /// ExecProcess of `args`, on a terminal of `tty` (rows, columns) if given.
    async fn exec(&self, id: &str, exec: &str, args: &[&str], tty: Option<(u32, u32)>) {
        let mut p = process(args);
        if let Some((h, w)) = tty {
            p.Terminal = true;
            let mut b = oci::Box::new();
            b.Height = h;
            b.Width = w;
            p.ConsoleSize = MessageField::some(b);
        }
        self.exec_process(id, exec, p).await;
    }

    /// Runs `args` in container `id`; returns (status, stdout, stderr).
    async fn sh(&self, id: &str, exec: &str, args: &[&str]) -> (i32, String, String) {
        self.exec_outcome(id, exec, process(args)).await
    }
}

fn code<T: std::fmt::Debug>(what: &str, r: ttrpc::Result<T>) -> ttrpc::Code {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => s.code(),
        other => panic!("{what}: expected an error status, got {other:?}"),
    }
}

/// [`kiln_testsupport::vm::process`] with `TERM=xterm` (the tty tests).
fn process(args: &[&str]) -> oci::Process {
    let mut p = kiln_testsupport::vm::process(args);
    p.Env.push("TERM=xterm".into());
    p
}

/// The shim's default (runc-like) spec for `args`, translated as `kiln-shim
/// run` does, over the shared busybox rootfs, in the sandbox's network.
fn spec(args: &[&str]) -> oci::Spec {
    kiln_testsupport::vm::shim_spec(args, SHARE)
}

/// The value of a Prometheus gauge in GetMetrics' text.
fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in GetMetrics:\n{metrics}"))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The number a ticker container last wrote to `rel` in the shared rootfs.
fn ticks(g: &Guest, rel: &str) -> Option<u64> {
    std::fs::read_to_string(g.host(rel))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM; run through cargo xtask test"]
async fn containers_stdio_cgroups_and_hotplug_in_one_vm() {
    let mut cfg = ShimConfig::default();
    // The blk storage below waits for a disk plugged seconds later. The
    // other two words reach PID 1's argv (the kernel passes words it does
    // not know to init): the agent must neither become a container helper
    // nor print its version and return, which would panic the kernel.
    cfg.hypervisor.qemu.kernel_params =
        "agent.hotplug_timeout=60 --kiln-container-helper --version".into();
    let g = Guest::boot(&cfg).await;
    let t = Instant::now();

    // sh -c 'echo hi; exit 3': status 3, then `hi` on stdout.
    g.run("hi", spec(&["sh", "-c", "echo hi; exit 3"])).await;
    assert_eq!(
        g.wait("hi", "").await,
        3,
        "WaitProcess gives the exit status"
    );
    assert_eq!(g.read_text("hi", "").await, "hi\n", "ReadStdout after exit");
    assert!(g.read("hi", "", false).await.is_empty(), "EOF stays EOF");
    g.remove("hi").await;

    // 1 MiB written by a process that exits at once, read only after it exited.
    let script = "head -c 1048576 /dev/urandom > /dev/shm/blob; sha256sum /dev/shm/blob >&2; cat /dev/shm/blob";
    g.run("big", spec(&["sh", "-c", script])).await;
    assert_eq!(
        g.wait("big", "").await,
        0,
        "the writer exited before any read"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = g.read_all("big", "", false).await;
    let err = String::from_utf8(g.read_all("big", "", true).await).unwrap();
    assert_eq!(out.len(), 1 << 20, "all of the 1 MiB came back");
    assert_eq!(
        hex(&sha2::Sha256::digest(&out)),
        err.split_whitespace().next().unwrap_or_default(),
        "sha256 of what the container wrote vs what ReadStdout returned"
    );
    g.remove("big").await;
    eprintln!("stdout checks done at {:.1} s", t.elapsed().as_secs_f64());

    // A long-running container with a memory limit from its spec; execs go into it.
    g.run(
        "box",
        with_memory_limit(spec(&["sleep", "100000"]), 64 << 20),
    )
    .await;
    let (st, out, err) = g
        .sh("box", "max", &["cat", "/sys/fs/cgroup/memory.max"])
        .await;
    assert_eq!(
        (st, out.trim()),
        (0, "67108864"),
        "Linux.Resources.Memory.Limit is memory.max in the container ({err})"
    );

    // UpdateContainer changes memory.max.
    let mut up = agent::UpdateContainerRequest::new();
    up.container_id = "box".into();
    let mut res = oci::LinuxResources::new();
    res.Memory.mut_or_insert_default().Limit = 96 << 20;
    up.resources = MessageField::some(res);
    g.agent()
        .update_container(g.client.ctx(), &up)
        .await
        .unwrap();
    let (_, out, _) = g
        .sh("box", "max2", &["cat", "/sys/fs/cgroup/memory.max"])
        .await;
    assert_eq!(
        out.trim(),
        "100663296",
        "UpdateContainer set memory.max to 96 MiB"
    );

    // StatsContainer from the container's cgroup.
    let mut sreq = agent::StatsContainerRequest::new();
    sreq.container_id = "box".into();
    let stats = g
        .agent()
        .stats_container(g.client.ctx(), &sreq)
        .await
        .unwrap();
    let cg = stats.cgroup_stats.as_ref().expect("cgroup stats");
    assert!(
        cg.memory_stats.usage.usage > 0,
        "memory usage of a running container: {stats:?}"
    );
    assert_eq!(
        cg.memory_stats.usage.limit,
        96 << 20,
        "memory limit: {stats:?}"
    );
    assert!(
        cg.pids_stats.current >= 1,
        "pids of a running container: {stats:?}"
    );
    assert!(
        cg.cpu_stats.cpu_usage.total_usage > 0,
        "cpu usage: {stats:?}"
    );

    // stdin round trip through cat, closed with CloseStdin.
    g.exec("box", "cat", &["cat"], None).await;
    let mut input = b"hello through cat\n".to_vec();
    input.extend((0..100_000u32).map(|i| b'a' + (i % 26) as u8));
    g.write("box", "cat", &input[..18]).await;
    g.write("box", "cat", &input[18..]).await;
    let mut close = agent::CloseStdinRequest::new();
    close.container_id = "box".into();
    close.exec_id = "cat".into();
    g.agent().close_stdin(g.client.ctx(), &close).await.unwrap();
    let out = g.read_all("box", "cat", false).await;
    assert_eq!(out.len(), input.len(), "cat gave back what stdin got");
    assert!(out == input, "stdin round-trips through cat byte for byte");
    assert_eq!(g.wait("box", "cat").await, 0, "cat ends at CloseStdin");
    assert!(
        g.read_all("box", "cat", true).await.is_empty(),
        "cat wrote no stderr"
    );

    // SIGTERM ends an exec'd sleep: 128 + 15.
    g.exec("box", "nap", &["sleep", "1000"], None).await;
    g.signal("box", "nap", 15).await;
    assert_eq!(g.wait("box", "nap").await, 143, "SIGTERM ended the sleep");
    assert!(g.read_all("box", "nap", false).await.is_empty());
    assert!(g.read_all("box", "nap", true).await.is_empty());

    // A terminal gets its window size; TtyWinResize changes it.
    g.exec(
        "box",
        "tty",
        &["sh", "-c", "stty size; read x; stty size"],
        Some((24, 80)),
    )
    .await;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("24 80") {
        let d = g.read("box", "tty", false).await;
        assert!(
            !d.is_empty(),
            "EOF before the first size: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend(d);
    }
    let mut rs = agent::TtyWinResizeRequest::new();
    rs.container_id = "box".into();
    rs.exec_id = "tty".into();
    rs.row = 30;
    rs.column = 100;
    g.agent().tty_win_resize(g.client.ctx(), &rs).await.unwrap();
    g.write("box", "tty", b"\n").await;
    let rest = g.read_text("box", "tty").await;
    assert!(
        rest.contains("30 100"),
        "stty size after TtyWinResize: {rest:?}"
    );
    assert_eq!(g.wait("box", "tty").await, 0);
    eprintln!(
        "stdio/tty/cgroup checks done at {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // 200 sequential execs leave the agent's fds and RSS flat. Each one must
    // see the container's root: once, an exec whose pid in the container
    // equalled the init's guest pid skipped the mount namespace and ran in
    // the guest's root.
    let execs = |from: usize, to: usize| {
        let g = &g;
        async move {
            for i in from..to {
                let id = format!("e{i}");
                let (st, out, err) = g.sh("box", &id, &["cat", "/etc/kiln-rootfs"]).await;
                assert_eq!(
                    (st, out.as_str(), err.as_str()),
                    (0, "the shared busybox rootfs\n", ""),
                    "exec {id} runs in the container's root"
                );
            }
        }
    };
    execs(0, 20).await;
    let m0 = g.metrics().await;
    let started = Instant::now();
    execs(20, 220).await;
    let per_exec = started.elapsed().as_secs_f64() / 200.0;
    let m1 = g.metrics().await;
    let (fds0, fds1) = (
        gauge(&m0, "kiln_agent_open_fds"),
        gauge(&m1, "kiln_agent_open_fds"),
    );
    let (rss0, rss1) = (
        gauge(&m0, "kiln_agent_resident_memory_bytes"),
        gauge(&m1, "kiln_agent_resident_memory_bytes"),
    );
    eprintln!(
        "figure: agent after 20 execs: {fds0} fds, {:.0} KiB RSS; after 220: {fds1} fds, {:.0} KiB RSS; {:.0} ms per exec+read+wait",
        rss0 / 1024.0,
        rss1 / 1024.0,
        per_exec * 1000.0
    );
    assert!(
        fds1 <= fds0 + 2.0,
        "agent fd leak over 200 execs: {fds0} -> {fds1}"
    );
    assert!(
        rss1 <= rss0 + 4.0 * 1024.0 * 1024.0,
        "agent RSS grew over 200 execs: {rss0} -> {rss1} bytes"
    );
    assert_eq!(
        gauge(&m1, "kiln_agent_processes"),
        1.0,
        "finished execs are forgotten (only box's init is left)"
    );

    // PauseContainer / ResumeContainer: a ticker stops while frozen.
    let mut ticker = spec(&[
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i > /tmp/ticks.new; mv /tmp/ticks.new /tmp/ticks; usleep 100000; done",
    ]);
    ticker.Root.mut_or_insert_default().Readonly = false;
    g.run("tick", ticker).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ticks(&g, "tmp/ticks").unwrap_or(0) < 2 {
        assert!(Instant::now() < deadline, "the ticker never ticked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut p = agent::PauseContainerRequest::new();
    p.container_id = "tick".into();
    g.agent().pause_container(g.client.ctx(), &p).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen = ticks(&g, "tmp/ticks");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        ticks(&g, "tmp/ticks"),
        frozen,
        "a paused container does not run"
    );
    let mut r = agent::ResumeContainerRequest::new();
    r.container_id = "tick".into();
    g.agent()
        .resume_container(g.client.ctx(), &r)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ticks(&g, "tmp/ticks") <= frozen {
        assert!(Instant::now() < deadline, "the ticker did not resume");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    g.remove("tick").await;

    // A container over a small memory limit: OOM kill, GetOOMEvent names it.
    g.run(
        "oom",
        with_memory_limit(
            spec(&["awk", "BEGIN { s = \"x\"; while (1) s = s s }"]),
            24 << 20,
        ),
    )
    .await;
    let ev = tokio::time::timeout(
        Duration::from_secs(90),
        g.agent()
            .get_oom_event(long(), &agent::GetOOMEventRequest::new()),
    )
    .await
    .expect("GetOOMEvent answered within 90 s")
    .unwrap();
    assert_eq!(ev.container_id, "oom", "the OOM event names the container");
    assert_eq!(g.wait("oom", "").await, 137, "the OOM killer's SIGKILL");
    g.remove("oom").await;
    eprintln!(
        "pause/oom checks done at {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // A disk hot-plugged after CreateContainer started waiting for it.
    let work = tempfile::tempdir().unwrap();
    let img = kiln_testsupport::vm::ext4_image(work.path());
    let pci = kiln_shim::qemu::root_port_device_path(0);
    let mount_point = format!("{SANDBOX_STORAGE}/kiln_disk0");
    let mut blk = agent::Storage::new();
    blk.driver = "blk".into();
    blk.source = pci.clone();
    blk.fstype = "ext4".into();
    blk.mount_point = mount_point.clone();
    let mut s = spec(&["sh", "-c", "cat /data/hello.txt"]);
    s.Mounts.push(bind("/data", &mount_point, &["rbind", "rw"]));
    let req = create_request("disk", s, vec![blk]);
    let client = g.agent().clone();
    let waiting = tokio::spawn(async move { client.create_container(long(), &req).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !waiting.is_finished(),
        "CreateContainer waits for the disk at {pci}: {:?}",
        waiting.await
    );
    let plugged = g.vm.hotplug_disk(0, &img).unwrap();
    assert_eq!(
        plugged.pci_path, pci,
        "the disk went where the storage said"
    );
    let created = waiting.await.unwrap();
    assert!(
        created.is_ok(),
        "CreateContainer after the hotplug: {created:?}"
    );
    g.start("disk").await;
    assert_eq!(g.wait("disk", "").await, 0);
    assert_eq!(
        g.read_text("disk", "").await,
        "hello from the disk\n",
        "the hot-plugged disk is mounted in the container"
    );
    g.remove("disk").await;

    g.signal("box", "", 15).await;
    assert_eq!(
        g.wait("box", "").await,
        137,
        "SIGTERM to a pid-namespace init becomes SIGKILL"
    );
    g.remove("box").await;
    eprintln!("all done at {:.1} s", t.elapsed().as_secs_f64());
    g.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM; run through cargo xtask test"]
async fn guest_rpcs_network_and_hostile_input_in_one_vm() {
    let mut cfg = ShimConfig::default();
    // Two vCPUs, so OnlineCPUMem has one to bring back online.
    cfg.hypervisor.qemu.default_vcpus = 2;
    // Small resource bounds, reached on purpose in `hostile_input`.
    cfg.hypervisor.qemu.kernel_params = "agent.run_size=16m agent.output_buffer_size=65536".into();
    let g = Guest::boot(&cfg).await;

    // A container whose /sys is writable (CPU offlining) and rootfs too.
    let mut s = spec(&["sleep", "100000"]);
    s.Root.mut_or_insert_default().Readonly = false;
    for m in s.Mounts.iter_mut().filter(|m| m.destination == "/sys") {
        m.options.retain(|o| o != "ro");
    }
    g.run("box", s).await;

    // SetGuestDateTime: the guest clock (seen from the container) follows.
    let mut dt = agent::SetGuestDateTimeRequest::new();
    dt.Sec = 2_000_000_000;
    g.agent()
        .set_guest_date_time(g.client.ctx(), &dt)
        .await
        .unwrap();
    let (_, out, _) = g.sh("box", "date", &["date", "+%s"]).await;
    let guest_now: i64 = out.trim().parse().unwrap();
    assert!(
        (2_000_000_000..2_000_000_120).contains(&guest_now),
        "guest clock after SetGuestDateTime(2e9): {guest_now}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    dt.Sec = now.as_secs() as i64;
    dt.Usec = i64::from(now.subsec_micros());
    g.agent()
        .set_guest_date_time(g.client.ctx(), &dt)
        .await
        .unwrap();
    dt.Usec = 2_000_000;
    assert_eq!(
        code(
            "SetGuestDateTime usec 2e6",
            g.agent().set_guest_date_time(g.client.ctx(), &dt).await
        ),
        ttrpc::Code::INVALID_ARGUMENT
    );

    // CopyFile into the shared container directory: on the host, and in the container.
    let mut cf = agent::CopyFileRequest::new();
    cf.path = format!("{SHARE_MOUNT_POINT}/{SHARE}/rootfs/etc/copied/hosts");
    cf.data = b"127.0.0.1 localhost kiln\n".to_vec();
    cf.file_size = cf.data.len() as i64;
    cf.file_mode = 0o100640;
    cf.dir_mode = 0o750;
    g.agent().copy_file(g.client.ctx(), &cf).await.unwrap();
    let host_copy = g.host("etc/copied/hosts");
    assert_eq!(
        std::fs::read(&host_copy).unwrap(),
        cf.data,
        "CopyFile content"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&host_copy).unwrap().permissions().mode() & 0o7777,
        0o640,
        "CopyFile mode"
    );
    let (_, out, _) = g.sh("box", "cf", &["cat", "/etc/copied/hosts"]).await;
    assert_eq!(out.as_bytes(), cf.data, "the copied file in the container");

    // OnlineCPUMem brings an offlined CPU back.
    let (st, out, err) = g
        .sh(
            "box",
            "off",
            &[
                "sh",
                "-c",
                "echo 0 > /sys/devices/system/cpu/cpu1/online && cat /sys/devices/system/cpu/online",
            ],
        )
        .await;
    assert_eq!((st, out.trim()), (0, "0"), "cpu1 offlined: {err}");
    let mut oc = agent::OnlineCPUMemRequest::new();
    // nb_cpus is the total that must be online (Kata's runtimes send that).
    oc.nb_cpus = 2;
    oc.wait = true;
    g.agent().online_cpu_mem(g.client.ctx(), &oc).await.unwrap();
    let (_, out, _) = g
        .sh("box", "on", &["cat", "/sys/devices/system/cpu/online"])
        .await;
    assert_eq!(out.trim(), "0-1", "OnlineCPUMem onlined cpu1");

    // GetMetrics: the agent's own figures and the guest's.
    let m = g.metrics().await;
    assert!(
        gauge(&m, "kiln_agent_resident_memory_bytes") > 100_000.0,
        "{m}"
    );
    assert!(gauge(&m, "kiln_agent_open_fds") >= 3.0, "{m}");
    assert_eq!(gauge(&m, "kiln_agent_containers"), 1.0, "{m}");
    assert_eq!(gauge(&m, "kiln_guest_online_cpus"), 2.0, "{m}");
    eprintln!(
        "figure: agent RSS {:.0} KiB, {} fds with one container",
        gauge(&m, "kiln_agent_resident_memory_bytes") / 1024.0,
        gauge(&m, "kiln_agent_open_fds")
    );

    network(&g).await;
    hostile_input(&g).await;
    // Last: the rest of this test then runs under the policy it installs.
    policy(&g).await;

    g.signal("box", "", 9).await;
    assert_eq!(g.wait("box", "").await, 137);
    g.remove("box").await;
    g.shutdown().await;
}

/// Kata's agent policy: SetPolicy installs one that allows every
/// AgentService request but ExecProcess (Kata's allow-all-except-exec-process
/// shape); the exec is refused with Kata's code and message, other calls
/// (here GetMetrics, then signal, wait, remove and DestroySandbox) go on.
async fn policy(g: &Guest) {
    let mut rego = String::from("package agent_policy\n");
    let fd = agent::file_descriptor();
    let requests: std::collections::BTreeSet<&str> = fd
        .proto()
        .service
        .iter()
        .flat_map(|s| s.method.iter())
        .filter_map(|m| m.input_type().rsplit('.').next())
        .filter(|n| *n != "ExecProcessRequest")
        .collect();
    for r in requests {
        rego.push_str(&format!("default {r} := true\n"));
    }
    rego.push_str(
        "default ExecProcessRequest := false\nExecProcessRequest if {\n  print(\"no exec into\", input.container_id)\n  false\n}\n",
    );
    let mut set = agent::SetPolicyRequest::new();
    set.policy = rego;
    g.agent()
        .set_policy(g.client.ctx(), &set)
        .await
        .unwrap_or_else(|e| panic!("SetPolicy: {e:?}"));

    let mut req = agent::ExecProcessRequest::new();
    req.container_id = "box".into();
    req.exec_id = "refused".into();
    req.process = MessageField::some(process(&["true"]));
    match g.agent().exec_process(g.client.ctx(), &req).await {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::PERMISSION_DENIED, "{s:?}");
            // Kata's text; the reason is the policy's print() output.
            assert!(
                s.message()
                    .starts_with("ExecProcessRequest is blocked by policy: ")
                    && s.message().contains("no exec into box"),
                "{s:?}"
            );
        }
        other => panic!("ExecProcess under a policy refusing it: {other:?}"),
    }
    set.policy = "package agent_policy\ndefault ExecProcessRequest := \n".into();
    assert_eq!(
        code(
            "SetPolicy of a policy that does not parse",
            g.agent().set_policy(g.client.ctx(), &set).await
        ),
        ttrpc::Code::INVALID_ARGUMENT
    );
    assert!(gauge(&g.metrics().await, "kiln_agent_containers") == 1.0);
    g.still_serving("SetPolicy").await;
}

/// Network RPCs on `lo` and on a virtio-net NIC hot-plugged through QMP
/// (identified by its MAC, as Kata does).
async fn network(g: &Guest) {
    let list = g
        .agent()
        .list_interfaces(g.client.ctx(), &agent::ListInterfacesRequest::new())
        .await
        .unwrap();
    assert!(
        list.Interfaces
            .iter()
            .any(|i| i.name == "lo" && i.hwAddr == "00:00:00:00:00:00"),
        "ListInterfaces has lo: {list:?}"
    );
    // The agent brings lo up at boot; UpdateInterface by name sets its addresses.
    let mut lo = types::Interface::new();
    lo.name = "lo".into();
    let mut addr = types::IPAddress::new();
    addr.address = "127.0.0.1".into();
    addr.mask = "8".into();
    lo.IPAddresses = vec![addr];
    let mut req = agent::UpdateInterfaceRequest::new();
    req.interface = MessageField::some(lo);
    let lo = g
        .agent()
        .update_interface(g.client.ctx(), &req)
        .await
        .unwrap();
    assert!(lo.raw_flags & 1 == 1, "lo is up: {lo:?}");
    assert!(
        lo.IPAddresses
            .iter()
            .any(|a| a.address == "127.0.0.1" && a.mask == "8"),
        "lo has 127.0.0.1/8: {lo:?}"
    );
    g.agent()
        .list_routes(g.client.ctx(), &agent::ListRoutesRequest::new())
        .await
        .unwrap();

    let mac = "02:00:00:00:00:01";
    let mut qmp = g.vm.qmp().unwrap();
    qmp.device_add(
        "virtio-net-pci",
        "kiln_nic0",
        Some(&kiln_shim::qemu::root_port_id(1)),
        &[("mac", serde_json::json!(mac))],
    )
    .unwrap();
    drop(qmp);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = g
            .agent()
            .list_interfaces(g.client.ctx(), &agent::ListInterfacesRequest::new())
            .await
            .unwrap();
        if list.Interfaces.iter().any(|i| i.hwAddr == mac) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hot-plugged NIC {mac} never showed in ListInterfaces: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut want = types::Interface::new();
    want.hwAddr = mac.into();
    want.name = "kiln0".into();
    want.mtu = 1400;
    let mut addr = types::IPAddress::new();
    addr.address = "192.0.2.10".into();
    addr.mask = "24".into();
    want.IPAddresses = vec![addr];
    let mut req = agent::UpdateInterfaceRequest::new();
    req.interface = MessageField::some(want.clone());
    let got = g
        .agent()
        .update_interface(g.client.ctx(), &req)
        .await
        .unwrap();
    assert_eq!(
        (got.name.as_str(), got.mtu),
        ("kiln0", 1400),
        "renamed, MTU set: {got:?}"
    );
    assert!(got.raw_flags & 1 == 1, "the interface is up: {got:?}");
    assert!(
        got.IPAddresses
            .iter()
            .any(|x| x.address == "192.0.2.10" && x.mask == "24"),
        "address set: {got:?}"
    );

    let route = |dest: &str, gw: &str| {
        let mut r = types::Route::new();
        r.dest = dest.into();
        r.gateway = gw.into();
        r.device = "kiln0".into();
        r
    };
    let mut routes = agent::Routes::new();
    routes.Routes = vec![
        route("", "192.0.2.1"),
        route("198.51.100.0/24", "192.0.2.1"),
    ];
    let mut ur = agent::UpdateRoutesRequest::new();
    ur.routes = MessageField::some(routes);
    g.agent().update_routes(g.client.ctx(), &ur).await.unwrap();
    let listed = g
        .agent()
        .list_routes(g.client.ctx(), &agent::ListRoutesRequest::new())
        .await
        .unwrap();
    let shown: Vec<(String, String)> = listed
        .Routes
        .iter()
        .map(|r| (r.dest.clone(), r.gateway.clone()))
        .collect();
    for want in [("", "192.0.2.1"), ("198.51.100.0/24", "192.0.2.1")] {
        assert!(
            shown.contains(&(want.0.into(), want.1.into())),
            "ListRoutes has {want:?}: {shown:?}"
        );
    }

    let mut n = types::ARPNeighbor::new();
    let mut to = types::IPAddress::new();
    to.address = "192.0.2.1".into();
    n.toIPAddress = MessageField::some(to);
    n.device = "kiln0".into();
    n.lladdr = "02:00:00:00:00:99".into();
    let mut neighbors = agent::ARPNeighbors::new();
    neighbors.ARPNeighbors = vec![n];
    let mut an = agent::AddARPNeighborsRequest::new();
    an.neighbors = MessageField::some(neighbors);
    g.agent()
        .add_arp_neighbors(g.client.ctx(), &an)
        .await
        .unwrap();

    // The container shares the sandbox's network: it sees all of it.
    let (st, out, err) = g
        .sh(
            "box",
            "ip",
            &[
                "sh",
                "-c",
                "ip addr show kiln0; ip route; ip neigh show dev kiln0",
            ],
        )
        .await;
    assert_eq!(st, 0, "ip in the container: {err}");
    assert!(
        out.contains("192.0.2.10/24") && out.contains("mtu 1400"),
        "{out}"
    );
    assert!(out.contains("default via 192.0.2.1"), "{out}");
    assert!(out.contains("198.51.100.0/24 via 192.0.2.1"), "{out}");
    assert!(
        out.contains("192.0.2.1") && out.contains("02:00:00:00:00:99"),
        "{out}"
    );

    // Errors name the problem: a bad MAC, and an interface that is not there.
    want.hwAddr = "not-a-mac".into();
    req.interface = MessageField::some(want.clone());
    assert_eq!(
        code(
            "UpdateInterface bad MAC",
            g.agent().update_interface(g.client.ctx(), &req).await
        ),
        ttrpc::Code::INVALID_ARGUMENT
    );
    want.hwAddr = "02:00:00:00:00:77".into();
    req.interface = MessageField::some(want);
    assert_eq!(
        code(
            "UpdateInterface unknown MAC",
            g.agent().update_interface(g.client.ctx(), &req).await
        ),
        ttrpc::Code::NOT_FOUND
    );
}

/// Hostile and unknown ids and paths: each an error, nothing changes, the
/// agent keeps serving.
async fn hostile_input(g: &Guest) {
    for bad in ["../x", "a/b", "..", ""] {
        let mut st = agent::StartContainerRequest::new();
        st.container_id = bad.into();
        assert_eq!(
            code(
                &format!("StartContainer {bad:?}"),
                g.agent().start_container(g.client.ctx(), &st).await
            ),
            ttrpc::Code::INVALID_ARGUMENT,
            "container id {bad:?}"
        );
        assert_eq!(
            code(
                &format!("CreateContainer {bad:?}"),
                g.create(bad, spec(&["true"]), vec![]).await
            ),
            ttrpc::Code::INVALID_ARGUMENT,
            "container id {bad:?}"
        );
    }
    g.still_serving("hostile container ids").await;

    // CopyFile outside the run directory, by `..`, absolutely, or through a symlink.
    let mut link = agent::CopyFileRequest::new();
    link.path = "/run/kata-containers/sandbox/esc".into();
    link.data = format!("{SHARE_MOUNT_POINT}/{SHARE}/rootfs/tmp").into_bytes();
    link.file_size = link.data.len() as i64;
    link.file_mode = 0o120777;
    link.dir_mode = 0o755;
    g.agent().copy_file(g.client.ctx(), &link).await.unwrap();
    for path in [
        "/etc/kiln-escape".to_string(),
        "/run/kata-containers/../../etc/kiln-escape".to_string(),
        format!("{SHARE_MOUNT_POINT}/../../../../etc/kiln-escape"),
        "/run/kata-containers/sandbox/esc/kiln-escape".to_string(),
        "relative/kiln-escape".to_string(),
    ] {
        let mut cf = agent::CopyFileRequest::new();
        cf.path = path.clone();
        cf.data = b"x".to_vec();
        cf.file_size = 1;
        cf.file_mode = 0o100644;
        assert_eq!(
            code(
                &format!("CopyFile {path}"),
                g.agent().copy_file(g.client.ctx(), &cf).await
            ),
            ttrpc::Code::INVALID_ARGUMENT,
            "CopyFile {path}"
        );
    }
    assert!(
        !g.host("tmp/kiln-escape").exists(),
        "nothing was written through the symlink"
    );
    g.still_serving("escaping CopyFile paths").await;

    // The guest's /run is a 16 MiB tmpfs here (agent.run_size): a 24 MiB
    // CopyFile stops with RESOURCE_EXHAUSTED naming the knob, and its part
    // file is gone, so the next CopyFile has room.
    let fill = |offset: i64, data: Vec<u8>, size: i64| {
        let mut cf = agent::CopyFileRequest::new();
        cf.path = "/run/kata-containers/sandbox/fill".into();
        cf.data = data;
        cf.offset = offset;
        cf.file_size = size;
        cf.file_mode = 0o100644;
        cf.dir_mode = 0o755;
        cf
    };
    let mut refused = None;
    for i in 0..24i64 {
        let cf = fill(i << 20, vec![0x5a; 1 << 20], 24 << 20);
        if let Err(e) = g.agent().copy_file(g.client.ctx(), &cf).await {
            refused = Some(e);
            break;
        }
    }
    let e = format!("{:?}", refused.expect("24 MiB fitted in a 16 MiB /run"));
    assert!(
        e.contains("RESOURCE_EXHAUSTED") && e.contains("agent.run_size"),
        "{e}"
    );
    g.agent()
        .copy_file(g.client.ctx(), &fill(0, b"room".to_vec(), 4))
        .await
        .expect("a small CopyFile after the refused one");
    g.still_serving("a CopyFile that filled /run").await;

    // A process writing 1 MiB that nobody reads: with a 64 KiB output
    // buffer (agent.output_buffer_size) it waits on its pipe instead of the
    // agent holding the megabyte, and finishes once the host reads.
    g.exec(
        "box",
        "flood",
        &["sh", "-c", "head -c 1048576 /dev/zero; echo flooded >&2"],
        None,
    )
    .await;
    // One WaitProcess, kept in flight (the agent forgets an exec process
    // once a wait has answered).
    let wait = g.wait("box", "flood");
    tokio::pin!(wait);
    assert!(
        tokio::time::timeout(Duration::from_secs(3), &mut wait)
            .await
            .is_err(),
        "1 MiB of unread output did not hold the writer back"
    );
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    let (st, (out, err)) = tokio::join!(wait, async {
        (
            g.read_all("box", "flood", false).await,
            text(g.read_all("box", "flood", true).await),
        )
    });
    assert_eq!((st, out.len(), err.as_str()), (0, 1 << 20, "flooded\n"));

    // PID 1 moved itself off the initramfs onto a tmpfs at boot, so the
    // helper pivot_roots and detaches the guest's root: a container's mount
    // table holds one mount on "/", its own, and nothing of the initramfs.
    // (With the chroot fallback the guest's rootfs mount showed here too.)
    g.run("mnt", spec(&["cat", "/proc/self/mountinfo"])).await;
    let (st, out, err) = g.outcome("mnt", "").await;
    g.remove("mnt").await;
    let on_root = out
        .lines()
        .filter(|l| l.split_whitespace().nth(4) == Some("/"))
        .count();
    assert!(
        st == 0 && on_root == 1 && !out.contains(" - rootfs "),
        "the container sees the guest's root mount: {st} {out} {err}"
    );

    // A container that keeps CAP_SYS_ADMIN and CAP_SYS_CHROOT (Docker's
    // default grants the latter) tries the classic way out of its root:
    // holding an fd to its root, it chroots into a subdirectory and walks
    // `..` from that fd, which a chroot does not confine. `..` at the top
    // must stay in the container's own root and never reach the guest's
    // (`init`, `lib/modules`). (The walk does leave the chroot: `pwd` there
    // is unreachable.)
    let mut esc = spec(&[
        "sh",
        "-c",
        "mkdir -p /esc/proc /esc/bin && cp /bin/busybox /esc/bin/ && mount --rbind /proc /esc/proc \
         && exec 3</ && chroot /esc /bin/busybox sh -c \
         'cd -P /proc/self/fd/3/.. && /bin/busybox ls -a; echo walked'",
    ]);
    esc.Root.mut_or_insert_default().Readonly = false;
    let mut caps = oci::LinuxCapabilities::new();
    let keep: Vec<String> = ["CAP_SYS_ADMIN", "CAP_SYS_CHROOT", "CAP_DAC_OVERRIDE"]
        .map(String::from)
        .to_vec();
    (caps.Bounding, caps.Effective, caps.Permitted) = (keep.clone(), keep.clone(), keep);
    esc.Process.mut_or_insert_default().Capabilities = MessageField::some(caps);
    g.run("escape", esc).await;
    let (st, out, err) = g.outcome("escape", "").await;
    g.remove("escape").await;
    let _ = g
        .sh(
            "box",
            "esc-clean",
            &["sh", "-c", "umount -l /esc/proc; rm -rf /esc"],
        )
        .await;
    let listed: Vec<&str> = out.lines().collect();
    assert_eq!(
        listed.iter().filter(|l| **l == "walked").count(),
        1,
        "the walk ran: {st} {out} {err}"
    );
    assert!(
        listed.contains(&"esc") && !listed.contains(&"init") && !listed.contains(&"lib"),
        "the container walked out of its root: {out}"
    );

    // Root in a container dials the agent's vsock port, sending a real
    // Check: over loopback (CID 1), at the guest's own CID (3) and at the
    // host (2). vsock has no namespaces, so only the guest kernel's
    // transports (no vsock_loopback: CID 3 has no route, CID 1 goes to the
    // backend, which knows no such VM) and the host (nothing listens behind
    // guest-initiated connections) stand in the way; the agent's peer check
    // (host CID only) is the next wall. Every dial must fail to connect.
    g.run(
        "dial",
        spec(&["/vsock_probe", "1:1024", "3:1024", "2:1024"]),
    )
    .await;
    let (st, out, err) = g.outcome("dial", "").await;
    g.remove("dial").await;
    eprintln!("vsock dials from a container:\n{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!((st, lines.len()), (0, 3), "{out} {err}");
    for line in &lines {
        assert!(
            line.contains(" connect=("),
            "a container connected to a vsock port: {line}"
        );
    }
    g.still_serving("vsock dials from a container").await;

    // A storage whose mount point escapes the run directory.
    let mut st = agent::Storage::new();
    st.driver = "ephemeral".into();
    st.source = "tmpfs".into();
    st.fstype = "tmpfs".into();
    st.mount_point = "/run/kata-containers/../../etc".into();
    assert_eq!(
        code(
            "escaping storage",
            g.create("c2", spec(&["true"]), vec![st]).await
        ),
        ttrpc::Code::INVALID_ARGUMENT
    );

    // Unknown containers and exec ids.
    let mut w = agent::WaitProcessRequest::new();
    w.container_id = "nope".into();
    assert_eq!(
        code(
            "WaitProcess unknown container",
            g.agent().wait_process(g.client.ctx(), &w).await
        ),
        ttrpc::Code::NOT_FOUND
    );
    w.container_id = "box".into();
    w.exec_id = "ghost".into();
    assert_eq!(
        code(
            "WaitProcess unknown exec",
            g.agent().wait_process(g.client.ctx(), &w).await
        ),
        ttrpc::Code::NOT_FOUND
    );
    let mut rd = agent::ReadStreamRequest::new();
    rd.container_id = "box".into();
    rd.exec_id = "ghost".into();
    rd.len = 16;
    assert_eq!(
        code(
            "ReadStdout unknown exec",
            g.agent().read_stdout(g.client.ctx(), &rd).await
        ),
        ttrpc::Code::NOT_FOUND
    );
    let mut sig = agent::SignalProcessRequest::new();
    sig.container_id = "box".into();
    sig.exec_id = "ghost".into();
    sig.signal = 9;
    assert_eq!(
        code(
            "SignalProcess unknown exec",
            g.agent().signal_process(g.client.ctx(), &sig).await
        ),
        ttrpc::Code::NOT_FOUND
    );
    let mut wr = agent::WriteStreamRequest::new();
    wr.container_id = "box".into();
    wr.exec_id = "ghost".into();
    wr.data = b"x".to_vec();
    assert_eq!(
        code(
            "WriteStdin unknown exec",
            g.agent().write_stdin(g.client.ctx(), &wr).await
        ),
        ttrpc::Code::NOT_FOUND
    );
    let mut huge = spec(&["true"]);
    huge.Process.mut_or_insert_default().Env = vec!["A=b".into(); 10_000];
    assert_eq!(
        code("oversized env", g.create("c3", huge, vec![]).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    g.still_serving("unknown ids and an oversized env").await;

    // Raw frames on a fresh connection: a header claiming a ~4 GiB message,
    // then one claiming 64 MiB followed by garbage. The agent must neither
    // allocate them nor stop serving others.
    let rss = |m: &str| gauge(m, "kiln_agent_resident_memory_bytes");
    let before = rss(&g.metrics().await);
    for (len, tail) in [(0xffff_fff0u32, &b""[..]), (64 << 20, &[0xa5u8; 4096][..])] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let port = ShimConfig::load(None).unwrap().agent.port;
        let mut raw = kiln_shim::vsock::connect(&g.vm.run_dir.path().join("vm.vsock"), port)
            .await
            .unwrap();
        let mut frame = Vec::new();
        frame.extend(len.to_be_bytes()); // length
        frame.extend(1u32.to_be_bytes()); // stream id
        frame.extend([1u8, 0]); // type request, no flags
        frame.extend(tail);
        raw.write_all(&frame).await.unwrap();
        // An error answer or a closed connection are both fine; a hang of
        // this one connection is too, as long as the agent serves others.
        let mut buf = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_secs(3), raw.read(&mut buf)).await;
        g.still_serving(&format!("a frame header claiming {len} bytes"))
            .await;
    }
    let after = rss(&g.metrics().await);
    assert!(
        after < before + 8.0 * 1024.0 * 1024.0,
        "oversized frames were not buffered: RSS {before} → {after}"
    );

    // A hostile image and workload (root with CAP_MKNOD, as containerd's
    // default spec grants): a world-writable block node shipped in the image
    // and one made in the container. Neither opens in the guest (device
    // program and nodev), and virtiofsd (no CAP_MKNOD) makes no device on the host.
    let shipped = g.host("shipped-disk");
    let made = std::process::Command::new("mknod")
        .args(["-m", "666"])
        .arg(&shipped)
        .args(["b", "8", "0"])
        .status()
        .unwrap();
    assert!(
        made.success(),
        "mknod on the host (root) for the shipped node"
    );
    let (_, out, err) = g
        .sh(
            "box",
            "devices",
            &[
                "sh",
                "-c",
                "mknod /made-disk b 8 0; echo mknod=$?; head -c 1 /shipped-disk >/dev/null; echo read=$?",
            ],
        )
        .await;
    assert!(
        out.contains("read=1"),
        "the shipped block node was read: {out} {err}"
    );
    assert!(
        !out.contains("mknod=0"),
        "mknod of a block device on the share worked: {out} {err}"
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata(g.host("made-disk"))
            .map_or(true, |m| !m.file_type().is_block_device()),
        "a block device appeared on the host"
    );
    let _ = std::fs::remove_file(&shipped);

    // And it still runs things.
    let (st, out, _) = g.sh("box", "after", &["echo", "still here"]).await;
    assert_eq!((st, out.as_str()), (0, "still here\n"));
}
