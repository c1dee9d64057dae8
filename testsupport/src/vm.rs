//! End-to-end helpers for host-shim/tests: the manifest under test, a booted
//! VM whose sandbox mounts the virtio-fs share (a busybox rootfs shared under
//! one container id), the container calls the tests make over and over, and
//! the specs they send. The calls panic with what failed (and, where the guest
//! may explain it, its diagnostics): they are test code.

use std::path::{Path, PathBuf};

use kiln_protocol::{agent, oci};
use kiln_shim::config::ShimConfig;

use crate::streams::{read_once, read_to_eof, Stream};

/// The manifest.json named by `var` (`cargo xtask test` sets it).
pub fn manifest_var(var: &str) -> PathBuf {
    PathBuf::from(std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} must name a built manifest.json; run these tests through `cargo xtask test`")
    }))
}

/// The manifest.json under test: `KILN_E2E_MANIFEST`.
pub fn manifest() -> PathBuf {
    manifest_var("KILN_E2E_MANIFEST")
}

/// A temp dir with the busybox tree ([`crate::busybox::write_tree`]) plus
/// `/data`, the container rootfs the end-to-end tests share.
pub fn busybox_rootfs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("creating a temp dir");
    write_busybox_rootfs(dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
    dir
}

/// [`busybox_rootfs`] written into `root`.
pub fn write_busybox_rootfs(root: &Path) -> anyhow::Result<()> {
    crate::busybox::write_tree(root)?;
    std::fs::create_dir_all(root.join("data"))?;
    Ok(())
}

/// Compiles the dependency-free program `src` (one of host-shim's
/// `examples/`) statically for the x86_64 guest, to `out`, so a container
/// can run it. Panics with rustc's message (the musl target comes from
/// `cargo xtask setup`).
pub fn build_static_x86_64(src: &Path, out: &Path) {
    build_static(src, out, kiln_manifest::Arch::X86_64)
}

/// [`build_static_x86_64`] for a guest of `arch` (musl on x86_64 and
/// aarch64, static glibc on ppc64le and s390x; the foreign ones link with
/// Debian's cross gcc, as .cargo/config.toml says for the agent).
pub fn build_static(src: &Path, out: &Path, arch: kiln_manifest::Arch) {
    let mut rustc = std::process::Command::new("rustc");
    rustc.args(["--edition", "2021", "--target", arch.rust_target()]);
    rustc.args([
        "-C",
        "opt-level=1",
        "-C",
        "panic=abort",
        "-C",
        "target-feature=+crt-static",
    ]);
    let linker = match arch {
        kiln_manifest::Arch::X86_64 => None,
        kiln_manifest::Arch::Aarch64 => Some("aarch64-linux-gnu-gcc"),
        kiln_manifest::Arch::Ppc64le => Some("powerpc64le-linux-gnu-gcc"),
        kiln_manifest::Arch::S390x => Some("s390x-linux-gnu-gcc"),
    };
    if let Some(linker) = linker {
        rustc.arg("-C").arg(format!("linker={linker}"));
    }
    let built = rustc
        .arg("-o")
        .arg(out)
        .arg(src)
        .output()
        .expect("running rustc");
    assert!(
        built.status.success(),
        "building {} for {}: {}",
        src.display(),
        arch.rust_target(),
        String::from_utf8_lossy(&built.stderr)
    );
}

/// A 16 MiB ext4 image holding `hello.txt` ("hello from the disk\n"),
/// made without root or loop devices (`mke2fs -d`), for hot-plug tests.
pub fn ext4_image(dir: &Path) -> std::path::PathBuf {
    let content = dir.join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("hello.txt"), "hello from the disk\n").unwrap();
    let img = dir.join("disk.img");
    let mk = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&content)
        .arg(&img)
        .arg("16M")
        .output()
        .expect("mke2fs (e2fsprogs) is installed by `cargo xtask setup`");
    assert!(
        mk.status.success(),
        "{}",
        String::from_utf8_lossy(&mk.stderr)
    );
    img
}

