//! The bot inside the controller: each request is the control-plane operation the HTTP API
//! calls, with the context [`ControlPlane::discord_principal`] makes.

use std::sync::Arc;
use std::time::Duration;

use nebula_controller::ai::gateway::{Caller, NODE_HEADER};
use nebula_controller::authz::{Op, OpCtx};
use nebula_controller::jobs::NewJob;
use nebula_controller::store::jobs::JobFilter;
use nebula_controller::{ControlPlane, OpError};
use nebula_types::api::alerts::{AlertView, CreateSilence, SilenceView};
use nebula_types::api::desired::{PlanView, ServiceView};
use nebula_types::api::discord::{DiscordUser, GuildChanges, GuildSettings, GuildView, Moderated};
use nebula_types::api::nodes::{NodeView, Wake};
use nebula_types::api::telemetry::LatestSample;
use nebula_types::jobs::{JobRecord, Target, Work};
use serde_json::Value;
use uuid::Uuid;

use super::backend::{AiAnswer, Backend, Connection, Principal};

pub(crate) struct Local(pub Arc<ControlPlane>);

impl Local {
    /// The gateway's caller for `p`, who may chat.
    fn caller(&self, p: &Principal) -> Result<Caller, OpError> {
        let cx = cx(p)?;
        self.0.authorize(cx, Op::Chat)?;
        Ok(Caller::for_discord(cx))
    }
}

fn principal(who: &DiscordUser, cx: OpCtx) -> Principal {
    Principal {
        who: who.clone(),
        actor: cx.actor.clone(),
        role: cx.role,
        cx: Some(cx),
    }
}

fn cx(p: &Principal) -> Result<&OpCtx, OpError> {
    p.cx.as_ref()
        .ok_or_else(|| OpError::Forbidden("no principal".into()))
}

