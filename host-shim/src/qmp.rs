//! QMP, QEMU's control protocol, through the `qapi` crate's typed commands.
//! Synchronous on purpose: each call is a short request/response on a unix
//! socket; async callers wrap it in `spawn_blocking`.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use qapi::{qmp, Qmp};
use serde::{Deserialize, Serialize};

type Stream = qapi::Stream<BufReader<UnixStream>, UnixStream>;

pub struct QmpClient {
    qmp: Qmp<Stream>,
}

/// `blockdev-add` with free-form arguments: the typed `BlockdevOptions` enum
/// covers every driver, but a raw file node is all kiln needs.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BlockdevAdd(pub serde_json::Map<String, serde_json::Value>);

impl qapi::qmp::QmpCommand for BlockdevAdd {}
impl qapi_spec::Command for BlockdevAdd {
    const NAME: &'static str = "blockdev-add";
    const ALLOW_OOB: bool = false;
    type Ok = qapi_spec::Empty;
}

/// `object-add` with free-form arguments (kiln adds memory backends only).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ObjectAdd(pub serde_json::Map<String, serde_json::Value>);

impl qapi::qmp::QmpCommand for ObjectAdd {}
impl qapi_spec::Command for ObjectAdd {
    const NAME: &'static str = "object-add";
    const ALLOW_OOB: bool = false;
    type Ok = qapi_spec::Empty;
}

/// `query-hotpluggable-cpus`, read as plain JSON: the CPU type and the
/// topology properties differ per arch, and kiln passes them back verbatim.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct QueryHotpluggableCpus {}

impl qapi::qmp::QmpCommand for QueryHotpluggableCpus {}
impl qapi_spec::Command for QueryHotpluggableCpus {
    const NAME: &'static str = "query-hotpluggable-cpus";
    const ALLOW_OOB: bool = false;
    type Ok = Vec<serde_json::Value>;
}

/// A vCPU slot QEMU offers for hot-plug: the `device_add` driver and the
/// topology properties (socket-id, core-id, thread-id, ...) that place it.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuSlot {
    pub driver: String,
    pub props: Vec<(String, serde_json::Value)>,
}

/// The first slot of a `query-hotpluggable-cpus` answer that holds no CPU
/// yet (an occupied slot has a `qom-path`). None: every slot is taken.
pub fn free_cpu_slot(answer: &[serde_json::Value]) -> anyhow::Result<Option<CpuSlot>> {
    // QEMU lists slots highest first; plug the lowest free one, as Kata does.
    for entry in answer.iter().rev() {
        if entry.get("qom-path").is_some() {
            continue;
        }
        let driver = entry
            .get("type")
            .and_then(|t| t.as_str())
            .with_context(|| format!("query-hotpluggable-cpus entry without a type: {entry}"))?;
        let props = entry
            .get("props")
            .and_then(|p| p.as_object())
            .with_context(|| format!("query-hotpluggable-cpus entry without props: {entry}"))?;
        return Ok(Some(CpuSlot {
            driver: driver.to_string(),
            props: props.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }));
    }
    Ok(None)
}

/// The `object-add` arguments of a shared memfd backend for a DIMM:
/// vhost-user backends (vsock, virtio-fs) map all guest RAM, so hot-added
/// memory must be shareable like the boot memory.
pub fn memfd_backend(id: &str, size_mib: u64) -> serde_json::Map<String, serde_json::Value> {
    let serde_json::Value::Object(map) = serde_json::json!({
        "qom-type": "memory-backend-memfd",
        "id": id,
        "size": size_mib << 20,
        "share": true,
    }) else {
        unreachable!("json! object")
    };
    map
}

