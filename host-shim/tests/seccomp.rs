//! End-to-end: OCI seccomp profiles in a real VM under TCG, with the real
//! agent. A busybox rootfs is shared from the host over virtio-fs (Kata's
//! layout); one boot for the whole file.
//!
//! `cargo xtask test` builds the image and runs this with KILN_E2E_MANIFEST.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_protocol::{agent, oci};
use kiln_shim::client::AgentClient;
use kiln_shim::config::ShimConfig;
use kiln_shim::vm::Vm;
use protobuf::MessageField;

/// The container id under which the rootfs is shared (its directory in the share).
const SHARE: &str = "share";
/// 128 + SIGSYS: how WaitProcess reports a process seccomp killed.
const KILLED_BY_SIGSYS: i32 = 128 + 31;

fn manifest() -> PathBuf {
    PathBuf::from(std::env::var("KILN_E2E_MANIFEST").expect(
        "KILN_E2E_MANIFEST must name a built manifest.json; run these tests through `cargo xtask test`",
    ))
}

/// A context for calls that wait on the guest.
fn long() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(180).as_nanos() as i64)
}

struct Guest {
    vm: Vm,
    c: AgentClient,
    _rootfs: tempfile::TempDir,
    _run_base: tempfile::TempDir,
}

impl Guest {
    async fn boot() -> Guest {
        let rootfs = tempfile::tempdir().unwrap();
        kiln_shim::testsupport::busybox_rootfs(rootfs.path()).unwrap();
        let mut sb = agent::CreateSandboxRequest::new();
        sb.sandbox_id = "sb".into();
        let booted = kiln_shim::testsupport::boot_sandbox(
            &ShimConfig::default(),
            &manifest(),
            rootfs,
            SHARE,
            sb,
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        Guest {
            vm: booted.vm,
            c: booted.client,
            _rootfs: booted.rootfs,
            _run_base: booted.run_base,
        }
    }

    fn ag(&self) -> &kiln_protocol::agent_ttrpc::AgentServiceClient {
        &self.c.agent
    }

    async fn create(&self, id: &str, spec: oci::Spec) -> ttrpc::Result<()> {
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = id.into();
        req.OCI = MessageField::some(spec);
        self.ag()
            .create_container(self.c.ctx(), &req)
            .await
            .map(|_| ())
    }

    async fn run(&self, id: &str, spec: oci::Spec) {
        self.create(id, spec)
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {id}: {e:?}{}", self.vm.diagnostics()));
        let mut req = agent::StartContainerRequest::new();
        req.container_id = id.into();
        self.ag()
            .start_container(self.c.ctx(), &req)
            .await
            .unwrap_or_else(|e| panic!("StartContainer {id}: {e:?}{}", self.vm.diagnostics()));
    }

    async fn exec(&self, id: &str, exec: &str, p: oci::Process) {
        let mut req = agent::ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        req.process = MessageField::some(p);
        self.ag()
            .exec_process(self.c.ctx(), &req)
            .await
            .unwrap_or_else(|e| panic!("ExecProcess {id}/{exec}: {e:?}{}", self.vm.diagnostics()));
    }

    async fn read_all(&self, id: &str, exec: &str, stderr: bool) -> String {
        let mut out = Vec::new();
        loop {
            let mut req = agent::ReadStreamRequest::new();
            req.container_id = id.into();
            req.exec_id = exec.into();
            req.len = 64 * 1024;
            let r = if stderr {
                self.ag().read_stderr(long(), &req).await
            } else {
                self.ag().read_stdout(long(), &req).await
            };
            let d = r
                .unwrap_or_else(|e| panic!("reading {id}/{exec}: {e:?}"))
                .data;
            if d.is_empty() {
                return String::from_utf8_lossy(&out).into_owned();
            }
            out.extend(d);
        }
    }

    async fn wait(&self, id: &str, exec: &str) -> i32 {
        let mut req = agent::WaitProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        self.ag()
            .wait_process(long(), &req)
            .await
            .unwrap_or_else(|e| panic!("WaitProcess {id}/{exec}: {e:?}"))
            .status
    }

    /// (status, stdout, stderr) of a process that runs to its end.
    async fn outcome(&self, id: &str, exec: &str) -> (i32, String, String) {
        let out = self.read_all(id, exec, false).await;
        let err = self.read_all(id, exec, true).await;
        (self.wait(id, exec).await, out, err)
    }

    async fn sh(&self, id: &str, exec: &str, script: &str, nnp: bool) -> (i32, String, String) {
        let mut p = process(&["sh", "-c", script]);
        p.NoNewPrivileges = nnp;
        self.exec(id, exec, p).await;
        self.outcome(id, exec).await
    }

    async fn remove(&self, id: &str) {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = id.into();
        req.timeout = 30;
        self.ag()
            .remove_container(long(), &req)
            .await
            .unwrap_or_else(|e| panic!("RemoveContainer {id}: {e:?}"));
    }

    async fn shutdown(self) {
        let r = self
            .ag()
            .destroy_sandbox(self.c.ctx(), &agent::DestroySandboxRequest::new())
            .await;
        assert!(r.is_ok(), "DestroySandbox: {r:?}");
        drop(self.c);
        self.vm.shutdown();
    }
}

fn process(args: &[&str]) -> oci::Process {
    let mut p = oci::Process::new();
    p.Args = args.iter().map(|s| s.to_string()).collect();
    p.Env = vec!["PATH=/bin".into(), "HOME=/root".into()];
    p.Cwd = "/".into();
    p
}

/// The shim's default (runc-like) spec for `args` — noNewPrivileges, the
/// default capabilities — over the shared busybox rootfs, with `profile`.
fn spec(args: &[&str], profile: oci::LinuxSeccomp) -> oci::Spec {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let s = kiln_shim::spec::default_spec(&args, &[], false).unwrap();
    let mut s = kiln_shim::run::protocol_spec(&s, SHARE).unwrap();
    s.Root.mut_or_insert_default().Readonly = false;
    s.Linux.mut_or_insert_default().Seccomp = MessageField::some(profile);
    s
}

fn rule(names: &[&str], action: &str, errno: Option<u32>) -> oci::LinuxSyscall {
    let mut r = oci::LinuxSyscall::new();
    r.Names = names.iter().map(|s| s.to_string()).collect();
    r.Action = action.into();
    if let Some(e) = errno {
        r.set_errnoret(e);
    }
    r
}

fn profile(default: &str, rules: Vec<oci::LinuxSyscall>) -> oci::LinuxSeccomp {
    let mut p = oci::LinuxSeccomp::new();
    p.DefaultAction = default.into();
    p.Architectures = vec![
        "SCMP_ARCH_X86_64".into(),
        "SCMP_ARCH_AARCH64".into(),
        "SCMP_ARCH_PPC64LE".into(),
        "SCMP_ARCH_S390X".into(),
    ];
    p.Syscalls = rules;
    p
}

/// Allow everything but mkdir: EPERM. A name no architecture has is skipped.
fn no_mkdir() -> oci::LinuxSeccomp {
    profile(
        "SCMP_ACT_ALLOW",
        vec![rule(
            &["mkdir", "mkdirat", "kiln_no_such_syscall"],
            "SCMP_ACT_ERRNO",
            None,
        )],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM; run through cargo xtask test"]
async fn seccomp_profiles_in_one_vm() {
    let g = Guest::boot().await;
    let t = Instant::now();

    let details = g.c.guest_details().await.unwrap();
    assert!(
        details.agent_details.supports_seccomp,
        "GetGuestDetails says the guest kernel takes seccomp filters"
    );

    // The init: mkdir is denied, echo works. The filter is installed after
    // no_new_privs (the default spec sets noNewPrivileges).
    let script = "echo ok; mkdir /tmp/x; echo mkdir=$?; test -d /tmp/x && echo exists; exit 0";
    g.run("deny", spec(&["sh", "-c", script], no_mkdir())).await;
    let (st, out, err) = g.outcome("deny", "").await;
    assert_eq!(st, 0, "the script ran to its end: {out} {err}");
    assert!(
        out.starts_with("ok\n"),
        "echo works under the filter: {out:?}"
    );
    assert!(out.contains("mkdir=1"), "mkdir failed: {out:?} {err:?}");
    assert!(!out.contains("exists"), "no directory was made: {out:?}");
    assert!(
        err.contains("Operation not permitted"),
        "mkdir's error is EPERM: {err:?}"
    );

    // A container that keeps running, for execs.
    g.run("box", spec(&["sleep", "100000"], no_mkdir())).await;
    let (st, out, err) = g.sh("box", "nnp", "echo ok; mkdir /tmp/y", true).await;
    assert_eq!(out, "ok\n", "exec with noNewPrivileges: echo works");
    assert_ne!(st, 0, "exec with noNewPrivileges: mkdir fails ({err})");
    assert!(err.contains("Operation not permitted"), "{err:?}");
    // Without noNewPrivileges the filter goes in before the user switch,
    // while the helper still has CAP_SYS_ADMIN (as runc does).
    let (st, out, err) = g.sh("box", "privs", "echo ok; mkdir /tmp/z", false).await;
    assert_eq!(out, "ok\n", "exec without noNewPrivileges: echo works");
    assert_ne!(st, 0, "exec without noNewPrivileges: mkdir fails ({err})");
    assert!(err.contains("Operation not permitted"), "{err:?}");
    let look = "for d in /tmp/y /tmp/z; do test -e $d && echo $d; done; exit 0";
    let (st, out, _) = g.sh("box", "look", look, true).await;
    assert_eq!(
        (st, out.as_str()),
        (0, ""),
        "neither exec made its directory"
    );
    g.remove("box").await;
    g.remove("deny").await;

    // SCMP_ACT_KILL_PROCESS: the caller dies of SIGSYS.
    let kill = profile(
        "SCMP_ACT_ALLOW",
        vec![rule(&["uname"], "SCMP_ACT_KILL_PROCESS", None)],
    );
    g.run("kill", spec(&["uname"], kill)).await;
    let (st, _, err) = g.outcome("kill", "").await;
    assert_eq!(st, KILLED_BY_SIGSYS, "uname was killed by seccomp ({err})");
    g.remove("kill").await;

    // An unknown action is refused up front.
    let bad = profile(
        "SCMP_ACT_ALLOW",
        vec![rule(&["mkdir"], "SCMP_ACT_EXPLODE", None)],
    );
    match g.create("bad", spec(&["true"], bad)).await {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT, "{s:?}");
            assert!(s.message.contains("SCMP_ACT_EXPLODE"), "{}", s.message);
        }
        other => panic!("CreateContainer with SCMP_ACT_EXPLODE: {other:?}"),
    }

    eprintln!("seccomp checks took {:.1} s", t.elapsed().as_secs_f64());
    g.shutdown().await;
}
