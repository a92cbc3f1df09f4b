//! A stand-in for Discord on 127.0.0.1. Discord itself is not reachable from the test machine,
//! so this speaks its real wire formats instead: the REST API under `/api/v10` (command
//! registration, interaction callbacks, webhook edits, channel messages, member roles) and the
//! gateway WebSocket (HELLO, IDENTIFY, READY, heartbeats and their ACKs, RESUME and RESUMED,
//! dispatches with sequence numbers). The bot under test is the real serenity client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::wait_for;

pub const APP_ID: u64 = 900_000_000_000_000_001;
pub const BOT_ID: u64 = 900_000_000_000_000_002;

/// One REST call the bot made.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub body: Value,
    /// What the stand-in answered (`null` for no content).
    pub response: Value,
    /// Files sent with the call (multipart uploads): name and bytes.
    pub files: Vec<(String, Vec<u8>)>,
}

enum Ctl {
    Send(Value),
    Drop,
}

struct Inner {
    guilds: Vec<u64>,
    calls: Mutex<Vec<Call>>,
    next_id: AtomicU64,
    seq: AtomicU64,
    /// Every dispatch sent, for RESUME.
    sent: Mutex<Vec<Value>>,
    live: Mutex<Option<mpsc::UnboundedSender<Ctl>>>,
    identifies: AtomicUsize,
    resumes: AtomicUsize,
    /// On RESUME, send again this many dispatches the client already saw (as Discord may).
    redeliver: AtomicUsize,
    addr: Mutex<Option<SocketAddr>>,
}

