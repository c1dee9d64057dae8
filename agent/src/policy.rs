//! Kata's agent policy: a Rego document that decides, request by request,
//! whether the agent serves an AgentService call.
//!
//! The semantics follow Kata's agent (the specification):
//! - The query for a request is `data.agent_policy.<RequestTypeName>`, the
//!   protobuf message name (`ExecProcessRequest`, `ReadStreamRequest`,
//!   `VolumeStatsRequest`, `MemAgentMemcgConfig`, ...); the input is the
//!   request as JSON the way Kata's serde derive writes it: proto field names
//!   (a Rust keyword gets a `_` suffix, e.g. `type_`), every field present,
//!   64-bit integers as numbers, enums as numbers, bytes as arrays of numbers,
//!   an unset message as `null`. CopyFile is checked on a derived input
//!   (`path`, `file_type`, `symlink_target`, ... but no `data`).
//! - The result is a boolean, or an object `{"allowed": bool, "ops": [...]}`
//!   whose JSON-patch `ops` update the policy's state in `data.pstate`.
//! - Denied: PERMISSION_DENIED "`<Name>` is blocked by policy: `<prints>`",
//!   the reason being what the policy's `print()` calls wrote. A rule that is
//!   undefined or does not evaluate: INTERNAL "`<Name>`: internal error ...".
//!   `AllowRequestsFailingPolicy := true` turns both into "allowed, logged".
//! - SetPolicy is itself checked (`SetPolicyRequest`, input `{"policy": ...}`)
//!   by the policy in force, then replaces it.
//! - ReadStdout/ReadStderr are not refused: a denied read comes back empty.
//!
//! Where kiln differs, deliberately: with no policy installed every request is
//! allowed (Kata's agent built without policy support); a SetPolicy whose text
//! does not parse, or whose package is not `agent_policy`, is refused with
//! INVALID_ARGUMENT and the policy in force stays (Kata drops it); an initial
//! policy file that cannot be loaded denies everything (Kata aborts the VM).

use std::path::Path;
use std::sync::Mutex;

use kiln_protocol::agent;
#[cfg(feature = "policy")]
use serde_json::json;
use serde_json::Value;

/// Where Kata's guest images keep the policy the agent starts with.
pub const DEFAULT_POLICY_FILE: &str = "/etc/kata-opa/default-policy.rego";

/// The Rego package every agent policy must declare.
const PACKAGE: &str = "agent_policy";

/// The policy of the running agent. A process-wide value, as in Kata, so
/// that a restart of the ttrpc server (see `main.rs`) keeps the policy.
static AGENT_POLICY: AgentPolicy = AgentPolicy::new();

/// The agent's policy.
pub fn agent_policy() -> &'static AgentPolicy {
    &AGENT_POLICY
}

/// Checks an AgentService request against the agent's policy: one call at
/// the top of each handler.
pub fn check<M: Request>(req: &M) -> ttrpc::Result<()> {
    AGENT_POLICY.check(req)
}

/// CopyFile is checked on a derived input rather than the raw request.
pub fn check_copy_file(req: &agent::CopyFileRequest) -> ttrpc::Result<()> {
    AGENT_POLICY.check_copy_file(req)
}

/// ReadStdout/ReadStderr: the read happens, a denied one comes back empty.
pub fn redact_read(
    req: &agent::ReadStreamRequest,
    resp: ttrpc::Result<agent::ReadStreamResponse>,
) -> ttrpc::Result<agent::ReadStreamResponse> {
    AGENT_POLICY.redact_read(req, resp)
}

/// SetPolicy: checked by the policy in force, then replaces it.
pub fn set_policy(req: &agent::SetPolicyRequest) -> ttrpc::Result<()> {
    AGENT_POLICY.set_policy(req)
}

