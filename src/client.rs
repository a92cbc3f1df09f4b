//! Subcommands that talk to a controller's HTTP API, through [`Api`]: a client that sends and
//! reads the API's own types (`nebula_types::api`), never JSON by string keys.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use nebula_protocol::Labels;
use nebula_types::api::access::{
    CreateTokenRequest, CreateUserRequest, CreatedTokenView, TokenRevoked, TokenView, UserList,
    UserView,
};
use nebula_types::api::nodes::{NodeRemoved, NodeView, Wake};
use nebula_types::api::{ErrorBody, Page};
use nebula_types::jobs::JobRecord;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::Cli;

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a join token and print it (shown once).
    Create {
        /// Lifetime, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many agents may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Label for nodes that join with it, key=value (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List join tokens.
    List,
    /// Revoke a join token.
    Revoke { id: String },
}

#[derive(Args, Debug)]
pub struct NodesArgs {
    /// Only nodes with this label, key=value.
    #[arg(long)]
    label: Option<String>,
    /// Only online or offline nodes.
    #[arg(long)]
    status: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Show one node.
    Show { name: String },
    /// Remove a node: revoke its certificate and cut its connection.
    Remove { name: String },
}

pub struct Api {
    http: reqwest::Client,
    pub base: String,
    pub token: String,
    /// The extra CA to trust (`--ca-file`).
    ca: Option<reqwest::Certificate>,
}

/// A client builder trusting `ca` besides the public roots.
fn builder(ca: &Option<reqwest::Certificate>) -> reqwest::ClientBuilder {
    let b =
        reqwest::Client::builder().user_agent(concat!("nebula-cli/", env!("CARGO_PKG_VERSION")));
    match ca {
        Some(ca) => b.add_root_certificate(ca.clone()),
        None => b,
    }
}

/// The API's error answer as an error: `STATUS: message (code)`, with the problems of a map
/// one per line.
pub async fn error_of(resp: reqwest::Response) -> anyhow::Error {
    let status = resp.status();
    let bytes = resp.bytes().await.unwrap_or_default();
    let Ok(ErrorBody { error }) = serde_json::from_slice::<ErrorBody>(&bytes) else {
        return anyhow::anyhow!("{status}: {}", String::from_utf8_lossy(&bytes).trim());
    };
    let problems: Vec<nebula_desired::map::Problem> = error
        .problems
        .and_then(|p| serde_json::from_value(p).ok())
        .unwrap_or_default();
    if !problems.is_empty() {
        // One line per problem, `line:column: message`, as compilers print them.
        let lines: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
        return anyhow::anyhow!("{status} ({}):\n{}", error.code, lines.join("\n"));
    }
    anyhow::anyhow!("{status}: {} ({})", error.message, error.code)
}

impl Api {
    pub fn new(cli: &Cli) -> anyhow::Result<Self> {
        let token = match (&cli.token, &cli.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .with_context(|| format!("reading token file {}", f.display()))?
                .trim()
                .to_owned(),
            (None, None) => anyhow::bail!(
                "no API token: set NEBULA_TOKEN, NEBULA_TOKEN_FILE or pass --token-file"
            ),
        };
        let ca = match &cli.ca_file {
            Some(f) => {
                let pem = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                Some(
                    reqwest::Certificate::from_pem(&pem)
                        .with_context(|| format!("{} holds no PEM certificate", f.display()))?,
                )
            }
            None => None,
        };
        let http = builder(&ca).timeout(Duration::from_secs(30)).build()?;
        Ok(Api {
            http,
            base: cli.controller.trim_end_matches('/').to_owned(),
            token,
            ca,
        })
    }

    /// A client without the overall timeout, for streams that last as long as a job.
    pub fn http_long(&self) -> reqwest::Client {
        builder(&self.ca)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_else(|_| self.http.clone())
    }