#[derive(Clone)]
pub struct FakeDiscord {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl FakeDiscord {
    pub async fn start(guilds: &[u64]) -> Self {
        let inner = Arc::new(Inner {
            guilds: guilds.to_vec(),
            calls: Mutex::default(),
            next_id: AtomicU64::new(800_000_000_000_000_000),
            seq: AtomicU64::new(0),
            sent: Mutex::default(),
            live: Mutex::default(),
            identifies: AtomicUsize::new(0),
            resumes: AtomicUsize::new(0),
            redeliver: AtomicUsize::new(0),
            addr: Mutex::default(),
        });
        let app = axum::Router::new()
            .route("/gateway", axum::routing::get(gateway))
            .fallback(rest)
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        *inner.addr.lock().unwrap() = Some(addr);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, inner }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::SeqCst)
    }

    pub fn identifies(&self) -> usize {
        self.inner.identifies.load(Ordering::SeqCst)
    }

    pub fn resumes(&self) -> usize {
        self.inner.resumes.load(Ordering::SeqCst)
    }

    /// Every REST call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.calls.lock().unwrap().clone()
    }

    /// Wait for a REST call (made after `after` calls) that `pred` accepts.
    pub async fn wait_call(&self, what: &str, after: usize, pred: impl Fn(&Call) -> bool) -> Call {
        wait_for(what, Duration::from_secs(45), || {
            let found = self.calls().into_iter().skip(after).find(|c| pred(c));
            async move { found }
        })
        .await
    }

    /// Send a gateway dispatch (event `t` with data `d`) to the connected bot.
    pub fn dispatch(&self, t: &str, d: Value) {
        dispatch(&self.inner, t, d);
    }

    /// Close the WebSocket without a close frame (as a network failure would).
    pub fn drop_connection(&self) {
        if let Some(tx) = self.inner.live.lock().unwrap().take() {
            let _ = tx.send(Ctl::Drop);
        }
    }

    pub fn redeliver_on_resume(&self, n: usize) {
        self.inner.redeliver.store(n, Ordering::SeqCst);
    }

    /// Wait until the bot has identified and registered `guild`'s commands.
    pub async fn wait_ready(&self, guild: u64) -> Vec<String> {
        let call = self
            .wait_call("the bot registers its commands", 0, |c| {
                c.method == "PUT" && c.path.ends_with(&format!("/guilds/{guild}/commands"))
            })
            .await;
        names(&call.body)
    }

    /// A member of `guild` (with `roles`) runs `/name` with `options`; returns the interaction id
    /// and token.
    pub fn command(
        &self,
        guild: u64,
        user: u64,
        roles: &[u64],
        name: &str,
        options: &[(&str, &str)],
    ) -> (u64, String) {
        self.command_with(guild, user, roles, name, options, "0")
    }

    pub fn command_with(
        &self,
        guild: u64,
        user: u64,
        roles: &[u64],
        name: &str,
        options: &[(&str, &str)],
        permissions: &str,
    ) -> (u64, String) {
        let id = self.id();
        let token = format!("itoken-{id}");
        let opts: Vec<Value> = options
            .iter()
            .map(|(k, v)| json!({ "name": k, "type": 3, "value": v }))
            .collect();
        let mut d = interaction(id, &token, 2, guild, user, roles, permissions);
        d["data"] =
            json!({ "id": self.id().to_string(), "name": name, "type": 1, "options": opts });
        self.dispatch("INTERACTION_CREATE", d);
        (id, token)
    }

    /// A member clicks a button with `custom_id` on message `message`.
    pub fn click(
        &self,
        guild: u64,
        user: u64,
        roles: &[u64],
        custom_id: &str,
        message: u64,
    ) -> (u64, String) {
        let id = self.id();
        let token = format!("itoken-{id}");
        let mut d = interaction(id, &token, 3, guild, user, roles, "0");
        d["data"] = json!({ "custom_id": custom_id, "component_type": 2 });
        d["message"] = message_json(message, 1, BOT_ID, "the message", Some(guild));
        self.dispatch("INTERACTION_CREATE", d);
        (id, token)
    }

    /// A member posts `content` in `channel`; returns the message id.
    pub fn say(&self, guild: u64, channel: u64, user: u64, content: &str) -> u64 {
        let id = self.id();
        let mut m = message_json(id, channel, user, content, Some(guild));
        m["member"] = json!({ "roles": [], "deaf": false, "mute": false, "flags": 0 });
        self.dispatch("MESSAGE_CREATE", m);
        id
    }

    /// A member types `typed` into option `option` of `/name`: an autocomplete interaction.
    pub fn autocomplete(
        &self,
        guild: u64,
        user: u64,
        roles: &[u64],
        name: &str,
        option: &str,
        typed: &str,
    ) -> u64 {
        let id = self.id();
        let token = format!("itoken-{id}");
        let mut d = interaction(id, &token, 4, guild, user, roles, "0");
        d["data"] = json!({
            "id": self.id().to_string(), "name": name, "type": 1,
            "options": [{ "name": option, "type": 3, "value": typed, "focused": true }],
        });
        self.dispatch("INTERACTION_CREATE", d);
        id
    }

    /// The bot is added to a server while connected: GUILD_CREATE with the whole guild.
    pub fn add_guild(&self, guild: u64, name: &str) {
        let mut g: Value = serde_json::from_str(
            r#"{
                "icon": null, "icon_hash": null, "splash": null, "discovery_splash": null,
                "owner_id": "1", "afk_channel_id": null, "afk_timeout": 300,
                "widget_enabled": false, "widget_channel_id": null, "verification_level": 0,
                "default_message_notifications": 0, "explicit_content_filter": 0, "roles": [],
                "emojis": [], "features": [], "mfa_level": 0, "application_id": null,
                "system_channel_id": null, "system_channel_flags": 0, "rules_channel_id": null,
                "max_presences": null, "max_members": 250000, "vanity_url_code": null,
                "description": null, "banner": null, "premium_tier": 0,
                "premium_subscription_count": 0, "preferred_locale": "en-US",
                "public_updates_channel_id": null, "max_video_channel_users": 25,
                "max_stage_video_channel_users": 50, "nsfw_level": 0, "stickers": [],
                "premium_progress_bar_enabled": false, "safety_alerts_channel_id": null,
                "joined_at": "2026-12-06T12:00:00.000000+00:00", "large": false,
                "unavailable": false, "member_count": 2, "voice_states": [], "members": [],
                "channels": [], "threads": [], "presences": [], "stage_instances": [],
                "guild_scheduled_events": []
            }"#,
        )
        .unwrap();
        g["id"] = json!(guild.to_string());
        g["name"] = json!(name);
        self.dispatch("GUILD_CREATE", g);
    }

    /// `user` leaves `guild`.
    pub fn leave(&self, guild: u64, user: u64, name: &str) {
        self.dispatch(
            "GUILD_MEMBER_REMOVE",
            json!({ "guild_id": guild.to_string(), "user": user_json(user, name) }),
        );
    }

    /// `user` joins `guild`.
    pub fn join(&self, guild: u64, user: u64, name: &str) {
        self.dispatch(
            "GUILD_MEMBER_ADD",
            json!({
                "guild_id": guild.to_string(),
                "user": user_json(user, name),
                "roles": [],
                "joined_at": "2026-12-06T12:00:00.000000+00:00",
                "deaf": false, "mute": false, "flags": 0,
            }),
        );
    }
}

