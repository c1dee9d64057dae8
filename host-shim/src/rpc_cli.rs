//! `kiln-shim agent <RPC> [JSON]`: call any method of `grpc.AgentService`,
//! `grpc.Health` or `kiln.Diagnostics` by name, with the request given as protobuf JSON and the answer
//! printed as JSON. Works from the protocol's descriptors, so every RPC the
//! protocol crate knows is reachable without code per method.

use protobuf::reflect::{MessageDescriptor, MethodDescriptor};

/// A method found by name, with the service it belongs to.
pub struct ResolvedMethod {
    pub service: String,
    pub method: MethodDescriptor,
}

/// Finds `name` (e.g. `GetGuestDetails`, `check`) in AgentService or Health.
pub fn resolve(name: &str) -> anyhow::Result<ResolvedMethod> {
    let files = [
        kiln_protocol::health::file_descriptor(),
        kiln_protocol::agent::file_descriptor(),
        kiln_protocol::kiln::file_descriptor(),
    ];
    let mut all = Vec::new();
    for fd in files {
        for svc in fd.services() {
            for m in svc.methods() {
                let full_service = format!("{}.{}", fd.package(), svc.proto().name());
                if m.proto().name().eq_ignore_ascii_case(name) {
                    return Ok(ResolvedMethod {
                        service: full_service,
                        method: m,
                    });
                }
                all.push(m.proto().name().to_string());
            }
        }
    }
    all.sort();
    anyhow::bail!("no RPC named `{name}`; known RPCs: {}", all.join(", "))
}

impl ResolvedMethod {
    pub fn input(&self) -> MessageDescriptor {
        self.method.input_type()
    }

    pub fn output(&self) -> MessageDescriptor {
        self.method.output_type()
    }

    /// Encodes the JSON request (empty string = default message).
    pub fn encode_request(&self, json: &str) -> anyhow::Result<Vec<u8>> {
        let json = if json.trim().is_empty() { "{}" } else { json };
        let msg = protobuf_json_mapping::parse_dyn_from_str(&self.input(), json).map_err(|e| {
            anyhow::anyhow!(
                "request is not a valid {} in JSON: {e}",
                self.input().full_name()
            )
        })?;
        Ok(msg.write_to_bytes_dyn()?)
    }

    pub fn decode_response(&self, bytes: &[u8]) -> anyhow::Result<String> {
        let msg = self.output().parse_from_bytes(bytes)?;
        Ok(protobuf_json_mapping::print_to_string(&*msg)?)
    }

    /// Sends the request over `client` and returns the answer as JSON.
    pub async fn call(
        &self,
        client: &ttrpc::r#async::Client,
        json: &str,
        timeout: std::time::Duration,
    ) -> anyhow::Result<String> {
        let mut req = ttrpc::Request::new();
        req.service = self.service.clone();
        req.method = self.method.proto().name().to_string();
        req.payload = self.encode_request(json)?;
        req.timeout_nano = timeout.as_nanos() as i64;
        match client.request(req).await {
            Ok(resp) => self.decode_response(&resp.payload),
            Err(ttrpc::Error::RpcStatus(s)) => {
                anyhow::bail!(
                    "{}/{} answered {:?}: {}",
                    self.service,
                    self.method.proto().name(),
                    s.code(),
                    s.message()
                )
            }
            Err(e) => Err(anyhow::anyhow!(
                "{}/{}: {e}",
                self.service,
                self.method.proto().name()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_any_case_and_lists_on_miss() {
        let m = resolve("getguestdetails").unwrap();
        assert_eq!(m.service, "grpc.AgentService");
        assert_eq!(m.input().name(), "GuestDetailsRequest");
        let h = resolve("Check").unwrap();
        assert_eq!(h.service, "grpc.Health");
        let err = resolve("Frobnicate")
            .err()
            .expect("no such rpc")
            .to_string();
        assert!(
            err.contains("CreateContainer") && err.contains("Frobnicate"),
            "{err}"
        );
    }

    #[test]
    fn json_round_trip_through_wire_bytes() {
        use protobuf::Message;
        let m = resolve("GetGuestDetails").unwrap();
        let bytes = m.encode_request(r#"{"memBlockSize": true}"#).unwrap();
        let req = kiln_protocol::agent::GuestDetailsRequest::parse_from_bytes(&bytes).unwrap();
        assert!(req.mem_block_size);
        let mut resp = kiln_protocol::agent::GuestDetailsResponse::new();
        resp.mem_block_size_bytes = 4096;
        let json = m.decode_response(&resp.write_to_bytes().unwrap()).unwrap();
        assert!(json.contains("4096"), "{json}");
        assert!(m.encode_request("{not json").is_err());
    }
}
