//! The Discord page: connect the bot (its token, its invite link), link your own Discord
//! account, each server's settings, and the actions taken through the bot.

use std::collections::BTreeMap;

use nebula_controller::authz::Role as AuthRole;
use nebula_controller::discord::MODERATION_RULES as RULES;
use nebula_types::api::discord::{GuildSettings, GuildView, ModAction, SelfRole};

use crate::prelude::*;

fn action_name(a: Option<&ModAction>) -> &'static str {
    match a {
        None => "off",
        Some(ModAction::Warn) => "warn",
        Some(ModAction::Delete) => "delete",
        Some(ModAction::Log) => "log",
    }
}

fn lines<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    items.iter().map(f).collect::<Vec<_>>().join("\n")
}

fn guild_form(user: &User, g: &GuildView, admin: bool) -> Markup {
    let s = &g.settings;
    let dis = !admin;
    let roles = s
        .roles
        .iter()
        .map(|(id, r)| format!("{id}={}", r.as_str()))
        .collect::<Vec<_>>()
        .join("\n");
    html! {
        section.card id={"guild-" (g.id)} {
            h2 { (if g.name.is_empty() { g.id.as_str() } else { g.name.as_str() }) " " span.dim { (g.id) } }
            p.dim { "Changed by " (g.updated_by) " at " (g.updated_at) }
            form method="post" action={"/ui/discord/guilds/" (g.id)} {
                (csrf_field(user))
                fieldset disabled[dis] {
                    legend { "Command groups" }
                    label { input type="checkbox" name="fleet" checked[s.groups.fleet]; " fleet" }
                    label { input type="checkbox" name="ai" checked[s.groups.ai]; " AI" }
                    label { input type="checkbox" name="community" checked[s.groups.community]; " community" }
                    div { label { "Nickname " input name="nickname" value=(s.nickname) maxlength="32"; } }
                    div { label { "Answer in channels (ids, empty: all) " input name="channels" value=(s.channels.join(" ")) size="40"; } }
                    h3 { "Persona" }
                    div { label { "Model " input name="model" value=(s.persona.model) placeholder="routed by the gateway"; } }
                    div { label { "Image checkpoint " input name="image_model" value=(s.persona.image_model); } }
                    div { label { "System prompt" br; textarea name="system" rows="3" cols="70" { (s.persona.system) } } }
                    div { label { "AI cooldown per member (s) " input type="number" name="cooldown_s" min="0" value=(s.ai_limits.cooldown_s); }
                        " " label { "AI commands per hour " input type="number" name="per_hour" min="0" value=(s.ai_limits.per_hour); } }
                    h3 { "Alerts" }
                    div { label { "Channel id " input name="alert_channel" value=(s.alerts.channel); }
                        " " label { "from severity " select name="min_severity" {
                            @for sev in ["info", "warning", "critical"] {
                                option value=(sev) selected[s.alerts.min_severity == sev || (s.alerts.min_severity.is_empty() && sev == "info")] { (sev) }
                            } } }
                        " " label { "rules (empty: all) " input name="alert_rules" value=(s.alerts.filters.rules.join(" ")); } }
                    h3 { "Community" }
                    div { label { "Welcome channel " input name="welcome_channel" value=(s.welcome.channel); }
                        " " label { "message " input name="welcome" value=(s.welcome.template) size="50" placeholder="Welcome {user} to {server}!"; } }
                    div { label { "Goodbye channel " input name="goodbye_channel" value=(s.goodbye.channel); }
                        " " label { "message " input name="goodbye" value=(s.goodbye.template) size="50" placeholder="{name} left."; } }
                    div { label { "Self-assigned roles (ROLE_ID label, one a line)" br;
                        textarea name="self_roles" rows="3" cols="40" { (lines(&s.self_roles, |r| format!("{} {}", r.role, r.label))) } } }
                    div { "Moderation: "
                        @for rule in RULES {
                            label { (rule) " " select name={"mod_" (rule)} {
                                @for a in ["off", "log", "warn", "delete"] {
                                    option value=(a) selected[action_name(s.moderation.rules.get(rule)) == a] { (a) }
                                } } } " "
                        }
                    }
                    div { label { "Moderators' log channel " input name="log_channel" value=(s.moderation.log_channel); } }
                    h3 { "Who is who" }
                    div { label { "Discord role id = Nebula role (viewer, operator, admin), one a line" br;
                        textarea name="roles" rows="3" cols="40" { (roles) } } }
                    div { label { "Everyone else " select name="everyone" {
                        option value="" selected[s.everyone.is_none()] { "no role (link first)" }
                        @for r in ["viewer", "operator"] {
                            option value=(r) selected[s.everyone.map(|e| e.as_str()) == Some(r)] { (r) }
                        } } } }
                    button type="submit" { "Save" }
                }
            }
        }
    }
}

