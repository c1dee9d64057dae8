//! Real containers on the host: the agent binary on a unix socket, driven
//! over ttrpc, running a busybox rootfs built in a temp dir. Needs root,
//! cgroup v2 (a `cgroup.controllers` file at /sys/fs/cgroup or
//! /sys/fs/cgroup/unified) and /bin/busybox; without them each test says
//! why it skips and passes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kiln_protocol::{agent, agent_ttrpc, health, health_ttrpc, oci};
use kiln_testsupport::agent::AgentProcess;
use kiln_testsupport::streams::{read_once, read_to_eof, Stream};
use protobuf::MessageField;
use sha2::{Digest, Sha256};

struct Agent {
    /// The agent binary on its socket; its temp dir holds `run` and rootfs trees.
    p: AgentProcess,
    cgroup_root: PathBuf,
    sandbox: String,
    client: Option<agent_ttrpc::AgentServiceClient>,
    health: Option<health_ttrpc::HealthClient>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.p.child.kill();
        let _ = self.p.child.wait();
        // Leftovers of a failed test: container processes and cgroups.
        let sb = self.cgroup_root.join("kiln").join(&self.sandbox);
        if let Ok(entries) = std::fs::read_dir(&sb) {
            for e in entries.flatten() {
                let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
                for _ in 0..50 {
                    if std::fs::remove_dir(e.path()).is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let _ = std::fs::remove_dir(&sb);
        // Storage mounts made under the run dir.
        let run = self.p.dir.path().join("run");
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            for l in mounts.lines() {
                if let Some(mp) = l.split_whitespace().nth(1) {
                    if mp.starts_with(run.to_str().unwrap_or("\0")) {
                        let _ = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH);
                    }
                }
            }
        }
    }
}

fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
}

/// Why this machine cannot run real containers, if it cannot.
fn unsupported() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    if cgroup2_root().is_none() {
        return Some("no cgroup v2 mount".into());
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("no /bin/busybox (apt-get install busybox-static)".into());
    }
    None
}

macro_rules! require_root_and_cgroup2 {
    () => {
        if let Some(why) = unsupported() {
            eprintln!("SKIPPED: real-container test needs root, cgroup v2 and busybox: {why}");
            return;
        }
    };
}

static SEQ: AtomicU32 = AtomicU32::new(0);

async fn start_agent(extra: &[&str]) -> Agent {
    start_agent_with(None, extra).await
}

/// `wrapper` runs the agent (e.g. `unshare -n` for a private network namespace).
async fn start_agent_with(wrapper: Option<&[&str]>, extra: &[&str]) -> Agent {
    let cgroup_root = cgroup2_root().unwrap();
    let p = AgentProcess::spawn(env!("CARGO_BIN_EXE_kiln-agent"), wrapper, |dir| {
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let mut args = vec![
            "--run-dir".to_string(),
            run.display().to_string(),
            "--cgroup-root".into(),
            cgroup_root.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    });
    let sandbox = format!(
        "kiln-test-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    );
    let c = p.connect().await;
    Agent {
        p,
        cgroup_root,
        sandbox,
        client: Some(agent_ttrpc::AgentServiceClient::new(c.clone())),
        health: Some(health_ttrpc::HealthClient::new(c)),
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(120).as_nanos() as i64)
}

fn code<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> ttrpc::Code {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => s.code(),
        other => panic!("expected an error status, got {other:?}"),
    }
}

impl Agent {
    fn ag(&self) -> &agent_ttrpc::AgentServiceClient {
        self.client.as_ref().unwrap()
    }

    fn run_dir(&self) -> PathBuf {
        self.p.dir.path().join("run")
    }

    /// A busybox root filesystem in the run directory (where a container's
    /// root must be, as under Kata's shared directory).
    fn rootfs(&self, name: &str) -> PathBuf {
        let root = self.run_dir().join("trees").join(name);
        kiln_testsupport::busybox::write_tree(&root).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
        )
        .unwrap();
        root
    }

    async fn create_sandbox(&self) {
        let mut req = agent::CreateSandboxRequest::new();
        req.sandbox_id = self.sandbox.clone();
        req.hostname = "kiln-sandbox".into();
        self.ag().create_sandbox(ctx(), &req).await.unwrap();
    }

    async fn create(
        &self,
        id: &str,
        spec: oci::Spec,
        storages: Vec<agent::Storage>,
    ) -> ttrpc::Result<()> {
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = id.into();
        req.OCI = MessageField::some(spec);
        req.storages = storages;
        self.ag().create_container(ctx(), &req).await.map(|_| ())
    }

    async fn start(&self, id: &str) {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = id.into();
        self.ag().start_container(ctx(), &req).await.unwrap();
    }

    async fn run(&self, id: &str, spec: oci::Spec) {
        self.create(id, spec, vec![]).await.unwrap();
        self.start(id).await;
    }

    async fn wait(&self, id: &str, exec: &str) -> i32 {
        let mut req = agent::WaitProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        self.ag().wait_process(ctx(), &req).await.unwrap().status
    }

    async fn read(&self, id: &str, exec: &str, stderr: bool) -> Vec<u8> {
        let stream = Stream::from_stderr_flag(stderr);
        read_once(self.ag(), ctx(), id, exec, stream, 32 * 1024)
            .await
            .unwrap()
    }

    /// Everything until EOF (an empty answer).
    async fn read_all(&self, id: &str, exec: &str, stderr: bool) -> Vec<u8> {
        let stream = Stream::from_stderr_flag(stderr);
        read_to_eof(self.ag(), ctx, id, exec, stream, 32 * 1024)
            .await
            .unwrap()
    }

    async fn write(&self, id: &str, exec: &str, data: &[u8]) {
        let mut req = agent::WriteStreamRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        req.data = data.to_vec();
        assert_eq!(
            self.ag().write_stdin(ctx(), &req).await.unwrap().len as usize,
            data.len()
        );
    }

    async fn exec(&self, id: &str, exec: &str, args: &[&str], tty: Option<(u32, u32)>) {
        let mut req = agent::ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        let mut p = process(args);
        if let Some((h, w)) = tty {
            p.Terminal = true;
            let mut b = oci::Box::new();
            b.Height = h;
            b.Width = w;
            p.ConsoleSize = MessageField::some(b);
        }
        req.process = MessageField::some(p);
        self.ag().exec_process(ctx(), &req).await.unwrap();
    }

    async fn signal(&self, id: &str, exec: &str, sig: u32) {
        let mut req = agent::SignalProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        req.signal = sig;
        self.ag().signal_process(ctx(), &req).await.unwrap();
    }

    async fn remove(&self, id: &str) {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = id.into();
        req.timeout = 30;
        self.ag().remove_container(ctx(), &req).await.unwrap();
    }

    async fn destroy(&self) {
        self.ag()
            .destroy_sandbox(ctx(), &agent::DestroySandboxRequest::new())
            .await
            .unwrap();
        assert!(
            !self.cgroup_root.join("kiln").join(&self.sandbox).exists(),
            "sandbox cgroup left behind"
        );
    }

    fn proc_status(&self, key: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.p.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.p.child.id()))
            .unwrap()
            .count()
    }
}