    /// Send a request and read its answer as `T`, or the API's error as an error.
    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the controller at {}", self.base))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(error_of(resp).await);
        }
        let bytes = resp.bytes().await.unwrap_or_default();
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the controller's answer is not what this CLI reads (versions differ?): {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            )
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }
    /// GET with query parameters.
    pub async fn get_query<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)).query(query))
            .await
    }
    /// Send a request whose answer has no body (204); the API's error is an error.
    async fn send_empty(&self, req: reqwest::RequestBuilder) -> anyhow::Result<()> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the controller at {}", self.base))?;
        if resp.status().is_success() {
            return Ok(());
        }
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap_or_default();
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(ErrorBody { error }) => {
                anyhow::bail!("{status}: {} ({})", error.message, error.code)
            }
            Err(_) => anyhow::bail!("{status}: {}", String::from_utf8_lossy(&bytes).trim()),
        }
    }
    pub async fn delete_empty(&self, path: &str) -> anyhow::Result<()> {
        self.send_empty(self.http.delete(format!("{}{path}", self.base)))
            .await
    }
    pub async fn post_empty(&self, path: &str) -> anyhow::Result<()> {
        self.send_empty(self.http.post(format!("{}{path}", self.base)))
            .await
    }
    async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }
    /// Send a text body (a service map) with PUT or POST.
    pub async fn send_text<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        text: String,
    ) -> anyhow::Result<T> {
        self.send(
            self.http
                .request(method, format!("{}{path}", self.base))
                .header(reqwest::header::CONTENT_TYPE, "application/yaml")
                .body(text),
        )
        .await
    }
    pub async fn send_json<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(
            self.http
                .request(method, format!("{}{path}", self.base))
                .json(body),
        )
        .await
    }

    pub async fn post<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// Every node (all pages), filtered.
    pub async fn nodes(&self, args: &NodesArgs) -> anyhow::Result<Vec<NodeView>> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q = vec![("limit", "1000".to_owned())];
            if let Some(c) = &cursor {
                q.push(("cursor", c.clone()));
            }
            if let Some(l) = &args.label {
                q.push(("label", l.clone()));
            }
            if let Some(st) = &args.status {
                q.push(("status", st.clone()));
            }
            let url = format!("{}/api/v1/nodes", self.base);
            let page: Page<NodeView> = self.send(self.http.get(url).query(&q)).await?;
            items.extend(page.items);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        Ok(items)
    }

    pub async fn node(&self, name: &str) -> anyhow::Result<NodeView> {
        self.get(&format!("/api/v1/nodes/{name}")).await
    }
}

/// Print a value as the API's JSON (for `--json`).
pub fn print_json<T: Serialize + ?Sized>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Print rows as an aligned table.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!("{}", line(headers.iter().map(|h| h.to_string()).collect()));
    for r in rows {
        println!("{}", line(r));
    }
}

/// A value for a table cell: `-` when absent.
pub fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

pub fn labels(l: &Labels) -> String {
    if l.is_empty() {
        return "-".into();
    }
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub async fn token(cli: &Cli, cmd: &TokenCommand) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    match cmd {
        TokenCommand::Create {
            ttl,
            uses,
            labels: ls,
            description,
        } => {
            let mut labels = Labels::new();
            for l in ls {
                let (k, v) = l
                    .split_once('=')
                    .with_context(|| format!("label `{l}` must read key=value"))?;
                labels.insert(k.into(), v.into());
            }
            let body = CreateTokenRequest {
                ttl: Some(ttl.clone()),
                uses: Some(*uses),
                labels,
                description: description.clone(),
            };
            let created: CreatedTokenView = api.post("/api/v1/tokens", &body).await?;
            if cli.json {
                print_json(&created);
            } else {
                let t = &created.record;
                println!("{}", created.token);
                eprintln!(
                    "token {} expires {} with {} use(s); join with:\n  nebula-agent join --controller HOST:4433 --token {}",
                    t.id,
                    opt(t.expires_at.as_ref()),
                    opt(t.uses_left),
                    created.token
                );
            }
        }
        TokenCommand::List => {
            let page: Page<TokenView> = api.get("/api/v1/tokens").await?;
            if cli.json {
                print_json(&page.items);
                return Ok(());
            }
            let rows = page
                .items
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.state.clone(),
                        opt(t.uses_left),
                        t.uses.to_string(),
                        opt(t.expires_at.as_ref()),
                        labels(&t.labels),
                        t.description.clone(),
                    ]
                })
                .collect();
            table(
                &[
                    "ID",
                    "STATE",
                    "USES LEFT",
                    "USED",
                    "EXPIRES",
                    "LABELS",
                    "DESCRIPTION",
                ],
                rows,
            );
        }
        TokenCommand::Revoke { id } => {
            let v: TokenRevoked = api.delete(&format!("/api/v1/tokens/{id}")).await?;
            if cli.json {
                print_json(&v);
            } else {
                println!("revoked {}", v.revoked);
            }
        }
    }
    Ok(())
}

fn gib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1u64 << 30) as f64)
}

/// "42%" with a small bar, for the live view.
fn bar(pct: f64, width: usize) -> String {
    let filled = ((pct / 100.0) * width as f64)
        .round()
        .clamp(0.0, width as f64) as usize;
    format!(
        "{}{} {:>3.0}%",
        "█".repeat(filled),
        "·".repeat(width - filled),
        pct
    )
}