/// The names of a command registration's body.
pub fn names(body: &Value) -> Vec<String> {
    body.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

pub fn user_json(id: u64, name: &str) -> Value {
    json!({
        "id": id.to_string(), "username": name, "discriminator": "0",
        "global_name": null, "avatar": null, "bot": id == BOT_ID,
    })
}

fn message_json(id: u64, channel: u64, author: u64, content: &str, guild: Option<u64>) -> Value {
    let mut m = json!({
        "id": id.to_string(), "channel_id": channel.to_string(),
        "author": user_json(author, if author == BOT_ID { "nebula" } else { "someone" }),
        "content": content, "timestamp": "2026-12-06T12:00:00.000000+00:00",
        "edited_timestamp": null, "tts": false, "mention_everyone": false, "mentions": [],
        "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "type": 0,
        "components": [],
    });
    if let Some(g) = guild {
        m["guild_id"] = json!(g.to_string());
    }
    m
}

fn interaction(
    id: u64,
    token: &str,
    kind: u8,
    guild: u64,
    user: u64,
    roles: &[u64],
    permissions: &str,
) -> Value {
    json!({
        "id": id.to_string(), "application_id": APP_ID.to_string(), "type": kind,
        "token": token, "version": 1, "locale": "en-US", "guild_locale": "en-US",
        "entitlements": [], "attachment_size_limit": 8_388_608, "app_permissions": "0",
        "channel_id": "1", "guild_id": guild.to_string(),
        "member": {
            "user": user_json(user, &format!("user{}", user % 1000)),
            "roles": roles.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "joined_at": "2026-01-01T00:00:00.000000+00:00",
            "deaf": false, "mute": false, "flags": 0, "permissions": permissions,
        },
    })
}

fn dispatch(inner: &Inner, t: &str, d: Value) {
    let s = inner.seq.fetch_add(1, Ordering::SeqCst) + 1;
    let payload = json!({ "op": 0, "s": s, "t": t, "d": d });
    inner.sent.lock().unwrap().push(payload.clone());
    if let Some(tx) = inner.live.lock().unwrap().as_ref() {
        let _ = tx.send(Ctl::Send(payload));
    }
}

async fn gateway(State(inner): State<Arc<Inner>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| session(inner, socket))
}

async fn send(socket: &mut WebSocket, v: &Value) -> bool {
    socket
        .send(WsMessage::Text(v.to_string().into()))
        .await
        .is_ok()
}