/// Installs the policy the agent starts with: `configured` (the
/// `agent.policy_file` kernel parameter) or, when that is not given, Kata's
/// default file if the image has one. No file: every request is allowed.
/// Returns what was done, for the start-up log.
pub fn install_initial(configured: Option<&Path>) -> String {
    let path = match configured {
        Some(p) => p,
        None if Path::new(DEFAULT_POLICY_FILE).exists() => Path::new(DEFAULT_POLICY_FILE),
        None => return "no policy: every request is allowed".into(),
    };
    match AGENT_POLICY.load_file(path) {
        Ok(()) => format!("policy from {}", path.display()),
        Err(e) => format!("{e}; every request is denied"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("the policy does not parse: {0}")]
    Parse(String),
    #[error("the policy declares package {found}, expected `package {PACKAGE}`")]
    Package { found: String },
    #[error("the policy does not evaluate: {0}")]
    Eval(String),
    #[error("cannot read the policy file {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("this kiln-agent was built without agent policy support (cargo feature `policy`)")]
    NotBuiltIn,
}

/// What the policy said about one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Allow,
    /// The rule evaluated to false; the reason is the policy's prints.
    Deny(String),
    /// The rule could not be evaluated (undefined, wrong type, error).
    Error(String),
}

enum State {
    /// No policy: every request is allowed.
    AllowAll,
    #[cfg(feature = "policy")]
    Rego(Box<engine::RegoPolicy>),
    /// The initial policy could not be loaded: fail closed.
    Unusable(String),
}

pub struct AgentPolicy {
    state: Mutex<State>,
    /// Held by SetPolicy from its check to its install, so two of them
    /// cannot interleave; requests are not held up by a policy compiling.
    #[cfg_attr(not(feature = "policy"), allow(dead_code))]
    update: Mutex<()>,
}

impl Default for AgentPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentPolicy {
    /// No policy: every request is allowed.
    pub const fn new() -> Self {
        AgentPolicy {
            state: Mutex::new(State::AllowAll),
            update: Mutex::new(()),
        }
    }

    /// A policy from Rego text.
    pub fn from_rego(text: &str) -> Result<Self, PolicyError> {
        let p = AgentPolicy::new();
        p.install(text)?;
        Ok(p)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while evaluating is caught below; the state it leaves is
        // still a policy, so a poisoned lock is not a reason to stop serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the policy in force with `text`, which must parse, declare
    /// `package agent_policy` and evaluate; otherwise the old policy stays.
    pub fn install(&self, text: &str) -> Result<(), PolicyError> {
        #[cfg(feature = "policy")]
        {
            let new = engine::RegoPolicy::compile(text)?;
            if new.allow_failures() {
                tracing::warn!("policy: AllowRequestsFailingPolicy is set: requests the policy refuses are served anyway");
            }
            *self.lock() = State::Rego(Box::new(new));
            Ok(())
        }
        #[cfg(not(feature = "policy"))]
        {
            let _ = text;
            Err(PolicyError::NotBuiltIn)
        }
    }

    /// Installs the policy in `path`; on failure every request is denied
    /// with the reason, since an agent meant to run under a policy must not
    /// quietly run without one.
    pub fn load_file(&self, path: &Path) -> Result<(), PolicyError> {
        let r = std::fs::read_to_string(path)
            .map_err(|err| PolicyError::Read {
                path: path.display().to_string(),
                err,
            })
            .and_then(|text| self.install(&text));
        if let Err(e) = &r {
            *self.lock() =
                State::Unusable(format!("the initial policy {} failed: {e}", path.display()));
        }
        r
    }

    /// Evaluates `data.agent_policy.<rule>` with `input`.
    pub fn verdict(&self, rule: &str, input: Value) -> Verdict {
        #[cfg(not(feature = "policy"))]
        let _ = (rule, input);
        let mut state = self.lock();
        match &mut *state {
            State::AllowAll => Verdict::Allow,
            State::Unusable(why) => Verdict::Error(why.clone()),
            #[cfg(feature = "policy")]
            State::Rego(p) => {
                let v = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    p.evaluate(rule, input)
                }))
                .unwrap_or_else(|_| Verdict::Error("the policy engine panicked".into()));
                match v {
                    Verdict::Allow => Verdict::Allow,
                    _ if p.allow_failures() => {
                        tracing::warn!(
                            rule,
                            ?v,
                            "policy: AllowRequestsFailingPolicy: served anyway"
                        );
                        Verdict::Allow
                    }
                    v => v,
                }
            }
        }
    }

    /// Checks `input` under `rule` and turns the verdict into what ttrpc sends.
    pub fn check_as(&self, rule: &str, input: Value) -> ttrpc::Result<()> {
        match self.verdict(rule, input) {
            Verdict::Allow => Ok(()),
            Verdict::Deny(reason) => {
                tracing::warn!(rule, %reason, "policy: request denied");
                Err(status(
                    ttrpc::Code::PERMISSION_DENIED,
                    format!("{rule} is blocked by policy: {reason}"),
                ))
            }
            Verdict::Error(e) => {
                tracing::warn!(rule, error = %e, "policy: request not evaluated; denied");
                Err(status(
                    ttrpc::Code::INTERNAL,
                    format!("{rule}: internal error {e}"),
                ))
            }
        }
    }

    pub fn check<M: Request>(&self, req: &M) -> ttrpc::Result<()> {
        if matches!(*self.lock(), State::AllowAll) {
            return Ok(()); // skip building the input
        }
        self.check_as(request_name::<M>(), req.policy_input())
    }

    pub fn check_copy_file(&self, req: &agent::CopyFileRequest) -> ttrpc::Result<()> {
        if matches!(*self.lock(), State::AllowAll) {
            return Ok(());
        }
        #[cfg(feature = "policy")]
        let input = copy_file_input(req).map_err(|e| {
            status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("CopyFileRequest for {}: {e}", req.path),
            )
        })?;
        #[cfg(not(feature = "policy"))]
        let input = {
            let _ = req;
            Value::Null
        };
        self.check_as("CopyFileRequest", input)
    }

    pub fn redact_read(
        &self,
        req: &agent::ReadStreamRequest,
        resp: ttrpc::Result<agent::ReadStreamResponse>,
    ) -> ttrpc::Result<agent::ReadStreamResponse> {
        let mut resp = resp?;
        if self.check(req).is_err() {
            resp.data.clear();
        }
        Ok(resp)
    }

    pub fn set_policy(&self, req: &agent::SetPolicyRequest) -> ttrpc::Result<()> {
        #[cfg(not(feature = "policy"))]
        {
            let _ = req;
            Err(status(
                ttrpc::Code::UNIMPLEMENTED,
                PolicyError::NotBuiltIn.to_string(),
            ))
        }
        #[cfg(feature = "policy")]
        {
            let _serial = self.update.lock().unwrap_or_else(|p| p.into_inner());
            self.check(req)?;
            self.install(&req.policy).map_err(|e| {
                tracing::warn!("SetPolicy refused: {e}");
                status(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!("SetPolicyRequest refused, the policy in force stays: {e}"),
                )
            })?;
            tracing::info!(bytes = req.policy.len(), "policy: replaced by SetPolicy");
            Ok(())
        }
    }
}

