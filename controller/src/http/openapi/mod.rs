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
    /// A `bot` API token: a Discord bot in its own process (`nebula bot`).
    Bot,
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

mod more_routes;
mod routes;
mod workflow_routes;

pub use more_routes::MORE_ROUTES;
pub use routes::ROUTES;
pub use workflow_routes::WORKFLOW_ROUTES;
use Access::{Bot, Gateway, Public, Token};

/// Every operation: [`ROUTES`], then [`MORE_ROUTES`] (the Discord bot's own, secrets), then
/// [`WORKFLOW_ROUTES`].
pub fn all_routes() -> impl Iterator<Item = &'static Route> {
    ROUTES.iter().chain(MORE_ROUTES).chain(WORKFLOW_ROUTES)
}

/// The document.
pub fn document() -> Value {
    let mut generator = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    let mut paths = Map::new();
    for r in all_routes() {
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
            Bot => {
                op["security"] = json!([{"bearer": []}]);
                op["x-nebula-role"] = json!("bot");
                responses.insert("401".into(), error("no token, or an unknown one"));
                responses.insert("403".into(), error("the token's role is not bot"));
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
        let src = include_str!("../mod.rs");
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
        let documented: BTreeSet<(String, String)> = all_routes()
            .map(|r| (r.method.to_owned(), r.path.to_owned()))
            .collect();
        assert_eq!(
            documented.len(),
            all_routes().count(),
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
            "/api/v1/backup",
        ];
        for r in all_routes() {
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
