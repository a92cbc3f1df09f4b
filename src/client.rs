//! Subcommands that talk to a controller's HTTP API.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

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
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("nebula-cli/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Api {
            http,
            base: cli.controller.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// A client without the overall timeout, for streams that last as long as a job.
    pub fn http_long(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("nebula-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_else(|_| self.http.clone())
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the controller at {}", self.base))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let code = body["error"]["code"].as_str().unwrap_or("error");
            if let Some(problems) = body["error"]["problems"].as_array() {
                // One line per problem, `line:column: message`, as compilers print them.
                let lines: Vec<String> = problems
                    .iter()
                    .map(|p| format!("  {}:{}: {}", p["line"], p["column"], s(&p["message"])))
                    .collect();
                anyhow::bail!("{status} ({code}):\n{}", lines.join("\n"));
            }
            let msg = body["error"]["message"].as_str().unwrap_or("no details");
            anyhow::bail!("{status}: {msg} ({code})");
        }
        Ok(serde_json::from_value(body)?)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base)))
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
    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> anyhow::Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }
}

pub fn print_json(v: &Value) {
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

pub fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn labels(v: &Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", s(v)))
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into())
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
            let mut map = serde_json::Map::new();
            for l in ls {
                let (k, v) = l
                    .split_once('=')
                    .with_context(|| format!("label `{l}` must read key=value"))?;
                map.insert(k.into(), v.into());
            }
            let body = json!({"ttl": ttl, "uses": uses, "labels": map, "description": description});
            let created: Value = api.post("/api/v1/tokens", &body).await?;
            if cli.json {
                print_json(&created);
            } else {
                println!("{}", s(&created["token"]));
                eprintln!(
                    "token {} expires {} with {} use(s); join with:\n  nebula-agent join --controller HOST:4433 --token {}",
                    s(&created["id"]),
                    s(&created["expires_at"]),
                    s(&created["uses_left"]),
                    s(&created["token"])
                );
            }
        }
        TokenCommand::List => {
            let page: Value = api.get("/api/v1/tokens").await?;
            if cli.json {
                print_json(&page["items"]);
                return Ok(());
            }
            let rows = page["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|t| {
                    vec![
                        s(&t["id"]),
                        s(&t["state"]),
                        s(&t["uses_left"]),
                        s(&t["uses"]),
                        s(&t["expires_at"]),
                        labels(&t["labels"]),
                        s(&t["description"]),
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
            let v: Value = api.delete(&format!("/api/v1/tokens/{id}")).await?;
            if cli.json {
                print_json(&v);
            } else {
                println!("revoked {id}");
            }
        }
    }
    Ok(())
}