fn status(code: ttrpc::Code, msg: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

/// The rule for a request: its message name (`ExecProcessRequest`), which
/// the generated type carries. Taken from the type rather than protobuf's
/// descriptors, whose reflection tables would add about 1.3 MB to the agent.
fn request_name<M>() -> &'static str {
    let path = std::any::type_name::<M>();
    path.rsplit("::").next().unwrap_or(path)
}

/// A request the policy can check: with the engine, anything that
/// serialises (kiln-protocol's `serde` feature, Kata's JSON shape).
#[cfg(feature = "policy")]
pub trait Request: serde::Serialize {
    fn policy_input(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|e| json!({ "unserialisable": e.to_string() }))
    }
}
#[cfg(feature = "policy")]
impl<T: serde::Serialize> Request for T {}

#[cfg(not(feature = "policy"))]
pub trait Request {
    fn policy_input(&self) -> Value {
        Value::Null
    }
}
#[cfg(not(feature = "policy"))]
impl<T> Request for T {}

#[cfg(feature = "policy")]
/// The policy input for CopyFile, as Kata derives it: the file's type from the
/// mode and a symlink's target instead of the raw bytes.
fn copy_file_input(req: &agent::CopyFileRequest) -> Result<Value, String> {
    let file_type = match req.file_mode & libc::S_IFMT {
        libc::S_IFREG => "Regular",
        libc::S_IFDIR => "Directory",
        libc::S_IFLNK => "Symlink",
        _ => "Unknown",
    };
    let symlink_target = if file_type == "Symlink" {
        let t = std::str::from_utf8(&req.data)
            .map_err(|_| "the symlink target is not UTF-8".to_string())?;
        Value::String(t.to_string())
    } else {
        Value::Null
    };
    Ok(json!({
        "path": req.path,
        "file_type": file_type,
        "symlink_target": symlink_target,
        "file_size": req.file_size,
        "file_mode": req.file_mode,
        "dir_mode": req.dir_mode,
        "uid": req.uid,
        "gid": req.gid,
        "offset": req.offset,
    }))
}