pub(crate) async fn discord_page(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
) -> Response {
    let cx = user.cx();
    let guilds = match cp.discord_guilds(&cx).await {
        Ok(g) => g,
        Err(e) => return op_error(e),
    };
    let admin = user.authorize(&cp, Op::ManageBot).is_ok();
    let actions = cp.discord_actions(&cx, 30).await.unwrap_or_default();
    let status = cp.discord.status();
    let from_file = cp.config.discord.token_file.is_some();
    let body = html! {
        h1 { "Discord" }
        p id="bot-status" {
            @if status.connected { span.badge.up { "connected" } " as " code { (status.account.clone().unwrap_or_default()) } }
            @else if status.configured || status.remote.is_some() { span.badge.down { "not connected" } }
            @else { span.badge { "no token" } }
            @if let Some(host) = &status.remote { " · runs as " code { "nebula bot" } " on " code { (host) } }
            @if let Some(url) = status.invite_url() { " · " a href=(url) rel="noopener" target="_blank" { "Add the bot to a server" } }
        }
        @if admin && !from_file && status.remote.is_none() {
            form.actions method="post" action="/ui/discord/token" id="token-form" {
                (csrf_field(&user))
                label for="token" { "Bot token" }
                input id="token" name="token" type="password" autocomplete="off" size="60" placeholder="from the Discord developer portal";
                button type="submit" { "Connect" }
            }
        } @else if from_file { p.dim { "The token comes from the controller's config ([discord] token_file)." } }
        form.actions method="post" action="/ui/discord/link" id="link-form" {
            (csrf_field(&user))
            button.secondary type="submit" { "Link my Discord account" }
            span.dim { " a one-time code for " code { "/link" } }
        }
        @if guilds.is_empty() { p.dim id="no-guilds" { "The bot is in no server yet." } }
        @for g in &guilds { (guild_form(&user, g, admin)) }
        h2 { "Recent bot actions" }
        @if actions.is_empty() { p.dim { "None yet." } }
        @else {
            div.scroll { table id="bot-actions" {
                thead { tr { th { "When" } th { "Who" } th { "Discord user" } th { "Action" } th { "Target" } } }
                tbody { @for a in &actions { tr {
                    td { (nebula_controller::store::rfc3339_millis(nebula_controller::store::from_millis(a.at))) }
                    td { (a.actor) } td { (a.detail["discord"]["name"].as_str().unwrap_or("")) }
                    td { code { (a.action) } } td { (a.target) }
                } } }
            } }
        }
    };
    page(&user, "Discord", "/ui/discord", None, body).into_response()
}

#[derive(Deserialize, Default)]
pub(crate) struct TokenForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    token: String,
}

pub(crate) async fn set_token(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    match cp.set_discord_token(&user.cx(), &f.token).await {
        Ok(()) => Redirect::to("/ui/discord").into_response(),
        Err(e) => op_error(e),
    }
}

