//! End-to-end: real programs from a Debian container rootfs in one VM per
//! arch, proving the kernel's `workload` feature by behaviour: fio with the
//! libaio and io_uring engines on a hot-plugged disk, a POSIX message queue
//! round trip, IPv6 on loopback, an iptables and an nft rule that drop
//! packets (a connection works before, fails under, works after), a process
//! swapping under a memory limit with memory.swap.max set (and OOM-killed
//! without swap), a program using huge pages from a hugetlbfs spec mount,
//! redis-server answering redis-cli, and IPv6 and IPv4 over a virtio-net
//! link (QEMU's user-mode network) configured as Kata's runtime does it
//! (UpdateInterface, UpdateRoutes): the container's TCP connections to
//! fec0::2 and 10.0.2.2 reach listeners on the host's ::1 and 127.0.0.1,
//! and the guest's neighbour table shows the router learned by neighbour
//! discovery.
//!
//! The rootfs is rootfs-recipes/workload.toml, built by `cargo xtask
//! build-container-rootfs` (KILN_E2E_WORKLOAD_ROOTFS names it); the guest is
//! the minimal image (KILN_E2E_MANIFEST). `cargo xtask test` sets both.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_protocol::{agent, oci, types};
use kiln_shim::config::ShimConfig;
use kiln_shim::qemu::usernet;
use kiln_testsupport::vm::SandboxVm;
use protobuf::MessageField;

const SHARE: &str = "workload";
const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn env_path(var: &str) -> PathBuf {
    PathBuf::from(std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set; run this test through `cargo xtask test` (see the file's header)")
    }))
}

/// A private copy of the built rootfs: the tests write into it (redis, fio).
fn rootfs_copy() -> tempfile::TempDir {
    kiln_testsupport::vm::rootfs_copy("KILN_E2E_WORKLOAD_ROOTFS", "usr/bin/fio")
}

/// Every capability: the test's containers are privileged (mkswap, swapon,
/// mknod, iptables, sysctl writes), as a `--privileged` container is.
const ALL_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

fn caps() -> oci::LinuxCapabilities {
    let all: Vec<String> = ALL_CAPS.iter().map(|c| c.to_string()).collect();
    let mut c = oci::LinuxCapabilities::new();
    c.Bounding = all.clone();
    c.Effective = all.clone();
    c.Permitted = all.clone();
    c.Inheritable = all.clone();
    c.Ambient = all;
    c
}

fn process(args: &[&str]) -> oci::Process {
    let mut p = oci::Process::new();
    p.Args = args.iter().map(|s| s.to_string()).collect();
    p.Env = vec![PATH.into(), "HOME=/root".into()];
    p.Cwd = "/".into();
    p.Capabilities = MessageField::some(caps());
    p
}

/// The shim's default spec for `args`, made privileged: every capability,
/// writable /sys and /proc/sys, no masked paths, a writable root.
fn privileged(args: &[&str]) -> oci::Spec {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let s = kiln_shim::spec::default_spec(&args, &[], false).unwrap();
    let mut s = kiln_shim::run::protocol_spec(&s, SHARE).unwrap();
    let p = s.Process.mut_or_insert_default();
    p.Env = vec![PATH.into(), "HOME=/root".into()];
    p.Capabilities = MessageField::some(caps());
    s.Root.mut_or_insert_default().Readonly = false;
    for m in s.Mounts.iter_mut().filter(|m| m.destination == "/sys") {
        m.options.retain(|o| o != "ro");
    }
    let linux = s.Linux.mut_or_insert_default();
    linux.MaskedPaths.clear();
    linux.ReadonlyPaths.clear();
    // A privileged container, as `docker run --privileged` makes it: every
    // device allowed (the agent's device program denies a hot-plugged disk
    // to a container whose spec does not allow it; agent_vm tests that).
    linux.Resources.mut_or_insert_default().Devices =
        vec![kiln_testsupport::spec::allow_all_devices()];
    s
}

fn with_memory(mut s: oci::Spec, limit: i64, swap: i64) -> oci::Spec {
    let mem = s
        .Linux
        .mut_or_insert_default()
        .Resources
        .mut_or_insert_default()
        .Memory
        .mut_or_insert_default();
    mem.Limit = limit;
    mem.Swap = swap;
    s
}

struct Guest {
    g: SandboxVm,
    n: std::cell::Cell<u32>,
}

impl Guest {
    /// Runs `script` with /bin/sh in container `id` as a new exec; returns
    /// (status, stdout, stderr).
    async fn sh(&self, id: &str, script: &str) -> (i32, String, String) {
        self.shell(id, "/bin/sh", script).await
    }

