//! Agent side of starting a container process: spawn the helper (the agent
//! binary re-executed), hand it the resolved spec, learn the pid of the
//! process that will exec, register that pid with the reaper, and later tell
//! it to start.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

use super::stdio::ChildStdio;
use super::wire::{self, Config, Report};
use crate::error::{internal, os, timeout, Result};
use crate::reaper::{ExitCode, Reaper};

/// How long a helper may take to build a container (TCG guests are slow).
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// A process that is set up and waiting for Start.
pub struct Launched {
    pub pid: i32,
    pub exit: oneshot::Receiver<ExitCode>,
    pub control: UnixStream,
}

/// The helper binary: a sealed in-memory copy of the agent, made once it succeeds.
///
/// Not `/proc/self/exe`: a container process that re-executes or opens its
/// helper's `/proc/<pid>/exe` would reach the agent's own file and could
/// overwrite it once nothing executes it any more (CVE-2019-5736; today the
/// running agent's ETXTBSY is all that would stop it). The copy is sealed
/// against writes, growth and shrinking, so that path leads nowhere writable.
/// It costs one copy of the agent binary in guest memory.
fn helper_exe() -> Result<String> {
    // Only a success is kept: a failure (EMFILE, ENOMEM under a burst) is
    // returned to this request and the next launch tries again.
    static COPY: std::sync::Mutex<Option<OwnedFd>> = std::sync::Mutex::new(None);
    let mut copy = COPY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(fd) = copy.as_ref() {
        return Ok(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    }
    let fd = sealed_copy(std::path::Path::new("/proc/self/exe")).map_err(internal)?;
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    *copy = Some(fd);
    Ok(path)
}

/// `src` copied into a memfd sealed against every change.
pub fn sealed_copy(src: &std::path::Path) -> std::result::Result<OwnedFd, String> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fd = memfd_create(
        c"kiln-agent",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(|e| {
        format!("memfd_create for the container helper: {e} (the kernel needs CONFIG_MEMFD_CREATE)")
    })?;
    let mut file = std::fs::File::from(fd);
    let mut exe =
        std::fs::File::open(src).map_err(|e| format!("opening {}: {e}", src.display()))?;
    std::io::copy(&mut exe, &mut file)
        .map_err(|e| format!("copying {} into a memfd: {e}", src.display()))?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on a memfd we own, with integer arguments.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(format!(
            "sealing the helper copy: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(OwnedFd::from(file))
}

pub async fn launch(reaper: &Reaper, cfg: &Config, stdio: ChildStdio) -> Result<Launched> {
    let body = wire::encode_config(cfg).map_err(internal)?;
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| os("creating the helper control socket", e))?;
    // Keep the child's end off 0..=2, which the stdio set-up overwrites first.
    let theirs: OwnedFd = if theirs.as_raw_fd() <= 2 {
        let fd = nix::fcntl::fcntl(
            theirs.as_raw_fd(),
            nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10),
        )
        .map_err(|e| os("duplicating the control socket", e))?;
        // SAFETY: F_DUPFD_CLOEXEC returned a new fd that we now own.
        unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    } else {
        theirs
    };
    let theirs_raw = theirs.as_raw_fd();

    let mut cmd = Command::new(helper_exe()?);
    cmd.arg(wire::HELPER_ARG)
        .env_clear()
        .stdin(Stdio::from(stdio.stdin))
        .stdout(Stdio::from(stdio.stdout))
        .stderr(Stdio::from(stdio.stderr));
    // SAFETY: the closure runs between fork and exec and only calls dup2 /
    // fcntl, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if theirs_raw == wire::CONTROL_FD {
                if libc::fcntl(theirs_raw, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(theirs_raw, wire::CONTROL_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let helper_exit = {
        let mut reg = reaper.lock();
        let child = cmd.spawn().map_err(|e| {
            os(
                "starting the container helper (the sealed copy of the agent)",
                e,
            )
        })?;
        reg.register(child.id() as i32)
    };
    // The child's copies of the stdio ends and the socket live in `cmd`.
    drop(cmd);
    drop(theirs);
    tokio::spawn(async move {
        if let Ok(code) = helper_exit.await {
            if code != 0 {
                tracing::debug!(code, "container helper exited with an error");
            }
        }
    });

    let std_sock = std::os::unix::net::UnixStream::from(ours);
    std_sock
        .set_nonblocking(true)
        .map_err(|e| os("control socket", e))?;
    let mut control = UnixStream::from_std(std_sock).map_err(|e| os("control socket", e))?;
    control
        .write_all(&wire::frame(&body))
        .await
        .map_err(|e| os("sending the spec to the container helper", e))?;

    let handshake = handshake(reaper, &mut control);
    let (pid, exit) = match tokio::time::timeout(SETUP_TIMEOUT, handshake).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(timeout(format!(
                "container set-up took longer than {} s",
                SETUP_TIMEOUT.as_secs()
            )))
        }
    };
    Ok(Launched { pid, exit, control })
}

/// Reads the helper's reports until Ready: the pid it forked (registered
/// with the reaper at once), or the error that ended set-up.
async fn handshake(
    reaper: &Reaper,
    control: &mut UnixStream,
) -> Result<(i32, oneshot::Receiver<ExitCode>)> {
    let mut registered: Option<(i32, oneshot::Receiver<ExitCode>)> = None;
    loop {
        match next_report(control).await {
            Ok(Report::Pid(pid)) => {
                let rx = reaper.lock().register(pid);
                // If it died before we registered, the reaper already took it.
                if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
                    reaper.lock().unregister(pid);
                    return Err(internal(format!(
                        "container process {pid} vanished during set-up"
                    )));
                }
                registered = Some((pid, rx));
            }
            Ok(Report::Ready) => {
                return registered
                    .ok_or_else(|| internal("container helper said Ready before reporting a pid"));
            }
            Ok(Report::Error(msg)) => {
                if let Some((pid, _)) = registered {
                    reaper.lock().unregister(pid);
                }
                return Err(internal(msg));
            }
            Err(e) => {
                if let Some((pid, _)) = registered {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    reaper.lock().unregister(pid);
                }
                return Err(e);
            }
        }
    }
}

async fn next_report(control: &mut UnixStream) -> Result<Report> {
    match wire::read_frame(control).await {
        Ok(Some(b)) => wire::decode_report(&b).map_err(internal),
        Ok(None) => Err(internal(
            "the container helper exited without finishing set-up",
        )),
        Err(e) => Err(os("reading from the container helper", e)),
    }
}

/// Tells a set-up process to exec, and waits until it did (the control
/// socket closes) or failed (it says why).
pub async fn start(control: &mut UnixStream) -> Result<()> {
    control
        .write_all(&wire::frame(wire::START))
        .await
        .map_err(|e| os("telling the container process to start", e))?;
    let outcome = async {
        match wire::read_frame(control).await {
            Ok(None) => Ok(()),
            Ok(Some(b)) => match wire::decode_report(&b) {
                Ok(Report::Error(msg)) => Err(internal(msg)),
                Ok(other) => Err(internal(format!(
                    "unexpected {other:?} from the container process"
                ))),
                Err(e) => Err(internal(e)),
            },
            // A reset also means the socket went away with the exec.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(os("waiting for the container process to exec", e)),
        }
    };
    tokio::time::timeout(SETUP_TIMEOUT, outcome)
        .await
        .map_err(|_| timeout("the container process did not exec in time"))?
}