/// One gateway connection: HELLO, then IDENTIFY (READY) or RESUME (missed dispatches, then
/// RESUMED), heartbeats acknowledged, dispatches forwarded until dropped.
async fn session(inner: Arc<Inner>, mut socket: WebSocket) {
    let hello = json!({ "op": 10, "s": null, "t": null, "d": { "heartbeat_interval": 2000 } });
    if !send(&mut socket, &hello).await {
        return;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Ctl>();
    loop {
        tokio::select! {
            frame = socket.recv() => {
                let Some(Ok(frame)) = frame else { return };
                let WsMessage::Text(text) = frame else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                match v["op"].as_u64() {
                    Some(1) if !send(&mut socket, &json!({ "op": 11, "s": null, "t": null, "d": null })).await => {
                        return;
                    }
                    Some(2) => {
                        inner.identifies.fetch_add(1, Ordering::SeqCst);
                        // A new session numbers its dispatches from 1.
                        inner.seq.store(0, Ordering::SeqCst);
                        inner.sent.lock().unwrap().clear();
                        let addr = inner.addr.lock().unwrap().expect("address");
                        *inner.live.lock().unwrap() = Some(tx.clone());
                        let guilds: Vec<Value> = inner
                            .guilds
                            .iter()
                            .map(|g| json!({ "id": g.to_string(), "unavailable": true }))
                            .collect();
                        dispatch(&inner, "READY", json!({
                            "v": 10,
                            "user": user_json(BOT_ID, "nebula"),
                            "guilds": guilds,
                            "session_id": "fake-session",
                            "resume_gateway_url": format!("ws://{addr}/gateway"),
                            "shard": [0, 1],
                            "application": { "id": APP_ID.to_string(), "flags": 0 },
                        }));
                    }
                    Some(6) => {
                        inner.resumes.fetch_add(1, Ordering::SeqCst);
                        let from = v["d"]["seq"].as_u64().unwrap_or(0);
                        let again = inner.redeliver.swap(0, Ordering::SeqCst) as u64;
                        let missed: Vec<Value> = inner
                            .sent
                            .lock()
                            .unwrap()
                            .iter()
                            .filter(|p| p["s"].as_u64().unwrap_or(0) > from.saturating_sub(again))
                            .cloned()
                            .collect();
                        for p in missed {
                            if !send(&mut socket, &p).await {
                                return;
                            }
                        }
                        *inner.live.lock().unwrap() = Some(tx.clone());
                        dispatch(&inner, "RESUMED", json!({}));
                    }
                    _ => {}
                }
            }
            ctl = rx.recv() => match ctl {
                Some(Ctl::Send(p)) => {
                    if !send(&mut socket, &p).await {
                        return;
                    }
                }
                Some(Ctl::Drop) | None => return,
            }
        }
    }
}

/// The REST API: records each call and answers as Discord does.
async fn rest(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let boundary = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once("boundary="))
        .map(|(_, b)| b.trim_matches('"').to_owned());
    let bytes = axum::body::to_bytes(req.into_body(), 16 << 20)
        .await
        .unwrap_or_default();
    let (body, files) = match boundary {
        Some(b) => multipart(&bytes, &b),
        None => (
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            Vec::new(),
        ),
    };
    let addr = inner.addr.lock().unwrap().expect("address");
    let parts: Vec<&str> = path.trim_start_matches("/api/v10/").split('/').collect();
    let id = || inner.next_id.fetch_add(1, Ordering::SeqCst);
    let json_ok = |v: Value| (axum::http::StatusCode::OK, v);
    let answer = match (method.as_str(), parts.as_slice()) {
        ("GET", ["gateway"]) => json_ok(json!({ "url": format!("ws://{addr}/gateway") })),
        ("GET", ["gateway", "bot"]) => json_ok(json!({
            "url": format!("ws://{addr}/gateway"), "shards": 1,
            "session_start_limit": { "total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1 },
        })),
        ("PUT", ["applications", _, "guilds", _, "commands"]) => {
            let cmds: Vec<Value> = body
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|mut c| {
                    c["id"] = json!(id().to_string());
                    c["application_id"] = json!(APP_ID.to_string());
                    c["version"] = json!("1");
                    c["type"] = c.get("type").cloned().unwrap_or(json!(1));
                    c["default_member_permissions"] = c
                        .get("default_member_permissions")
                        .cloned()
                        .unwrap_or(Value::Null);
                    c
                })
                .collect();
            json_ok(Value::Array(cmds))
        }
        ("POST", ["interactions", _, _, "callback"]) => no_content(),
        ("PATCH", ["webhooks", _, _, "messages", _]) | ("POST", ["webhooks", _, _]) => {
            json_ok(echo(id(), 1, &body))
        }
        ("POST", ["channels", channel, "messages"]) => {
            json_ok(echo(id(), channel.parse().unwrap_or(1), &body))
        }
        ("PATCH", ["channels", channel, "messages", m]) => json_ok(echo(
            m.parse().unwrap_or(1),
            channel.parse().unwrap_or(1),
            &body,
        )),
        ("DELETE", ["channels", _, "messages", _]) => no_content(),
        ("PUT" | "DELETE", ["guilds", _, "members", _, "roles", _]) => no_content(),
        ("PATCH", ["guilds", _, "members", "@me"]) => json_ok(json!({
            "user": user_json(BOT_ID, "nebula"), "nick": body["nick"], "roles": [],
            "joined_at": "2026-01-01T00:00:00.000000+00:00", "deaf": false, "mute": false, "flags": 0,
        })),
        _ => (
            axum::http::StatusCode::NOT_FOUND,
            json!({ "message": "Unknown route", "code": 0 }),
        ),
    };
    inner.calls.lock().unwrap().push(Call {
        method,
        path,
        body,
        response: answer.1.clone(),
        files,
    });
    if answer.1.is_null() {
        answer.0.into_response()
    } else {
        (answer.0, axum::Json(answer.1)).into_response()
    }
}