/// Every capability this test (and so the agent) holds, as these tests'
/// containers act as root; a spec without capabilities gets none (tested below).
fn process(args: &[&str]) -> oci::Process {
    let mut p = oci::Process::new();
    p.Args = args.iter().map(|s| s.to_string()).collect();
    p.Env = vec!["PATH=/bin".into(), "HOME=/root".into(), "TERM=xterm".into()];
    p.Cwd = "/".into();
    let all: Vec<String> = caps::read(None, caps::CapSet::Bounding)
        .unwrap()
        .iter()
        .map(|c| c.to_string())
        .collect();
    let mut c = oci::LinuxCapabilities::new();
    c.Bounding = all.clone();
    c.Effective = all.clone();
    c.Permitted = all;
    p.Capabilities = MessageField::some(c);
    p
}

fn mount(dest: &str, typ: &str, source: &str, opts: &[&str]) -> oci::Mount {
    let mut m = oci::Mount::new();
    m.destination = dest.into();
    m.type_ = typ.into();
    m.source = source.into();
    m.options = opts.iter().map(|s| s.to_string()).collect();
    m
}

/// A runc-like default spec over `root`.
fn spec(root: &Path, args: &[&str]) -> oci::Spec {
    let mut s = oci::Spec::new();
    let mut r = oci::Root::new();
    r.Path = root.display().to_string();
    s.Root = MessageField::some(r);
    s.Hostname = "kiln-box".into();
    s.Process = MessageField::some(process(args));
    s.Mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
    ];
    let mut l = oci::Linux::new();
    for t in ["pid", "mount", "uts", "ipc", "cgroup", "network"] {
        let mut ns = oci::LinuxNamespace::new();
        ns.Type = t.into();
        l.Namespaces.push(ns);
    }
    l.MaskedPaths = vec!["/proc/kcore".into(), "/proc/keys".into()];
    l.ReadonlyPaths = vec!["/proc/sys".into()];
    s.Linux = MessageField::some(l);
    s
}

#[tokio::test]
async fn echo_hi_exit_3_and_big_output_read_after_exit() {
    require_root_and_cgroup2!();
    let a = start_agent(&[]).await;
    a.create_sandbox().await;
    let root = a.rootfs("rootfs");

    a.run(
        "hi",
        spec(&root, &["sh", "-c", "echo hi; hostname; exit 3"]),
    )
    .await;
    assert_eq!(a.wait("hi", "").await, 3);
    assert_eq!(
        String::from_utf8(a.read_all("hi", "", false).await).unwrap(),
        // The sandbox's shared UTS namespace carries its hostname; a
        // container joining it does not rename it (as in Kata's agent).
        "hi\nkiln-sandbox\n"
    );
    assert!(a.read("hi", "", false).await.is_empty(), "EOF stays EOF");
    a.remove("hi").await;

    // 1 MiB written by a process that exits at once; read only after it exited.
    let script = "head -c 1048576 /dev/urandom > /tmp/blob; sha256sum /tmp/blob >&2; cat /tmp/blob; rm /tmp/blob";
    a.run("big", spec(&root, &["sh", "-c", script])).await;
    assert_eq!(a.wait("big", "").await, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = a.read_all("big", "", false).await;
    let err = String::from_utf8(a.read_all("big", "", true).await).unwrap();
    assert_eq!(out.len(), 1 << 20);
    let want = err.split_whitespace().next().unwrap().to_string();
    let got: String = Sha256::digest(&out)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        got, want,
        "sha256 of what the container wrote vs what ReadStdout returned"
    );
    a.remove("big").await;
    a.destroy().await;
}