/// An OCI process running `args` with `PATH=/bin` and `HOME=/root` in `/`.
pub fn process(args: &[&str]) -> oci::Process {
    let mut p = oci::Process::new();
    p.Args = args.iter().map(|s| s.to_string()).collect();
    p.Env = vec!["PATH=/bin".into(), "HOME=/root".into()];
    p.Cwd = "/".into();
    p
}

/// A bind mount of `source` at `dest` with `opts`.
pub fn bind(dest: &str, source: &str, opts: &[&str]) -> oci::Mount {
    let mut m = oci::Mount::new();
    m.destination = dest.into();
    m.source = source.into();
    m.type_ = "bind".into();
    m.options = opts.iter().map(|s| s.to_string()).collect();
    m
}

/// The shim's default (runc-like) spec for `args`, translated as `kiln-shim
/// run` does, over the rootfs shared as `share`, in the sandbox's network.
pub fn shim_spec(args: &[&str], share: &str) -> oci::Spec {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let s = kiln_shim::spec::default_spec(&args, &[], false).expect("the shim's default spec");
    kiln_shim::run::protocol_spec(&s, share).expect("translating the default spec")
}

/// A context for calls that wait on the guest (WaitProcess, reads, OOM):
/// generous, because TCG is slow and the machines are busy.
pub fn long() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(std::time::Duration::from_secs(180).as_nanos() as i64)
}

/// CreateContainer of `spec` as `id`, with extra `storages` (e.g. a disk).
pub fn create_request(
    id: &str,
    spec: oci::Spec,
    storages: Vec<agent::Storage>,
) -> agent::CreateContainerRequest {
    let mut req = agent::CreateContainerRequest::new();
    req.container_id = id.into();
    req.OCI = protobuf::MessageField::some(spec);
    req.storages = storages;
    req
}

/// A booted VM whose sandbox mounts the virtio-fs share, a busybox-style
/// rootfs shared under one container id: where the container tests start.
pub struct SandboxVm {
    pub vm: kiln_shim::vm::Vm,
    pub client: kiln_shim::client::AgentClient,
    /// The shared rootfs on the host; lives as long as the VM uses it.
    pub rootfs: tempfile::TempDir,
    /// The VM's run directory base (`KILN_RUN_DIR`), removed last.
    pub run_base: tempfile::TempDir,
}

/// Boots `manifest` with `rootfs` shared as `share_id`, waits for the agent
/// and creates `sandbox` with the share's storage added. Errors carry the
/// VM's console and backend logs, so a failed boot explains itself.
pub async fn boot_sandbox(
    cfg: &ShimConfig,
    manifest: &Path,
    rootfs: tempfile::TempDir,
    share_id: &str,
    sandbox: agent::CreateSandboxRequest,
) -> anyhow::Result<SandboxVm> {
    let how = RootfsTo {
        share_id: Some(share_id),
        disk: false,
    };
    boot_sandbox_with(cfg, manifest, rootfs, how, sandbox).await
}

/// How [`boot_sandbox_with`] gives the guest the rootfs: shared over
/// virtio-fs as a container id, copied into a virtio-blk disk
/// (`kiln_shim::rootfs_disk`; `SandboxVm::vm.container_disk` says where), or both.
#[derive(Debug, Clone, Copy)]
pub struct RootfsTo<'a> {
    pub share_id: Option<&'a str>,
    pub disk: bool,
}

