//! Helpers the end-to-end tests share (public so every test binary can use
//! them; nothing in the shim itself calls them).

use std::path::Path;
use std::process::Command;

use anyhow::Context;
use kiln_protocol::agent;

/// Fills `root` with a container root filesystem: the host's static
/// `/bin/busybox` with its applets as symlinks, `/etc/passwd` with root, and
/// the usual empty directories (plus `/data`).
pub fn busybox_rootfs(root: &Path) -> anyhow::Result<()> {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root", "data"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .context("copying /bin/busybox (busybox-static is installed by `cargo xtask setup`)")?;
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .context("running busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    Ok(())
}

/// A booted VM whose sandbox mounts the virtio-fs share, a busybox-style
/// rootfs shared under one container id: where the container tests start.
pub struct SandboxVm {
    pub vm: crate::vm::Vm,
    pub client: crate::client::AgentClient,
    /// The shared rootfs on the host; lives as long as the VM uses it.
    pub rootfs: tempfile::TempDir,
    /// The VM's run directory base (`KILN_RUN_DIR`), removed last.
    pub run_base: tempfile::TempDir,
}

/// Boots `manifest` with `rootfs` shared as `share_id`, waits for the agent
/// and creates `sandbox` with the share's storage added. Errors carry the
/// VM's console and backend logs, so a failed boot explains itself.
pub async fn boot_sandbox(
    cfg: &crate::config::ShimConfig,
    manifest: &Path,
    rootfs: tempfile::TempDir,
    share_id: &str,
    mut sandbox: agent::CreateSandboxRequest,
) -> anyhow::Result<SandboxVm> {
    let run_base = tempfile::tempdir()?;
    std::env::set_var("KILN_RUN_DIR", run_base.path());
    let image = crate::image::BootImage::load(manifest)?;
    let opts = crate::vm::BootOptions {
        share_rootfs: Some((share_id.into(), rootfs.path().to_path_buf())),
        ..Default::default()
    };
    let mut vm = crate::vm::Vm::launch(&image, cfg, &opts)?;
    let ready = match vm.wait_ready(cfg).await {
        Ok(r) => r,
        Err(e) => anyhow::bail!("the agent never answered: {e:#}"),
    };
    eprintln!(
        "agent ready after {:.2} s ({})",
        ready.elapsed.as_secs_f64(),
        vm.accel_note
    );
    sandbox.storages.push(crate::run::share_storage());
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

/// A context for calls that wait on the guest (WaitProcess, reads, OOM):
/// generous, because TCG is slow and the machines are busy.
pub fn long() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(std::time::Duration::from_secs(180).as_nanos() as i64)
}

/// CreateContainer of `spec` as `id`, with extra `storages` (e.g. a disk).
pub fn create_request(
    id: &str,
    spec: kiln_protocol::oci::Spec,
    storages: Vec<agent::Storage>,
) -> agent::CreateContainerRequest {
    let mut req = agent::CreateContainerRequest::new();
    req.container_id = id.into();
    req.OCI = protobuf::MessageField::some(spec);
    req.storages = storages;
    req
}

/// The container calls the end-to-end tests make over and over; each panics
/// with what failed (and, where the guest may explain it, its diagnostics).
impl SandboxVm {
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
        spec: kiln_protocol::oci::Spec,
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
    pub async fn run(&self, id: &str, spec: kiln_protocol::oci::Spec) {
        self.create(id, spec, vec![])
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {id}: {e:?}{}", self.vm.diagnostics()));
        self.start(id).await;
    }

    pub async fn exec_process(&self, id: &str, exec: &str, p: kiln_protocol::oci::Process) {
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
        let mut req = agent::ReadStreamRequest::new();
        req.container_id = id.into();
        req.exec_id = exec.into();
        req.len = 64 * 1024;
        let r = if stderr {
            self.agent().read_stderr(long(), &req).await
        } else {
            self.agent().read_stdout(long(), &req).await
        };
        r.unwrap_or_else(|e| {
            panic!(
                "Read{} {id}/{exec}: {e:?}{}",
                if stderr { "Stderr" } else { "Stdout" },
                self.vm.diagnostics()
            )
        })
        .data
    }

    /// Everything until EOF (an empty answer).
    pub async fn read_all(&self, id: &str, exec: &str, stderr: bool) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let d = self.read(id, exec, stderr).await;
            if d.is_empty() {
                return out;
            }
            out.extend(d);
        }
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
}
