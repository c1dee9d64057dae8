//! Containers on plain Linux primitives (nix): namespaces, a pivoted rootfs,
//! cgroup v2, capabilities, rlimits, a pty or pipes.
//!
//! * `spec` — the request's OCI spec as a typed, validated view.
//! * `launch` (agent side) and `child` (the re-executed helper) — creating a
//!   container or exec process, talking over `wire`.
//! * `mounts` — the container's filesystem view (runs in the helper).
//! * `cgroups` — `<root>/kiln/<sandbox>/<container>` limits, stats, freeze.
//! * `devcg` — which devices the container may open (a cgroup device program).
//! * `seccomp` — OCI seccomp profiles compiled to BPF, installed before exec.
//! * `stdio` — loss-free pipes and ptys.
//!
//! This module holds the per-process and per-container records the RPCs use.

pub mod cgroups;
pub mod child;
pub mod devcg;
pub mod inroot;
pub mod launch;
pub mod mounts;
/// The seccomp compiler lives in its own crate (`agent/seccomp`).
pub use kiln_seccomp as seccomp;
pub mod spec;
pub mod stdio;
pub mod wire;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kiln_protocol::oci;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::net::UnixStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use self::cgroups::Cgroup;
use self::stdio::{OutputBuffer, ParentStdio, StdinWriter};
use crate::error::{invalid, os, precondition, Result};
use crate::reaper::ExitCode;

/// Exit status reported when the reaper lost track of a process.
const LOST_STATUS: ExitCode = 255;

/// One process of a container (its init or an exec), with its stdio.
pub struct Process {
    pub exec_id: String,
    pub pid: i32,
    /// PID 1 of its own pid namespace: signals without a handler are ignored.
    pub pidns_init: bool,
    exit: watch::Receiver<Option<ExitCode>>,
    stdin: tokio::sync::Mutex<Option<StdinWriter>>,
    stdout: Arc<OutputBuffer>,
    stderr: Arc<OutputBuffer>,
    tty: Option<OwnedFd>,
    tasks: Vec<JoinHandle<()>>,
    waited: AtomicBool,
}