    /// Runs `script` with `shell` (e.g. bash, for /dev/tcp) in container `id`.
    async fn shell(&self, id: &str, shell: &str, script: &str) -> (i32, String, String) {
        self.n.set(self.n.get() + 1);
        let exec = format!("e{}", self.n.get());
        self.g
            .exec_process(id, &exec, process(&[shell, "-c", script]))
            .await;
        let r = self.g.outcome(id, &exec).await;
        eprintln!("$ {script}\n  -> {} {:?} {:?}", r.0, r.1, r.2);
        r
    }

    /// `script` must exit 0; returns its stdout.
    async fn ok(&self, id: &str, script: &str) -> String {
        let (st, out, err) = self.sh(id, script).await;
        assert_eq!(
            st,
            0,
            "`{script}` failed: {out}{err}{}",
            self.g.vm.diagnostics()
        );
        out
    }
}

/// The first JSON object in fio's output: (read bytes, written bytes, error).
fn fio_result(out: &str) -> (u64, u64, i64) {
    let start = out
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from fio: {out}"));
    let v: serde_json::Value =
        serde_json::from_str(&out[start..]).unwrap_or_else(|e| panic!("fio's JSON: {e}: {out}"));
    let job = &v["jobs"][0];
    (
        job["read"]["io_bytes"].as_u64().unwrap_or(0),
        job["write"]["io_bytes"].as_u64().unwrap_or(0),
        job["error"].as_i64().unwrap_or(-1),
    )
}

/// A listener on the host's `addr` that answers one line per connection
/// with `reply` and sends the line it read back through the channel.
fn host_listener(
    addr: &str,
    reply: String,
) -> (
    u16,
    std::sync::mpsc::Receiver<(String, std::net::SocketAddr)>,
) {
    use std::io::{BufRead, Write};
    let l = std::net::TcpListener::bind(addr)
        .unwrap_or_else(|e| panic!("listening on the host's {addr}: {e}"));
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let peer = c.peer_addr().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(60))).ok();
            let mut line = String::new();
            let mut r = std::io::BufReader::new(c.try_clone().unwrap());
            if r.read_line(&mut line).is_ok() {
                let _ = c.write_all(reply.as_bytes());
                if tx.send((line.trim().to_string(), peer)).is_err() {
                    return;
                }
            }
        }
    });
    (port, rx)
}

/// The NIC as Kata's runtime describes a pod interface to UpdateInterface:
/// found by MAC, named, with an MTU and an IPv4 and an IPv6 address.
fn nic_interface() -> types::Interface {
    let addr = |ip: &str, len: u8, family: types::IPFamily| {
        let mut a = types::IPAddress::new();
        a.address = ip.into();
        a.mask = len.to_string();
        a.family = family.into();
        a
    };
    let mut i = types::Interface::new();
    i.name = "eth0".into();
    i.device = "eth0".into();
    i.hwAddr = usernet::MAC.into();
    i.mtu = u64::from(usernet::MTU);
    i.IPAddresses = vec![
        addr(usernet::GUEST_V4, usernet::PREFIX_V4, types::IPFamily::v4),
        addr(usernet::GUEST_V6, usernet::PREFIX_V6, types::IPFamily::v6),
    ];
    i
}

