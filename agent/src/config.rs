//! Agent settings from the kernel command line (`agent.*` parameters).
//!
//! Parsing never fails: unknown keys and bad values become warnings, and the
//! setting keeps its default, because an agent that refuses to start over a
//! typo in the command line leaves a VM nobody can talk to.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// tracing level filter: error, warn, info, debug, trace.
    pub log_level: String,
    /// ttrpc listen address, e.g. `vsock://-1:1024`.
    pub server_addr: String,
    /// How long to wait for a hot-plugged device to appear.
    pub hotplug_timeout: Duration,
    /// Size of container stdio pipes in bytes (0 keeps the kernel default).
    pub container_pipe_size: u32,
    /// Offer a shell on `debug_console_vport`.
    pub debug_console: bool,
    pub debug_console_vport: u32,
    /// Developer mode: more permissive, more verbose.
    pub devmode: bool,
    /// Kata's agent policy to start with (`agent.policy_file`); without it
    /// the agent uses `/etc/kata-opa/default-policy.rego` if the image has one.
    pub policy_file: Option<std::path::PathBuf>,
    /// Filesystem types (`mqueue`, `hugetlbfs`, ...) a container mount may
    /// ask for although the guest kernel lacks them: such a mount is skipped
    /// instead of failing the container. Set by an image whose kernel
    /// deliberately leaves a feature out.
    pub tolerate_missing_fs: Vec<String>,
    /// Bytes of a process's stdout or stderr the agent holds for the host
    /// to read (`agent.output_buffer_size`); when full, the process blocks
    /// on its write, as it would on a full pipe. Never more memory than this.
    pub output_buffer_size: usize,
    /// Size of the guest's `/run` tmpfs when the agent is PID 1
    /// (`agent.run_size`, tmpfs syntax: `64m`, `25%`). CopyFile data and
    /// the sandbox's files live there, so this bounds them in total.
    pub run_size: String,
}

/// Default of `agent.output_buffer_size`: 8 MiB per stream.
pub const OUTPUT_BUFFER_SIZE: usize = 8 << 20;
/// Default of `agent.run_size`: the kernel's own tmpfs default, made explicit.
pub const RUN_SIZE: &str = "50%";

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            log_level: "info".into(),
            server_addr: "vsock://-1:1024".into(),
            hotplug_timeout: Duration::from_secs(3),
            container_pipe_size: 0,
            debug_console: false,
            debug_console_vport: 1026,
            devmode: false,
            policy_file: None,
            tolerate_missing_fs: Vec::new(),
            output_buffer_size: OUTPUT_BUFFER_SIZE,
            run_size: RUN_SIZE.into(),
        }
    }
}

const LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];

impl AgentConfig {
    /// Parses a kernel command line; returns the config and the warnings to log
    /// once logging is up.
    pub fn from_cmdline(cmdline: &str) -> (AgentConfig, Vec<String>) {
        let mut cfg = AgentConfig::default();
        let mut warnings = Vec::new();
        for word in cmdline.split_whitespace() {
            let Some(rest) = word.strip_prefix("agent.") else {
                continue;
            };
            let (key, value) = match rest.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (rest, None),
            };
            let mut bad = |what: &str| {
                warnings.push(format!(
                    "ignoring agent.{key}={}: {what}",
                    value.unwrap_or("")
                ));
            };
            match (key, value) {
                ("log", Some(v)) => {
                    let v = v.to_ascii_lowercase();
                    if LEVELS.contains(&v.as_str()) {
                        cfg.log_level = v;
                    } else {
                        bad("not one of error, warn, info, debug, trace");
                    }
                }
                ("server_addr", Some(v)) => {
                    if valid_server_addr(v) {
                        cfg.server_addr = v.to_string();
                    } else {
                        bad("expected vsock://CID:PORT or unix://PATH");
                    }
                }
                ("hotplug_timeout", Some(v)) => match v.trim_end_matches('s').parse::<u64>() {
                    Ok(s) if s > 0 && s <= 3600 => cfg.hotplug_timeout = Duration::from_secs(s),
                    _ => bad("expected whole seconds between 1 and 3600"),
                },
                ("output_buffer_size", Some(v)) => match v.parse::<usize>() {
                    Ok(n) if (4096..=1 << 30).contains(&n) => cfg.output_buffer_size = n,
                    _ => bad("expected a byte count from 4096 to 1073741824"),
                },
                ("run_size", Some(v)) => {
                    if valid_tmpfs_size(v) {
                        cfg.run_size = v.to_string();
                    } else {
                        bad("expected a tmpfs size such as 64m, 1g or 25% (1 to 100)");
                    }
                }
                ("container_pipe_size", Some(v)) => match v.parse::<u32>() {
                    Ok(n) => cfg.container_pipe_size = n,
                    Err(_) => bad("expected a byte count"),
                },
                ("debug_console", None) => cfg.debug_console = true,
                ("debug_console", Some(v)) => match parse_bool(v) {
                    Some(b) => cfg.debug_console = b,
                    None => bad("expected a boolean"),
                },
                ("debug_console_vport", Some(v)) => match v.parse::<u32>() {
                    Ok(p) if p > 0 => cfg.debug_console_vport = p,
                    _ => bad("expected a vsock port number"),
                },
                ("devmode", None) => cfg.devmode = true,
                ("devmode", Some(v)) => match parse_bool(v) {
                    Some(b) => cfg.devmode = b,
                    None => bad("expected a boolean"),
                },
                ("policy_file", Some(v)) if v.starts_with('/') => {
                    cfg.policy_file = Some(v.into());
                }
                ("policy_file", _) => bad("expected an absolute path"),
                ("tolerate_missing_fs", Some(v)) => {
                    let names: Vec<&str> = v.split(',').filter(|n| !n.is_empty()).collect();
                    if names.iter().all(|n| valid_fs_name(n)) {
                        cfg.tolerate_missing_fs = names.into_iter().map(String::from).collect();
                    } else {
                        bad("expected filesystem type names separated by commas");
                    }
                }
                _ => warnings.push(format!("unknown kernel parameter agent.{rest} (ignored)")),
            }
        }
        (cfg, warnings)
    }
}