/// [`boot_sandbox`], the rootfs given as `how` says; without a share, the
/// sandbox gets no share storage.
pub async fn boot_sandbox_with(
    cfg: &ShimConfig,
    manifest: &Path,
    rootfs: tempfile::TempDir,
    how: RootfsTo<'_>,
    mut sandbox: agent::CreateSandboxRequest,
) -> anyhow::Result<SandboxVm> {
    let run_base = tempfile::tempdir()?;
    std::env::set_var("KILN_RUN_DIR", run_base.path());
    let image = kiln_shim::image::BootImage::load(manifest)?;
    let opts = kiln_shim::vm::BootOptions {
        share_rootfs: how
            .share_id
            .map(|id| (id.into(), rootfs.path().to_path_buf())),
        rootfs_disk: how.disk.then(|| rootfs.path().to_path_buf()),
        ..Default::default()
    };
    let mut vm = kiln_shim::vm::Vm::launch(&image, cfg, &opts)?;
    let ready = match vm.wait_ready(cfg).await {
        Ok(r) => r,
        Err(e) => anyhow::bail!("the agent never answered: {e:#}"),
    };
    eprintln!(
        "agent ready after {:.2} s ({})",
        ready.elapsed.as_secs_f64(),
        vm.accel_note
    );
    if how.share_id.is_some() {
        sandbox.storages.push(kiln_shim::run::share_storage());
    }
    if let Err(e) = ready
        .client
        .agent
        .create_sandbox(ready.client.ctx(), &sandbox)
        .await
    {
        anyhow::bail!("CreateSandbox: {e:?}{}", vm.diagnostics());
    }
    Ok(SandboxVm {
        vm,
        client: ready.client,
        rootfs,
        run_base,
    })
}