#[tokio::test]
async fn stdin_signals_tty_and_hostile_requests() {
    require_root_and_cgroup2!();
    let a = start_agent(&[]).await;
    a.create_sandbox().await;
    let root = a.rootfs("rootfs");
    // Init is a long sleep; everything else is exec'd into it.
    a.run("box", spec(&root, &["sleep", "1000"])).await;

    // stdin round trip through cat, closed with CloseStdin.
    a.exec("box", "cat", &["cat"], None).await;
    a.write("box", "cat", b"hello through cat\n").await;
    a.write("box", "cat", &[b'x'; 100_000]).await;
    let mut req = agent::CloseStdinRequest::new();
    req.container_id = "box".into();
    req.exec_id = "cat".into();
    a.ag().close_stdin(ctx(), &req).await.unwrap();
    let out = a.read_all("box", "cat", false).await;
    assert_eq!(out.len(), 18 + 100_000);
    assert!(out.starts_with(b"hello through cat\n"));
    assert_eq!(a.wait("box", "cat").await, 0);

    // SIGTERM ends an exec'd sleep (143), and the init sleep too: as PID 1 of
    // its namespace it ignores SIGTERM, so the agent makes it SIGKILL (137).
    a.exec("box", "nap", &["sleep", "1000"], None).await;
    a.signal("box", "nap", 15).await;
    assert_eq!(a.wait("box", "nap").await, 143);

    // A terminal gets its window size, and TtyWinResize changes it.
    a.exec(
        "box",
        "tty",
        &["sh", "-c", "stty size; read x; stty size"],
        Some((24, 80)),
    )
    .await;
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("24 80") {
        let d = a.read("box", "tty", false).await;
        assert!(
            !d.is_empty(),
            "EOF before the size: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend(d);
    }
    let mut rs = agent::TtyWinResizeRequest::new();
    rs.container_id = "box".into();
    rs.exec_id = "tty".into();
    rs.row = 30;
    rs.column = 100;
    a.ag().tty_win_resize(ctx(), &rs).await.unwrap();
    a.write("box", "tty", b"\n").await;
    let rest = String::from_utf8_lossy(&a.read_all("box", "tty", false).await).into_owned();
    assert!(rest.contains("30 100"), "{rest:?}");
    assert!(
        a.read("box", "tty", true).await.is_empty(),
        "a terminal has no separate stderr"
    );
    assert_eq!(a.wait("box", "tty").await, 0);
    // Waited and read to EOF: the exec is forgotten, its pty closed.
    let mut gone = agent::WaitProcessRequest::new();
    gone.container_id = "box".into();
    gone.exec_id = "tty".into();
    assert_eq!(
        code(a.ag().wait_process(ctx(), &gone).await),
        ttrpc::Code::NOT_FOUND
    );

    // A second container as nobody with two capabilities.
    let mut limited = spec(&root, &["sh", "-c", "id -u; grep CapEff /proc/self/status"]);
    {
        let p = limited.Process.as_mut().unwrap();
        let mut u = oci::User::new();
        u.UID = 65534;
        u.GID = 65534;
        p.User = MessageField::some(u);
        let mut c = oci::LinuxCapabilities::new();
        let two = vec!["CAP_CHOWN".to_string(), "CAP_NET_BIND_SERVICE".to_string()];
        c.Bounding = two.clone();
        c.Effective = two.clone();
        c.Permitted = two.clone();
        c.Inheritable = two.clone();
        c.Ambient = two;
        p.Capabilities = MessageField::some(c);
        p.NoNewPrivileges = true;
    }
    a.run("nobody", limited).await;
    assert_eq!(a.wait("nobody", "").await, 0);
    let out = String::from_utf8(a.read_all("nobody", "", false).await).unwrap();
    assert!(out.starts_with("65534\n"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000401"), "{out}");
    a.remove("nobody").await;

    // A spec that names no capabilities gets none (runc's rule), not root's.
    let mut bare = spec(
        &root,
        &["sh", "-c", "grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status"],
    );
    bare.Process.as_mut().unwrap().Capabilities = MessageField::none();
    a.run("bare", bare).await;
    assert_eq!(a.wait("bare", "").await, 0);
    let out = String::from_utf8(a.read_all("bare", "", false).await).unwrap();
    assert_eq!(
        out.lines()
            .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
            .collect::<Vec<_>>(),
        ["0000000000000000"; 3],
        "{out}"
    );
    a.remove("bare").await;

    // Hostile and unknown ids; the agent keeps serving.
    for bad in ["../x", "a/b", "", ".."] {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = bad.into();
        assert_eq!(
            code(a.ag().start_container(ctx(), &req).await),
            ttrpc::Code::INVALID_ARGUMENT,
            "{bad:?}"
        );
        assert_eq!(
            code(a.create(bad, spec(&root, &["true"]), vec![]).await),
            ttrpc::Code::INVALID_ARGUMENT
        );
    }
    let mut req = agent::WaitProcessRequest::new();
    req.container_id = "nope".into();
    assert_eq!(
        code(a.ag().wait_process(ctx(), &req).await),
        ttrpc::Code::NOT_FOUND
    );
    req.container_id = "box".into();
    req.exec_id = "ghost".into();
    assert_eq!(
        code(a.ag().wait_process(ctx(), &req).await),
        ttrpc::Code::NOT_FOUND
    );
    let mut rd = agent::ReadStreamRequest::new();
    rd.container_id = "box".into();
    rd.len = 0;
    assert_eq!(
        code(a.ag().read_stdout(ctx(), &rd).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    let mut sig = agent::SignalProcessRequest::new();
    sig.container_id = "box".into();
    sig.signal = 9999;
    assert_eq!(
        code(a.ag().signal_process(ctx(), &sig).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code(a.create("box", spec(&root, &["true"]), vec![]).await),
        ttrpc::Code::ALREADY_EXISTS
    );
    let mut st = agent::Storage::new();
    st.driver = "local".into();
    st.source = "local".into();
    st.mount_point = format!("{}/../../escape", a.run_dir().display());
    assert_eq!(
        code(a.create("c2", spec(&root, &["true"]), vec![st]).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    let mut cf = agent::CopyFileRequest::new();
    cf.path = "/etc/kiln-should-not-exist".into();
    cf.data = b"x".to_vec();
    cf.file_size = 1;
    assert_eq!(
        code(a.ag().copy_file(ctx(), &cf).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    assert!(!Path::new("/etc/kiln-should-not-exist").exists());
    let mut huge = spec(&root, &["true"]);
    huge.Process.as_mut().unwrap().Env = vec!["A=b".into(); 10_000];
    assert_eq!(
        code(a.create("c3", huge, vec![]).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    let h = a.health.as_ref().unwrap();
    assert!(
        h.check(ctx(), &health::CheckRequest::new()).await.is_ok(),
        "still serving"
    );

    a.signal("box", "", 15).await;
    assert_eq!(a.wait("box", "").await, 137);
    a.remove("box").await;
    a.destroy().await;
}

#[tokio::test]
async fn cgroup_limits_pause_stats_and_flat_resources_over_200_execs() {
    require_root_and_cgroup2!();
    let a = start_agent(&[]).await;
    a.create_sandbox().await;
    let root = a.rootfs("rootfs");
    let controllers = std::fs::read_to_string(a.cgroup_root.join("cgroup.controllers")).unwrap();
    let mut s = spec(&root, &["sleep", "1000"]);
    let mut res = oci::LinuxResources::new();
    let mut mem = oci::LinuxMemory::new();
    mem.Limit = 64 << 20;
    res.Memory = MessageField::some(mem);
    s.Linux.as_mut().unwrap().Resources = MessageField::some(res);
    let has_memory = controllers.split_whitespace().any(|c| c == "memory");
    if has_memory {
        a.run("lim", s).await;
        a.exec("lim", "max", &["cat", "/sys/fs/cgroup/memory.max"], None)
            .await;
        assert_eq!(
            String::from_utf8(a.read_all("lim", "max", false).await)
                .unwrap()
                .trim(),
            "67108864"
        );
        assert_eq!(a.wait("lim", "max").await, 0);
    } else {
        // This host binds the memory controller to cgroup v1: the limit
        // cannot be honoured, and the agent says so instead of ignoring it.
        eprintln!(
            "memory controller not in {}: checking the refusal instead",
            a.cgroup_root.display()
        );
        let e = a.create("lim", s, vec![]).await.unwrap_err();
        match e {
            ttrpc::Error::RpcStatus(st) => {
                assert_eq!(st.code(), ttrpc::Code::FAILED_PRECONDITION);
                assert!(st.message().contains("memory"), "{}", st.message());
            }
            other => panic!("{other:?}"),
        }
        a.run("lim", spec(&root, &["sleep", "1000"])).await;
    }
    // The container sees its own cgroup as the root of its cgroup namespace.
    a.exec("lim", "cg", &["cat", "/proc/self/cgroup"], None)
        .await;
    let cg = String::from_utf8(a.read_all("lim", "cg", false).await).unwrap();
    assert!(cg.lines().any(|l| l == "0::/"), "{cg}");
    assert!(a.read_all("lim", "cg", true).await.is_empty());
    assert_eq!(a.wait("lim", "cg").await, 0);
    let host_cg = a.cgroup_root.join("kiln").join(&a.sandbox).join("lim");
    assert!(!std::fs::read_to_string(host_cg.join("cgroup.procs"))
        .unwrap()
        .trim()
        .is_empty());

    // Pause / resume through cgroup.freeze; stats from cpu.stat.
    let mut p = agent::PauseContainerRequest::new();
    p.container_id = "lim".into();
    a.ag().pause_container(ctx(), &p).await.unwrap();
    assert!(std::fs::read_to_string(host_cg.join("cgroup.events"))
        .unwrap()
        .contains("frozen 1"));
    let mut r = agent::ResumeContainerRequest::new();
    r.container_id = "lim".into();
    a.ag().resume_container(ctx(), &r).await.unwrap();
    assert!(std::fs::read_to_string(host_cg.join("cgroup.events"))
        .unwrap()
        .contains("frozen 0"));
    let mut sreq = agent::StatsContainerRequest::new();
    sreq.container_id = "lim".into();
    let stats = a.ag().stats_container(ctx(), &sreq).await.unwrap();
    assert!(stats.cgroup_stats.cpu_stats.cpu_usage.total_usage > 0);
    let mut up = agent::UpdateContainerRequest::new();
    up.container_id = "lim".into();
    up.resources = MessageField::some(oci::LinuxResources::new());
    a.ag().update_container(ctx(), &up).await.unwrap();

    // 200 execs: the agent's fds and memory stay flat.
    let run_execs = |from: usize, to: usize| {
        let a = &a;
        async move {
            for i in from..to {
                let id = format!("e{i}");
                a.exec("lim", &id, &["echo", "x"], None).await;
                assert_eq!(a.read_all("lim", &id, false).await, b"x\n");
                assert!(a.read_all("lim", &id, true).await.is_empty());
                assert_eq!(a.wait("lim", &id).await, 0);
            }
        }
    };
    run_execs(0, 20).await;
    let (fds0, rss0) = (a.fd_count(), a.proc_status("VmRSS:"));
    run_execs(20, 220).await;
    let (fds1, rss1) = (a.fd_count(), a.proc_status("VmRSS:"));
    eprintln!(
        "agent after 20 execs: {fds0} fds, {rss0} kB RSS; after 220: {fds1} fds, {rss1} kB RSS"
    );
    assert!(fds1 <= fds0 + 2, "fd leak: {fds0} -> {fds1}");
    assert!(rss1 <= rss0 + 4096, "RSS grew from {rss0} kB to {rss1} kB");
    let m = a
        .ag()
        .get_metrics(ctx(), &agent::GetMetricsRequest::new())
        .await
        .unwrap();
    assert!(
        m.metrics.contains("kiln_agent_containers 1"),
        "{}",
        m.metrics
    );
    assert!(
        m.metrics.contains("kiln_agent_processes 1\n"),
        "finished execs are dropped: {}",
        m.metrics
    );

    a.remove("lim").await;
    assert!(!host_cg.exists(), "container cgroup removed");
    a.destroy().await;
}

#[tokio::test]
async fn storages_are_mounted_shared_and_released() {
    require_root_and_cgroup2!();
    let a = start_agent(&["--no-pivot-root"]).await;
    let run = a.run_dir();
    // The sandbox holds an ephemeral tmpfs; a container bind-mounts it.
    let eph = format!("{}/sandbox/ephemeral/scratch", run.display());
    let mut st = agent::Storage::new();
    st.driver = "ephemeral".into();
    st.source = "tmpfs".into();
    st.fstype = "tmpfs".into();
    st.options = vec!["size=8m".into()];
    st.mount_point = eph.clone();
    let mut req = agent::CreateSandboxRequest::new();
    req.sandbox_id = a.sandbox.clone();
    req.storages = vec![st.clone()];
    a.ag().create_sandbox(ctx(), &req).await.unwrap();
    let is_mounted = |p: &str| {
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(p))
    };
    assert!(is_mounted(&eph));

    // The rootfs is a `local` storage the test fills, under the shared dir
    // the way Kata lays it out; chroot fallback (--no-pivot-root) in use.
    let cdir = format!("{}/shared/containers/st", run.display());
    let mut local = agent::Storage::new();
    local.driver = "local".into();
    local.source = "local".into();
    local.mount_point = cdir.clone();
    local.options = vec!["mode=0755".into()];
    std::fs::create_dir_all(&cdir).unwrap();
    let root = a.rootfs("scratch-root");
    std::fs::rename(&root, format!("{cdir}/rootfs")).unwrap();
    let mut s = spec(
        Path::new("rootfs"),
        &["sh", "-c", "echo data > /scratch/file; cat /scratch/file"],
    );
    s.Mounts
        .push(mount("/scratch", "bind", &eph, &["rbind", "rw"]));
    a.create("st", s, vec![local, st]).await.unwrap();
    a.start("st").await;
    assert_eq!(a.wait("st", "").await, 0);
    assert_eq!(a.read_all("st", "", false).await, b"data\n");
    assert_eq!(
        std::fs::read_to_string(format!("{eph}/file")).unwrap(),
        "data\n"
    );
    a.remove("st").await;
    assert!(is_mounted(&eph), "still held by the sandbox");

    // CopyFile into the run dir works.
    let mut cf = agent::CopyFileRequest::new();
    cf.path = format!("{}/sandbox/hosts", run.display());
    cf.data = b"127.0.0.1 localhost\n".to_vec();
    cf.file_size = cf.data.len() as i64;
    cf.file_mode = 0o100644;
    cf.dir_mode = 0o755;
    a.ag().copy_file(ctx(), &cf).await.unwrap();
    assert_eq!(
        std::fs::read(format!("{}/sandbox/hosts", run.display())).unwrap(),
        cf.data
    );

    a.destroy().await;
    assert!(!is_mounted(&eph), "released at DestroySandbox");
}

#[cfg(feature = "netlink")]
#[tokio::test]
async fn networking_in_a_private_network_namespace() {
    require_root_and_cgroup2!();
    if !Path::new("/usr/bin/unshare").exists()
        || !Path::new("/usr/bin/nsenter").exists()
        || Command::new("ip").arg("-V").output().is_err()
    {
        eprintln!("SKIPPED: needs unshare, nsenter and ip");
        return;
    }
    // `unshare -n` execs the agent, so its pid is the agent's.
    let a = start_agent_with(Some(&["/usr/bin/unshare", "-n"]), &[]).await;
    let ip = |args: &[&str]| {
        let pid = a.p.child.id().to_string();
        let out = Command::new("/usr/bin/nsenter")
            .args(["-t", &pid, "-n", "ip"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ip(&[
        "link",
        "add",
        "kt0",
        "address",
        "02:00:00:00:00:01",
        "type",
        "veth",
        "peer",
        "name",
        "kt1",
    ]);

    let list = a
        .ag()
        .list_interfaces(ctx(), &agent::ListInterfacesRequest::new())
        .await
        .unwrap();
    let names: Vec<_> = list.Interfaces.iter().map(|i| i.name.as_str()).collect();
    assert!(names.contains(&"lo") && names.contains(&"kt0"), "{names:?}");

    let mut want = kiln_protocol::types::Interface::new();
    want.hwAddr = "02:00:00:00:00:01".into();
    want.name = "kiln0".into();
    want.mtu = 1400;
    let mut addr = kiln_protocol::types::IPAddress::new();
    addr.address = "192.0.2.10".into();
    addr.mask = "24".into();
    want.IPAddresses = vec![addr];
    let mut req = agent::UpdateInterfaceRequest::new();
    req.interface = MessageField::some(want.clone());
    let got = a.ag().update_interface(ctx(), &req).await.unwrap();
    assert_eq!((got.name.as_str(), got.mtu), ("kiln0", 1400));
    assert!(got.raw_flags & 1 == 1, "up");
    assert!(
        got.IPAddresses
            .iter()
            .any(|x| x.address == "192.0.2.10" && x.mask == "24"),
        "{:?}",
        got.IPAddresses
    );

    let route = |dest: &str, gw: &str| {
        let mut r = kiln_protocol::types::Route::new();
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
    a.ag().update_routes(ctx(), &ur).await.unwrap();
    let listed = a
        .ag()
        .list_routes(ctx(), &agent::ListRoutesRequest::new())
        .await
        .unwrap();
    let shown: Vec<(String, String)> = listed
        .Routes
        .iter()
        .map(|r| (r.dest.clone(), r.gateway.clone()))
        .collect();
    assert!(
        shown.contains(&("".into(), "192.0.2.1".into())),
        "{shown:?}"
    );
    assert!(
        shown.contains(&("198.51.100.0/24".into(), "192.0.2.1".into())),
        "{shown:?}"
    );
    assert!(ip(&["route"]).contains("default via 192.0.2.1"));

    let mut n = kiln_protocol::types::ARPNeighbor::new();
    let mut to = kiln_protocol::types::IPAddress::new();
    to.address = "192.0.2.1".into();
    n.toIPAddress = MessageField::some(to);
    n.device = "kiln0".into();
    n.lladdr = "02:00:00:00:00:99".into();
    let mut neighbors = agent::ARPNeighbors::new();
    neighbors.ARPNeighbors = vec![n];
    let mut an = agent::AddARPNeighborsRequest::new();
    an.neighbors = MessageField::some(neighbors);
    a.ag().add_arp_neighbors(ctx(), &an).await.unwrap();
    let neigh = ip(&["neigh", "show", "dev", "kiln0"]);
    assert!(
        neigh.contains("192.0.2.1 lladdr 02:00:00:00:00:99 PERMANENT"),
        "{neigh}"
    );

    want.hwAddr = "not-a-mac".into();
    req.interface = MessageField::some(want.clone());
    assert_eq!(
        code(a.ag().update_interface(ctx(), &req).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    // NOARP in raw_flags, as Kata's runtime sends for tap/macvtap NICs.
    let mut noarp = want.clone();
    noarp.hwAddr = "02:00:00:00:00:01".into();
    noarp.raw_flags = libc::IFF_NOARP as u32;
    req.interface = MessageField::some(noarp);
    a.ag().update_interface(ctx(), &req).await.unwrap();
    let link = ip(&["link", "show", "kiln0"]);
    assert!(link.contains("NOARP"), "{link}");

    // A gateway outside every subnet, reachable only as onlink, with a route MTU.
    let mut onlink = route("", "203.0.113.1");
    onlink.flags = 4; // RTNH_F_ONLINK
    onlink.mtu = 1300;
    let mut routes = agent::Routes::new();
    routes.Routes = vec![onlink];
    ur.routes = MessageField::some(routes);
    a.ag().update_routes(ctx(), &ur).await.unwrap();
    let shown = ip(&["route"]);
    assert!(
        shown.contains("default via 203.0.113.1 dev kiln0") && shown.contains("onlink"),
        "{shown}"
    );
    assert!(shown.contains("mtu 1300"), "{shown}");

    // A NIC that is not there (yet): the wording Kata's Go runtime retries on.
    want.hwAddr = "02:00:00:00:00:77".into();
    req.interface = MessageField::some(want);
    match a.ag().update_interface(ctx(), &req).await {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::NOT_FOUND);
            assert!(s.message().contains("Link not found"), "{}", s.message());
        }
        other => panic!("{other:?}"),
    }
}

impl Agent {
    /// Reads stdout until it holds `lines` lines (the process keeps running).
    async fn read_lines(&self, id: &str, lines: usize) -> Vec<String> {
        let mut out = String::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while out.lines().count() < lines {
            assert!(Instant::now() < deadline, "{id} printed only {out:?}");
            out.push_str(&String::from_utf8_lossy(&self.read(id, "", false).await));
        }
        out.lines().map(str::to_string).collect()
    }
}

/// What Kata's runtimes send, on the host: the pid namespace stripped from
/// the spec (the agent gives each container one), IPC and UTS shared by the
/// sandbox, SIGKILL with an empty exec id for the whole container, and the
/// pod storages they use for configMaps and fsGroup emptyDirs.
#[tokio::test]
async fn kata_runtime_shapes_namespaces_signal_all_and_pod_storages() {
    require_root_and_cgroup2!();
    let a = start_agent(&[]).await;
    a.create_sandbox().await;
    let root = a.rootfs("rootfs");
    let kata_spec = |args: &[&str]| {
        let mut s = spec(&root, args);
        s.Linux
            .as_mut()
            .unwrap()
            .Namespaces
            .retain(|n| n.Type != "pid");
        s
    };
    let show =
        "echo pid=$$; for n in ipc uts pid; do readlink /proc/self/ns/$n; done; exec sleep 1000";
    a.run("p1", kata_spec(&["sh", "-c", show])).await;
    a.run("p2", kata_spec(&["sh", "-c", show])).await;
    let (l1, l2) = (a.read_lines("p1", 4).await, a.read_lines("p2", 4).await);
    assert_eq!(
        l1[0], "pid=1",
        "the container's init is PID 1 of its own namespace"
    );
    assert_eq!(l2[0], "pid=1");
    assert_eq!(l1[1], l2[1], "one IPC namespace per sandbox");
    assert_eq!(l1[2], l2[2], "one UTS namespace per sandbox");
    assert_ne!(l1[3], l2[3], "a pid namespace per container");
    let agent_ns = |n: &str| {
        std::fs::read_link(format!("/proc/{}/ns/{n}", a.p.child.id()))
            .unwrap()
            .display()
            .to_string()
    };
    assert_ne!(l1[3], agent_ns("pid"), "not the agent's pid namespace");
    assert_ne!(l1[1], agent_ns("ipc"), "not the agent's IPC namespace");

    // SIGKILL with an empty exec id reaches every process, execs included.
    a.exec("p1", "e1", &["sleep", "1000"], None).await;
    a.signal("p1", "", 9).await;
    assert_eq!(a.wait("p1", "").await, 137);
    assert_eq!(a.wait("p1", "e1").await, 137, "the exec was killed too");
    a.remove("p1").await;
    // What the Go runtime sends after every stop.
    a.ag()
        .remove_stale_virtiofs_share_mounts(
            ctx(),
            &agent::RemoveStaleVirtiofsShareMountsRequest::new(),
        )
        .await
        .unwrap();

    // A configMap (watchable-bind) and an fsGroup memory emptyDir.
    let run = a.run_dir();
    let src = run.join("shared/containers/p3-0123456789abcdef-config");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("app.conf"), "v1\n").unwrap();
    let watch_mp = run.join("shared/containers/watchable/p3-0123456789abcdef-config");
    let mut cm = agent::Storage::new();
    cm.driver = "watchable-bind".into();
    cm.source = src.display().to_string();
    cm.mount_point = watch_mp.display().to_string();
    let cache_mp = run.join("sandbox/ephemeral/cache");
    let mut ed = agent::Storage::new();
    ed.driver = "ephemeral".into();
    ed.source = "tmpfs".into();
    ed.fstype = "tmpfs".into();
    ed.options = vec!["fsgid=2000".into()];
    ed.mount_point = cache_mp.display().to_string();
    let mut s = kata_spec(&["sh", "-c", "stat -c '%g %a' /cache; exec sleep 1000"]);
    s.Mounts.push(mount(
        "/etc/config",
        "bind",
        &watch_mp.display().to_string(),
        &["rbind", "ro"],
    ));
    s.Mounts.push(mount(
        "/cache",
        "bind",
        &cache_mp.display().to_string(),
        &["rbind"],
    ));
    a.create("p3", s, vec![cm, ed]).await.unwrap();
    a.start("p3").await;
    assert_eq!(
        a.read_lines("p3", 1).await[0],
        "2000 3777",
        "fsGroup owns the emptyDir, setgid (tmpfs is 1777)"
    );
    // A host-side update of the configMap reaches the container.
    std::fs::write(src.join("app.conf"), "version two\n").unwrap();
    let mut seen = String::new();
    for i in 0..30 {
        let id = format!("cat{i}");
        a.exec("p3", &id, &["cat", "/etc/config/app.conf"], None)
            .await;
        a.wait("p3", &id).await;
        seen = String::from_utf8(a.read_all("p3", &id, false).await).unwrap();
        if seen == "version two\n" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        seen, "version two\n",
        "configMap update not seen in the container"
    );
    a.signal("p3", "", 9).await;
    a.wait("p3", "").await;
    a.remove("p3").await;
    assert!(
        !watch_mp.exists(),
        "the copy goes with the last container holding it"
    );
    a.signal("p2", "", 9).await;
    a.wait("p2", "").await;
    a.remove("p2").await;
    a.destroy().await;
}

/// The attack: root in the container with CAP_MKNOD makes nodes for the
/// kernel log and the host's first disk and reads them. The device cgroup
/// program denies both (EPERM, not the EACCES of a nodev mount), while the
/// default devices work and a device the spec lists can be opened.
#[tokio::test]
async fn devices_the_spec_does_not_allow_cannot_be_opened() {
    require_root_and_cgroup2!();
    let disk = std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with("loop"))
        .find_map(|e| std::fs::read_to_string(e.path().join("dev")).ok())
        .map(|s| s.trim().replace(':', " "))
        .unwrap_or_else(|| "7 0".into());
    let a = start_agent(&[]).await;
    a.create_sandbox().await;
    let root = a.rootfs("rootfs");
    let script = format!(
        "mknod /tmp/kmsg c 1 11 && mknod /tmp/disk b {disk} && echo made; \
         head -c 16 /tmp/kmsg >/dev/null && echo KMSG-READ; \
         head -c 512 /tmp/disk >/dev/null && echo DISK-READ; \
         head -c 4 /dev/zero | wc -c; rm -f /tmp/kmsg /tmp/disk"
    );
    a.run("attack", spec(&root, &["sh", "-c", &script])).await;
    assert_eq!(a.wait("attack", "").await, 0);
    let out = String::from_utf8(a.read_all("attack", "", false).await).unwrap();
    let err = String::from_utf8(a.read_all("attack", "", true).await).unwrap();
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["made", "4"],
        "stderr: {err}"
    );
    assert_eq!(
        err.matches("Operation not permitted").count(),
        2,
        "both opens refused by the device program: {err}"
    );
    a.remove("attack").await;

    // A device the spec lists is allowed (as runc does).
    let mut s = spec(&root, &["sh", "-c", "head -c 1 /dev/kmsg | wc -c"]);
    let mut d = oci::LinuxDevice::new();
    d.Path = "/dev/kmsg".into();
    d.Type = "c".into();
    d.Major = 1;
    d.Minor = 11;
    d.FileMode = 0o600;
    s.Linux.as_mut().unwrap().Devices.push(d);
    a.run("granted", s).await;
    assert_eq!(a.wait("granted", "").await, 0);
    let out = String::from_utf8(a.read_all("granted", "", false).await).unwrap();
    assert_eq!(
        out.trim(),
        "1",
        "{}",
        String::from_utf8_lossy(&a.read_all("granted", "", true).await)
    );
    a.remove("granted").await;

    // A privileged container (allow-all rule, as `docker run --privileged`).
    let mut s = spec(
        &root,
        &[
            "sh",
            "-c",
            "mknod /tmp/k c 1 11 && head -c 1 /tmp/k | wc -c; rm -f /tmp/k",
        ],
    );
    s.Linux
        .as_mut()
        .unwrap()
        .Resources
        .mut_or_insert_default()
        .Devices = vec![kiln_testsupport::spec::allow_all_devices()];
    a.run("privileged", s).await;
    assert_eq!(a.wait("privileged", "").await, 0);
    let out = String::from_utf8(a.read_all("privileged", "", false).await).unwrap();
    assert_eq!(
        out.trim(),
        "1",
        "{}",
        String::from_utf8_lossy(&a.read_all("privileged", "", true).await)
    );
    a.remove("privileged").await;

    // A node on a storage volume is not a device, even one the device
    // program allows: storages are nodev (and nosuid) unless asked otherwise.
    let vol = a.run_dir().join("sandbox/ephemeral/vol");
    let mut st = agent::Storage::new();
    st.driver = "ephemeral".into();
    st.source = "tmpfs".into();
    st.fstype = "tmpfs".into();
    st.mount_point = vol.display().to_string();
    let mut s = spec(
        &root,
        &[
            "sh",
            "-c",
            "mknod /vol/null c 1 3 && echo x > /vol/null && echo WROTE",
        ],
    );
    s.Mounts.push(mount(
        "/vol",
        "bind",
        &vol.display().to_string(),
        &["rbind"],
    ));
    a.create("nodev", s, vec![st]).await.unwrap();
    a.start("nodev").await;
    assert_ne!(a.wait("nodev", "").await, 0);
    let out = String::from_utf8(a.read_all("nodev", "", false).await).unwrap();
    let err = String::from_utf8(a.read_all("nodev", "", true).await).unwrap();
    assert!(
        !out.contains("WROTE") && err.contains("Permission denied"),
        "{out} / {err}"
    );
    a.remove("nodev").await;
    a.destroy().await;
}

/// CVE-2019-5736: an exec of `/proc/self/exe` runs the runtime's own
/// binary inside the container; container root then reopens
/// that process's `/proc/<pid>/exe` for writing once it has exited. Here the
/// binary it reaches is the agent's sealed in-memory copy: the write is
/// refused and the agent's file is unchanged. (Before the copy, the target
/// was the agent's own file, spared only by ETXTBSY while the agent runs.)
#[tokio::test]
async fn a_container_cannot_overwrite_the_agent_through_proc_exe() {
    require_root_and_cgroup2!();
    let agent_bin = env!("CARGO_BIN_EXE_kiln-agent");
    let before = Sha256::digest(std::fs::read(agent_bin).unwrap());
    let a = start_agent(&[]).await;
    a.create_sandbox().await;
    let root = a.rootfs("rootfs");
    // The host build of the agent is dynamically linked (the guest's is
    // static): give the container its loader and libraries.
    let ldd = Command::new("ldd").arg(agent_bin).output().unwrap();
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dest = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(lib, &dest).unwrap();
    }
    a.run("cve", spec(&root, &["sleep", "300"])).await;
    // The helper execs /proc/self/exe: its own binary, now in the container.
    a.exec("cve", "trap", &["/proc/self/exe"], None).await;
    let attack = "for i in $(seq 100); do \
           for d in /proc/[0-9]*; do t=$(readlink $d/exe); \
             case \"$t\" in *busybox*|'') ;; *) pid=${d#/proc/}; break 2;; esac; \
           done; sleep 0.2; done; \
         echo \"target=$t\"; exec 3<\"/proc/$pid/exe\" || exit 9; \
         kill -9 \"$pid\"; sleep 1; \
         if echo pwned >/proc/self/fd/3; then echo WROTE; else echo REFUSED; fi";
    a.exec("cve", "attack", &["sh", "-c", attack], None).await;
    assert_eq!(a.wait("cve", "attack").await, 0);
    let out = String::from_utf8(a.read_all("cve", "attack", false).await).unwrap();
    let err = String::from_utf8(a.read_all("cve", "attack", true).await).unwrap();
    assert!(
        out.contains("target=/memfd:kiln-agent"),
        "the helper is the sealed copy: {out} {err}"
    );
    assert!(
        out.contains("REFUSED") && !out.contains("WROTE"),
        "{out} {err}"
    );
    a.wait("cve", "trap").await;
    assert_eq!(Sha256::digest(std::fs::read(agent_bin).unwrap()), before);
    a.signal("cve", "", 9).await;
    a.wait("cve", "").await;
    a.remove("cve").await;
    a.destroy().await;
}

/// Request-planted symlinks and `..` roots (security review M2): a CopyFile
/// symlink at the sandbox's resolv.conf is replaced, not written through, by
/// CreateSandbox's DNS; a container root of `../../../../` or a CopyFile link
/// `<cid>/rootfs -> /` is refused. Nothing outside the run directory changes.
#[tokio::test]
async fn request_planted_links_and_dot_dot_roots_reach_nothing_outside() {
    require_root_and_cgroup2!();
    let a = start_agent(&[]).await;
    let victim = a.p.dir.path().join("victim");
    std::fs::write(&victim, "original\n").unwrap();
    let link = |path: PathBuf, target: &str| {
        let mut r = agent::CopyFileRequest::new();
        r.path = path.display().to_string();
        r.data = target.as_bytes().to_vec();
        r.file_mode = libc::S_IFLNK | 0o777;
        r.uid = -1;
        r.gid = -1;
        r
    };
    let r = link(
        a.run_dir().join("sandbox/resolv.conf"),
        &victim.display().to_string(),
    );
    a.ag().copy_file(ctx(), &r).await.unwrap();
    let mut req = agent::CreateSandboxRequest::new();
    req.sandbox_id = a.sandbox.clone();
    req.dns = vec!["nameserver 192.0.2.53".into()];
    a.ag().create_sandbox(ctx(), &req).await.unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original\n");
    let resolv = a.run_dir().join("sandbox/resolv.conf");
    assert!(!std::fs::symlink_metadata(&resolv)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read_to_string(&resolv).unwrap(),
        "nameserver 192.0.2.53\n"
    );

    let root = a.rootfs("rootfs");
    let mut s = spec(&root, &["true"]);
    s.Root.as_mut().unwrap().Path = "../../../../".into();
    assert_eq!(
        code(a.create("dotdot", s, vec![]).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    let r = link(a.run_dir().join("shared/containers/evil/rootfs"), "/");
    a.ag().copy_file(ctx(), &r).await.unwrap();
    let mut s = spec(&root, &["true"]);
    s.Root.as_mut().unwrap().Path = "rootfs".into();
    assert_eq!(
        code(a.create("evil", s, vec![]).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    // The agent still serves, and a root inside the run directory works.
    a.run("fine", spec(&root, &["true"])).await;
    assert_eq!(a.wait("fine", "").await, 0);
    a.remove("fine").await;
    a.destroy().await;
}

/// CVE-2021-30465's shape: container A, sharing a volume with B, keeps
/// swapping the volume's directory `d` with a symlink `l -> /` (busybox mv in
/// a loop). B's spec bind-mounts `<volume>/d`. Resolved by path, the mount
/// would follow the link at the wrong moment and give B the guest's root;
/// opened once without symlinks, B gets `d` or a clear error, never `/`.
#[tokio::test]
async fn a_volume_swapped_for_a_link_to_root_never_becomes_a_mount_source() {
    require_root_and_cgroup2!();
    let a = start_agent(&[]).await;
    a.create_sandbox().await;
    let root = a.rootfs("rootfs");
    let vol = a.run_dir().join("trees/vol");
    std::fs::create_dir_all(vol.join("d")).unwrap();
    std::fs::write(vol.join("d/inside-marker"), "").unwrap();
    std::os::unix::fs::symlink("/", vol.join("l")).unwrap();
    let mut racer = spec(
        &root,
        &[
            "sh",
            "-c",
            "cd /vol; while :; do mv d t; mv l d; mv d l; mv t d; done",
        ],
    );
    racer.Mounts.push(mount(
        "/vol",
        "bind",
        &vol.display().to_string(),
        &["rbind", "rw"],
    ));
    a.run("racer", racer).await;
    let (mut inside, mut refused, mut escaped) = (0, 0, Vec::new());
    for i in 0..30 {
        let id = format!("b{i}");
        let mut s = spec(&root, &["ls", "/data"]);
        let src = vol.join("d").display().to_string();
        s.Mounts
            .push(mount("/data", "bind", &src, &["rbind", "ro"]));
        if a.create(&id, s, vec![]).await.is_err() {
            refused += 1;
            continue;
        }
        a.start(&id).await;
        a.wait(&id, "").await;
        let out = String::from_utf8(a.read_all(&id, "", false).await).unwrap();
        if out.contains("inside-marker") {
            inside += 1;
        } else if !out.trim().is_empty() {
            escaped.push(out);
        } else {
            refused += 1;
        }
        a.remove(&id).await;
    }
    a.signal("racer", "", 9).await;
    a.wait("racer", "").await;
    a.remove("racer").await;
    eprintln!(
        "{inside} mounted the volume, {refused} refused, {} escaped",
        escaped.len()
    );
    assert!(escaped.is_empty(), "B saw another directory: {escaped:?}");
    assert!(inside + refused == 30 && inside > 0, "{inside} {refused}");
    a.destroy().await;
}
