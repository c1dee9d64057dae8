//! Child reaping for an agent that may be PID 1.
//!
//! As init, every orphan in the guest becomes our child and must be reaped or
//! it stays a zombie forever. One task owns `waitpid(-1)`; code that spawns a
//! child registers its pid (while holding the reaper lock, so the exit cannot be
//! reaped before the registration) and gets the exit status through a channel.
//! Invariant: nothing else in the agent calls wait on a child (so no
//! `tokio::process`, whose own reaping would race with ours).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// Exit status in the shell convention: the code, or 128 + signal number.
pub type ExitCode = i32;

#[derive(Clone, Default)]
pub struct Reaper {
    inner: Arc<Mutex<HashMap<i32, oneshot::Sender<ExitCode>>>>,
}

impl Reaper {
    /// Locks the registry; hold the guard across spawn + `register`.
    pub fn lock(&self) -> ReaperGuard<'_> {
        ReaperGuard(self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Runs forever: reaps on every SIGCHLD and delivers statuses.
    pub async fn run(self) {
        let mut sigchld = match signal(SignalKind::child()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot watch SIGCHLD ({e}); zombies will not be reaped");
                return;
            }
        };
        loop {
            self.reap_all();
            sigchld.recv().await;
        }
    }

    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.deliver(pid.as_raw(), code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.deliver(pid.as_raw(), 128 + sig as i32)
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }

    fn deliver(&self, pid: i32, code: ExitCode) {
        match self.lock().0.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(code);
            }
            None => tracing::debug!(pid, code, "reaped an orphan"),
        }
    }
}

pub struct ReaperGuard<'a>(MutexGuard<'a, HashMap<i32, oneshot::Sender<ExitCode>>>);

impl ReaperGuard<'_> {
    /// Registers a freshly spawned child; its status arrives on the receiver.
    pub fn register(&mut self, pid: i32) -> oneshot::Receiver<ExitCode> {
        let (tx, rx) = oneshot::channel();
        self.0.insert(pid, tx);
        rx
    }

    /// Forgets a pid whose process is known to be gone (or never started).
    pub fn unregister(&mut self, pid: i32) {
        self.0.remove(&pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    #[allow(clippy::zombie_processes)] // the reaper under test waits for them
    async fn delivers_exit_codes_and_signals() {
        let reaper = Reaper::default();
        tokio::spawn(reaper.clone().run());
        let (rx_exit, rx_sig) = {
            let mut g = reaper.lock();
            let a = std::process::Command::new("sh")
                .args(["-c", "exit 7"])
                .spawn()
                .unwrap();
            let rx_exit = g.register(a.id() as i32);
            let b = std::process::Command::new("sh")
                .args(["-c", "kill -TERM $$"])
                .spawn()
                .unwrap();
            let rx_sig = g.register(b.id() as i32);
            (rx_exit, rx_sig)
        };
        let t = std::time::Duration::from_secs(20);
        assert_eq!(tokio::time::timeout(t, rx_exit).await.unwrap().unwrap(), 7);
        assert_eq!(
            tokio::time::timeout(t, rx_sig).await.unwrap().unwrap(),
            128 + 15
        );
    }
}