#[cfg(feature = "policy")]
mod engine {
    use std::num::{NonZeroU32, NonZeroUsize};

    use serde_json::Value;

    use super::{PolicyError, Verdict, PACKAGE};

    /// A compiled policy and its state (`data.pstate`).
    #[derive(Clone)]
    pub struct RegoPolicy {
        engine: regorus::Engine,
        allow_failures: bool,
    }

    impl RegoPolicy {
        pub fn compile(text: &str) -> Result<Self, PolicyError> {
            let mut engine = regorus::Engine::new();
            // Builtin errors make the expression undefined, as in OPA.
            engine.set_strict_builtin_errors(false);
            engine.set_gather_prints(true);
            // genpolicy's documents exceed regorus' defaults (1 KiB lines,
            // 1 MiB); these are the bounds Kata's agent uses.
            engine.set_policy_length_config(regorus::PolicyLengthConfig {
                // Non-zero constants: the fallbacks are never taken.
                max_col: NonZeroU32::new(64 * 1024).unwrap_or(NonZeroU32::MIN),
                max_file_bytes: NonZeroUsize::new(16 * 1024 * 1024).unwrap_or(NonZeroUsize::MIN),
                max_lines: NonZeroUsize::new(200_000).unwrap_or(NonZeroUsize::MIN),
            });
            engine
                .add_data(regorus::Value::from(serde_json::json!({ "pstate": {} })))
                .map_err(|e| PolicyError::Eval(e.to_string()))?;
            let package = engine
                .add_policy("agent_policy.rego".into(), text.into())
                .map_err(|e| PolicyError::Parse(format!("{e:#}").trim().to_string()))?;
            if package != format!("data.{PACKAGE}") {
                return Err(PolicyError::Package { found: package });
            }
            let mut p = RegoPolicy {
                engine,
                allow_failures: false,
            };
            // Evaluating the whole package once (with no input) reaches every
            // rule, so a policy that parses but cannot be evaluated (unknown
            // function, conflicting rules) is refused here rather than on the
            // next request.
            let package = p.eval_path(&format!("data.{PACKAGE}"), Value::Null);
            p.allow_failures = match package {
                Ok(Some(regorus::Value::Object(rules))) => matches!(
                    rules.get(&regorus::Value::from("AllowRequestsFailingPolicy")),
                    Some(regorus::Value::Bool(true))
                ),
                Ok(_) => false,
                Err(e) => return Err(PolicyError::Eval(e)),
            };
            let _ = p.engine.take_prints();
            Ok(p)
        }

        pub fn allow_failures(&self) -> bool {
            self.allow_failures
        }

        /// The value of `data.agent_policy.<rule>`, `None` when undefined.
        fn eval(&mut self, rule: &str, input: Value) -> Result<Option<regorus::Value>, String> {
            self.eval_path(&format!("data.{PACKAGE}.{rule}"), input)
        }

        fn eval_path(
            &mut self,
            path: &str,
            input: Value,
        ) -> Result<Option<regorus::Value>, String> {
            self.engine.set_input(regorus::Value::from(input));
            let results = self
                .engine
                .eval_query(path.to_string(), false)
                .map_err(|e| format!("{e:#}").trim().to_string())?;
            match results.result.as_slice() {
                [] => Ok(None),
                [r] if r.expressions.len() == 1 => Ok(Some(r.expressions[0].value.clone())),
                _ => Err(format!("unexpected result of {path}")),
            }
        }