impl AgentConfig {
    /// The command line of the running kernel, parsed (warnings dropped: the
    /// agent proper logs them at start-up). For the container helper, which
    /// does not inherit the agent's config.
    pub fn of_running_kernel() -> AgentConfig {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        AgentConfig::from_cmdline(&cmdline).0
    }
}

/// A filesystem type as /proc/filesystems lists it.
fn valid_fs_name(n: &str) -> bool {
    n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "true" | "on" | "yes" => Some(true),
        "0" | "false" | "off" | "no" => Some(false),
        _ => None,
    }
}

fn valid_server_addr(v: &str) -> bool {
    if let Some(rest) = v.strip_prefix("vsock://") {
        return match rest.split_once(':') {
            Some((cid, port)) => {
                (cid == "-1" || cid.parse::<u32>().is_ok()) && port.parse::<u32>().is_ok()
            }
            None => false,
        };
    }
    v.strip_prefix("unix://")
        .is_some_and(|p| p.starts_with('/') || p.starts_with('@'))
}

/// tmpfs's `size=`: a byte count with an optional k/m/g suffix, or a
/// percentage of RAM from 1 to 100.
fn valid_tmpfs_size(v: &str) -> bool {
    if let Some(p) = v.strip_suffix('%') {
        return matches!(p.parse::<u8>(), Ok(1..=100));
    }
    let digits = v.trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G']);
    v.len() - digits.len() <= 1
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.trim_start_matches('0').is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn defaults_without_agent_params() {
        let (cfg, warns) = AgentConfig::from_cmdline("console=ttyS0 quiet");
        assert_eq!(cfg, AgentConfig::default());
        assert!(warns.is_empty());
    }

    #[test]
    fn parses_known_params() {
        let (cfg, warns) = AgentConfig::from_cmdline(
            "agent.log=DEBUG agent.server_addr=vsock://-1:2048 agent.hotplug_timeout=10 agent.container_pipe_size=65536 agent.debug_console agent.debug_console_vport=1030 agent.devmode=1 agent.policy_file=/etc/p.rego",
        );
        assert!(warns.is_empty(), "{warns:?}");
        assert_eq!(cfg.log_level, "debug");
        assert_eq!(cfg.server_addr, "vsock://-1:2048");
        assert_eq!(cfg.hotplug_timeout, Duration::from_secs(10));
        assert_eq!(cfg.container_pipe_size, 65536);
        assert!(cfg.debug_console && cfg.devmode);
        assert_eq!(cfg.debug_console_vport, 1030);
        assert_eq!(cfg.policy_file.as_deref(), Some(Path::new("/etc/p.rego")));
    }

    #[test]
    fn bad_values_fall_back_with_a_warning() {
        let (cfg, warns) = AgentConfig::from_cmdline(
            "agent.log=loud agent.server_addr=tcp://x agent.hotplug_timeout=-3 agent.frobnicate=1 agent.container_pipe_size=big",
        );
        assert_eq!(cfg, AgentConfig::default());
        assert_eq!(warns.len(), 5, "{warns:?}");
        assert!(warns.iter().any(|w| w.contains("agent.frobnicate")));
        assert!(warns.iter().any(|w| w.contains("agent.log=loud")));
    }

    #[test]
    fn tolerate_missing_fs_lists_filesystem_types() {
        let (cfg, warns) =
            AgentConfig::from_cmdline("agent.tolerate_missing_fs=mqueue,hugetlbfs quiet");
        assert!(warns.is_empty(), "{warns:?}");
        assert_eq!(cfg.tolerate_missing_fs, ["mqueue", "hugetlbfs"]);
        let (cfg, warns) = AgentConfig::from_cmdline("agent.tolerate_missing_fs=mq/ueue");
        assert!(cfg.tolerate_missing_fs.is_empty());
        assert_eq!(warns.len(), 1, "{warns:?}");
    }

    #[test]
    fn resource_bounds_are_configurable_and_checked() {
        let (cfg, warns) =
            AgentConfig::from_cmdline("agent.output_buffer_size=65536 agent.run_size=64m");
        assert!(warns.is_empty(), "{warns:?}");
        assert_eq!(
            (cfg.output_buffer_size, cfg.run_size.as_str()),
            (65536, "64m")
        );
        for ok in ["25%", "100%", "1g", "4096", "512K"] {
            assert!(valid_tmpfs_size(ok), "{ok}");
        }
        for bad in [
            "0%",
            "101%",
            "",
            "m",
            "0",
            "64mb",
            "-1",
            "1,nr_inodes=9",
            "12%%",
        ] {
            assert!(!valid_tmpfs_size(bad), "{bad}");
        }
        // A size that would be no bound at all, or one that would starve the
        // process, is refused with a warning and the default kept.
        let (cfg, warns) = AgentConfig::from_cmdline(
            "agent.output_buffer_size=0 agent.output_buffer_size=99999999999 agent.run_size=1,mode=777",
        );
        assert_eq!(warns.len(), 3, "{warns:?}");
        assert_eq!(cfg.output_buffer_size, OUTPUT_BUFFER_SIZE);
        assert_eq!(cfg.run_size, RUN_SIZE);
    }
}
