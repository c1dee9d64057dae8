//! OCI runtime specs for the agent: read a bundle's `config.json` (or build
//! the default spec for `--rootfs`), then translate it into the protocol's
//! `oci.Spec` message.
//!
//! The protocol's messages mirror the OCI JSON with capitalised names
//! (`process.args` → `Process.Args`, `linux.uidMappings` →
//! `Linux.UIDMappings`), so the translation walks the JSON alongside the
//! message descriptor and matches keys to field names case-insensitively.
//! OCI keys the protocol has no field for are dropped and reported.

use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_protocol::oci;
use protobuf::reflect::{MessageDescriptor, RuntimeFieldType, RuntimeType};
use protobuf::MessageFull;
use serde_json::{Map, Value};

/// Loads `<bundle>/config.json`.
pub fn load_bundle(bundle: &Path) -> anyhow::Result<oci_spec::runtime::Spec> {
    let path = bundle.join("config.json");
    oci_spec::runtime::Spec::load(&path)
        .map_err(|e| anyhow::anyhow!("{}: not a valid OCI runtime spec: {e}", path.display()))
}

/// A container's spec and root filesystem for `kiln-shim run`: a bundle's
/// config.json and root, or the default spec running `command` in `rootfs`.
/// The command line's command, env and terminal override the spec's.
pub fn container_source(
    bundle: Option<&Path>,
    rootfs: Option<&Path>,
    command: &[String],
    env: &[String],
    terminal: bool,
) -> anyhow::Result<(oci_spec::runtime::Spec, PathBuf)> {
    let (mut spec, root) = match (bundle, rootfs) {
        (Some(b), None) => {
            let spec = load_bundle(b)?;
            let root = bundle_root(&spec, b);
            (spec, root)
        }
        (None, Some(r)) => {
            if command.is_empty() {
                anyhow::bail!("--rootfs needs a command after `--`, e.g. kiln-shim run --image M --rootfs DIR -- sh -c 'echo hi'");
            }
            (default_spec(command, env, terminal)?, r.to_path_buf())
        }
        _ => anyhow::bail!("give either --bundle DIR or --rootfs DIR"),
    };
    override_process(&mut spec, command, env, terminal)?;
    Ok((spec, root))
}

/// A bundle's root filesystem: `root.path`, relative to the bundle unless
/// absolute; `rootfs` when the spec names none.
pub fn bundle_root(spec: &oci_spec::runtime::Spec, bundle: &Path) -> PathBuf {
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| "rootfs".into());
    if root.is_absolute() {
        root
    } else {
        bundle.join(root)
    }
}

/// The spec `runc spec` would write, running `args` with `env` added.
pub fn default_spec(
    args: &[String],
    env: &[String],
    terminal: bool,
) -> anyhow::Result<oci_spec::runtime::Spec> {
    let mut spec = oci_spec::runtime::Spec::default();
    override_process(&mut spec, args, env, terminal)?;
    spec.set_hostname(Some("kiln".into()));
    Ok(spec)
}

/// Applies command-line overrides to a bundle's process: args (when given),
/// extra env, terminal.
pub fn override_process(
    spec: &mut oci_spec::runtime::Spec,
    args: &[String],
    env: &[String],
    terminal: bool,
) -> anyhow::Result<()> {
    let mut process = spec
        .process()
        .clone()
        .context("the spec has no `process`")?;
    if !args.is_empty() {
        process.set_args(Some(args.to_vec()));
    }
    if terminal {
        process.set_terminal(Some(true));
    }
    let mut all_env = process.env().clone().unwrap_or_default();
    for e in env {
        if !e.contains('=') {
            anyhow::bail!("-e {e}: give KEY=VALUE");
        }
        let key = e.split('=').next().unwrap_or(e);
        all_env.retain(|x| x.split('=').next() != Some(key));
        all_env.push(e.clone());
    }
    process.set_env(Some(all_env));
    spec.set_process(Some(process));
    Ok(())
}