        pub fn evaluate(&mut self, rule: &str, input: Value) -> Verdict {
            let value = self.eval(rule, input);
            let prints = match self.engine.take_prints() {
                Ok(p) => p.join(" "),
                Err(e) => format!("(no policy log: {e})"),
            };
            match value {
                Err(e) => Verdict::Error(e),
                Ok(None) => Verdict::Error(format!(
                    "policy check: data.{PACKAGE}.{rule} is undefined; the policy has no rule or default for it {prints}"
                )),
                Ok(Some(regorus::Value::Bool(true))) => Verdict::Allow,
                Ok(Some(regorus::Value::Bool(false))) => Verdict::Deny(prints),
                Ok(Some(obj @ regorus::Value::Object(_))) => self.metadata_verdict(rule, &obj, prints),
                Ok(Some(other)) => Verdict::Error(format!(
                    "policy check: data.{PACKAGE}.{rule} is {other}, expected a boolean or {{\"allowed\": bool, \"ops\": [...]}}"
                )),
            }
        }

        /// `{"allowed": bool, "ops": [JSON patch]}`: when allowed, the ops
        /// update the policy's state for the requests that follow.
        fn metadata_verdict(
            &mut self,
            rule: &str,
            obj: &regorus::Value,
            prints: String,
        ) -> Verdict {
            let obj = match serde_json::to_value(obj) {
                Ok(v) => v,
                Err(e) => return Verdict::Error(e.to_string()),
            };
            let Some(allowed) = obj.get("allowed").and_then(Value::as_bool) else {
                return Verdict::Error(format!(
                    "policy check: data.{PACKAGE}.{rule} has no boolean \"allowed\": {obj}"
                ));
            };
            if !allowed {
                return Verdict::Deny(prints);
            }
            match obj.get("ops") {
                None | Some(Value::Null) => Verdict::Allow,
                Some(ops) => match self.apply_ops(ops) {
                    Ok(()) => Verdict::Allow,
                    Err(e) => Verdict::Error(format!("policy state update: {e}")),
                },
            }
        }

        fn apply_ops(&mut self, ops: &Value) -> Result<(), String> {
            let ops = ops.as_array().ok_or("\"ops\" is not an array")?;
            let mut data =
                serde_json::to_value(self.engine.get_data()).map_err(|e| e.to_string())?;
            for op in ops {
                super::json_patch(&mut data, op)?;
            }
            self.engine.clear_data();
            self.engine
                .add_data(regorus::Value::from(data))
                .map_err(|e| e.to_string())
        }
    }
}

#[cfg(feature = "policy")]
/// One RFC 6902 operation (add, remove, replace) on `doc`: what Kata's
/// policies use to keep state between requests.
fn json_patch(doc: &mut Value, op: &Value) -> Result<(), String> {
    let kind = op
        .get("op")
        .and_then(Value::as_str)
        .ok_or("op without \"op\"")?;
    let path = op
        .get("path")
        .and_then(Value::as_str)
        .ok_or("op without \"path\"")?;
    let tokens: Vec<String> = match path.strip_prefix('/') {
        Some(rest) => rest
            .split('/')
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect(),
        None if path.is_empty() => Vec::new(),
        None => return Err(format!("path {path:?} does not start with /")),
    };
    let Some((last, parents)) = tokens.split_last() else {
        return match (kind, op.get("value")) {
            ("add" | "replace", Some(v)) => {
                *doc = v.clone();
                Ok(())
            }
            _ => Err(format!("cannot {kind} the whole document")),
        };
    };
    let mut target = &mut *doc;
    for t in parents {
        target = match target {
            Value::Object(m) => m.get_mut(t.as_str()),
            Value::Array(a) => t.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("path {path:?}: no {t:?}"))?;
    }
    let value = || {
        op.get("value")
            .cloned()
            .ok_or_else(|| format!("{kind} {path:?} without a value"))
    };
    match (kind, target) {
        ("add", Value::Object(m)) => {
            m.insert(last.clone(), value()?);
        }
        ("replace", Value::Object(m)) if m.contains_key(last.as_str()) => {
            m.insert(last.clone(), value()?);
        }
        ("remove", Value::Object(m)) if m.contains_key(last.as_str()) => {
            m.remove(last.as_str());
        }
        ("add", Value::Array(a)) if last == "-" => a.push(value()?),
        ("add", Value::Array(a)) => match last.parse::<usize>() {
            Ok(i) if i <= a.len() => a.insert(i, value()?),
            _ => return Err(format!("path {path:?}: bad array index")),
        },
        ("replace" | "remove", Value::Array(a)) => match last.parse::<usize>() {
            Ok(i) if i < a.len() => {
                if kind == "replace" {
                    a[i] = value()?;
                } else {
                    a.remove(i);
                }
            }
            _ => return Err(format!("path {path:?}: bad array index")),
        },
        _ => return Err(format!("cannot {kind} at {path:?}")),
    }
    Ok(())
}

