//! OCI runtime specs for the agent: read a bundle's `config.json` (or build
//! the default spec for `--rootfs`), then translate it into the protocol's
//! `oci.Spec` message.
//!
//! The protocol's messages mirror the OCI JSON with capitalised names
//! (`process.args` → `Process.Args`, `linux.uidMappings` →
//! `Linux.UIDMappings`), so the translation walks the JSON alongside the
//! message descriptor and matches keys to field names case-insensitively.
//! OCI keys the protocol has no field for are dropped and reported.

use std::path::Path;

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
