//! User-facing progress: one line per stage, a spinner with elapsed time for
//! long steps. When stderr is not a terminal (CI), plain lines are printed instead.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Ui {
    multi: MultiProgress,
    interactive: bool,
    outcomes: Outcomes,
    timings: Option<std::path::PathBuf>,
}

/// What each finished stage did, in order: (stage name, whether it ran).
/// Lets `cargo xtask test` prove that an unchanged tree re-runs nothing.
type Outcomes = Arc<Mutex<Vec<(String, bool)>>>;

impl Default for Ui {
    fn default() -> Ui {
        Ui::new()
    }
}

impl Ui {
    pub fn new() -> Ui {
        let interactive = std::io::stderr().is_terminal();
        let target = if interactive {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Ui {
            multi: MultiProgress::with_draw_target(target),
            interactive,
            outcomes: Outcomes::default(),
            timings: None,
        }
    }

    /// Records how long each stage that ran took, in `path` (JSON: stage →
    /// seconds), so `cargo xtask bench` can report real cold build times.
    pub fn with_timings(mut self, path: std::path::PathBuf) -> Ui {
        self.timings = Some(path);
        self
    }

    /// Starts a stage line such as `kernel x86_64`.
    pub fn stage(&self, name: &str) -> Step {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner:.cyan} {prefix:<18} {elapsed:>4} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(name.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        if !self.interactive {
            eprintln!("[kiln] {name}: started");
        }
        Step {
            bar,
            name: name.to_string(),
            start: Instant::now(),
            interactive: self.interactive,
            done: false,
            outcomes: self.outcomes.clone(),
            timings: self.timings.clone(),
        }
    }

    /// Stages finished so far and whether each ran (false: up to date).
    pub fn take_outcomes(&self) -> Vec<(String, bool)> {
        std::mem::take(&mut *self.outcomes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn println(&self, line: &str) {
        if self.interactive {
            let _ = self.multi.println(line);
        } else {
            eprintln!("{line}");
        }
    }
}

pub struct Step {
    bar: ProgressBar,
    name: String,
    start: Instant,
    interactive: bool,
    done: bool,
    outcomes: Outcomes,
    timings: Option<std::path::PathBuf>,
}

impl Step {
    pub fn message(&self, msg: &str) {
        self.bar.set_message(msg.to_string());
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// The stage did its work.
    pub fn done(mut self, detail: &str) {
        self.record(true);
        self.finish("✓", detail);
    }

    /// The stage's inputs were unchanged; nothing ran.
    pub fn cached(mut self, detail: &str) {
        self.record(false);
        self.finish("=", &format!("up to date {detail}"));
    }

    fn record(&self, ran: bool) {
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((self.name.clone(), ran));
        if let (true, Some(path)) = (ran, &self.timings) {
            let mut map: std::collections::BTreeMap<String, f64> = std::fs::read(path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let secs = (self.start.elapsed().as_secs_f64() * 10.0).round() / 10.0;
            map.insert(self.name.clone(), secs);
            if let Ok(text) = serde_json::to_vec_pretty(&map) {
                let _ = crate::cache::write_atomic(path, &text);
            }
        }
    }

    fn finish(&mut self, mark: &str, detail: &str) {
        self.done = true;
        let secs = self.start.elapsed().as_secs_f64();
        let line = format!("{mark} {:<18} {secs:>6.1}s {detail}", self.name);
        if self.interactive {
            self.bar.set_style(
                ProgressStyle::with_template("{msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            self.bar.finish_with_message(line);
        } else {
            self.bar.finish_and_clear();
            eprintln!("[kiln] {line}");
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if !self.done {
            self.finish("✗", "failed");
        }
    }
}