/// Translates an OCI spec into the protocol message; returns the message and
/// the OCI keys that have no protocol field.
pub fn to_protocol(spec: &oci_spec::runtime::Spec) -> anyhow::Result<(oci::Spec, Vec<String>)> {
    let json = serde_json::to_value(spec)?;
    let mut dropped = Vec::new();
    let mapped = map_message(&json, &oci::Spec::descriptor(), "", &mut dropped);
    let text = serde_json::to_string(&mapped)?;
    let msg = protobuf_json_mapping::parse_from_str::<oci::Spec>(&text)
        .map_err(|e| anyhow::anyhow!("translating the OCI spec for the agent: {e}"))?;
    Ok((msg, dropped))
}

/// Rewrites a translated spec the way Kata's Go runtime does before
/// CreateContainer (kata_agent.go: `constrainGRPCSpec`, then
/// `handlePidNamespace`), so the agent receives what it would from Kata:
/// - hooks removed (they run on the host);
/// - the device, pids, block-IO and network cgroup resources removed, and the
///   CPU/memory-node pinning cleared (host numbers mean nothing in the guest);
/// - the network and time namespaces removed (the sandbox owns them), and
///   every other namespace's path cleared (host paths). The cgroup namespace
///   is kept, as runtime-rs does (the Go runtime drops it, and Kata's agent
///   unshares one anyway on cgroup v2), so a container sees its own cgroup
///   at /sys/fs/cgroup;
/// - the pid namespace removed: the agent gives every container its own,
///   and shares the sandbox's when CreateContainer says `sandbox_pidns`,
///   which Kata sets when the spec's pid namespace had a path (joining a
///   pod's shared pid namespace).
///
/// Returns that `sandbox_pidns`. Seccomp is kept, as Kata does with
/// `disable_guest_seccomp = false` (kiln's guests enforce it).
pub fn constrain_for_agent(p: &mut oci::Spec) -> bool {
    p.Hooks = protobuf::MessageField::none();
    let Some(linux) = p.Linux.as_mut() else {
        return false;
    };
    if let Some(res) = linux.Resources.as_mut() {
        res.Devices.clear();
        res.Pids = protobuf::MessageField::none();
        res.BlockIO = protobuf::MessageField::none();
        res.Network = protobuf::MessageField::none();
        if let Some(cpu) = res.CPU.as_mut() {
            cpu.Cpus.clear();
            cpu.Mems.clear();
        }
    }
    let mut sandbox_pidns = false;
    linux.Namespaces.retain_mut(|ns| match ns.Type.as_str() {
        "network" | "time" => false,
        "pid" => {
            sandbox_pidns |= !ns.Path.is_empty();
            false
        }
        _ => {
            ns.Path.clear();
            true
        }
    });
    sandbox_pidns
}