pub(crate) async fn link_code(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(&f.csrf) {
        return r.into_response();
    }
    match cp.discord_link_code(&user.cx(), &user.name).await {
        Ok(code) => page(
            &user,
            "Discord",
            "/ui/discord",
            None,
            html! {
                h1 { "Link your Discord account" }
                p { "Send this to the bot in Discord before " (code.expires_at) ":" }
                pre id="link-code" { "/link " (code.code) }
                p { a href="/ui/discord" { "Back" } }
            },
        )
        .into_response(),
        Err(e) => op_error(e),
    }
}

/// Read the settings form (every field is sent; unchecked boxes are absent).
fn settings_from(
    f: &BTreeMap<String, String>,
    old: &GuildSettings,
) -> Result<GuildSettings, String> {
    let get = |k: &str| f.get(k).map(|v| v.trim().to_owned()).unwrap_or_default();
    let words = |k: &str| {
        get(k)
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let mut s = old.clone();
    s.groups.fleet = f.contains_key("fleet");
    s.groups.ai = f.contains_key("ai");
    s.groups.community = f.contains_key("community");
    s.nickname = get("nickname");
    s.channels = words("channels");
    s.persona.model = get("model");
    s.persona.image_model = get("image_model");
    s.persona.system = get("system");
    let number = |k: &str| {
        get(k)
            .parse::<u32>()
            .map_err(|_| format!("`{k}` is a whole number"))
    };
    s.ai_limits.cooldown_s = number("cooldown_s")?;
    s.ai_limits.per_hour = number("per_hour")?;
    s.alerts.channel = get("alert_channel");
    s.alerts.min_severity = get("min_severity");
    s.alerts.filters.rules = words("alert_rules");
    s.welcome.channel = get("welcome_channel");
    s.welcome.template = get("welcome");
    s.goodbye.channel = get("goodbye_channel");
    s.goodbye.template = get("goodbye");
    s.self_roles = get("self_roles")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (role, label) = l
                .trim()
                .split_once(char::is_whitespace)
                .unwrap_or((l.trim(), l.trim()));
            SelfRole {
                role: role.to_owned(),
                label: label.trim().to_owned(),
            }
        })
        .collect();
    s.moderation.rules.clear();
    for rule in RULES {
        let a = match get(&format!("mod_{rule}")).as_str() {
            "log" => ModAction::Log,
            "warn" => ModAction::Warn,
            "delete" => ModAction::Delete,
            _ => continue,
        };
        s.moderation.rules.insert(rule.to_owned(), a);
    }
    s.moderation.log_channel = get("log_channel");
    s.roles.clear();
    for l in get("roles").lines().filter(|l| !l.trim().is_empty()) {
        let (id, role) = l
            .split_once('=')
            .ok_or_else(|| format!("`{l}`: ROLE_ID=role"))?;
        let role = match role.trim() {
            "viewer" => AuthRole::Viewer,
            "operator" => AuthRole::Operator,
            "admin" => AuthRole::Admin,
            other => return Err(format!("`{other}`: viewer, operator or admin")),
        };
        s.roles.insert(id.trim().to_owned(), role);
    }
    s.everyone = match get("everyone").as_str() {
        "viewer" => Some(AuthRole::Viewer),
        "operator" => Some(AuthRole::Operator),
        _ => None,
    };
    Ok(s)
}

pub(crate) async fn save_guild(
    State(cp): State<Arc<ControlPlane>>,
    Extension(user): Extension<User>,
    Path(id): Path<String>,
    form: Result<Form<BTreeMap<String, String>>, FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    if let Err(r) = user.check(f.get("csrf").map(String::as_str).unwrap_or("")) {
        return r.into_response();
    }
    let old = match cp.guild_settings(&id).await {
        Ok(s) => s,
        Err(e) => return op_error(e),
    };
    let settings = match settings_from(&f, &old) {
        Ok(s) => s,
        Err(why) => return op_error(OpError::Invalid(why)),
    };
    match cp
        .set_guild_settings(&user.cx(), &id, settings, false)
        .await
    {
        Ok(_) => Redirect::to("/ui/discord").into_response(),
        Err(e) => op_error(e),
    }
}