/// A `multipart/form-data` body as Discord reads it: the `payload_json` part is the JSON
/// body, the others are files.
fn multipart(bytes: &[u8], boundary: &str) -> (Value, Vec<(String, Vec<u8>)>) {
    let delim = format!("--{boundary}");
    let mut body = Value::Null;
    let mut files = Vec::new();
    let mut rest = bytes;
    while let Some(start) = find(rest, delim.as_bytes()) {
        rest = &rest[start + delim.len()..];
        let Some(head_end) = find(rest, b"\r\n\r\n") else {
            break;
        };
        let head = String::from_utf8_lossy(&rest[..head_end]).to_string();
        let content = &rest[head_end + 4..];
        let end = find(content, delim.as_bytes()).unwrap_or(content.len());
        let part = content[..end]
            .strip_suffix(b"\r\n")
            .unwrap_or(&content[..end]);
        let name = head
            .split("name=\"")
            .nth(1)
            .and_then(|n| n.split('"').next())
            .unwrap_or("")
            .to_owned();
        if name == "payload_json" {
            body = serde_json::from_slice(part).unwrap_or(Value::Null);
        } else {
            files.push((name, part.to_vec()));
        }
        rest = &content[end..];
    }
    (body, files)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn no_content() -> (axum::http::StatusCode, Value) {
    (axum::http::StatusCode::NO_CONTENT, Value::Null)
}

/// A message as Discord answers a create or edit: the fields sent, in a whole message object.
fn echo(id: u64, channel: u64, body: &Value) -> Value {
    let mut m = message_json(
        id,
        channel,
        BOT_ID,
        body["content"].as_str().unwrap_or(""),
        None,
    );
    if let Some(c) = body.get("components") {
        m["components"] = c.clone();
    }
    m
}

/// The text of every content a call carried (interaction callbacks nest it under `data`).
pub fn content(c: &Call) -> String {
    c.body["content"]
        .as_str()
        .or_else(|| c.body["data"]["content"].as_str())
        .unwrap_or("")
        .to_owned()
}

/// The custom ids of the buttons a call carried.
pub fn buttons(c: &Call) -> Vec<String> {
    let comps = c
        .body
        .get("components")
        .or_else(|| c.body["data"].get("components"));
    let mut out = Vec::new();
    for row in comps.and_then(Value::as_array).into_iter().flatten() {
        for b in row["components"].as_array().into_iter().flatten() {
            if let Some(id) = b["custom_id"].as_str() {
                out.push(id.to_owned());
            }
        }
    }
    out
}
