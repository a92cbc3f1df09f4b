//! The OpenAPI 3.1 document of everything the HTTP layer serves, at `GET /api/v1/openapi.json`.
//! [`ROUTES`] is the one list of operations; a test reads the router in `mod.rs` and fails when
//! a route is served but not documented, or documented but not served. Schemas come from
//! schemars where the types derive it (they are JSON Schema 2020-12, which OpenAPI 3.1 uses).

use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::authz::Op;
use nebula_types::api::{
    access, alerts, containers, desired, jobs, models, monitors, nodes, telemetry, Health, Page,
};
use nebula_types::jobs::{AuditRecord, JobRecord};

/// Who may call an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token (health, install scripts, the documents that describe the API).
    Public,
    /// An API token whose role allows the operation.
    Token(Op),
    /// An API token allowed on the AI gateway (any role, `ai` tokens included).
    Gateway,
}

/// One operation of the HTTP API.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    /// The path as the router declares it (`{name}` for a parameter).
    pub path: &'static str,
    pub summary: &'static str,
    pub tag: &'static str,
    pub access: Access,
    /// The success status and what it carries.
    pub ok: (u16, &'static str),
    /// The response body's schema (JSON answers; not for text, scripts, files or streams).
    pub schema: Option<SchemaFn>,
    /// The request body's schema, for JSON bodies.
    pub body: Option<SchemaFn>,
}

type SchemaFn = fn(&mut SchemaGenerator) -> schemars::Schema;