#[cfg(all(test, feature = "policy"))]
mod tests {
    use super::*;

    const ALLOW_ALL_BUT_EXEC: &str = r#"
package agent_policy

default AllowRequestsFailingPolicy := false
default ExecProcessRequest := false
default SetPolicyRequest := true
default CreateContainerRequest := true
default ReadStreamRequest := true

ExecProcessRequest if {
    print("exec of", input.exec_id, "in", input.container_id, "is not allowed")
    false
}
"#;

    fn code_and_message(r: ttrpc::Result<()>) -> (ttrpc::Code, String) {
        match r {
            Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
            other => panic!("expected a status, got {other:?}"),
        }
    }

    fn exec(cid: &str, eid: &str) -> agent::ExecProcessRequest {
        let mut r = agent::ExecProcessRequest::new();
        r.container_id = cid.into();
        r.exec_id = eid.into();
        r
    }

    #[test]
    fn no_policy_allows_everything() {
        let p = AgentPolicy::new();
        p.check(&exec("c", "e")).unwrap();
        p.check(&agent::CreateContainerRequest::new()).unwrap();
        let mut set = agent::SetPolicyRequest::new();
        set.policy = "package agent_policy\ndefault ExecProcessRequest := true\n".into();
        p.set_policy(&set).unwrap();
    }

    #[test]
    fn kata_allow_all_allows_every_request_type() {
        // Kata's src/kata-opa/allow-all.rego, shape for shape (defaults only).
        let p = AgentPolicy::from_rego(
            "package agent_policy\n\ndefault ExecProcessRequest := true\ndefault CreateContainerRequest := true\ndefault GuestDetailsRequest := true\n",
        )
        .unwrap();
        p.check(&exec("c", "e")).unwrap();
        p.check(&agent::CreateContainerRequest::new()).unwrap();
        p.check(&agent::GuestDetailsRequest::new()).unwrap();
    }

    #[test]
    fn one_request_type_denied_with_the_policy_reason() {
        let p = AgentPolicy::from_rego(ALLOW_ALL_BUT_EXEC).unwrap();
        let (code, msg) = code_and_message(p.check(&exec("ctr-1", "exec-9")));
        assert_eq!(code, ttrpc::Code::PERMISSION_DENIED);
        assert!(
            msg.starts_with("ExecProcessRequest is blocked by policy: "),
            "{msg}"
        );
        assert!(
            msg.contains("exec of exec-9 in ctr-1 is not allowed"),
            "{msg}"
        );
        p.check(&agent::CreateContainerRequest::new()).unwrap();
    }

    #[test]
    fn a_request_the_policy_does_not_mention_is_an_internal_error() {
        let p = AgentPolicy::from_rego(ALLOW_ALL_BUT_EXEC).unwrap();
        let (code, msg) = code_and_message(p.check(&agent::StatsContainerRequest::new()));
        assert_eq!(code, ttrpc::Code::INTERNAL);
        assert!(
            msg.starts_with("StatsContainerRequest: internal error"),
            "{msg}"
        );
    }

    #[test]
    fn allow_requests_failing_policy_serves_what_is_refused() {
        let p = AgentPolicy::from_rego(
            "package agent_policy\ndefault AllowRequestsFailingPolicy := true\ndefault ExecProcessRequest := false\n",
        )
        .unwrap();
        p.check(&exec("c", "e")).unwrap();
        p.check(&agent::StatsContainerRequest::new()).unwrap();
    }

