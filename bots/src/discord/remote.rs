//! The bot in its own process (`nebula bot`) against a remote controller, through its HTTP
//! API with a `bot` token. Fleet commands are the ordinary API routes with the Discord user
//! in `x-nebula-discord-*` headers, so the controller judges them as it judges any request;
//! the bot's own bookkeeping is under `/api/v1/discord/bot/`. The process attaches (one per
//! controller: one gateway connection per token), says so again every 15 s, long-polls for
//! settings changes and for alert notifications to post, and reports each delivery.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nebula_controller::OpError;
use nebula_types::api::alerts::{AlertView, CreateSilence, SilenceView};
use nebula_types::api::desired::{PlanView, RolledBack, ServiceView};
use nebula_types::api::discord::{
    AlertDelivery, AlertMessage, BotAttach, BotPrincipal, DeliveryOutcome, DiscordUser, ForUser,
    GuildChanges, GuildSettings, GuildView, Moderated,
};
use nebula_types::api::models::ModelsInventory;
use nebula_types::api::nodes::{NodeView, Wake};
use nebula_types::api::telemetry::{LatestSample, NodeTelemetry};
use nebula_types::api::Page;
use nebula_types::jobs::{JobRecord, JobState};
use reqwest::{Method, RequestBuilder};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::backend::{AiAnswer, Backend, Connection, Principal};

/// How `nebula bot` connects to both sides.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// The controller's URL (`https://controller.example`).
    pub controller: String,
    /// A `bot` API token of that controller.
    pub api_token: String,
    /// The Discord bot's token and where Discord is.
    pub discord: super::Config,
}

pub(crate) struct Remote {
    http: reqwest::Client,
    base: String,
    token: String,
    instance: String,
    host: String,
    state: Mutex<Connection>,
    /// Servers' settings, read once and dropped when the controller says they changed (the
    /// settings-changes long poll) or after a minute.
    settings: Mutex<HashMap<String, (Instant, Arc<GuildSettings>)>>,
}

/// A Discord name in a header: bytes outside plain ASCII are percent-encoded (the controller
/// decodes them).
fn header_name(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b" -_.".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An answer's error as the control plane's.
fn op_error(status: reqwest::StatusCode, body: &[u8]) -> OpError {
    let msg = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("the controller answered {status}"));
    match status.as_u16() {
        400 | 422 => OpError::Invalid(msg),
        401 | 403 => OpError::Forbidden(msg),
        404 => OpError::NotFound(msg),
        409 => OpError::Conflict(msg),
        429 => OpError::TooManyRequests(msg),
        _ => OpError::Conflict(format!("the controller could not do it: {msg}")),
    }
}

fn unreachable(e: &reqwest::Error) -> OpError {
    OpError::Conflict(format!("the controller is not reachable now ({e})"))
}