fn node_rows(items: &[NodeView], bars: bool) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|n| {
            let (cpu, mem, gpu, ctr) = match &n.telemetry {
                Some(t) => {
                    let cpu = f64::from(t.cpu_percent);
                    let used = t.memory_used_bytes;
                    let total = t.memory_total_bytes.max(1);
                    let mem_pct = used as f64 * 100.0 / total as f64;
                    let gpu = match t.gpu_utilization_percent.map(f64::from) {
                        Some(u) => {
                            let vram = match (t.gpu_memory_used_bytes, t.gpu_memory_total_bytes) {
                                (Some(u), Some(tt)) => format!(" {}/{} GiB", gib(u), gib(tt)),
                                _ => String::new(),
                            };
                            if bars {
                                format!("{}{vram}", bar(u, 10))
                            } else {
                                format!("{u:.0}%{vram}")
                            }
                        }
                        None => "-".into(),
                    };
                    let unhealthy = t.containers_unhealthy;
                    let ctr = format!(
                        "{}/{}{}",
                        t.containers_running,
                        t.containers_total,
                        if unhealthy > 0 {
                            format!(" ({unhealthy} unhealthy)")
                        } else {
                            String::new()
                        }
                    );
                    if bars {
                        (
                            bar(cpu, 10),
                            format!("{} {}/{} GiB", bar(mem_pct, 10), gib(used), gib(total)),
                            gpu,
                            ctr,
                        )
                    } else {
                        (
                            format!("{cpu:.0}%"),
                            format!("{}/{} GiB", gib(used), gib(total)),
                            gpu,
                            ctr,
                        )
                    }
                }
                None => ("-".into(), "-".into(), "-".into(), "-".into()),
            };
            vec![
                n.name.clone(),
                n.status.as_str().to_owned(),
                cpu,
                mem,
                gpu,
                ctr,
                opt(n.last_seen_at.as_ref()),
            ]
        })
        .collect()
}

const NODE_HEADERS: [&str; 7] = [
    "NAME",
    "STATUS",
    "CPU",
    "MEMORY",
    "GPU",
    "CONTAINERS",
    "LAST SEEN",
];

pub async fn nodes(cli: &Cli, args: &NodesArgs) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let items = api.nodes(args).await?;
    if cli.json {
        print_json(&items);
        return Ok(());
    }
    table(&NODE_HEADERS, node_rows(&items, false));
    Ok(())
}

#[derive(Args, Debug)]
pub struct TopArgs {
    #[command(flatten)]
    filter: NodesArgs,
    /// Refresh period.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Stop after this many refreshes (default: until Ctrl-C).
    #[arg(long)]
    iterations: Option<u64>,
}