    #[test]
    fn input_is_the_request_with_kata_field_names() {
        let p = AgentPolicy::from_rego(
            r#"package agent_policy
default CreateContainerRequest := false
CreateContainerRequest if {
    input.container_id == "ctr"
    is_null(input.string_user)
    input.OCI.Process.Args == ["sh", "-c", "true"]
    input.OCI.Process.User.UID == 1000
    count(input.storages) == 0
    input.devices[0].type_ == "vfio-pci"
}
"#,
        )
        .unwrap();
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = "ctr".into();
        let oci = req.OCI.mut_or_insert_default();
        let process = oci.Process.mut_or_insert_default();
        process.Args = vec!["sh".into(), "-c".into(), "true".into()];
        process.User.mut_or_insert_default().UID = 1000;
        let mut dev = agent::Device::new();
        dev.type_ = "vfio-pci".into();
        req.devices.push(dev);
        p.check(&req).unwrap();
        req.container_id = "other".into();
        assert_eq!(
            code_and_message(p.check(&req)).0,
            ttrpc::Code::PERMISSION_DENIED
        );
    }

    #[test]
    fn json_shape_matches_kata_serde() {
        let mut req = agent::CopyFileRequest::new();
        req.path = "/run/x".into();
        req.file_size = 1 << 40;
        req.data = vec![1, 2];
        let v = req.policy_input();
        assert_eq!(v["path"], "/run/x");
        assert_eq!(v["file_size"], 1u64 << 40, "int64 as a number");
        assert_eq!(v["data"], json!([1, 2]), "bytes as numbers");
        assert_eq!(v["uid"], 0, "defaults are present");
        let e = exec("c", "e").policy_input();
        assert_eq!(e["string_user"], Value::Null);
        assert_eq!(e["process"], Value::Null);
    }

    #[test]
    fn copy_file_input_is_derived_like_kata() {
        let mut req = agent::CopyFileRequest::new();
        req.path = "/run/kata-containers/shared/containers/x/..data".into();
        req.file_mode = libc::S_IFLNK | 0o777;
        req.data = b"..2024_01_01".to_vec();
        let v = copy_file_input(&req).unwrap();
        assert_eq!(v["file_type"], "Symlink");
        assert_eq!(v["symlink_target"], "..2024_01_01");
        assert!(v.get("data").is_none());
        req.data = vec![0xff, 0xfe];
        assert!(copy_file_input(&req).is_err());
        req.file_mode = libc::S_IFDIR | 0o755;
        assert_eq!(
            copy_file_input(&req).unwrap()["symlink_target"],
            Value::Null
        );
    }

    #[test]
    fn a_policy_that_does_not_parse_is_refused_and_the_old_one_stays() {
        let p = AgentPolicy::from_rego(ALLOW_ALL_BUT_EXEC).unwrap();
        let mut set = agent::SetPolicyRequest::new();
        set.policy = "package agent_policy\ndefault ExecProcessRequest := \n".into();
        let (code, msg) = code_and_message(p.set_policy(&set));
        assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
        assert!(msg.contains("does not parse"), "{msg}");
        // Still the old policy.
        assert_eq!(
            code_and_message(p.check(&exec("c", "e"))).0,
            ttrpc::Code::PERMISSION_DENIED
        );
        assert!(matches!(
            AgentPolicy::from_rego("package other\ndefault ExecProcessRequest := true\n"),
            Err(PolicyError::Package { .. })
        ));
        assert!(matches!(
            AgentPolicy::from_rego(
                "package agent_policy\nExecProcessRequest := no_such_builtin(1)\n"
            ),
            Err(PolicyError::Parse(_) | PolicyError::Eval(_))
        ));
    }

    #[test]
    fn set_policy_replaces_the_policy() {
        let p = AgentPolicy::from_rego(ALLOW_ALL_BUT_EXEC).unwrap();
        assert!(p.check(&exec("c", "e")).is_err());
        let mut set = agent::SetPolicyRequest::new();
        set.policy = "package agent_policy\ndefault ExecProcessRequest := true\ndefault SetPolicyRequest := true\n".into();
        p.set_policy(&set).unwrap();
        p.check(&exec("c", "e")).unwrap();
        // Replaced, not merged: CreateContainer is no longer defined.
        assert_eq!(
            code_and_message(p.check(&agent::CreateContainerRequest::new())).0,
            ttrpc::Code::INTERNAL
        );
    }