impl Remote {
    pub(crate) fn new(cfg: &RemoteConfig) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("nebula-bot/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base: cfg.controller.trim_end_matches('/').to_owned(),
            token: cfg.api_token.clone(),
            instance: Uuid::new_v4().to_string(),
            host: hostname(),
            state: Mutex::default(),
            settings: Mutex::default(),
        })
    }

    fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
    }

    /// A request acting for `who`.
    fn req_as(&self, who: &DiscordUser, method: Method, path: &str) -> RequestBuilder {
        let mut r = self
            .req(method, path)
            .header("x-nebula-discord-user", &who.id)
            .header("x-nebula-discord-name", header_name(&who.name))
            .header("x-nebula-discord-roles", who.roles.join(","));
        if let Some(g) = &who.guild {
            r = r.header("x-nebula-discord-guild", g);
        }
        r
    }

    async fn send_raw(&self, req: RequestBuilder) -> Result<Vec<u8>, OpError> {
        let resp = req.send().await.map_err(|e| unreachable(&e))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| unreachable(&e))?;
        if status.is_success() {
            Ok(body.to_vec())
        } else {
            Err(op_error(status, &body))
        }
    }

    async fn send<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T, OpError> {
        let body = self.send_raw(req).await?;
        serde_json::from_slice(&body)
            .map_err(|e| OpError::Conflict(format!("the controller's answer did not parse ({e})")))
    }

    /// Attach, or say again that this process holds the connection. `Ok(false)`: refused
    /// (another process holds it, or the controller runs its own bot).
    async fn attach(&self) -> Result<Result<(), String>, OpError> {
        let c = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let body = BotAttach {
            instance: self.instance.clone(),
            host: self.host.clone(),
            connected: c.connected,
            account: c.account,
            application_id: c.application_id,
        };
        let req = self
            .req(Method::PUT, "/api/v1/discord/bot/attach")
            .json(&body);
        let resp = req.send().await.map_err(|e| unreachable(&e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap_or_default();
        match status.as_u16() {
            200..=299 => Ok(Ok(())),
            401 | 403 | 409 => Ok(Err(op_error(status, &bytes).to_string())),
            _ => Err(op_error(status, &bytes)),
        }
    }

    async fn detach(&self) {
        let path = format!("/api/v1/discord/bot/attach?instance={}", self.instance);
        let _ = self.send_raw(self.req(Method::DELETE, &path)).await;
    }

    async fn ai(&self, p: &Principal, path: &str, body: &Value) -> AiAnswer {
        let resp = self
            .req_as(&p.who, Method::POST, path)
            .json(body)
            .timeout(Duration::from_secs(600))
            .send()
            .await;
        match resp {
            Err(e) => AiAnswer {
                status: 502,
                body: json!({ "error": { "message": unreachable(&e).to_string() } }),
                node: None,
            },
            Ok(r) => {
                let node = r
                    .headers()
                    .get(nebula_controller::ai::gateway::NODE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let status = r.status().as_u16();
                let body = r.json().await.unwrap_or_default();
                AiAnswer { status, body, node }
            }
        }
    }
}

impl Remote {
    /// Drop cached settings: one server's, or all.
    fn forget(&self, guild: Option<&str>) {
        let mut cache = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        match guild {
            Some(g) => {
                cache.remove(g);
            }
            None => cache.clear(),
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn to_principal(who: &DiscordUser, p: BotPrincipal) -> Principal {
    Principal {
        who: who.clone(),
        actor: p.actor,
        role: p.role,
        cx: None,
    }
}

fn enc(s: &str) -> String {
    header_name(s).replace(' ', "%20")
}

#[serenity::async_trait]
impl Backend for Remote {
    async fn principal(&self, who: &DiscordUser) -> Result<Principal, OpError> {
        let req = self
            .req(Method::POST, "/api/v1/discord/bot/principal")
            .json(who);
        Ok(to_principal(who, self.send(req).await?))
    }

    async fn redeem_link(&self, who: &DiscordUser, code: &str) -> Result<Principal, OpError> {
        let body = ForUser {
            user: who.clone(),
            body: code.to_owned(),
        };
        let req = self
            .req(Method::POST, "/api/v1/discord/bot/link")
            .json(&body);
        Ok(to_principal(who, self.send(req).await?))
    }

    async fn set_settings(
        &self,
        who: &DiscordUser,
        guild: &str,
        settings: GuildSettings,
    ) -> Result<GuildView, OpError> {
        let body = ForUser {
            user: who.clone(),
            body: settings,
        };
        let path = format!("/api/v1/discord/bot/guilds/{guild}/settings");
        self.forget(Some(guild));
        self.send(self.req(Method::PUT, &path).json(&body)).await
    }

    async fn moderated(&self, who: &DiscordUser, m: Moderated) -> Result<(), OpError> {
        let body = ForUser {
            user: who.clone(),
            body: m,
        };
        let req = self.req(Method::POST, "/api/v1/discord/bot/moderation");
        self.send_raw(req.json(&body)).await.map(|_| ())
    }

    async fn guild_seen(&self, guild: &str, name: &str) -> Result<(), OpError> {
        let req = self.req(Method::POST, &format!("/api/v1/discord/bot/guilds/{guild}"));
        self.send_raw(req.json(&json!({ "name": name })))
            .await
            .map(|_| ())
    }

    async fn guild_settings(&self, guild: &str) -> Result<Arc<GuildSettings>, OpError> {
        if let Some((at, s)) = self
            .settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(guild)
        {
            if at.elapsed() < Duration::from_secs(60) {
                return Ok(s.clone());
            }
        }
        let path = format!("/api/v1/discord/bot/guilds/{guild}/settings");
        let s: Arc<GuildSettings> = Arc::new(self.send(self.req(Method::GET, &path)).await?);
        self.settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(guild.to_owned(), (Instant::now(), s.clone()));
        Ok(s)
    }

    async fn changes(
        &self,
        since: Option<(String, u64)>,
        wait: Duration,
    ) -> Result<GuildChanges, OpError> {
        let mut path = format!("/api/v1/discord/bot/changes?wait={}", wait.as_secs());
        if let Some((epoch, seq)) = since {
            path.push_str(&format!("&epoch={}&since={seq}", enc(&epoch)));
        }
        let c: GuildChanges = self.send(self.req(Method::GET, &path)).await?;
        if c.all {
            self.forget(None);
        }
        for g in &c.guilds {
            self.forget(Some(g));
        }
        Ok(c)
    }

    async fn connection(&self, c: Connection) {
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.connected = c.connected;
            if c.account.is_some() {
                s.account = c.account;
                s.application_id = c.application_id;
            }
        }
        match self.attach().await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => tracing::warn!("the controller refused this bot process: {why}"),
            Err(e) => tracing::warn!("could not tell the controller about the connection: {e}"),
        }
    }

    async fn alert_message(&self, fp: &str, channel: &str) -> Result<Option<String>, OpError> {
        let path = format!("/api/v1/discord/bot/alert-messages/{}/{channel}", enc(fp));
        match self
            .send::<AlertMessage>(self.req(Method::GET, &path))
            .await
        {
            Ok(m) => Ok(Some(m.message)),
            Err(OpError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn remember_alert_message(
        &self,
        fp: &str,
        channel: &str,
        message: &str,
    ) -> Result<(), OpError> {
        let path = format!("/api/v1/discord/bot/alert-messages/{}/{channel}", enc(fp));
        let body = AlertMessage {
            message: message.to_owned(),
        };
        self.send_raw(self.req(Method::PUT, &path).json(&body))
            .await
            .map(|_| ())
    }

    async fn nodes(&self, p: &Principal) -> Result<Vec<NodeView>, OpError> {
        let req = self.req_as(&p.who, Method::GET, "/api/v1/nodes?limit=1000");
        Ok(self.send::<Page<NodeView>>(req).await?.items)
    }

    async fn node_latest(
        &self,
        p: &Principal,
        node: &str,
    ) -> Result<Option<LatestSample>, OpError> {
        let path = format!("/api/v1/nodes/{}/telemetry?since=1s", enc(node));
        let t: NodeTelemetry = self.send(self.req_as(&p.who, Method::GET, &path)).await?;
        Ok(t.latest)
    }

    async fn services(&self, p: &Principal) -> Result<Vec<ServiceView>, OpError> {
        self.send(self.req_as(&p.who, Method::GET, "/api/v1/services"))
            .await
    }

    async fn jobs(&self, p: &Principal, limit: u32) -> Result<Vec<JobRecord>, OpError> {
        let path = format!("/api/v1/jobs?limit={limit}");
        let page: Page<JobRecord> = self.send(self.req_as(&p.who, Method::GET, &path)).await?;
        Ok(page.items)
    }

    async fn active_jobs(&self, p: &Principal) -> Result<usize, OpError> {
        let mut n = 0;
        for s in JobState::ALL.iter().filter(|s| !s.is_terminal()) {
            let path = format!("/api/v1/jobs?limit=1000&state={}", s.as_str());
            let page: Page<JobRecord> = self.send(self.req_as(&p.who, Method::GET, &path)).await?;
            n += page.items.len();
        }
        Ok(n)
    }

    async fn alerts(&self, p: &Principal) -> Result<Vec<AlertView>, OpError> {
        self.send(self.req_as(&p.who, Method::GET, "/api/v1/alerts"))
            .await
    }

    async fn silence(&self, p: &Principal, s: CreateSilence) -> Result<SilenceView, OpError> {
        let req = self.req_as(&p.who, Method::POST, "/api/v1/alerts/silences");
        self.send(req.json(&s)).await
    }

    async fn acknowledge(&self, p: &Principal, fingerprint: &str) -> Result<(), OpError> {
        let path = format!("/api/v1/alerts/{}/ack", enc(fingerprint));
        self.send_raw(self.req_as(&p.who, Method::POST, &path))
            .await
            .map(|_| ())
    }

    async fn plan(&self, p: &Principal) -> Result<PlanView, OpError> {
        self.send(self.req_as(&p.who, Method::GET, "/api/v1/plan"))
            .await
    }

    async fn reconcile(&self, p: &Principal) -> Result<(), OpError> {
        self.send_raw(self.req_as(&p.who, Method::POST, "/api/v1/reconcile"))
            .await
            .map(|_| ())
    }

    async fn rollback(&self, p: &Principal, service: &str) -> Result<String, OpError> {
        let path = format!("/api/v1/services/{}/rollback", enc(service));
        let r: RolledBack = self
            .send(self.req_as(&p.who, Method::POST, &path).json(&json!({})))
            .await?;
        Ok(r.revision)
    }

    async fn wake(&self, p: &Principal, node: &str) -> Result<Wake, OpError> {
        let path = format!("/api/v1/nodes/{}/wake", enc(node));
        self.send(self.req_as(&p.who, Method::POST, &path)).await
    }

    async fn sleep(&self, p: &Principal, node: &str) -> Result<Uuid, OpError> {
        let path = format!("/api/v1/nodes/{}/sleep", enc(node));
        let j: JobRecord = self.send(self.req_as(&p.who, Method::POST, &path)).await?;
        Ok(j.id)
    }

    async fn run(
        &self,
        p: &Principal,
        node: &str,
        op: &str,
        args: Vec<String>,
    ) -> Result<Uuid, OpError> {
        let body = json!({ "node": node, "work": { "kind": "exec", "op": op, "args": args } });
        let req = self
            .req_as(&p.who, Method::POST, "/api/v1/jobs")
            .json(&body);
        let j: JobRecord = self.send(req).await?;
        Ok(j.id)
    }

    async fn job_output(
        &self,
        p: &Principal,
        id: Uuid,
    ) -> Result<(Option<JobRecord>, Vec<String>), OpError> {
        let rec: JobRecord = self
            .send(self.req_as(&p.who, Method::GET, &format!("/api/v1/jobs/{id}")))
            .await?;
        let path = format!("/api/v1/jobs/{id}/logs?follow=false");
        let text = self
            .send_raw(self.req_as(&p.who, Method::GET, &path))
            .await?;
        Ok((Some(rec), log_lines(&String::from_utf8_lossy(&text))))
    }

    async fn model_names(&self, p: &Principal) -> Vec<String> {
        let req = self.req_as(&p.who, Method::GET, "/api/v1/models/inventory");
        let Ok(inv) = self.send::<ModelsInventory>(req).await else {
            return Vec::new();
        };
        let mut names = super::backend::chat_models(inv);
        let req = self.req_as(&p.who, Method::GET, "/api/v1/agents");
        if let Ok(agents) = self
            .send::<Vec<nebula_types::api::agents::AgentView>>(req)
            .await
        {
            names.extend(agents.into_iter().map(|a| format!("agent/{}", a.name)));
        }
        names
    }

    async fn chat(&self, p: &Principal, body: Value) -> AiAnswer {
        self.ai(p, "/v1/chat/completions", &body).await
    }

    async fn image(&self, p: &Principal, body: Value) -> AiAnswer {
        self.ai(p, "/v1/images/generations", &body).await
    }
}

/// The `log` events' lines of a job's log stream.
fn log_lines(sse: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut event = "";
    for line in sse.lines() {
        if let Some(e) = line.strip_prefix("event:") {
            event = e.trim();
        } else if let Some(d) = line.strip_prefix("data:") {
            if event == "log" {
                if let Ok(v) = serde_json::from_str::<Value>(d.trim()) {
                    out.push(v["line"].as_str().unwrap_or("").to_owned());
                }
            }
        } else if line.is_empty() {
            event = "";
        }
    }
    out
}

/// Run the bot against a remote controller until `shutdown`. Errors when the controller
/// refuses it (another bot process holds the connection, the controller runs its own bot, or
/// the token is not a `bot` token) or cannot be reached at start.
pub async fn run(cfg: RemoteConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let remote = Arc::new(Remote::new(&cfg)?);
    match remote.attach().await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => anyhow::bail!("the controller at {} refused the bot: {why}", remote.base),
        Err(e) => anyhow::bail!("the controller at {} did not answer: {e}", remote.base),
    }
    tracing::info!(controller = %remote.base, "attached to the controller");
    let backend: Arc<dyn Backend> = remote.clone();
    let stop = shutdown.child_token();
    let started = super::start(backend.clone(), cfg.discord.clone(), stop.clone()).await;
    let (handle, http) = match started {
        Ok(s) => s,
        Err(e) => {
            remote.detach().await;
            return Err(e);
        }
    };
    let beat = tokio::spawn(heartbeat(remote.clone(), stop.clone()));
    let posts = tokio::spawn(deliveries(remote.clone(), http, stop.clone()));
    let _ = handle.await;
    stop.cancel();
    let (refused, _) = tokio::join!(beat, posts);
    remote.detach().await;
    match refused {
        Ok(Some(why)) => anyhow::bail!("the controller refused this bot process: {why}"),
        _ if !shutdown.is_cancelled() => {
            anyhow::bail!("the Discord connection ended (is the token valid? see the log)")
        }
        _ => Ok(()),
    }
}

/// Say every 15 s that this process holds the connection; stop the bot when the controller
/// refuses it (another process holds the connection, or it has a token itself). Gives why.
async fn heartbeat(remote: Arc<Remote>, stop: CancellationToken) -> Option<String> {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(15)) => {}
            () = stop.cancelled() => return None,
        }
        match remote.attach().await {
            Ok(Err(why)) => {
                tracing::error!("{why}: this bot process stops");
                stop.cancel();
                return Some(why);
            }
            Err(e) => tracing::warn!("the controller did not take the heartbeat: {e}"),
            Ok(Ok(())) => {}
        }
    }
}

/// Post the alert notifications the controller hands over, and report each.
async fn deliveries(remote: Arc<Remote>, http: Arc<serenity::all::Http>, stop: CancellationToken) {
    let path = format!(
        "/api/v1/discord/bot/deliveries?instance={}&wait=25",
        remote.instance
    );
    loop {
        let batch = tokio::select! {
            b = remote.send::<Vec<AlertDelivery>>(remote.req(Method::GET, &path)) => b,
            () = stop.cancelled() => return,
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("could not fetch alert notifications: {e}");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    () = stop.cancelled() => return,
                }
            }
        };
        for d in batch {
            let outcome =
                super::alerts::post(&http, remote.as_ref(), &d.sink, &d.url, &d.body).await;
            let body = DeliveryOutcome {
                error: outcome.err(),
            };
            let req = remote
                .req(
                    Method::POST,
                    &format!("/api/v1/discord/bot/deliveries/{}", d.id),
                )
                .json(&body);
            if let Err(e) = remote.send_raw(req).await {
                tracing::warn!(delivery = %d.id, "could not report a delivery: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_travel_in_headers_percent_encoded() {
        assert_eq!(header_name("ann b_c.d-e"), "ann b_c.d-e");
        assert_eq!(header_name("zoë%"), "zo%C3%AB%25");
    }

    #[test]
    fn a_log_stream_gives_its_lines() {
        let sse = "event: log\ndata: {\"line\":\"one\"}\n\nevent: state\ndata: {\"line\":\"no\"}\n\nevent: log\ndata: {\"line\":\"two\"}\n\n";
        assert_eq!(log_lines(sse), ["one", "two"]);
    }
}