impl Drop for Process {
    fn drop(&mut self) {
        // Stops the pumps, which closes the agent's ends of the pipes.
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Process {
    pub fn new(
        exec_id: String,
        pid: i32,
        pidns_init: bool,
        exit: oneshot::Receiver<ExitCode>,
        io: ParentStdio,
        buffer_size: usize,
    ) -> Result<Arc<Process>> {
        let (tx, rx) = watch::channel(None);
        let mut tasks = vec![tokio::spawn(async move {
            let code = exit.await.unwrap_or(LOST_STATUS);
            let _ = tx.send(Some(code));
        })];
        let tty = io.tty.is_some();
        let stdout = OutputBuffer::new(buffer_size);
        tasks.push(tokio::spawn(stdio::pump(
            io.stdout,
            stdout.clone(),
            rx.clone(),
        )));
        let stderr = match io.stderr {
            Some(fd) => {
                let b = OutputBuffer::new(buffer_size);
                tasks.push(tokio::spawn(stdio::pump(fd, b.clone(), rx.clone())));
                b
            }
            None => OutputBuffer::closed(),
        };
        let stdin = StdinWriter::new(io.stdin, tty)?;
        Ok(Arc::new(Process {
            exec_id,
            pid,
            pidns_init,
            exit: rx,
            stdin: tokio::sync::Mutex::new(Some(stdin)),
            stdout,
            stderr,
            tty: io.tty,
            tasks,
            waited: AtomicBool::new(false),
        }))
    }

    pub fn exit_code(&self) -> Option<ExitCode> {
        *self.exit.borrow()
    }

    pub async fn wait(&self) -> ExitCode {
        let mut rx = self.exit.clone();
        loop {
            if let Some(c) = *rx.borrow_and_update() {
                self.waited.store(true, Ordering::SeqCst);
                return c;
            }
            if rx.changed().await.is_err() {
                let c = (*rx.borrow()).unwrap_or(LOST_STATUS);
                self.waited.store(true, Ordering::SeqCst);
                return c;
            }
        }
    }

    /// Waited for, and both output streams read to EOF: nothing left to give.
    pub fn finished(&self) -> bool {
        self.waited.load(Ordering::SeqCst)
            && self.stdout.eof_delivered()
            && self.stderr.eof_delivered()
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        if self.exit_code().is_some() {
            // Already reaped: the pid may belong to someone else now.
            return Ok(());
        }
        let mut signal = signal;
        // The init of a pid namespace ignores signals it has no handler for,
        // so SIGTERM would do nothing; Kata turns it into SIGKILL too.
        if self.pidns_init && signal == Signal::SIGTERM && !handles_signal(self.pid, signal) {
            signal = Signal::SIGKILL;
        }
        match nix::sys::signal::kill(Pid::from_raw(self.pid), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(os(format!("sending {signal} to pid {}", self.pid), e)),
        }
    }

    pub async fn write_stdin(&self, data: &[u8]) -> Result<usize> {
        let guard = self.stdin.lock().await;
        let w = guard.as_ref().ok_or_else(|| {
            precondition(format!("stdin of process {:?} is closed", self.exec_id))
        })?;
        let mut exit = self.exit.clone();
        tokio::select! {
            r = w.write_all(data) => r.map(|_| data.len()).map_err(|e| precondition(format!("writing to stdin of process {:?}: {e}", self.exec_id))),
            _ = exit.wait_for(|c| c.is_some()) => Err(precondition(format!("process {:?} has exited; its stdin is gone", self.exec_id))),
        }
    }

    pub async fn close_stdin(&self) {
        if let Some(w) = self.stdin.lock().await.take() {
            w.finish().await;
        }
    }

    pub async fn read_output(&self, stderr: bool, len: u32) -> Result<Vec<u8>> {
        if len == 0 {
            return Err(invalid("ReadStream len is 0; ask for at least one byte"));
        }
        let b = if stderr { &self.stderr } else { &self.stdout };
        Ok(b.read(len as usize).await)
    }

    pub fn resize(&self, rows: u32, cols: u32) -> Result<()> {
        let tty = self
            .tty
            .as_ref()
            .ok_or_else(|| precondition(format!("process {:?} has no terminal", self.exec_id)))?;
        if rows > u16::MAX as u32 || cols > u16::MAX as u32 {
            return Err(invalid(format!("window size {rows}x{cols} is too large")));
        }
        stdio::set_window_size(tty, rows as u16, cols as u16)
    }
}

/// Whether `pid` has a handler for `sig` (SigCgt in /proc/<pid>/status).
fn handles_signal(pid: i32, sig: Signal) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1u64 << (sig as i32 - 1)) != 0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Paused,
}

/// A container: its init process, its execs, its cgroup and storages.
pub struct Container {
    pub id: String,
    pub init: Arc<Process>,
    pub cgroup: Option<Cgroup>,
    /// Mount points of the storages this container holds a reference on.
    pub storages: Vec<PathBuf>,
    /// The resolved spec it was created from (execs reuse it).
    pub spec: oci::Spec,
    /// Host → guest PCI addresses of its passed-through devices, for the
    /// `PCIDEVICE_*` variables of exec'd processes.
    pub pci_map: crate::devices::PciMap,
    pub state: Mutex<State>,
    /// Until StartContainer: the channel to the waiting init.
    pub control: tokio::sync::Mutex<Option<UnixStream>>,
    pub execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Background tasks (OOM watch) stopped with the container.
    pub tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Container {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            t.abort();
        }
    }
}

impl Container {
    pub fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_state(&self, s: State) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// `""` or the init's exec id means the init process.
    pub fn process(&self, exec_id: &str) -> Option<Arc<Process>> {
        if exec_id.is_empty() || exec_id == self.init.exec_id || exec_id == self.id {
            return Some(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
    }

    /// Drops an exec once it has been waited for and read to EOF; the
    /// agent's pipe ends close with it.
    pub fn reap_exec_if_finished(&self, exec_id: &str) {
        let mut execs = self.execs.lock().unwrap_or_else(|p| p.into_inner());
        if execs.get(exec_id).is_some_and(|p| p.finished()) {
            execs.remove(exec_id);
        }
    }

    pub fn exec_count(&self) -> usize {
        self.execs.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