    #[test]
    fn set_policy_is_checked_by_the_policy_in_force() {
        let p = AgentPolicy::from_rego(
            r#"package agent_policy
default ExecProcessRequest := false
default SetPolicyRequest := false
SetPolicyRequest if {
    not contains(input.policy, "ExecProcessRequest := true")
}
SetPolicyRequest if {
    print("SetPolicy may not allow exec")
    false
}
"#,
        )
        .unwrap();
        let mut set = agent::SetPolicyRequest::new();
        set.policy = "package agent_policy\ndefault ExecProcessRequest := true\n".into();
        let (code, msg) = code_and_message(p.set_policy(&set));
        assert_eq!(code, ttrpc::Code::PERMISSION_DENIED);
        assert!(
            msg.starts_with("SetPolicyRequest is blocked by policy"),
            "{msg}"
        );
        assert!(
            p.check(&exec("c", "e")).is_err(),
            "old policy still in force"
        );
        set.policy = "package agent_policy\ndefault ExecProcessRequest := false\ndefault GuestDetailsRequest := true\n".into();
        p.set_policy(&set).unwrap();
        p.check(&agent::GuestDetailsRequest::new()).unwrap();
    }

    #[test]
    fn read_streams_are_redacted_not_refused() {
        let p =
            AgentPolicy::from_rego("package agent_policy\ndefault ReadStreamRequest := false\n")
                .unwrap();
        let mut resp = agent::ReadStreamResponse::new();
        resp.data = b"secret".to_vec();
        let r = p
            .redact_read(&agent::ReadStreamRequest::new(), Ok(resp))
            .unwrap();
        assert!(r.data.is_empty());
    }

    #[test]
    fn state_ops_persist_between_requests() {
        // genpolicy's pattern: remember the first container id, refuse others.
        let p = AgentPolicy::from_rego(
            r#"package agent_policy
default CreateContainerRequest := {"allowed": false}
CreateContainerRequest := {"allowed": true, "ops": [{"op": "add", "path": "/pstate/first", "value": input.container_id}]} if {
    not data.pstate.first
}
CreateContainerRequest := {"allowed": true, "ops": []} if {
    data.pstate.first == input.container_id
}
"#,
        )
        .unwrap();
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = "a".into();
        p.check(&req).unwrap();
        p.check(&req).unwrap();
        req.container_id = "b".into();
        assert_eq!(
            code_and_message(p.check(&req)).0,
            ttrpc::Code::PERMISSION_DENIED
        );
    }

    #[test]
    fn an_unloadable_initial_policy_denies_everything() {
        let dir = tempfile::tempdir().unwrap();
        let p = AgentPolicy::new();
        let missing = dir.path().join("none.rego");
        assert!(p.load_file(&missing).is_err());
        let (code, msg) = code_and_message(p.check(&agent::GuestDetailsRequest::new()));
        assert_eq!(code, ttrpc::Code::INTERNAL);
        assert!(msg.contains("none.rego"), "{msg}");
        let good = dir.path().join("p.rego");
        std::fs::write(
            &good,
            "package agent_policy\ndefault GuestDetailsRequest := true\n",
        )
        .unwrap();
        p.load_file(&good).unwrap();
        p.check(&agent::GuestDetailsRequest::new()).unwrap();
    }

    #[test]
    fn json_patch_ops() {
        let mut d = json!({"pstate": {}});
        json_patch(
            &mut d,
            &json!({"op": "add", "path": "/pstate/a~1b", "value": 1}),
        )
        .unwrap();
        assert_eq!(d, json!({"pstate": {"a/b": 1}}));
        json_patch(
            &mut d,
            &json!({"op": "replace", "path": "/pstate/a~1b", "value": [2]}),
        )
        .unwrap();
        json_patch(
            &mut d,
            &json!({"op": "add", "path": "/pstate/a~1b/-", "value": 3}),
        )
        .unwrap();
        assert_eq!(d, json!({"pstate": {"a/b": [2, 3]}}));
        json_patch(&mut d, &json!({"op": "remove", "path": "/pstate/a~1b"})).unwrap();
        assert_eq!(d, json!({"pstate": {}}));
        assert!(json_patch(&mut d, &json!({"op": "remove", "path": "/pstate/x"})).is_err());
        assert!(json_patch(&mut d, &json!({"op": "move", "path": "/pstate"})).is_err());
    }
}
