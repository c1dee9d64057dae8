//! Ownership of everything the shim starts: child processes are killed and
//! reaped when their guard drops, the run directory is removed with its guard,
//! so success, error and Ctrl-C all leave the host as it was.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A child process that is terminated (SIGTERM, then SIGKILL) on drop.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Starts `cmd` so that it dies with the shim: the child gets
    /// `PR_SET_PDEATHSIG` (SIGKILL), so a shim killed with SIGKILL takes
    /// QEMU and the backends with it instead of leaving a running guest.
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<ChildGuard> {
        let program = cmd.get_program().to_owned();
        let shim = std::process::id() as libc::pid_t;
        cmd.stdin(Stdio::null());
        // SAFETY: the closure runs between fork and exec and calls only
        // async-signal-safe functions (prctl, getppid, _exit-free returns).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The shim died between fork and prctl: the signal is lost.
                if libc::getppid() != shim {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let owned = std::mem::replace(cmd, Command::new(&program));
        let child = spawn_from_launcher(owned)
            .with_context(|| format!("cannot start {name} ({program:?}): is it installed? `kiln-shim check` tells what is missing"))?;
        tracing::debug!(name, pid = child.id(), "started");
        Ok(ChildGuard {
            name: name.to_string(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` when the process has already exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `grace` for the process to exit on its own.
    pub fn wait_exit(&mut self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Asks the process to stop and waits up to `grace`, then kills it.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                tracing::debug!(name = %self.name, "stopped");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        tracing::debug!(name = %self.name, "killed");
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

/// A per-VM directory for sockets, logs and the state file; removed on drop.
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    pub fn create() -> anyhow::Result<RunDir> {
        let base = runtime_base()?;
        secure_base(&base)?;
        let path = tempfile::Builder::new()
            .prefix("vm-")
            .tempdir_in(&base)
            .with_context(|| format!("creating a run directory in {}", base.display()))?
            .keep();
        Ok(RunDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        remove_dir_if_unmounted(&self.path);
    }
}

/// Removes `dir` recursively unless something is still mounted below it:
/// deleting through a live bind mount would delete the user's files.
pub fn remove_dir_if_unmounted(dir: &Path) -> bool {
    let busy = mounts_under(dir);
    if !busy.is_empty() {
        tracing::warn!(
            "not removing {}: still mounted below it: {busy:?}",
            dir.display()
        );
        return false;
    }
    std::fs::remove_dir_all(dir).is_ok()
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Forks `cmd` from one thread that lives as long as the shim. The kernel
/// sends `PR_SET_PDEATHSIG` when the *thread* that forked the child exits, and
/// the shim's callers include tokio blocking-pool threads, which exit after
/// 10 s idle: forking there would kill QEMU with a thread, not with the shim.
fn spawn_from_launcher(cmd: Command) -> std::io::Result<Child> {
    use std::sync::mpsc;
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static LAUNCHER: std::sync::OnceLock<Option<std::sync::Mutex<mpsc::Sender<Request>>>> =
        std::sync::OnceLock::new();
    let launcher = LAUNCHER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("kiln-launcher".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .ok()
            .map(|_| std::sync::Mutex::new(tx))
    });
    let launcher = launcher
        .as_ref()
        .ok_or_else(|| std::io::Error::other("could not start the launcher thread"))?;
    let (reply, answer) = mpsc::channel();
    launcher
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send((cmd, reply))
        .map_err(|_| std::io::Error::other("the launcher thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the launcher thread is gone"))?
}

/// A bind mount that is detached on drop.
pub struct BindMount {
    target: PathBuf,
}

impl BindMount {
    pub fn new(source: &Path, target: &Path) -> anyhow::Result<BindMount> {
        std::fs::create_dir_all(target)?;
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| {
            format!(
                "bind-mounting {} on {} (kiln-shim run needs root for this)",
                source.display(),
                target.display()
            )
        })?;
        Ok(BindMount {
            target: target.to_path_buf(),
        })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!("unmounting {}: {e}", self.target.display());
        }
    }
}

/// `$KILN_RUN_DIR`, else `$XDG_RUNTIME_DIR/kiln`, else `/run/kiln` for root.
/// A user without `XDG_RUNTIME_DIR` gets an error rather than a predictable
/// directory in /tmp that another user could create first.
pub fn runtime_base() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("KILN_RUN_DIR") {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Ok(PathBuf::from(d).join("kiln"));
    }
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/run/kiln"));
    }
    anyhow::bail!(
        "no place for run directories: XDG_RUNTIME_DIR is not set (a login session sets it); \
         set it, or KILN_RUN_DIR to a directory only you can write"
    )
}

/// Makes `base` (mode 0700) or checks the existing one: a real directory
/// owned by us, then closed to others. Refuses a symlink or someone else's
/// directory, where state.json, sockets and QMP could be swapped.
pub fn secure_base(base: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(base)
    {
        Ok(()) => {}
        Err(e) => anyhow::bail!("creating {}: {e}", base.display()),
    }
    let md = std::fs::symlink_metadata(base).with_context(|| format!("stat {}", base.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if !md.is_dir() || md.uid() != me {
        anyhow::bail!(
            "refusing run base {}: it is {} owned by uid {}, not a directory of yours (uid {me}); \
             remove it, or set KILN_RUN_DIR to a directory only you can write",
            base.display(),
            if md.file_type().is_symlink() {
                "a symlink"
            } else if md.is_dir() {
                "a directory"
            } else {
                "a file"
            },
            md.uid()
        );
    }
    if md.mode() & 0o077 != 0 {
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", base.display()))?;
    }
    Ok(())
}

/// Waits until `path` exists (a socket a child creates), or the deadline.
pub fn wait_for_path(path: &Path, child: &mut ChildGuard, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if let Some(status) = child.exited() {
            anyhow::bail!(
                "{} exited ({status}) before creating {}",
                child.name,
                path.display()
            );
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{} did not create {} within {:?}",
                child.name,
                path.display(),
                timeout
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_kills_child_on_drop() {
        let guard = ChildGuard::spawn("sleep", Command::new("sleep").arg("100")).unwrap();
        let pid = guard.pid().unwrap() as i32;
        drop(guard);
        // The child was reaped, so the pid no longer exists (or was reused, not as our child).
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        let ours = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains("(sleep)"))
            .unwrap_or(false);
        assert!(!(alive && ours), "sleep {pid} survived its guard");
    }

    /// A helper started from a thread that then exits (as tokio's idle
    /// blocking threads do) lives on: its death signal is tied to the shim's
    /// launcher thread, not to the caller's.
    #[test]
    fn helper_outlives_the_thread_that_asked_for_it() {
        let mut guard = std::thread::spawn(|| {
            ChildGuard::spawn("sleep", Command::new("sleep").arg("100")).unwrap()
        })
        .join()
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            guard.exited().is_none(),
            "the helper died with the caller's thread"
        );
        let pid = guard.pid().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(status.contains("State:\tS"), "{status}");
    }

    #[test]
    fn bind_mounted_dir_is_never_deleted_through() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("note: skipped, bind mounts need root");
            return;
        }
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("precious"), "keep").unwrap();
        let run = tempfile::tempdir().unwrap();
        let target = run.path().join("shared/c1/rootfs");
        let mount = BindMount::new(src.path(), &target).unwrap();
        assert!(target.join("precious").exists());
        assert!(
            !remove_dir_if_unmounted(run.path()),
            "refuses while mounted"
        );
        assert!(src.path().join("precious").exists());
        drop(mount);
        assert!(mounts_under(run.path()).is_empty());
        assert!(src.path().join("precious").exists());
    }

    #[test]
    fn run_dir_is_removed_on_drop() {
        let base = tempfile::tempdir().unwrap();
        std::env::set_var("KILN_RUN_DIR", base.path());
        let dir = RunDir::create().unwrap();
        let p = dir.path().to_path_buf();
        std::fs::write(p.join("x.sock"), "").unwrap();
        drop(dir);
        assert!(!p.exists());
    }

    #[test]
    fn run_base_is_ours_and_closed_to_others() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("kiln");
        secure_base(&base).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&base), 0o700);
        // An existing one of ours that others could enter is closed.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        secure_base(&base).unwrap();
        assert_eq!(mode(&base), 0o700);
        // A symlink planted where the base should be is refused.
        let link = tmp.path().join("planted");
        std::os::unix::fs::symlink(&base, &link).unwrap();
        let e = secure_base(&link).unwrap_err().to_string();
        assert!(e.contains("a symlink"), "{e}");
    }
}