impl QmpClient {
    /// Connects (retrying until `timeout`, QEMU creates the socket shortly
    /// after start) and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<QmpClient> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("connecting to QMP at {}", path.display()))
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let reader = BufReader::new(stream.try_clone().context("cloning the QMP socket")?);
        let mut qmp = Qmp::new(qapi::Stream::new(reader, stream));
        qmp.handshake()
            .map_err(|e| anyhow::anyhow!("QMP handshake failed: {e}"))?;
        Ok(QmpClient { qmp })
    }

    fn exec<C: qapi::qmp::QmpCommand + qapi_spec::Command>(
        &mut self,
        cmd: &C,
    ) -> anyhow::Result<C::Ok> {
        self.qmp
            .execute(cmd)
            .map_err(|e| anyhow::anyhow!("QMP {} failed: {e}", C::NAME))
    }

    /// The VM's run state, e.g. "running".
    pub fn status(&mut self) -> anyhow::Result<String> {
        let info = self.exec(&qmp::query_status {})?;
        Ok(serde_json::to_value(info.status)?
            .as_str()
            .unwrap_or("unknown")
            .to_string())
    }

    pub fn query_iothreads(&mut self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .exec(&qmp::query_iothreads {})?
            .into_iter()
            .map(|t| t.id)
            .collect())
    }

    pub fn qom_get(&mut self, path: &str, property: &str) -> anyhow::Result<serde_json::Value> {
        let v = self.exec(&qmp::qom_get {
            path: path.into(),
            property: property.into(),
        })?;
        Ok(serde_json::to_value(v)?)
    }

    pub fn device_add(
        &mut self,
        driver: &str,
        id: &str,
        bus: Option<&str>,
        props: &[(&str, serde_json::Value)],
    ) -> anyhow::Result<()> {
        let mut arguments = qapi_spec::Dictionary::new();
        for (k, v) in props {
            arguments.insert(k.to_string(), v.clone());
        }
        self.exec(&qmp::device_add {
            driver: driver.into(),
            id: Some(id.into()),
            bus: bus.map(str::to_string),
            arguments,
        })?;
        Ok(())
    }

    pub fn device_del(&mut self, id: &str) -> anyhow::Result<()> {
        self.exec(&qmp::device_del { id: id.into() })?;
        Ok(())
    }

    /// Adds a raw-format block node reading `file`.
    pub fn blockdev_add_raw_file(
        &mut self,
        node: &str,
        file: &Path,
        read_only: bool,
    ) -> anyhow::Result<()> {
        let args = serde_json::json!({
            "driver": "raw",
            "node-name": node,
            "read-only": read_only,
            "file": { "driver": "file", "filename": file.display().to_string(), "read-only": read_only }
        });
        let serde_json::Value::Object(map) = args else {
            unreachable!("json! object")
        };
        self.exec(&BlockdevAdd(map))?;
        Ok(())
    }

    /// Hot-plugs one vCPU into the lowest free slot, as `id`; returns the
    /// slot. The guest still has to online it (the agent's OnlineCPUMem).
    pub fn hotplug_vcpu(&mut self, id: &str) -> anyhow::Result<CpuSlot> {
        let slots = self.exec(&QueryHotpluggableCpus {})?;
        let slot = free_cpu_slot(&slots)?.with_context(|| {
            format!(
                "no free vCPU slot ({} slots, all taken): raise hypervisor.qemu.default_maxvcpus",
                slots.len()
            )
        })?;
        let props: Vec<(&str, serde_json::Value)> = slot
            .props
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        self.device_add(&slot.driver, id, None, &props)?;
        Ok(slot)
    }

    /// Hot-plugs `size_mib` of RAM as DIMM `id` (backend `<id>-mem`, a shared
    /// memfd). The guest onlines its memory blocks (OnlineCPUMem).
    pub fn hotplug_memory(&mut self, id: &str, size_mib: u64) -> anyhow::Result<()> {
        let backend = format!("{id}-mem");
        self.exec(&ObjectAdd(memfd_backend(&backend, size_mib)))?;
        self.device_add("pc-dimm", id, None, &[("memdev", backend.as_str().into())])
    }

    /// Asks QEMU to exit. The connection closing before the answer is fine.
    pub fn quit(&mut self) {
        let _ = self.exec(&qmp::quit {});
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_cpu_slot_is_the_lowest_empty_one() {
        // What QEMU 7.2 answers for q35 `-smp 1,maxcpus=3`.
        let answer: Vec<serde_json::Value> = serde_json::from_str(
            r#"[
              {"props": {"core-id": 0, "thread-id": 0, "socket-id": 2}, "vcpus-count": 1, "type": "max-x86_64-cpu"},
              {"props": {"core-id": 0, "thread-id": 0, "socket-id": 1}, "vcpus-count": 1, "type": "max-x86_64-cpu"},
              {"props": {"core-id": 0, "thread-id": 0, "socket-id": 0}, "vcpus-count": 1,
               "qom-path": "/machine/unattached/device[0]", "type": "max-x86_64-cpu"}
            ]"#,
        )
        .unwrap();
        let slot = free_cpu_slot(&answer).unwrap().unwrap();
        assert_eq!(slot.driver, "max-x86_64-cpu");
        let socket = slot.props.iter().find(|(k, _)| k == "socket-id").unwrap();
        assert_eq!(socket.1, 1);
        assert_eq!(slot.props.len(), 3);
        assert_eq!(free_cpu_slot(&answer[2..]).unwrap(), None, "all taken");
        let bad: Vec<serde_json::Value> = serde_json::from_str(r#"[{"props": {}}]"#).unwrap();
        assert!(free_cpu_slot(&bad).is_err());
    }

    #[test]
    fn dimm_backend_is_a_shared_memfd() {
        let m = memfd_backend("dimm0-mem", 256);
        assert_eq!(m["qom-type"], "memory-backend-memfd");
        assert_eq!(m["id"], "dimm0-mem");
        assert_eq!(m["size"], 256u64 << 20);
        assert_eq!(m["share"], true);
    }
}
