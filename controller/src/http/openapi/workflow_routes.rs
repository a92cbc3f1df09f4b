//! Workflows: definitions, runs, cancelling and approving.

use super::{of, route, Access, Route};
use crate::authz::Op;
use nebula_types::api::{agents, workflows};

use Access::{Public, Token};

pub const WORKFLOW_ROUTES: &[Route] = &[
    route(
        "get",
        "/api/v1/agents",
        "agents",
        Token(Op::ReadFleet),
        (200, "every agent: the built-ins, and those from workflows.yml and the API (which replace a built-in of the same name)"),
        "List AI agents",
    )
    .returns(of::<Vec<agents::AgentView>>),
    route(
        "get",
        "/api/v1/agents/{name}",
        "agents",
        Token(Op::ReadFleet),
        (200, "the agent"),
        "One AI agent",
    )
    .returns(of::<agents::AgentView>),
    route(
        "put",
        "/api/v1/agents/{name}",
        "agents",
        Token(Op::ManageWorkflows),
        (200, "the agent as stored; 400 with line and column when it does not check; 409 for one defined in workflows.yml"),
        "Define (or replace) an AI agent",
    )
    .accepts(of::<workflows::PutWorkflow>)
    .returns(of::<agents::AgentView>),
    route(
        "delete",
        "/api/v1/agents/{name}",
        "agents",
        Token(Op::ManageWorkflows),
        (204, "removed (a built-in of that name is in force again)"),
        "Remove an AI agent",
    ),
    route(
        "post",
        "/api/v1/agents/{name}/ask",
        "agents",
        Token(Op::Chat),
        (200, "the agent's answer and each tool call it made, with what became of it (every call is also audited)"),
        "Ask an AI agent",
    )
    .accepts(of::<agents::AskAgent>)
    .returns(of::<agents::AgentReply>),
    route(
        "get",
        "/api/v1/workflows",
        "workflows",
        Token(Op::ReadFleet),
        (200, "every workflow, from workflows.yml and the API"),
        "List workflows",
    )
    .returns(of::<Vec<workflows::WorkflowView>>),
    route(
        "get",
        "/api/v1/workflows/{name}",
        "workflows",
        Token(Op::ReadFleet),
        (200, "the workflow with its checked definition"),
        "One workflow",
    )
    .returns(of::<workflows::WorkflowView>),
    route(
        "put",
        "/api/v1/workflows/{name}",
        "workflows",
        Token(Op::ManageWorkflows),
        (200, "the workflow as stored; 400 with line and column when it does not check; 409 for one defined in workflows.yml"),
        "Define (or replace) a workflow",
    )
    .accepts(of::<workflows::PutWorkflow>)
    .returns(of::<workflows::WorkflowView>),
    route(
        "delete",
        "/api/v1/workflows/{name}",
        "workflows",
        Token(Op::ManageWorkflows),
        (204, "removed (only workflows defined through the API)"),
        "Remove a workflow",
    ),
    route(
        "post",
        "/api/v1/workflows/{name}/runs",
        "workflows",
        Token(Op::RunWorkflow),
        (201, "the run, `running` or `queued` behind its concurrency group; 409 when its group's policy forbids it"),
        "Start a run",
    )
    .accepts(of::<workflows::StartRun>)
    .returns(of::<workflows::RunView>),
    route(
        "get",
        "/api/v1/workflow-runs",
        "workflows",
        Token(Op::ReadFleet),
        (200, "runs, newest first (?workflow=, ?limit= up to 500)"),
        "List runs",
    )
    .returns(of::<Vec<workflows::RunView>>),
    route(
        "get",
        "/api/v1/workflow-runs/{id}",
        "workflows",
        Token(Op::ReadFleet),
        (200, "the run with each step's latest attempt"),
        "One run",
    )
    .returns(of::<workflows::RunView>),
    route(
        "post",
        "/api/v1/workflow-runs/{id}/cancel",
        "workflows",
        Token(Op::RunWorkflow),
        (200, "the run, cancelling (its jobs are cancelled, steps not started are skipped)"),
        "Cancel a run",
    )
    .returns(of::<workflows::RunView>),
    route(
        "post",
        "/api/v1/workflow-runs/{id}/approve",
        "workflows",
        Token(Op::ApproveStep),
        (200, "the run after the decision; 409 when the step is not waiting for one"),
        "Approve or reject a step that waits for a person",
    )
    .accepts(of::<workflows::Decide>)
    .returns(of::<workflows::RunView>),
    route(
        "post",
        "/hooks/workflows/{name}",
        "workflows",
        Public,
        (202, "the run it started; 200 for a replayed delivery id (nothing started); 403 when the signature does not match"),
        "A webhook delivery (signed: GitHub X-Hub-Signature-256, GitLab X-Gitlab-Token, or Standard Webhooks)",
    )
    .returns(of::<workflows::Delivered>),
];
