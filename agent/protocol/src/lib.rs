//! The Kata Containers agent protocol as kiln speaks it: `grpc.Health` and
//! `grpc.AgentService` over ttrpc, generated at build time from `protos/`,
//! plus kiln's own read-only `kiln.Diagnostics` (`protos/kiln.proto`).
//!
//! Package, service, method names and field numbers are Kata's, so Kata's own
//! runtimes and tools can drive kiln-agent and kiln-shim can drive a Kata agent.
//! Note: `oci::Box` is the OCI console-size message; name it in full.

#[allow(clippy::all, unused_imports, unused_qualifications, missing_docs)]
mod protocols {
    include!(concat!(env!("OUT_DIR"), "/protocols.rs"));
}

pub use protocols::*;

/// Kata's serde shape for an enum field: its number.
#[cfg(feature = "serde")]
fn serde_enum<E: protobuf::Enum, S: serde::Serializer>(
    e: &protobuf::EnumOrUnknown<E>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_i32(e.value())
}

/// Kata's serde shape for a message field: the message, or `null` when unset.
#[cfg(feature = "serde")]
fn serde_message_field<M: serde::Serialize, S: serde::Serializer>(
    m: &protobuf::MessageField<M>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match m.as_ref() {
        Some(m) => m.serialize(s),
        None => s.serialize_unit(),
    }
}

/// ttrpc method paths, for tests and tools that speak the wire protocol by hand.
pub mod paths {
    pub const HEALTH_SERVICE: &str = "grpc.Health";
    pub const AGENT_SERVICE: &str = "grpc.AgentService";
}

#[cfg(test)]
mod tests {
    use protobuf::{Message, MessageFull};

    use super::*;

    #[test]
    fn descriptors_match_kata_names() {
        let fd = agent::file_descriptor();
        assert_eq!(fd.package(), "grpc");
        let svc = fd
            .proto()
            .service
            .iter()
            .find(|s| s.name() == "AgentService")
            .expect("AgentService");
        let names: Vec<_> = svc.method.iter().map(|m| m.name().to_string()).collect();
        for m in [
            "CreateContainer",
            "ExecProcess",
            "GetGuestDetails",
            "ReadStdout",
            "CopyFile",
            "OnlineCPUMem",
        ] {
            assert!(names.iter().any(|n| n == m), "{m} missing");
        }
        let hsvc = health::file_descriptor()
            .proto()
            .service
            .iter()
            .find(|s| s.name() == "Health")
            .cloned()
            .unwrap();
        let hn: Vec<_> = hsvc.method.iter().map(|m| m.name().to_string()).collect();
        assert_eq!(hn, vec!["Check", "Version"]);
    }

    #[test]
    fn kiln_services_live_in_their_own_package() {
        let fd = kiln::file_descriptor();
        assert_eq!(fd.package(), "kiln", "never inside Kata's `grpc` package");
        let svc = fd
            .proto()
            .service
            .iter()
            .find(|s| s.name() == "Diagnostics")
            .expect("Diagnostics");
        let names: Vec<_> = svc.method.iter().map(|m| m.name().to_string()).collect();
        assert_eq!(names, ["GuestFacts"]);
    }

    #[test]
    fn field_numbers_are_katas() {
        // A few fields whose numbers Kata's runtime depends on.
        let d = agent::GuestDetailsResponse::descriptor();
        assert_eq!(d.field_by_name("mem_block_size_bytes").unwrap().number(), 1);
        assert_eq!(d.field_by_name("agent_details").unwrap().number(), 2);
        assert_eq!(
            d.field_by_name("support_mem_hotplug_probe")
                .unwrap()
                .number(),
            3
        );
        let c = agent::CreateContainerRequest::descriptor();
        assert_eq!(c.field_by_name("OCI").unwrap().number(), 6);
        assert_eq!(c.field_by_name("storages").unwrap().number(), 5);
        let r = agent::ReseedRandomDevRequest::descriptor();
        assert_eq!(r.field_by_name("data").unwrap().number(), 2);
    }

    #[test]
    fn wire_round_trip() {
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = "c1".into();
        let mut spec = oci::Spec::new();
        spec.Hostname = "h".into();
        req.OCI = protobuf::MessageField::some(spec);
        let bytes = req.write_to_bytes().unwrap();
        let back = agent::CreateContainerRequest::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back, req);
    }
}