/// 1 MiB of test input that is not all one byte (the stdin round trips).
pub fn one_mib() -> Vec<u8> {
    (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// A private copy of the built container rootfs named by `var` (`cargo
/// xtask test` sets it; the tests write into their copy), checked to hold
/// `must_have`.
pub fn rootfs_copy(var: &str, must_have: &str) -> tempfile::TempDir {
    let src =
        PathBuf::from(std::env::var(var).unwrap_or_else(|_| {
            panic!("{var} is not set; run this test through `cargo xtask test`")
        }));
    assert!(
        src.join(must_have).exists(),
        "{} is not the rootfs this test needs (no {must_have})",
        src.display()
    );
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(dir.path())
        .status()
        .expect("running cp");
    assert!(st.success(), "copying {}", src.display());
    dir
}

impl SandboxVm {
    /// [`boot_sandbox`] of the manifest under test with `rootfs` shared as
    /// `share_id`; panics with the VM's diagnostics if it fails.
    pub async fn launch(
        cfg: &ShimConfig,
        rootfs: tempfile::TempDir,
        share_id: &str,
        sandbox: agent::CreateSandboxRequest,
    ) -> SandboxVm {
        boot_sandbox(cfg, &manifest(), rootfs, share_id, sandbox)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn agent(&self) -> &kiln_protocol::agent_ttrpc::AgentServiceClient {
        &self.client.agent
    }

    /// The host path of a file in the shared rootfs.
    pub fn host(&self, rel: &str) -> std::path::PathBuf {
        self.rootfs.path().join(rel)
    }

    pub async fn create(
        &self,
        id: &str,
        spec: oci::Spec,
        storages: Vec<agent::Storage>,
    ) -> ttrpc::Result<()> {
        self.agent()
            .create_container(self.client.ctx(), &create_request(id, spec, storages))
            .await
            .map(|_| ())
    }

    pub async fn start(&self, id: &str) {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = id.into();
        self.agent()
            .start_container(self.client.ctx(), &req)
            .await
            .unwrap_or_else(|e| panic!("StartContainer {id}: {e:?}{}", self.vm.diagnostics()));
    }

    /// CreateContainer (no extra storages) and StartContainer.
    pub async fn run(&self, id: &str, spec: oci::Spec) {
        self.create(id, spec, vec![])
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {id}: {e:?}{}", self.vm.diagnostics()));
        self.start(id).await;
    }

    pub async fn exec_process(&self, id: &str, exec: &str, p: oci::Process) {
        let mut req = agent::ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        let args = p.Args.clone();
        req.process = protobuf::MessageField::some(p);
        self.agent()
            .exec_process(self.client.ctx(), &req)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "ExecProcess {id}/{exec} {args:?}: {e:?}{}",
                    self.vm.diagnostics()
                )
            });
    }

    pub async fn wait(&self, id: &str, exec: &str) -> i32 {
        let mut req = agent::WaitProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        self.agent()
            .wait_process(long(), &req)
            .await
            .unwrap_or_else(|e| panic!("WaitProcess {id}/{exec}: {e:?}"))
            .status
    }

    /// One ReadStdout/ReadStderr answer (empty at EOF).
    pub async fn read(&self, id: &str, exec: &str, stderr: bool) -> Vec<u8> {
        let stream = Stream::from_stderr_flag(stderr);
        read_once(self.agent(), long(), id, exec, stream, 64 * 1024)
            .await
            .unwrap_or_else(|e| self.read_failed(id, exec, stream, e))
    }

    /// Everything until EOF (an empty answer).
    pub async fn read_all(&self, id: &str, exec: &str, stderr: bool) -> Vec<u8> {
        let stream = Stream::from_stderr_flag(stderr);
        read_to_eof(self.agent(), long, id, exec, stream, 64 * 1024)
            .await
            .unwrap_or_else(|e| self.read_failed(id, exec, stream, e))
    }

    fn read_failed(&self, id: &str, exec: &str, stream: Stream, e: ttrpc::Error) -> ! {
        panic!(
            "{} {id}/{exec}: {e:?}{}",
            stream.rpc(),
            self.vm.diagnostics()
        )
    }

    /// ExecProcess of `p`, then its [`SandboxVm::outcome`].
    pub async fn exec_outcome(
        &self,
        id: &str,
        exec: &str,
        p: oci::Process,
    ) -> (i32, String, String) {
        self.exec_process(id, exec, p).await;
        self.outcome(id, exec).await
    }

    /// (status, stdout, stderr) of a process that runs to its end.
    pub async fn outcome(&self, id: &str, exec: &str) -> (i32, String, String) {
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        let out = text(self.read_all(id, exec, false).await);
        let err = text(self.read_all(id, exec, true).await);
        (self.wait(id, exec).await, out, err)
    }

    pub async fn remove(&self, id: &str) {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = id.into();
        req.timeout = 30;
        self.agent()
            .remove_container(long(), &req)
            .await
            .unwrap_or_else(|e| panic!("RemoveContainer {id}: {e:?}"));
    }

    /// DestroySandbox, then the VM's teardown.
    pub async fn shutdown(self) {
        let r = self
            .agent()
            .destroy_sandbox(self.client.ctx(), &agent::DestroySandboxRequest::new())
            .await;
        assert!(r.is_ok(), "DestroySandbox: {r:?}");
        drop(self.client);
        self.vm.shutdown();
    }

    /// Everything `exec` wrote to stdout until EOF, as text.
    pub async fn read_text(&self, id: &str, exec: &str) -> String {
        String::from_utf8_lossy(&self.read_all(id, exec, false).await).into_owned()
    }

    /// WriteStdin of `data`, which the agent takes whole.
    pub async fn write(&self, id: &str, exec: &str, data: &[u8]) {
        let mut req = agent::WriteStreamRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        req.data = data.to_vec();
        let n = self
            .agent()
            .write_stdin(self.client.ctx(), &req)
            .await
            .unwrap_or_else(|e| panic!("WriteStdin {id}/{exec}: {e:?}"))
            .len;
        assert_eq!(n as usize, data.len(), "WriteStdin takes all it is given");
    }

    pub async fn signal(&self, id: &str, exec: &str, sig: u32) {
        let mut req = agent::SignalProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        req.signal = sig;
        self.agent()
            .signal_process(self.client.ctx(), &req)
            .await
            .unwrap_or_else(|e| panic!("SignalProcess {id}/{exec} {sig}: {e:?}"));
    }

    /// GetMetrics' text.
    pub async fn metrics(&self) -> String {
        self.agent()
            .get_metrics(self.client.ctx(), &agent::GetMetricsRequest::new())
            .await
            .unwrap_or_else(|e| panic!("GetMetrics: {e:?}"))
            .metrics
    }

    /// Asserts the agent still answers Health.Check with SERVING.
    pub async fn still_serving(&self, after: &str) {
        let status = self.client.check().await;
        assert!(
            matches!(
                status,
                Ok(kiln_protocol::health::health_check_response::ServingStatus::SERVING)
            ),
            "the agent keeps serving after {after}: {status:?}"
        );
    }
}
