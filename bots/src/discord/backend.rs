//! What the bot asks of the control plane, in one interface with two sides: [`super::local`]
//! calls the operations in this process (the bot as a controller task), [`super::remote`]
//! calls the controller's HTTP API with a `bot` token (the bot as `nebula bot`). Either way
//! the control plane judges each request for the Discord user it names; the bot only asks
//! [`Principal::allows`] (the same rule) before offering a confirmation.

use std::sync::Arc;
use std::time::Duration;

use nebula_controller::authz::{Op, OpCtx, Role};
use nebula_controller::OpError;
use nebula_types::api::alerts::{AlertView, CreateSilence, SilenceView};
use nebula_types::api::desired::{PlanView, ServiceView};
use nebula_types::api::discord::{DiscordUser, GuildChanges, GuildSettings, GuildView, Moderated};
use nebula_types::api::nodes::{NodeView, Wake};
use nebula_types::api::telemetry::LatestSample;
use nebula_types::jobs::JobRecord;
use serde_json::Value;
use uuid::Uuid;

/// The chat models some online node serves (not Stable Diffusion checkpoints), sorted, for
/// autocomplete and `/ask`'s default (the model names add the agents, as `agent/NAME`, after
/// them).
pub(crate) fn chat_models(inv: nebula_types::api::models::ModelsInventory) -> Vec<String> {
    let sd = nebula_protocol::ai::BackendKind::StableDiffusion.as_str();
    let mut out: Vec<String> = inv
        .nodes
        .into_iter()
        .filter(|n| n.online)
        .flat_map(|n| n.backends)
        .filter(|b| b.healthy && b.kind != sd)
        .flat_map(|b| b.models.into_iter().map(|m| m.name))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A Discord user as the control plane knows them.
#[derive(Debug, Clone)]
pub(crate) struct Principal {
    pub who: DiscordUser,
    pub actor: String,
    pub role: Role,
    /// In this process: the context the operations take.
    pub cx: Option<OpCtx>,
}

impl Principal {
    /// May they do `op`? (The controller checks again when it runs.)
    pub fn allows(&self, op: Op) -> Result<(), OpError> {
        nebula_controller::authz::permits(self.role, op)
    }
}

/// The bot's connection, for the dashboard.
#[derive(Debug, Clone, Default)]
pub(crate) struct Connection {
    pub connected: bool,
    pub account: Option<String>,
    pub application_id: Option<String>,
}

/// A gateway answer: status, JSON body, and the node that made it (images).
pub(crate) struct AiAnswer {
    pub status: u16,
    pub body: Value,
    pub node: Option<String>,
}

#[serenity::async_trait]
pub(crate) trait Backend: Send + Sync + 'static {
    // Identity and settings.
    async fn principal(&self, who: &DiscordUser) -> Result<Principal, OpError>;
    async fn redeem_link(&self, who: &DiscordUser, code: &str) -> Result<Principal, OpError>;
    /// `/settings` by a server admin.
    async fn set_settings(
        &self,
        who: &DiscordUser,
        guild: &str,
        settings: GuildSettings,
    ) -> Result<GuildView, OpError>;
    async fn moderated(&self, who: &DiscordUser, m: Moderated) -> Result<(), OpError>;
    async fn guild_seen(&self, guild: &str, name: &str) -> Result<(), OpError>;
    async fn guild_settings(&self, guild: &str) -> Result<Arc<GuildSettings>, OpError>;
    /// Servers whose settings changed after `since` (an earlier answer's epoch and number),
    /// waiting up to `wait`.
    async fn changes(
        &self,
        since: Option<(String, u64)>,
        wait: Duration,
    ) -> Result<GuildChanges, OpError>;
    async fn connection(&self, c: Connection);
    async fn alert_message(&self, fp: &str, channel: &str) -> Result<Option<String>, OpError>;
    async fn remember_alert_message(
        &self,
        fp: &str,
        channel: &str,
        message: &str,
    ) -> Result<(), OpError>;

    // The fleet, as `p`.
    async fn nodes(&self, p: &Principal) -> Result<Vec<NodeView>, OpError>;
    async fn node_latest(&self, p: &Principal, node: &str)
        -> Result<Option<LatestSample>, OpError>;
    async fn services(&self, p: &Principal) -> Result<Vec<ServiceView>, OpError>;
    async fn jobs(&self, p: &Principal, limit: u32) -> Result<Vec<JobRecord>, OpError>;
    async fn active_jobs(&self, p: &Principal) -> Result<usize, OpError>;
    async fn alerts(&self, p: &Principal) -> Result<Vec<AlertView>, OpError>;
    async fn silence(&self, p: &Principal, s: CreateSilence) -> Result<SilenceView, OpError>;
    async fn acknowledge(&self, p: &Principal, fingerprint: &str) -> Result<(), OpError>;
    async fn plan(&self, p: &Principal) -> Result<PlanView, OpError>;
    async fn reconcile(&self, p: &Principal) -> Result<(), OpError>;
    /// The revision it goes back to.
    async fn rollback(&self, p: &Principal, service: &str) -> Result<String, OpError>;
    async fn wake(&self, p: &Principal, node: &str) -> Result<Wake, OpError>;
    /// The sleep job.
    async fn sleep(&self, p: &Principal, node: &str) -> Result<Uuid, OpError>;
    /// An allow-listed operation on a node: its job.
    async fn run(
        &self,
        p: &Principal,
        node: &str,
        op: &str,
        args: Vec<String>,
    ) -> Result<Uuid, OpError>;
    /// A job and its output so far.
    async fn job_output(
        &self,
        p: &Principal,
        id: Uuid,
    ) -> Result<(Option<JobRecord>, Vec<String>), OpError>;
    /// Chat models some online node serves (not Stable Diffusion checkpoints).
    async fn model_names(&self, p: &Principal) -> Vec<String>;

    // The AI gateway, as `p`.
    async fn chat(&self, p: &Principal, body: Value) -> AiAnswer;
    async fn image(&self, p: &Principal, body: Value) -> AiAnswer;
}