fn map_message(
    v: &Value,
    desc: &MessageDescriptor,
    path: &str,
    dropped: &mut Vec<String>,
) -> Value {
    let Value::Object(obj) = v else {
        return v.clone();
    };
    let mut out = Map::new();
    for (key, val) in obj {
        if val.is_null() {
            continue;
        }
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        let Some(field) = desc.fields().find(|f| f.name().eq_ignore_ascii_case(key)) else {
            dropped.push(here);
            continue;
        };
        let mapped = match field.runtime_field_type() {
            RuntimeFieldType::Singular(RuntimeType::Message(m)) => {
                map_message(val, &m, &here, dropped)
            }
            RuntimeFieldType::Repeated(RuntimeType::Message(m)) => match val {
                Value::Array(items) => Value::Array(
                    items
                        .iter()
                        .map(|i| map_message(i, &m, &here, dropped))
                        .collect(),
                ),
                other => other.clone(),
            },
            RuntimeFieldType::Map(_, RuntimeType::Message(m)) => match val {
                Value::Object(entries) => Value::Object(
                    entries
                        .iter()
                        .map(|(k, e)| (k.clone(), map_message(e, &m, &here, dropped)))
                        .collect(),
                ),
                other => other.clone(),
            },
            _ => val.clone(),
        };
        out.insert(field.json_name().to_string(), mapped);
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_root_is_relative_to_the_bundle_unless_absolute() {
        let b = Path::new("/bundles/c1");
        let mut spec = oci_spec::runtime::Spec::default();
        let mut root = oci_spec::runtime::Root::default();
        root.set_path("fs".into());
        spec.set_root(Some(root.clone()));
        assert_eq!(bundle_root(&spec, b), b.join("fs"));
        root.set_path("/srv/fs".into());
        spec.set_root(Some(root));
        assert_eq!(bundle_root(&spec, b), Path::new("/srv/fs"));
        spec.set_root(None);
        assert_eq!(bundle_root(&spec, b), b.join("rootfs"));
    }

    #[test]
    fn container_source_reads_a_bundle_and_applies_overrides() {
        let d = tempfile::tempdir().unwrap();
        let mut spec = default_spec(&["true".into()], &[], false).unwrap();
        let mut root = oci_spec::runtime::Root::default();
        root.set_path("fs".into());
        spec.set_root(Some(root));
        spec.save(d.path().join("config.json")).unwrap();
        let args = vec!["echo".to_string(), "hi".to_string()];
        let (spec, root) =
            container_source(Some(d.path()), None, &args, &["A=1".into()], true).unwrap();
        assert_eq!(root, d.path().join("fs"));
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &args);
        assert!(p.env().as_ref().unwrap().contains(&"A=1".to_string()));
        assert_eq!(p.terminal(), Some(true));
    }

    #[test]
    fn container_source_needs_one_source_and_a_command_for_rootfs() {
        let r = Path::new("/r");
        let err = container_source(None, None, &[], &[], false).unwrap_err();
        assert!(err.to_string().contains("--bundle"), "{err}");
        let err = container_source(None, Some(r), &[], &[], false).unwrap_err();
        assert!(err.to_string().contains("needs a command"), "{err}");
        let (spec, root) = container_source(None, Some(r), &["sh".into()], &[], false).unwrap();
        assert_eq!(root, r);
        assert_eq!(spec.hostname().as_deref(), Some("kiln"));
    }

    #[test]
    fn default_spec_translates_with_namespaces_caps_and_mounts() {
        let spec = default_spec(
            &["sh".into(), "-c".into(), "echo hi".into()],
            &["A=1".into()],
            false,
        )
        .unwrap();
        let (p, _dropped) = to_protocol(&spec).unwrap();
        assert_eq!(p.Process.Args, vec!["sh", "-c", "echo hi"]);
        assert!(p.Process.Env.iter().any(|e| e == "A=1"));
        assert!(p.Process.Env.iter().any(|e| e.starts_with("PATH=")));
        assert_eq!(p.Hostname, "kiln");
        let ns: Vec<_> = p.Linux.Namespaces.iter().map(|n| n.Type.as_str()).collect();
        for t in ["pid", "mount", "ipc", "uts"] {
            assert!(ns.contains(&t), "{t} in {ns:?}");
        }
        assert!(p
            .Process
            .Capabilities
            .Bounding
            .iter()
            .any(|c| c == "CAP_KILL"));
        assert!(p
            .Mounts
            .iter()
            .any(|m| m.destination == "/proc" && m.type_ == "proc"));
        assert!(p.Process.NoNewPrivileges);
    }

    #[test]
    fn constrained_like_katas_runtime() {
        let json = r#"{
          "ociVersion": "1.0.2",
          "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
          "root": {"path": "rootfs"},
          "hooks": {"prestart": [{"path": "/usr/bin/hook"}]},
          "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"},
                                   {"type": "ipc", "path": "/proc/7/ns/ipc"}, {"type": "uts"},
                                   {"type": "mount"}, {"type": "cgroup"}],
                    "resources": {"devices": [{"allow": false, "access": "rwm"}],
                                  "memory": {"limit": 67108864, "swap": 67108864},
                                  "pids": {"limit": 64},
                                  "blockIO": {"weight": 10},
                                  "cpu": {"quota": 50000, "period": 100000, "cpus": "0-3", "mems": "0"}},
                    "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}}
        }"#;
        let spec: oci_spec::runtime::Spec = serde_json::from_str(json).unwrap();
        let (mut p, _) = to_protocol(&spec).unwrap();
        assert!(p.Hooks.is_some());
        assert!(
            !constrain_for_agent(&mut p),
            "a pid ns without a path: not shared"
        );
        assert!(p.Hooks.is_none());
        let ns: Vec<_> = p
            .Linux
            .Namespaces
            .iter()
            .map(|n| (n.Type.as_str(), n.Path.as_str()))
            .collect();
        assert_eq!(
            ns,
            vec![("ipc", ""), ("uts", ""), ("mount", ""), ("cgroup", "")]
        );
        let res = &p.Linux.Resources;
        assert!(res.Devices.is_empty() && res.Pids.is_none() && res.BlockIO.is_none());
        assert_eq!(res.Memory.Limit, 64 << 20, "memory limits stay");
        assert_eq!(res.Memory.Swap, 64 << 20, "swap stays");
        assert_eq!(
            (res.CPU.Quota, res.CPU.Cpus.as_str(), res.CPU.Mems.as_str()),
            (50000, "", "")
        );
        assert!(
            p.Linux.Seccomp.is_some(),
            "seccomp passes (disable_guest_seccomp=false)"
        );

        // A pid namespace with a path (a pod sharing its pid ns) asks for the sandbox's.
        let json = r#"{"ociVersion": "1.0.2", "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
                       "linux": {"namespaces": [{"type": "pid", "path": "/proc/42/ns/pid"}]}}"#;
        let spec: oci_spec::runtime::Spec = serde_json::from_str(json).unwrap();
        let (mut p, _) = to_protocol(&spec).unwrap();
        assert!(constrain_for_agent(&mut p));
        assert!(p.Linux.Namespaces.is_empty());
    }

    #[test]
    fn bundle_fields_map_case_insensitively() {
        let json = r#"{
          "ociVersion": "1.0.2",
          "process": {"terminal": true, "user": {"uid": 1000, "gid": 1000, "additionalGids": [10]},
                      "args": ["top"], "cwd": "/work", "oomScoreAdj": 100,
                      "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}]},
          "root": {"path": "rootfs", "readonly": true},
          "hostname": "box",
          "linux": {"uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}],
                    "resources": {"memory": {"limit": 67108864}, "pids": {"limit": 64},
                                  "cpu": {"quota": 50000, "period": 100000}},
                    "devices": [{"path": "/dev/vfio/12", "type": "c", "major": 241, "minor": 0, "fileMode": 438}],
                    "someFutureKey": {"x": 1}}
        }"#;
        let spec: oci_spec::runtime::Spec = serde_json::from_str(json).unwrap();
        let (p, dropped) = to_protocol(&spec).unwrap();
        assert!(p.Process.Terminal);
        assert_eq!(p.Process.User.UID, 1000);
        assert_eq!(p.Process.User.AdditionalGids, vec![10]);
        assert_eq!(p.Process.OOMScoreAdj, 100);
        assert_eq!(p.Process.Rlimits[0].Type, "RLIMIT_NOFILE");
        assert_eq!(p.Process.Rlimits[0].Soft, 512);
        assert!(p.Root.Readonly);
        assert_eq!(p.Linux.UIDMappings[0].HostID, 1000);
        assert_eq!(p.Linux.Resources.Memory.Limit, 64 << 20);
        assert_eq!(p.Linux.Resources.Pids.Limit, 64);
        assert_eq!(p.Linux.Resources.CPU.Quota, 50000);
        assert_eq!(p.Linux.Devices[0].Path, "/dev/vfio/12");
        assert_eq!(p.Linux.Devices[0].Major, 241);
        // oci-spec drops keys it does not know when parsing; anything that
        // survives but has no protocol field is reported, not silently lost.
        let _ = dropped;
    }
}
