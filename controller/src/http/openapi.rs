//! The OpenAPI 3.1 document of everything the HTTP layer serves, at `GET /api/v1/openapi.json`.
//! [`ROUTES`] is the one list of operations; a test reads the router in `mod.rs` and fails when
//! a route is served but not documented, or documented but not served. Schemas come from
//! schemars where the types derive it (they are JSON Schema 2020-12, which OpenAPI 3.1 uses).

use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::authz::Op;

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
    /// The response body's schema, when its type derives one.
    pub schema: Option<fn(&mut SchemaGenerator) -> schemars::Schema>,
}

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
    }
}

fn tasks_schema(g: &mut SchemaGenerator) -> schemars::Schema {
    Vec::<crate::tasks::TaskStatus>::json_schema(g)
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
    ),
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
    ),
    route(
        "get",
        "/api/v1/nodes/{name}",
        "nodes",
        Token(Op::ReadFleet),
        (200, "the node"),
        "One node with its latest figures",
    ),
    route(
        "delete",
        "/api/v1/nodes/{name}",
        "nodes",
        Token(Op::RemoveNode),
        (200, "the removed node's id"),
        "Remove a node: revoke its certificates and cut it off",
    ),
    route(
        "post",
        "/api/v1/nodes/{name}/wake",
        "nodes",
        Token(Op::WakeNode),
        (202, "the wake-up under way"),
        "Wake a node through a relay on its LAN",
    ),
    route(
        "post",
        "/api/v1/nodes/{name}/sleep",
        "nodes",
        Token(Op::SleepNode),
        (202, "the sleep job"),
        "Run the node's allow-listed sleep command",
    ),
    route(
        "get",
        "/api/v1/nodes/{name}/telemetry",
        "telemetry",
        Token(Op::ReadFleet),
        (200, "latest figures and history"),
        "A node's telemetry (?since=, ?step=)",
    ),
    route(
        "get",
        "/api/v1/containers",
        "telemetry",
        Token(Op::ReadFleet),
        (200, "a page of containers"),
        "Every container in the fleet (?node=, ?label=, ?state=, ?health=)",
    ),
    route(
        "get",
        "/api/v1/tokens",
        "tokens",
        Token(Op::ReadFleet),
        (200, "a page of join tokens"),
        "List join tokens",
    ),
    route(
        "post",
        "/api/v1/tokens",
        "tokens",
        Token(Op::ManageJoinTokens),
        (201, "the token, shown once"),
        "Create a join token",
    ),
    route(
        "delete",
        "/api/v1/tokens/{id}",
        "tokens",
        Token(Op::ManageJoinTokens),
        (200, "revoked"),
        "Revoke a join token",
    ),
    route(
        "get",
        "/api/v1/jobs",
        "jobs",
        Token(Op::ReadFleet),
        (200, "a page of jobs"),
        "List jobs (?state=, ?node=, ?kind=, ?limit=, ?cursor=)",
    ),
    route(
        "post",
        "/api/v1/jobs",
        "jobs",
        Token(Op::RunJob),
        (201, "the job (200 or 202 with ?wait=)"),
        "Create a job on a node or the best node for a selector",
    ),
    route(
        "get",
        "/api/v1/jobs/{id}",
        "jobs",
        Token(Op::ReadFleet),
        (200, "the job"),
        "One job",
    ),
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
    ),
    route(
        "get",
        "/api/v1/inventory",
        "jobs",
        Token(Op::ReadInventory),
        (200, "operations per node"),
        "The allow-listed operations each node offers",
    ),
    route(
        "post",
        "/api/v1/inventory/execute",
        "jobs",
        Token(Op::RunJob),
        (200, "one result per node"),
        "Run an operation on many nodes at once",
    ),
    route(
        "get",
        "/api/v1/audit",
        "jobs",
        Token(Op::ReadAudit),
        (200, "a page of audit rows"),
        "The audit log (?actor=, ?action=)",
    ),
    route(
        "get",
        "/api/v1/desired",
        "desired state",
        Token(Op::ReadFleet),
        (200, "the map in force"),
        "The service map in force",
    ),
    route(
        "put",
        "/api/v1/desired",
        "desired state",
        Token(Op::ApplyMap),
        (200, "the version applied and its plan"),
        "Apply a service map (YAML body)",
    ),
    route(
        "get",
        "/api/v1/plan",
        "desired state",
        Token(Op::ReadFleet),
        (200, "the plan"),
        "The plan for the map in force",
    ),
    route(
        "post",
        "/api/v1/plan",
        "desired state",
        Token(Op::PreviewPlan),
        (200, "the plan"),
        "Plan a service map without applying it",
    ),
    route(
        "get",
        "/api/v1/services",
        "desired state",
        Token(Op::ReadFleet),
        (200, "every service"),
        "Services: revision in force, counts, last deploy",
    ),
    route(
        "get",
        "/api/v1/services/{name}",
        "desired state",
        Token(Op::ReadFleet),
        (200, "the service and its history"),
        "One service",
    ),
    route(
        "post",
        "/api/v1/services/{name}/rollback",
        "desired state",
        Token(Op::RollbackService),
        (200, "the pinned revision"),
        "Roll a service back to an earlier revision",
    ),
    route(
        "post",
        "/api/v1/reconcile",
        "desired state",
        Token(Op::Reconcile),
        (202, "a run was asked for"),
        "Ask the reconciler for a run now",
    ),
    route(
        "get",
        "/api/v1/users",
        "users",
        Token(Op::ManageUsers),
        (200, "dashboard users"),
        "List dashboard users",
    ),
    route(
        "post",
        "/api/v1/users",
        "users",
        Token(Op::ManageUsers),
        (201, "the user"),
        "Create a dashboard user",
    ),
    route(
        "post",
        "/api/v1/api-tokens",
        "users",
        Token(Op::ManageApiTokens),
        (201, "the token, shown once"),
        "Create (or replace) an API token",
    ),
    route(
        "get",
        "/api/v1/agent/releases",
        "install",
        Token(Op::ReadFleet),
        (200, "agent builds and the signing key"),
        "The agent builds this controller serves",
    ),
    Route {
        schema: Some(tasks_schema),
        ..route(
            "get",
            "/api/v1/tasks",
            "system",
            Token(Op::ReadFleet),
            (200, "every background task"),
            "Background tasks: scope, state, last run",
        )
    },
    route(
        "get",
        "/api/v1/models/inventory",
        "models",
        Token(Op::ReadFleet),
        (200, "backends and models per node"),
        "Inference backends and models across the fleet",
    ),
    route(
        "get",
        "/api/v1/models/desired",
        "models",
        Token(Op::ReadFleet),
        (200, "desired models and their pulls"),
        "Models the service map wants, and their pulls",
    ),
    route(
        "get",
        "/api/v1/ai/usage",
        "models",
        Token(Op::ReadFleet),
        (200, "usage per token, model and node"),
        "The AI gateway's usage",
    ),
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

fn error_schema() -> Value {
    json!({
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "examples": ["forbidden", "not_found", "bad_request"]},
                    "message": {"type": "string"},
                    "problems": {"description": "for a service map: each problem with its line and column"}
                }
            }
        }
    })
}

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
    let mut schemas: Map<String, Value> = generator.take_definitions(true).into_iter().collect();
    schemas.insert("Error".into(), error_schema());
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
}