const fn route(
    method: &'static str,
    path: &'static str,
    tag: &'static str,
    access: Access,
    ok: (u16, &'static str),
    summary: &'static str,
) -> Route {
    Route {
        method,
        path,
        summary,
        tag,
        access,
        ok,
        schema: None,
        body: None,
    }
}

/// A type's schema: a reference to it in the document's components (inline for lists).
fn of<T: JsonSchema>(g: &mut SchemaGenerator) -> schemars::Schema {
    g.subschema_for::<T>()
}

impl Route {
    /// The success body's schema.
    const fn returns(mut self, schema: SchemaFn) -> Self {
        self.schema = Some(schema);
        self
    }

    /// The request body's schema.
    const fn accepts(mut self, schema: SchemaFn) -> Self {
        self.body = Some(schema);
        self
    }
}

use Access::{Gateway, Public, Token};

/// Every operation the router serves.
pub const ROUTES: &[Route] = &[
    route(
        "get",
        "/healthz",
        "system",
        Public,
        (200, "the controller runs"),
        "Liveness and the number of online nodes",
    )
    .returns(of::<Health>),
    route(
        "get",
        "/metrics",
        "system",
        Token(Op::ReadFleet),
        (200, "Prometheus text format"),
        "Prometheus metrics",
    ),
    route(
        "get",
        "/api/v1/openapi.json",
        "system",
        Public,
        (200, "this document"),
        "The OpenAPI document of this API",
    ),
    route(
        "get",
        "/api/v1/schema/service-map",
        "desired state",
        Public,
        (200, "a JSON Schema"),
        "The service map's JSON Schema",
    ),
    route(
        "get",
        "/install.sh",
        "install",
        Public,
        (200, "a shell script"),
        "The Linux agent installer, pre-filled for this controller",
    ),
    route(
        "get",
        "/install.ps1",
        "install",
        Public,
        (200, "a PowerShell script"),
        "The Windows agent installer, pre-filled for this controller",
    ),
    route(
        "get",
        "/downloads/{file}",
        "install",
        Public,
        (200, "an agent build or its manifest"),
        "A signed agent build",
    ),
    route(
        "get",
        "/api/v1/nodes",
        "nodes",
        Token(Op::ReadFleet),
        (200, "a page of nodes"),
        "List nodes (?status=, ?label=k=v, ?limit=, ?cursor=)",
    )
    .returns(of::<Page<nodes::NodeView>>),
    route(
        "get",
        "/api/v1/nodes/{name}",
        "nodes",
        Token(Op::ReadFleet),
        (200, "the node"),
        "One node with its latest figures",
    )
    .returns(of::<nodes::NodeView>),
    route(
        "delete",
        "/api/v1/nodes/{name}",
        "nodes",
        Token(Op::RemoveNode),
        (200, "the removed node's id"),
        "Remove a node: revoke its certificates and cut it off",
    )
    .returns(of::<nodes::NodeRemoved>),
    route(
        "post",
        "/api/v1/nodes/{name}/wake",
        "nodes",
        Token(Op::WakeNode),
        (202, "the wake-up under way"),
        "Wake a node through a relay on its LAN",
    )
    .returns(of::<nodes::Wake>),
    route(
        "post",
        "/api/v1/nodes/{name}/sleep",
        "nodes",
        Token(Op::SleepNode),
        (202, "the sleep job"),
        "Run the node's allow-listed sleep command",
    )
    .returns(of::<JobRecord>),
    route(
        "get",
        "/api/v1/nodes/{name}/telemetry",
        "telemetry",
        Token(Op::ReadFleet),
        (200, "latest figures and history"),
        "A node's telemetry (?since=, ?step=)",
    )
    .returns(of::<telemetry::NodeTelemetry>),
    route(
        "get",
        "/api/v1/alerts",
        "alerts",
        Token(Op::ReadFleet),
        (200, "alerts pending and firing, most severe first"),
        "What fires now",
    )
    .returns(of::<Vec<alerts::AlertView>>),
    route(
        "post",
        "/api/v1/alerts/{fingerprint}/ack",
        "alerts",
        Token(Op::ManageAlerts),
        (204, "acknowledged: not repeated; its resolution is still sent"),
        "Acknowledge a firing alert",
    ),
    route(
        "get",
        "/api/v1/alerts/sinks",
        "alerts",
        Token(Op::ReadFleet),
        (200, "where notifications go"),
        "List notification sinks",
    )
    .returns(of::<Vec<alerts::SinkView>>),
    route(
        "post",
        "/api/v1/alerts/sinks",
        "alerts",
        Token(Op::ManageSinks),
        (201, "the sink and its signing secret, shown once"),
        "Add (or replace) a notification sink",
    )
    .accepts(of::<alerts::CreateSink>)
    .returns(of::<alerts::CreatedSink>),
    route(
        "delete",
        "/api/v1/alerts/sinks/{name}",
        "alerts",
        Token(Op::ManageSinks),
        (204, "removed"),
        "Remove a notification sink",
    ),
    route(
        "post",
        "/api/v1/alerts/sinks/{name}/test",
        "alerts",
        Token(Op::ManageAlerts),
        (204, "the receiver took the test message"),
        "Send a test message to a sink",
    ),
    route(
        "get",
        "/api/v1/alerts/silences",
        "alerts",
        Token(Op::ReadFleet),
        (200, "silences in force or to come"),
        "List silences",
    )
    .returns(of::<Vec<alerts::SilenceView>>),
    route(
        "post",
        "/api/v1/alerts/silences",
        "alerts",
        Token(Op::ManageAlerts),
        (201, "the silence"),
        "Silence alerts that match, for a while",
    )
    .accepts(of::<alerts::CreateSilence>)
    .returns(of::<alerts::SilenceView>),
    route(
        "delete",
        "/api/v1/alerts/silences/{id}",
        "alerts",
        Token(Op::ManageAlerts),
        (204, "ended now"),
        "End a silence",
    ),
    route(
        "post",
        "/alerts/ack",
        "alerts",
        Public,
        (204, "acknowledged"),
        "Acknowledge through a signed link from a notification (?sink=&alert=&exp=&sig=)",
    ),
    route(
        "get",
        "/api/v1/alerts/notifications",
        "alerts",
        Token(Op::ReadFleet),
        (200, "the newest notifications and their delivery (?limit=)"),
        "Notification delivery history",
    )
    .returns(of::<Vec<alerts::NotificationView>>),
    route(
        "get",
        "/api/v1/monitors",
        "monitors",
        Token(Op::ReadFleet),
        (200, "every monitor with each node's state and uptime, down ones first"),
        "List monitors",
    )
    .returns(of::<Vec<monitors::MonitorView>>),
    route(
        "post",
        "/api/v1/monitors",
        "monitors",
        Token(Op::ManageAlerts),
        (201, "the monitor, as assigned to its nodes"),
        "Add (or replace) a monitor",
    )
    .accepts(of::<monitors::CreateMonitor>)
    .returns(of::<monitors::MonitorView>),
    route(
        "get",
        "/api/v1/monitors/{name}",
        "monitors",
        Token(Op::ReadFleet),
        (200, "the monitor, its recent results and hours per node"),
        "One monitor",
    )
    .returns(of::<monitors::MonitorDetail>),
    route(
        "delete",
        "/api/v1/monitors/{name}",
        "monitors",
        Token(Op::ManageAlerts),
        (204, "removed (only monitors made through the API)"),
        "Remove a monitor",
    ),
    route(
        "get",
        "/api/v1/containers",
        "containers",
        Token(Op::ReadFleet),
        (200, "a page of containers"),
        "Every container in the fleet (?node=, ?label=, ?state=, ?health=, ?managed=, ?q=)",
    )
    .returns(of::<Page<containers::ContainerRow>>),
    route(
        "get",
        "/api/v1/nodes/{name}/containers/{container}",
        "containers",
        Token(Op::ReadFleet),
        (200, "the container and what its node's policy allows"),
        "One container (by name or id)",
    )
    .returns(of::<containers::ContainerView>),
    route(
        "post",
        "/api/v1/nodes/{name}/containers/{container}/actions",
        "containers",
        Token(Op::ControlContainer),
        (
            202,
            "the job that carries it out, and a warning for managed containers",
        ),
        "Start, stop, restart, kill, remove a container or pull its image again",
    )
    .accepts(of::<containers::ContainerActionRequest>)
    .returns(of::<containers::ContainerActionView>),
    route(
        "get",
        "/api/v1/nodes/{name}/containers/{container}/logs",
        "containers",
        Token(Op::ReadLogs),
        (
            200,
            "server-sent events: `logs` (a JSON array of ContainerLogLine), `end`, `error`",
        ),
        "A container's log (?follow=, ?tail=, ?since=)",
    ),
    route(
        "get",
        "/api/v1/nodes/{name}/containers/{container}/exec",
        "containers",
        Token(Op::ExecContainer),
        (101, "a WebSocket: binary input; output tagged 1 stdout, 2 stderr; text {\"resize\"}, {\"eof\"}, {\"exit\"}, {\"error\"}"),
        "An interactive command in a container (?cmd=, ?tty=, ?rows=, ?cols=)",
    ),
    route(
        "get",
        "/api/v1/nodes/{name}/storage",
        "containers",
        Token(Op::ReadFleet),
        (200, "images and volumes with sizes and users, and the runtime's disk usage"),
        "A node's images and volumes",
    )
    .returns(of::<containers::StorageView>),
    route(
        "get",
        "/api/v1/nodes/{name}/storage/prune",
        "containers",
        Token(Op::PruneStorage),
        (200, "the unused images (and volumes, with ?volumes=true) a prune would remove"),
        "Preview a prune (?volumes=, ?match=)",
    )
    .returns(of::<containers::PrunePreview>),
    route(
        "post",
        "/api/v1/nodes/{name}/storage/prune",
        "containers",
        Token(Op::PruneStorage),
        (200, "what was removed, what was left and why, and the bytes freed"),
        "Remove exactly the unused images and volumes named (a preview's)",
    )
    .accepts(of::<containers::PruneRequest>)
    .returns(of::<containers::PruneResult>),
    route(
        "get",
        "/api/v1/tokens",
        "tokens",
        Token(Op::ReadFleet),
        (200, "a page of join tokens"),
        "List join tokens",
    )
    .returns(of::<Page<access::TokenView>>),
    route(
        "post",
        "/api/v1/tokens",
        "tokens",
        Token(Op::ManageJoinTokens),
        (201, "the token, shown once"),
        "Create a join token",
    )
    .returns(of::<access::CreatedTokenView>)
    .accepts(of::<access::CreateTokenRequest>),
    route(
        "delete",
        "/api/v1/tokens/{id}",
        "tokens",
        Token(Op::ManageJoinTokens),
        (200, "revoked"),
        "Revoke a join token",
    )
    .returns(of::<access::TokenRevoked>),
    route(
        "get",
        "/api/v1/jobs",
        "jobs",
        Token(Op::ReadFleet),
        (200, "a page of jobs"),
        "List jobs (?state=, ?node=, ?kind=, ?limit=, ?cursor=)",
    )
    .returns(of::<Page<JobRecord>>),
    route(
        "post",
        "/api/v1/jobs",
        "jobs",
        Token(Op::RunJob),
        (201, "the job (200 or 202 with ?wait=)"),
        "Create a job on a node or the best node for a selector",
    )
    .returns(of::<JobRecord>)
    .accepts(of::<jobs::CreateJob>),
    route(
        "get",
        "/api/v1/jobs/{id}",
        "jobs",
        Token(Op::ReadFleet),
        (200, "the job"),
        "One job",
    )
    .returns(of::<jobs::JobView>),
    route(
        "get",
        "/api/v1/jobs/{id}/logs",
        "jobs",
        Token(Op::ReadFleet),
        (200, "server-sent events with ?follow=true, else JSON"),
        "A job's log lines",
    ),
    route(
        "post",
        "/api/v1/jobs/{id}/cancel",
        "jobs",
        Token(Op::CancelJob),
        (202, "the job"),
        "Cancel a job",
    )
    .returns(of::<JobRecord>),
    route(
        "get",
        "/api/v1/inventory",
        "jobs",
        Token(Op::ReadInventory),
        (200, "operations per node"),
        "The allow-listed operations each node offers",
    )
    .returns(of::<jobs::FanOut>),
    route(
        "post",
        "/api/v1/inventory/execute",
        "jobs",
        Token(Op::RunJob),
        (200, "one result per node"),
        "Run an operation on many nodes at once",
    )
    .returns(of::<jobs::FanOut>),
    route(
        "get",
        "/api/v1/audit",
        "jobs",
        Token(Op::ReadAudit),
        (200, "a page of audit rows"),
        "The audit log (?actor=, ?action=)",
    )
    .returns(of::<Page<AuditRecord>>),
    route(
        "get",
        "/api/v1/desired",
        "desired state",
        Token(Op::ReadFleet),
        (200, "the map in force"),
        "The service map in force",
    )
    .returns(of::<desired::DesiredView>),
    route(
        "put",
        "/api/v1/desired",
        "desired state",
        Token(Op::ApplyMap),
        (200, "the version applied and its plan"),
        "Apply a service map (YAML body)",
    )
    .returns(of::<desired::Applied>),
    route(
        "get",
        "/api/v1/plan",
        "desired state",
        Token(Op::ReadFleet),
        (200, "the plan"),
        "The plan for the map in force",
    )
    .returns(of::<desired::PlanView>),
    route(
        "post",
        "/api/v1/plan",
        "desired state",
        Token(Op::PreviewPlan),
        (200, "the plan"),
        "Plan a service map without applying it",
    )
    .returns(of::<desired::PlanView>),
    route(
        "get",
        "/api/v1/services",
        "desired state",
        Token(Op::ReadFleet),
        (200, "every service"),
        "Services: revision in force, counts, last deploy",
    )
    .returns(of::<Vec<desired::ServiceView>>),
    route(
        "get",
        "/api/v1/services/{name}",
        "desired state",
        Token(Op::ReadFleet),
        (200, "the service and its history"),
        "One service",
    )
    .returns(of::<desired::ServiceDetail>),
    route(
        "post",
        "/api/v1/services/{name}/rollback",
        "desired state",
        Token(Op::RollbackService),
        (200, "the pinned revision"),
        "Roll a service back to an earlier revision",
    )
    .returns(of::<desired::RolledBack>)
    .accepts(of::<desired::RollbackRequest>),
    route(
        "post",
        "/api/v1/reconcile",
        "desired state",
        Token(Op::Reconcile),
        (202, "a run was asked for"),
        "Ask the reconciler for a run now",
    )
    .returns(of::<desired::ReconcileStarted>),
    route(
        "get",
        "/api/v1/users",
        "users",
        Token(Op::ManageUsers),
        (200, "dashboard users"),
        "List dashboard users",
    )
    .returns(of::<access::UserList>),
    route(
        "post",
        "/api/v1/users",
        "users",
        Token(Op::ManageUsers),
        (201, "the user"),
        "Create a dashboard user",
    )
    .returns(of::<access::UserView>)
    .accepts(of::<access::CreateUserRequest>),
    route(
        "post",
        "/api/v1/api-tokens",
        "users",
        Token(Op::ManageApiTokens),
        (201, "the token, shown once"),
        "Create (or replace) an API token",
    )
    .returns(of::<access::CreatedApiToken>)
    .accepts(of::<access::CreateApiTokenRequest>),
    route(
        "get",
        "/api/v1/agent/releases",
        "install",
        Token(Op::ReadFleet),
        (200, "agent builds and the signing key"),
        "The agent builds this controller serves",
    )
    .returns(of::<models::AgentReleases>),
    route(
        "get",
        "/api/v1/tasks",
        "system",
        Token(Op::ReadFleet),
        (200, "every background task"),
        "Background tasks: scope, state, last run",
    )
    .returns(of::<Vec<crate::tasks::TaskStatus>>),
    route(
        "get",
        "/api/v1/models/inventory",
        "models",
        Token(Op::ReadFleet),
        (200, "backends and models per node"),
        "Inference backends and models across the fleet",
    )
    .returns(of::<models::ModelsInventory>),
    route(
        "get",
        "/api/v1/models/desired",
        "models",
        Token(Op::ReadFleet),
        (200, "desired models and their pulls"),
        "Models the service map wants, and their pulls",
    )
    .returns(of::<models::ModelsView>),
    route(
        "get",
        "/api/v1/ai/usage",
        "models",
        Token(Op::ReadFleet),
        (200, "usage per token, model and node"),
        "The AI gateway's usage",
    )
    .returns(of::<models::AiUsage>),
    route(
        "post",
        "/v1/chat/completions",
        "gateway",
        Gateway,
        (200, "an OpenAI chat completion, or server-sent events"),
        "OpenAI-compatible chat, routed to the node that has the model",
    ),
    route(
        "post",
        "/v1/completions",
        "gateway",
        Gateway,
        (200, "an OpenAI completion"),
        "OpenAI-compatible completions",
    ),
    route(
        "post",
        "/v1/embeddings",
        "gateway",
        Gateway,
        (200, "embeddings"),
        "OpenAI-compatible embeddings",
    ),
    route(
        "get",
        "/v1/models",
        "gateway",
        Gateway,
        (200, "the models the fleet serves"),
        "Models across the fleet, OpenAI style",
    ),
    route(
        "post",
        "/v1/images/generations",
        "gateway",
        Gateway,
        (200, "generated images"),
        "Image generation on a Stable Diffusion node",
    ),
    route(
        "post",
        "/sdapi/v1/{op}",
        "gateway",
        Gateway,
        (200, "the backend's answer"),
        "Stable Diffusion WebUI pass-through (txt2img, img2img)",
    ),
];

/// The document.
pub fn document() -> Value {
    let mut generator = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    let mut paths = Map::new();
    for r in ROUTES {
        let error = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
        let mut responses = Map::new();
        let mut ok = json!({"description": r.ok.1});
        if let Some(schema) = r.schema {
            ok["content"] = json!({"application/json": {"schema": schema(&mut generator)}});
        }
        let body = r.body.map(|schema| {
            json!({"required": true, "content": {"application/json": {"schema": schema(&mut generator)}}})
        });
        responses.insert(r.ok.0.to_string(), ok);
        let mut op = json!({
            "summary": r.summary,
            "operationId": format!("{} {}", r.method, r.path),
            "tags": [r.tag],
        });
        match r.access {
            Public => op["security"] = json!([]),
            Token(o) => {
                op["security"] = json!([{"bearer": []}]);
                op["x-nebula-role"] = json!(o.needs().as_str());
                op["x-nebula-operation"] = json!(o.as_str());
                responses.insert("401".into(), error("no token, or an unknown one"));
                responses.insert(
                    "403".into(),
                    error(&format!("the token's role is below {}", o.needs().as_str())),
                );
            }
            Gateway => {
                op["security"] = json!([{"bearer": []}]);
                responses.insert("401".into(), error("no token, or an unknown one"));
                responses.insert("429".into(), error("a per-token limit was reached"));
            }
        }
        if let Some(body) = body {
            op["requestBody"] = body;
        }
        if matches!(r.method, "post" | "put") {
            responses.insert(
                "400".into(),
                error("a body or query that is not valid, and why"),
            );
        }
        let params: Vec<Value> = r
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
            responses.insert("404".into(), error("no such resource"));
        }
        op["responses"] = Value::Object(responses);
        paths
            .entry(r.path.to_owned())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("an object")
            .insert(r.method.to_owned(), op);
    }
    generator.subschema_for::<nebula_types::api::ErrorBody>();
    let schemas: Map<String, Value> = generator.take_definitions(true).into_iter().collect();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Nebula Command",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The controller's HTTP API: the fleet, jobs, desired state, users and tokens under /api/v1 (bearer API tokens; each operation names the least role it needs in x-nebula-role), the OpenAI-compatible gateway under /v1, and the public install endpoints.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// (method, full path) for every route the router in `mod.rs` declares.
    fn served() -> BTreeSet<(String, String)> {
        let src = include_str!("mod.rs");
        let body = &src[src.find("pub fn router(").expect("the router")..];
        let v1_end = body.find("let metrics").expect("the /api/v1 block ends");
        let mut out = BTreeSet::new();
        let mut rest = body;
        let mut offset = 0;
        while let Some(i) = rest.find(".route(") {
            let start = offset + i;
            let call = &body[start..];
            let path_start = call.find('"').expect("a path") + 1;
            let path_len = call[path_start..].find('"').expect("a closing quote");
            let path = &call[path_start..path_start + path_len];
            // The methods are up to the next `.route(` (or the end of the chain).
            let tail = &call[path_start + path_len..];
            let end = tail.find(".route(").unwrap_or(tail.len());
            let methods = &tail[..end];
            let full = if start < v1_end {
                format!("/api/v1{path}")
            } else {
                path.to_owned()
            };
            for m in ["get", "post", "put", "delete", "patch"] {
                let called = methods.match_indices(&format!("{m}(")).any(|(j, _)| {
                    j == 0
                        || !methods.as_bytes()[j - 1].is_ascii_alphanumeric()
                            && methods.as_bytes()[j - 1] != b'_'
                });
                if called {
                    out.insert((m.to_owned(), full.clone()));
                }
            }
            offset = start + 7;
            rest = &body[offset..];
        }
        out
    }

    #[test]
    fn every_route_is_documented_and_every_documented_route_is_served() {
        let served = served();
        assert!(served.len() > 40, "{served:?}");
        let documented: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.to_owned(), r.path.to_owned()))
            .collect();
        assert_eq!(
            documented.len(),
            ROUTES.len(),
            "a route is documented twice"
        );
        let missing: Vec<_> = served.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&served).collect();
        assert!(missing.is_empty(), "served but not documented: {missing:?}");
        assert!(extra.is_empty(), "documented but not served: {extra:?}");
    }

    #[test]
    fn the_document_is_openapi_3_1_with_roles_and_schemas() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let put = &doc["paths"]["/api/v1/desired"]["put"];
        assert_eq!(put["x-nebula-role"], "admin");
        assert_eq!(
            put["responses"]["403"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/Error"
        );
        let wake = &doc["paths"]["/api/v1/nodes/{name}/wake"]["post"];
        assert_eq!(wake["parameters"][0]["name"], "name");
        assert_eq!(wake["x-nebula-role"], "operator");
        assert_eq!(doc["paths"]["/healthz"]["get"]["security"], json!([]));
        // The task list's schema comes from its type, with its definitions in components.
        let tasks = &doc["paths"]["/api/v1/tasks"]["get"]["responses"]["200"]["content"]
            ["application/json"]["schema"];
        assert_eq!(tasks["type"], "array", "{tasks}");
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        assert!(schemas.contains_key("TaskStatus"), "{:?}", schemas.keys());
        // Every reference resolves.
        let text = doc.to_string();
        for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = &r[..r.find('"').unwrap()];
            assert!(schemas.contains_key(name), "unresolved reference to {name}");
        }
    }

    #[test]
    fn every_json_answer_and_body_has_a_schema_from_its_type() {
        // Answers that are no JSON document of this API: text, scripts, files, event streams,
        // documents that describe themselves, and the gateway's OpenAI- and WebUI-shaped
        // answers (specified by those projects).
        let not_json = [
            "/metrics",
            "/install.sh",
            "/install.ps1",
            "/downloads/{file}",
            "/api/v1/openapi.json",
            "/api/v1/schema/service-map",
            "/api/v1/jobs/{id}/logs",
            "/api/v1/nodes/{name}/containers/{container}/logs",
            "/api/v1/nodes/{name}/containers/{container}/exec",
        ];
        for r in ROUTES {
            // 204: no body at all.
            if not_json.contains(&r.path) || matches!(r.access, Gateway) || r.ok.0 == 204 {
                continue;
            }
            assert!(
                r.schema.is_some(),
                "{} {} answers JSON without a schema",
                r.method,
                r.path
            );
        }
        let doc = document();
        let schemas = &doc["components"]["schemas"];
        // The node's schema is its type's: its fields, the status's values.
        let node = &schemas["NodeView"];
        assert!(node["properties"]["telemetry"].is_object(), "{node}");
        let status = schemas["NodeStatus"].to_string();
        assert!(status.contains("wake_failed"), "{status}");
        // A job is created from a `CreateJob` body; a page of nodes lists `NodeView`s.
        let create = &doc["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]
            ["application/json"]["schema"]["$ref"];
        assert_eq!(create, "#/components/schemas/CreateJob");
        let page = doc["paths"]["/api/v1/nodes"]["get"]["responses"]["200"].to_string();
        assert!(page.contains("#/components/schemas/Page"), "{page}");
        assert!(schemas
            .to_string()
            .contains("#/components/schemas/NodeView"));
        // The error body is the type the API answers with.
        assert!(
            schemas["Error"]["properties"]["error"].is_object(),
            "{}",
            schemas["Error"]
        );
    }
}