/// A gateway answer's status and JSON body (and the node that made it).
async fn read(resp: axum::response::Response) -> AiAnswer {
    let node = resp
        .headers()
        .get(NODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
        .await
        .unwrap_or_default();
    AiAnswer {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or_default(),
        node,
    }
}

#[serenity::async_trait]
impl Backend for Local {
    async fn principal(&self, who: &DiscordUser) -> Result<Principal, OpError> {
        Ok(principal(who, self.0.discord_principal(who).await?))
    }

    async fn redeem_link(&self, who: &DiscordUser, code: &str) -> Result<Principal, OpError> {
        self.0.redeem_discord_link(who, code, None).await?;
        self.principal(who).await
    }

    async fn set_settings(
        &self,
        who: &DiscordUser,
        guild: &str,
        settings: GuildSettings,
    ) -> Result<GuildView, OpError> {
        let cx = self.0.discord_guild_admin(who).await?;
        self.0.set_guild_settings(&cx, guild, settings, true).await
    }

    async fn moderated(&self, who: &DiscordUser, m: Moderated) -> Result<(), OpError> {
        self.0.discord_moderated(who, &m, None);
        Ok(())
    }

    async fn guild_seen(&self, guild: &str, name: &str) -> Result<(), OpError> {
        self.0.discord_guild_seen(guild, name).await
    }

    async fn guild_settings(&self, guild: &str) -> Result<Arc<GuildSettings>, OpError> {
        self.0.guild_settings(guild).await
    }

    async fn changes(
        &self,
        since: Option<(String, u64)>,
        wait: Duration,
    ) -> Result<GuildChanges, OpError> {
        let since = since.as_ref().map(|(e, n)| (e.as_str(), *n));
        Ok(self.0.discord.changes_since(since, wait).await)
    }

    async fn connection(&self, c: Connection) {
        self.0.discord.set_status(|s| {
            s.connected = c.connected;
            if c.account.is_some() {
                s.account = c.account;
                s.application_id = c.application_id;
            }
        });
    }

    async fn alert_message(&self, fp: &str, channel: &str) -> Result<Option<String>, OpError> {
        self.0.discord_alert_message(fp, channel).await
    }

    async fn remember_alert_message(
        &self,
        fp: &str,
        channel: &str,
        message: &str,
    ) -> Result<(), OpError> {
        self.0
            .remember_discord_alert_message(fp, channel, message)
            .await
    }

    async fn nodes(&self, p: &Principal) -> Result<Vec<NodeView>, OpError> {
        self.0.nodes_view(cx(p)?).await
    }

    async fn node_latest(
        &self,
        p: &Principal,
        node: &str,
    ) -> Result<Option<LatestSample>, OpError> {
        self.0.authorize(cx(p)?, Op::ReadFleet)?;
        let Some(rec) = self.0.store.node_by_name(node).await? else {
            return Err(OpError::NotFound(format!("no node named `{node}`")));
        };
        Ok(self.0.latest_sample(rec.id))
    }

    async fn services(&self, p: &Principal) -> Result<Vec<ServiceView>, OpError> {
        self.0.authorize(cx(p)?, Op::ReadFleet)?;
        self.0.services().await
    }

    async fn jobs(&self, p: &Principal, limit: u32) -> Result<Vec<JobRecord>, OpError> {
        self.0.authorize(cx(p)?, Op::ReadFleet)?;
        let filter = JobFilter {
            limit,
            ..Default::default()
        };
        Ok(self.0.store.list_jobs(&filter).await?)
    }

    async fn active_jobs(&self, p: &Principal) -> Result<usize, OpError> {
        self.0.authorize(cx(p)?, Op::ReadFleet)?;
        Ok(self.0.jobs.active_count())
    }

    async fn alerts(&self, p: &Principal) -> Result<Vec<AlertView>, OpError> {
        self.0.alerts_now(cx(p)?).await
    }

    async fn silence(&self, p: &Principal, s: CreateSilence) -> Result<SilenceView, OpError> {
        self.0.add_silence(cx(p)?, s).await
    }

    async fn acknowledge(&self, p: &Principal, fingerprint: &str) -> Result<(), OpError> {
        self.0.acknowledge_alert(cx(p)?, fingerprint).await
    }

    async fn plan(&self, p: &Principal) -> Result<PlanView, OpError> {
        self.0.current_plan_for(cx(p)?).await
    }

    async fn reconcile(&self, p: &Principal) -> Result<(), OpError> {
        self.0.request_reconcile(cx(p)?)
    }

    async fn rollback(&self, p: &Principal, service: &str) -> Result<String, OpError> {
        let pin = self.0.rollback_service(service, None, cx(p)?).await?;
        Ok(pin.revision)
    }

    async fn wake(&self, p: &Principal, node: &str) -> Result<Wake, OpError> {
        self.0.wake_node(node, cx(p)?).await
    }

    async fn sleep(&self, p: &Principal, node: &str) -> Result<Uuid, OpError> {
        Ok(self.0.sleep_node(node, cx(p)?).await?.id)
    }

    async fn run(
        &self,
        p: &Principal,
        node: &str,
        op: &str,
        args: Vec<String>,
    ) -> Result<Uuid, OpError> {
        let new = NewJob {
            work: Work::Exec {
                op: op.to_owned(),
                args,
            },
            target: Target::Node(node.to_owned()),
            deadline: None,
            idempotent: false,
            max_attempts: None,
        };
        Ok(self.0.create_job(new, cx(p)?).await?.id)
    }

    async fn job_output(
        &self,
        p: &Principal,
        id: Uuid,
    ) -> Result<(Option<JobRecord>, Vec<String>), OpError> {
        self.0.authorize(cx(p)?, Op::ReadFleet)?;
        let rec = self.0.job(id).await?;
        let done = rec.as_ref().is_none_or(|r| r.state.is_terminal());
        let lines = match self.0.watch_job(id) {
            Some(w) if !done => w.recent,
            _ => self.0.store.job_logs(id, None, 10_000).await?,
        };
        Ok((rec, lines.into_iter().map(|l| l.line).collect()))
    }

    async fn model_names(&self, p: &Principal) -> Vec<String> {
        if p.allows(Op::ReadFleet).is_err() {
            return Vec::new();
        }
        let mut names = super::backend::chat_models(self.0.models_inventory());
        if let Some(cx) = &p.cx {
            if let Ok(agents) = self.0.agent_views(cx).await {
                names.extend(agents.into_iter().map(|a| format!("agent/{}", a.name)));
            }
        }
        names
    }

    async fn chat(&self, p: &Principal, body: Value) -> AiAnswer {
        let caller = match self.caller(p) {
            Ok(c) => c,
            Err(e) => return refused(&e),
        };
        read(
            nebula_controller::agents::serve_for(
                self.0.clone(),
                caller,
                body.to_string().into(),
                "/v1/chat/completions",
            )
            .await,
        )
        .await
    }

    async fn image(&self, p: &Principal, body: Value) -> AiAnswer {
        let caller = match self.caller(p) {
            Ok(c) => c,
            Err(e) => return refused(&e),
        };
        read(
            nebula_controller::ai::gateway::generate_images(
                self.0.clone(),
                caller.name,
                body.to_string().into(),
            )
            .await,
        )
        .await
    }
}

/// A refusal in the gateway's error shape.
fn refused(e: &OpError) -> AiAnswer {
    AiAnswer {
        status: 403,
        body: serde_json::json!({ "error": { "message": e.to_string() } }),
        node: None,
    }
}