async fn fetch_nodes(api: &Api, args: &NodesArgs) -> anyhow::Result<Vec<Value>> {
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
        let url = format!("{}/api/v1/nodes", api.base);
        let page: Value = api.send(api.http.get(url).query(&q)).await?;
        items.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    Ok(items)
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

fn node_rows(items: &[Value], bars: bool) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|n| {
            let t = &n["telemetry"];
            let (cpu, mem, gpu, ctr) = if t.is_object() {
                let cpu = t["cpu_percent"].as_f64().unwrap_or(0.0);
                let used = t["memory_used_bytes"].as_u64().unwrap_or(0);
                let total = t["memory_total_bytes"].as_u64().unwrap_or(0).max(1);
                let mem_pct = used as f64 * 100.0 / total as f64;
                let gpu = match t["gpu_utilization_percent"].as_f64() {
                    Some(u) => {
                        let vram = match (
                            t["gpu_memory_used_bytes"].as_u64(),
                            t["gpu_memory_total_bytes"].as_u64(),
                        ) {
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
                let unhealthy = t["containers_unhealthy"].as_u64().unwrap_or(0);
                let ctr = format!(
                    "{}/{}{}",
                    t["containers_running"].as_u64().unwrap_or(0),
                    t["containers_total"].as_u64().unwrap_or(0),
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
            } else {
                ("-".into(), "-".into(), "-".into(), "-".into())
            };
            vec![
                s(&n["name"]),
                s(&n["status"]),
                cpu,
                mem,
                gpu,
                ctr,
                s(&n["last_seen_at"]),
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
    let items = fetch_nodes(&api, args).await?;
    if cli.json {
        print_json(&Value::Array(items));
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
    let api = Api::new(cli)?;
    let mut n = 0u64;
    loop {
        let items = fetch_nodes(&api, &args.filter).await?;
        let online = items.iter().filter(|i| i["status"] == "online").count();
        let running: u64 = items
            .iter()
            .filter_map(|i| i["telemetry"]["containers_running"].as_u64())
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
            let n: Value = api.get(&format!("/api/v1/nodes/{name}")).await?;
            if cli.json {
                print_json(&n);
                return Ok(());
            }
            for (k, v) in [
                ("name", s(&n["name"])),
                ("id", s(&n["id"])),
                ("status", s(&n["status"])),
                ("labels", labels(&n["labels"])),
                ("hostname", s(&n["facts"]["hostname"])),
                (
                    "os",
                    format!("{} {}", s(&n["facts"]["os"]), s(&n["facts"]["os_version"])),
                ),
                ("kernel", s(&n["facts"]["kernel"])),
                ("arch", s(&n["facts"]["arch"])),
                ("cpus", s(&n["facts"]["cpu_count"])),
                ("agent", s(&n["agent_version"])),
                ("address", s(&n["remote_addr"])),
                ("connected since", s(&n["connected_since"])),
                ("last seen", s(&n["last_seen_at"])),
                ("enrolled", s(&n["enrolled_at"])),
                ("certificate expires", s(&n["cert_not_after"])),
            ] {
                println!("{k:>20}: {v}");
            }
        }
        NodeCommand::Remove { name } => {
            let v: Value = api.delete(&format!("/api/v1/nodes/{name}")).await?;
            if cli.json {
                print_json(&v);
            } else {
                println!("removed {name}: certificate revoked, connection closed");
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
}

pub async fn user(cli: &Cli, cmd: &UserCommand) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    match cmd {
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
            let v: Value = api
                .post(
                    "/api/v1/users",
                    &json!({"username": username, "password": password, "role": role}),
                )
                .await?;
            if cli.json {
                let mut v = v;
                if generated {
                    v["password"] = json!(password);
                }
                print_json(&v);
            } else {
                println!("Created {} user `{}`.", s(&v["role"]), s(&v["username"]));
                if generated {
                    println!("Password (shown once): {password}");
                }
            }
        }
        UserCommand::List => {
            let v: Value = api.get("/api/v1/users").await?;
            if cli.json {
                print_json(&v);
                return Ok(());
            }
            let rows = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|u| vec![s(&u["username"]), s(&u["role"])])
                .collect();
            table(&["USERNAME", "ROLE"], rows);
        }
    }
    Ok(())
}

/// `nebula wake NODE`: through a relay on its LAN; waits (up to `wait`) for it to register.
pub async fn wake(cli: &Cli, node: &str, wait: Option<Duration>) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let w: Value = api
        .post(&format!("/api/v1/nodes/{node}/wake"), &json!({}))
        .await?;
    if cli.json && wait.is_none() {
        print_json(&w);
        return Ok(());
    }
    if !cli.json {
        println!(
            "Waking {node} through {} (job {}).",
            s(&w["relay"]),
            s(&w["job"])
        );
    }
    let Some(wait) = wait else { return Ok(()) };
    let started = std::time::Instant::now();
    loop {
        let n: Value = api.get(&format!("/api/v1/nodes/{node}")).await?;
        let status = s(&n["status"]);
        if status == "online" || status == "wake_failed" || started.elapsed() > wait {
            if cli.json {
                print_json(&n);
            } else {
                println!("{node} is {status} after {}s.", started.elapsed().as_secs());
            }
            if status != "online" {
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
    let job: Value = api
        .post(&format!("/api/v1/nodes/{node}/sleep"), &json!({}))
        .await?;
    if cli.json {
        print_json(&job);
    } else {
        println!("Sent {node} to sleep (job {}).", s(&job["id"]));
    }
    Ok(())
}