/// Default routes through the user-mode network's router, both families.
fn nic_routes() -> agent::Routes {
    let route = |gw: &str, family: types::IPFamily| {
        let mut r = types::Route::new();
        r.dest = String::new();
        r.gateway = gw.into();
        r.device = "eth0".into();
        r.family = family.into();
        r
    };
    let mut routes = agent::Routes::new();
    routes.Routes = vec![
        route(usernet::GATEWAY_V4, types::IPFamily::v4),
        route(usernet::GATEWAY_V6, types::IPFamily::v6),
    ];
    routes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM; run through cargo xtask test"]
async fn real_workloads_in_one_vm() {
    let t = Instant::now();
    let mut cfg = ShimConfig::default();
    // Room for a 48 MiB-limited container pushing into swap, redis and fio.
    cfg.hypervisor.qemu.default_memory = 768;
    // A virtio-net NIC on QEMU's user-mode network, for IPv6 on a real link.
    cfg.hypervisor.qemu.network = "user".into();
    let mut sb = agent::CreateSandboxRequest::new();
    sb.sandbox_id = "wl".into();
    sb.hostname = "kiln-workload".into();
    let g = kiln_testsupport::vm::boot_sandbox(
        &cfg,
        &env_path("KILN_E2E_MANIFEST"),
        rootfs_copy(),
        SHARE,
        sb,
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let g = Guest {
        g,
        n: std::cell::Cell::new(0),
    };

    // The long-lived privileged container; a hugetlbfs spec mount in it.
    let mut s = privileged(&["sleep", "infinity"]);
    let mut huge = oci::Mount::new();
    huge.destination = "/dev/hugepages".into();
    huge.source = "hugetlbfs".into();
    huge.type_ = "hugetlbfs".into();
    s.Mounts.push(huge);
    g.g.run("box", s).await;

    // POSIX message queue, through the default spec's /dev/mqueue mount.
    let out = g.ok("box", "kiln-probe mq").await;
    assert!(
        out.contains("received \"hello over mqueue\" priority 7")
            && out.contains("in /dev/mqueue: yes"),
        "{out}"
    );

    // Huge pages from the hugetlbfs mount the spec asked for.
    g.ok("box", "echo 8 > /proc/sys/vm/nr_hugepages").await;
    let out = g.ok("box", "kiln-probe hugetlb /dev/hugepages 4").await;
    assert!(out.starts_with("hugetlb: 4 pages of "), "{out}");
    eprintln!("mq, hugetlbfs done at {:.1} s", t.elapsed().as_secs_f64());

    // A hot-plugged disk: fio with libaio and io_uring, then swap on it.
    let work = tempfile::tempdir().unwrap();
    let img = work.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    g.g.vm.hotplug_disk(0, &img).unwrap();
    let dev = g
        .ok(
            "box",
            "for i in $(seq 60); do for d in /sys/block/vd*; do \
               [ -e \"$d/dev\" ] && { mknod -m 0660 /dev/kdisk b $(tr : ' ' < $d/dev) && echo ${d##*/}; exit 0; }; \
             done; sleep 1; done; echo no virtio disk appeared >&2; exit 1",
        )
        .await;
    eprintln!("hot-plugged disk is {}", dev.trim());
    for engine in ["libaio", "io_uring"] {
        let out = g
            .ok(
                "box",
                &format!(
                    "fio --name={engine} --filename=/dev/kdisk --ioengine={engine} --direct=1 \
                     --rw=randrw --bs=4k --size=16M --iodepth=8 --io_size=4M --output-format=json"
                ),
            )
            .await;
        let (read, written, error) = fio_result(&out);
        assert_eq!(error, 0, "fio {engine} reported an error: {out}");
        assert!(
            read > 0 && written > 0,
            "fio {engine} moved data both ways: read {read}, wrote {written}"
        );
    }
    eprintln!("fio done at {:.1} s", t.elapsed().as_secs_f64());

    g.ok("box", "mkswap /dev/kdisk && swapon /dev/kdisk").await;
    let swaps = g.ok("box", "cat /proc/swaps").await;
    assert!(swaps.contains("/dev/"), "swap is on: {swaps}");
    // 96 MiB touched under a 48 MiB limit: fits only through swap.
    let limit = 48 << 20;
    g.g.run(
        "swapper",
        with_memory(
            privileged(&["kiln-probe", "eat", "96"]),
            limit,
            limit + (160 << 20),
        ),
    )
    .await;
    let (st, out, err) = g.g.outcome("swapper", "").await;
    eprintln!("swapper: {st} {out:?} {err:?}");
    assert_eq!(st, 0, "96 MiB under a 48 MiB limit with swap: {out}{err}");
    let swapped: i64 = out
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(-1);
    assert!(
        swapped > (40 << 20),
        "the container's memory.swap.current shows its pages in swap: {out}"
    );
    g.g.remove("swapper").await;
    // The same with memory.swap.max = 0: the OOM killer ends it.
    g.g.run(
        "noswap",
        with_memory(privileged(&["kiln-probe", "eat", "96"]), limit, limit),
    )
    .await;
    let (st, out, err) = g.g.outcome("noswap", "").await;
    assert_eq!(st, 137, "without swap the OOM killer ends it: {out}{err}");
    g.g.remove("noswap").await;
    eprintln!("swap done at {:.1} s", t.elapsed().as_secs_f64());

    // redis-server on IPv4 and IPv6 loopback, as an exec that keeps running.
    g.g.exec_process(
        "box",
        "redis",
        process(&[
            "redis-server",
            "--bind",
            "127.0.0.1",
            "::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/tmp",
            // No --ignore-warnings: on arm64 redis 7.0 probes the kernel for
            // an old copy-on-write bug through /proc/self/smaps and refuses
            // to start when it cannot; the workload kernel has
            // PROC_PAGE_MONITOR for that (and 6.12 has the fix).
        ]),
    )
    .await;
    // The guest boots with lo down (the agent leaves links to the runtime's
    // UpdateInterface); up, the kernel gives it ::1.
    g.ok("box", "ip link set lo up").await;
    let lo6 = g.ok("box", "ip -6 addr show dev lo").await;
    assert!(lo6.contains("inet6 ::1/128"), "IPv6 on loopback: {lo6}");
    let ping = |host: &str| {
        format!(
            "for i in $(seq 60); do r=$(timeout 5 redis-cli -h {host} ping 2>&1) && [ \"$r\" = PONG ] && {{ echo $r; exit 0; }}; sleep 1; done; echo \"$r\"; exit 1"
        )
    };
    let once = |host: &str| format!("timeout 5 redis-cli -h {host} ping");
    let (st, out, err) = g.sh("box", &ping("127.0.0.1")).await;
    if st != 0 || out.trim() != "PONG" {
        let redis =
            tokio::time::timeout(Duration::from_secs(30), g.g.outcome("box", "redis")).await;
        panic!(
            "redis-server does not answer: {out}{err}\nredis-server's exec: {redis:?}{}",
            g.g.vm.diagnostics()
        );
    }
    assert_eq!(g.ok("box", &ping("::1")).await.trim(), "PONG");
    let out = g
        .ok(
            "box",
            "redis-cli -h ::1 set kiln works && redis-cli -h 127.0.0.1 get kiln",
        )
        .await;
    assert_eq!(out, "OK\nworks\n", "redis stores and answers");
    eprintln!("redis and IPv6 done at {:.1} s", t.elapsed().as_secs_f64());

    // The virtio-net link, configured as Kata's runtime does: UpdateInterface
    // (by MAC: name, MTU, an IPv4 and an IPv6 address), then UpdateRoutes
    // (default routes for both families through the router).
    let mut req = agent::UpdateInterfaceRequest::new();
    req.interface = MessageField::some(nic_interface());
    let got =
        g.g.agent()
            .update_interface(g.g.client.ctx(), &req)
            .await
            .unwrap_or_else(|e| panic!("UpdateInterface: {e}{}", g.g.vm.diagnostics()));
    assert!(
        got.name == "eth0"
            && got.hwAddr == usernet::MAC
            && got.mtu == u64::from(usernet::MTU)
            && got.IPAddresses.iter().any(|a| a.address == usernet::GUEST_V6
                && a.mask == usernet::PREFIX_V6.to_string()),
        "UpdateInterface answers with the configured NIC: {got:?}"
    );
    let mut req = agent::UpdateRoutesRequest::new();
    req.routes = MessageField::some(nic_routes());
    let routes =
        g.g.agent()
            .update_routes(g.g.client.ctx(), &req)
            .await
            .unwrap_or_else(|e| panic!("UpdateRoutes: {e}{}", g.g.vm.diagnostics()));
    for gw in [usernet::GATEWAY_V4, usernet::GATEWAY_V6] {
        assert!(
            routes
                .Routes
                .iter()
                .any(|r| r.gateway == gw && r.device == "eth0"),
            "UpdateRoutes lists the default route via {gw}: {routes:?}"
        );
    }
    let shown = g
        .ok("box", "ip -6 addr show dev eth0; ip -6 route; ip -4 route")
        .await;
    assert!(
        shown.contains(&format!(
            "inet6 {}/{}",
            usernet::GUEST_V6,
            usernet::PREFIX_V6
        )) && shown.contains(&format!("default via {} dev eth0", usernet::GATEWAY_V6))
            && shown.contains(&format!("default via {} dev eth0", usernet::GATEWAY_V4)),
        "the container (the sandbox's network namespace) sees the link: {shown}"
    );
    // Duplicate address detection (neighbour solicitations on the link) must
    // finish first: a tentative address answers no neighbour solicitation, so
    // the router could not send a reply back to it.
    let dad = g
        .ok(
            "box",
            "for i in $(seq 120); do ip -6 addr show dev eth0 | grep -q tentative || { echo ready after $i; exit 0; }; \
             sleep 0.5; done; ip -6 addr show dev eth0; exit 1",
        )
        .await;
    eprintln!(
        "IPv6 addresses {} at {:.1} s",
        dad.trim(),
        t.elapsed().as_secs_f64()
    );
    // TCP from the container over the link to listeners on the host's
    // loopback (slirp forwards the router's addresses there): IPv6, then IPv4.
    let token = format!("kiln-{}", std::process::id());
    for (listen, guest_dst) in [
        ("[::1]:0", usernet::GATEWAY_V6),
        ("127.0.0.1:0", usernet::GATEWAY_V4),
    ] {
        let (port, got) = host_listener(listen, format!("host-{token}\n"));
        // Retries while IPv6 duplicate address detection keeps the new address tentative.
        let script = format!(
            "for i in $(seq 30); do \
               if (exec 3<>/dev/tcp/{guest_dst}/{port} && echo guest-{token} >&3 && \
                   read -r -t 30 line <&3 && echo \"$line\") 2>/dev/null; then exit 0; fi; \
               sleep 1; done; echo no connection to {guest_dst} port {port} >&2; exit 1"
        );
        let (st, out, err) = g.shell("box", "/bin/bash", &script).await;
        assert_eq!(
            st,
            0,
            "TCP over the link to {guest_dst}: {out}{err}{}",
            g.g.vm.diagnostics()
        );
        assert_eq!(
            out.trim(),
            format!("host-{token}"),
            "the host's answer over {guest_dst}"
        );
        let (line, peer) = got
            .recv_timeout(Duration::from_secs(30))
            .expect("the host-side listener was reached");
        assert_eq!(line, format!("guest-{token}"), "what the container sent");
        eprintln!(
            "{guest_dst} port {port}: host saw {peer} at {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    // Neighbour discovery resolved the IPv6 router on the virtio-net link.
    let neigh = g.ok("box", "ip -6 neigh show dev eth0").await;
    assert!(
        neigh
            .lines()
            .any(|l| l.starts_with(&format!("{} lladdr ", usernet::GATEWAY_V6))),
        "the router's link-layer address, learned by neighbour discovery: {neigh}"
    );
    let stats = g.ok("box", "cat /sys/class/net/eth0/statistics/tx_packets /sys/class/net/eth0/statistics/rx_packets").await;
    assert!(
        stats
            .split_whitespace()
            .all(|n| n.parse::<u64>().unwrap_or(0) > 0),
        "packets crossed the virtio-net link both ways: {stats}"
    );
    eprintln!(
        "virtio-net IPv6/IPv4 done at {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // iptables (Debian's default, the nft back end): IPv4 to redis dropped.
    g.ok(
        "box",
        "iptables-nft -A INPUT -p tcp -d 127.0.0.1 --dport 6379 -j DROP",
    )
    .await;
    let (st, out, _) = g.sh("box", &once("127.0.0.1")).await;
    assert!(
        st != 0 && !out.contains("PONG"),
        "the iptables rule drops IPv4: {st} {out}"
    );
    assert_eq!(
        g.ok("box", &once("::1")).await.trim(),
        "PONG",
        "IPv6 is not affected"
    );
    let rules = g.ok("box", "iptables-nft -L INPUT -v -n -x").await;
    let dropped: u64 = rules
        .lines()
        .find(|l| l.contains("DROP"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(dropped > 0, "the DROP rule counted packets: {rules}");
    g.ok(
        "box",
        "iptables-nft -D INPUT -p tcp -d 127.0.0.1 --dport 6379 -j DROP",
    )
    .await;
    assert_eq!(
        g.ok("box", &once("127.0.0.1")).await.trim(),
        "PONG",
        "works again"
    );

    // nftables: IPv6 to redis dropped by an inet-family rule.
    g.ok(
        "box",
        "nft add table inet kiln && \
         nft add chain inet kiln input '{ type filter hook input priority 0; }' && \
         nft add rule inet kiln input ip6 daddr ::1 tcp dport 6379 counter drop",
    )
    .await;
    let (st, out, _) = g.sh("box", &once("::1")).await;
    assert!(
        st != 0 && !out.contains("PONG"),
        "the nft rule drops IPv6: {st} {out}"
    );
    assert_eq!(
        g.ok("box", &once("127.0.0.1")).await.trim(),
        "PONG",
        "IPv4 is not affected"
    );
    let listed = g.ok("box", "nft list table inet kiln").await;
    assert!(
        listed.contains("counter packets") && !listed.contains("counter packets 0 "),
        "the nft rule counted packets: {listed}"
    );
    g.ok("box", "nft delete table inet kiln").await;
    assert_eq!(
        g.ok("box", &once("::1")).await.trim(),
        "PONG",
        "works again"
    );
    eprintln!(
        "iptables and nft done at {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let mut sig = agent::SignalProcessRequest::new();
    sig.container_id = "box".into();
    sig.exec_id = "redis".into();
    sig.signal = 15;
    g.g.agent()
        .signal_process(g.g.client.ctx(), &sig)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(120), g.g.wait("box", "redis"))
        .await
        .expect("redis-server exits on SIGTERM");
    g.ok("box", "swapoff /dev/kdisk").await;
    g.g.remove("box").await;
    eprintln!("all done at {:.1} s", t.elapsed().as_secs_f64());
    g.g.shutdown().await;
}