/// A live, refreshing view of the fleet.
pub async fn top(cli: &Cli, args: &TopArgs) -> anyhow::Result<()> {
    use nebula_types::api::nodes::NodeStatus;
    let api = Api::new(cli)?;
    let mut n = 0u64;
    loop {
        let items = api.nodes(&args.filter).await?;
        let online = items
            .iter()
            .filter(|i| i.status == NodeStatus::Online)
            .count();
        let running: usize = items
            .iter()
            .filter_map(|i| i.telemetry.as_ref())
            .map(|t| t.containers_running)
            .sum();
        // Clear the screen and home the cursor, then draw.
        print!("\x1b[2J\x1b[H");
        println!(
            "nebula top — {} · {online}/{} nodes online · {running} containers running · every {}",
            api.base,
            items.len(),
            humantime::format_duration(args.interval)
        );
        println!();
        table(&NODE_HEADERS, node_rows(&items, true));
        n += 1;
        if args.iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

pub async fn node(cli: &Cli, cmd: &NodeCommand) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    match cmd {
        NodeCommand::Show { name } => {
            let n = api.node(name).await?;
            if cli.json {
                print_json(&n);
                return Ok(());
            }
            let f = &n.facts;
            for (k, v) in [
                ("name", n.name.clone()),
                ("id", n.id.to_string()),
                ("status", n.status.as_str().to_owned()),
                ("labels", labels(&n.labels)),
                ("hostname", f.hostname.clone()),
                ("os", format!("{} {}", f.os, f.os_version)),
                ("kernel", f.kernel.clone()),
                ("arch", f.arch.clone()),
                ("cpus", f.cpu_count.to_string()),
                ("agent", n.agent_version.clone()),
                ("address", opt(n.remote_addr.as_ref())),
                ("connected since", opt(n.connected_since.as_ref())),
                ("last seen", opt(n.last_seen_at.as_ref())),
                ("enrolled", n.enrolled_at.clone()),
                ("certificate expires", opt(n.cert_not_after.as_ref())),
            ] {
                println!("{k:>20}: {v}");
            }
        }
        NodeCommand::Remove { name } => {
            let v: NodeRemoved = api.delete(&format!("/api/v1/nodes/{name}")).await?;
            if cli.json {
                print_json(&v);
            } else {
                println!(
                    "removed {}: certificate revoked, connection closed",
                    v.removed
                );
            }
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Create a dashboard user; without --password-file a password is generated and printed once.
    Create {
        username: String,
        /// Make the user an admin (same as --role admin).
        #[arg(long)]
        admin: bool,
        /// admin, operator or viewer.
        #[arg(long, default_value = "viewer")]
        role: String,
        /// A file holding the password.
        #[arg(long)]
        password_file: Option<std::path::PathBuf>,
    },
    /// List dashboard users.
    List,
    /// A one-time code that links a Discord account to this user: send `/link CODE` to the bot
    /// within 15 minutes (your own; an admin makes them for anyone).
    LinkDiscord { username: String },
}

pub async fn user(cli: &Cli, cmd: &UserCommand) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    match cmd {
        UserCommand::LinkDiscord { username } => {
            let v: nebula_types::api::discord::LinkCode = api
                .post(
                    &format!("/api/v1/users/{username}/discord-link-code"),
                    &serde_json::json!({}),
                )
                .await?;
            if cli.json {
                print_json(&v);
            } else {
                println!(
                    "Send this to the Nebula bot in Discord before {}:",
                    v.expires_at
                );
                println!("/link {}", v.code);
            }
        }
        UserCommand::Create {
            username,
            admin,
            role,
            password_file,
        } => {
            let (password, generated) = match password_file {
                Some(f) => (
                    std::fs::read_to_string(f)
                        .with_context(|| format!("reading {}", f.display()))?
                        .trim_end_matches(['\r', '\n'])
                        .to_owned(),
                    false,
                ),
                None => (uuid::Uuid::new_v4().simple().to_string(), true),
            };
            let role = if *admin { "admin" } else { role.as_str() };
            let body = CreateUserRequest {
                username: username.clone(),
                password: password.clone(),
                role: Some(role.to_owned()),
            };
            let v: UserView = api.post("/api/v1/users", &body).await?;
            if cli.json {
                /// The user, with the password when it was generated (shown once).
                #[derive(Serialize)]
                struct Created<'a> {
                    #[serde(flatten)]
                    user: &'a UserView,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    password: Option<&'a str>,
                }
                let password = generated.then_some(password.as_str());
                print_json(&Created { user: &v, password });
            } else {
                println!("Created {} user `{}`.", v.role, v.username);
                if generated {
                    println!("Password (shown once): {password}");
                }
            }
        }
        UserCommand::List => {
            let v: UserList = api.get("/api/v1/users").await?;
            if cli.json {
                print_json(&v);
                return Ok(());
            }
            let rows = v
                .items
                .iter()
                .map(|u| vec![u.username.clone(), u.role.clone()])
                .collect();
            table(&["USERNAME", "ROLE"], rows);
        }
    }
    Ok(())
}

/// `nebula wake NODE`: through a relay on its LAN; waits (up to `wait`) for it to register.
pub async fn wake(cli: &Cli, node: &str, wait: Option<Duration>) -> anyhow::Result<()> {
    use nebula_types::api::nodes::NodeStatus;
    let api = Api::new(cli)?;
    let w: Wake = api
        .post(
            &format!("/api/v1/nodes/{node}/wake"),
            &serde_json::Map::new(),
        )
        .await?;
    if cli.json && wait.is_none() {
        print_json(&w);
        return Ok(());
    }
    if !cli.json {
        println!("Waking {node} through {} (job {}).", w.relay, w.job);
    }
    let Some(wait) = wait else { return Ok(()) };
    let started = std::time::Instant::now();
    loop {
        let n = api.node(node).await?;
        let done = matches!(n.status, NodeStatus::Online | NodeStatus::WakeFailed);
        if done || started.elapsed() > wait {
            if cli.json {
                print_json(&n);
            } else {
                println!(
                    "{node} is {} after {}s.",
                    n.status.as_str(),
                    started.elapsed().as_secs()
                );
            }
            if n.status != NodeStatus::Online {
                anyhow::bail!("{node} did not come online");
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `nebula sleep NODE`: the node's allow-listed suspend or power-off command.
pub async fn sleep(cli: &Cli, node: &str) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let job: JobRecord = api
        .post(
            &format!("/api/v1/nodes/{node}/sleep"),
            &serde_json::Map::new(),
        )
        .await?;
    if cli.json {
        print_json(&job);
    } else {
        println!("Sent {node} to sleep (job {}).", job.id);
    }
    Ok(())
}
