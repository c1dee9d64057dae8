//! End-to-end: OCI seccomp profiles in a real VM under TCG, with the real
//! agent. A busybox rootfs is shared from the host over virtio-fs (Kata's
//! layout); one boot for the whole file.
//!
//! `cargo xtask test` builds the image and runs this with KILN_E2E_MANIFEST.

use std::time::Instant;

use kiln_protocol::{agent, oci};
use kiln_shim::config::ShimConfig;
use kiln_testsupport::vm::{process, SandboxVm};
use protobuf::MessageField;

/// The container id under which the rootfs is shared (its directory in the share).
const SHARE: &str = "share";
/// 128 + SIGSYS: how WaitProcess reports a process seccomp killed.
const KILLED_BY_SIGSYS: i32 = 128 + 31;

/// The booted VM with its sandbox; the container calls come from [`SandboxVm`].
type Guest = SandboxVm;

trait GuestExt {
    async fn boot() -> Guest;
    async fn sh(&self, id: &str, exec: &str, script: &str, nnp: bool) -> (i32, String, String);
}

impl GuestExt for Guest {
    async fn boot() -> Guest {
        let mut sb = agent::CreateSandboxRequest::new();
        sb.sandbox_id = "sb".into();
        SandboxVm::launch(
            &ShimConfig::default(),
            kiln_testsupport::vm::busybox_rootfs(),
            SHARE,
            sb,
        )
        .await
    }

    /// `sh -c script` exec'd in `id`, with or without noNewPrivileges.
    async fn sh(&self, id: &str, exec: &str, script: &str, nnp: bool) -> (i32, String, String) {
        let mut p = process(&["sh", "-c", script]);
        p.NoNewPrivileges = nnp;
        self.exec_process(id, exec, p).await;
        self.outcome(id, exec).await
    }
}

/// default capabilities — over the shared busybox rootfs, with `profile`.
fn spec(args: &[&str], profile: oci::LinuxSeccomp) -> oci::Spec {
    let mut s = kiln_testsupport::vm::shim_spec(args, SHARE);
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

    let details = g.client.guest_details().await.unwrap();
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
    match g.create("bad", spec(&["true"], bad), vec![]).await {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT, "{s:?}");
            assert!(s.message.contains("SCMP_ACT_EXPLODE"), "{}", s.message);
        }
        other => panic!("CreateContainer with SCMP_ACT_EXPLODE: {other:?}"),
    }

    eprintln!("seccomp checks took {:.1} s", t.elapsed().as_secs_f64());
    g.shutdown().await;
}
