//! `nebula alerts`, `nebula silence ...`, `nebula sink ...`: what fires now, silences and where
//! notifications go.

use clap::Subcommand;
use nebula_types::api::alerts::{
    AlertView, CreateSilence, CreateSink, CreatedSink, NotificationView, SilenceView, SinkFilters,
    SinkView,
};

use crate::client::{labels, print_json, table, Api};
use crate::Cli;

#[derive(Subcommand, Debug)]
pub enum SilenceCommand {
    /// Silence alerts matching every MATCHER (`node=gpu-box`, `alertname=cpu_high`,
    /// `container!=db`) for a while.
    Add {
        #[arg(required = true)]
        matchers: Vec<String>,
        /// How long (e.g. 2h).
        #[arg(long = "for", default_value = "1h")]
        duration: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Silences in force.
    List,
    /// End a silence now.
    Expire { id: String },
}

#[derive(Subcommand, Debug)]
pub enum SinkCommand {
    /// Add (or replace) a sink; prints its secret once (webhooks are signed with it).
    Add {
        name: String,
        /// The webhook's URL, the ntfy topic's URL, or the Discord webhook's URL.
        url: String,
        /// webhook, ntfy, discord or email (url smtp://[USER@]HOST[:PORT]?from=..&to=..).
        #[arg(long, default_value = "webhook")]
        kind: String,
        /// An e-mail sink's SMTP password, read from this file.
        #[arg(long)]
        password_file: Option<std::path::PathBuf>,
        /// info, warning or critical: less severe alerts are not sent here.
        #[arg(long)]
        min_severity: Option<String>,
        /// Only alerts of this rule (repeat for more).
        #[arg(long = "rule")]
        rules: Vec<String>,
        /// Only alerts about this node (repeat for more).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// Only alerts about this service (repeat for more).
        #[arg(long = "service")]
        services: Vec<String>,
        /// Only alerts with this label KEY=VALUE (repeat for more).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    List,
    /// Send a test message now.
    Test {
        name: String,
    },
    Rm {
        name: String,
    },
    /// The newest notifications and how their delivery went.
    History,
}

pub async fn alerts(cli: &Cli, show_history: bool) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    if show_history {
        return history(cli, &api).await;
    }
    let items: Vec<AlertView> = api.get("/api/v1/alerts").await?;
    if cli.json {
        print_json(&items);
        return Ok(());
    }
    if items.is_empty() {
        println!("no alerts");
        return Ok(());
    }
    let rows = items
        .iter()
        .map(|a| {
            let mut state = a.state.clone();
            if a.silenced {
                state.push_str(" (silenced)");
            }
            if let Some(by) = &a.acknowledged_by {
                state.push_str(&format!(" (ack {by})"));
            }
            vec![
                state,
                a.severity.clone(),
                a.rule.clone(),
                labels(&a.labels),
                a.active_since.clone(),
                a.summary.clone(),
            ]
        })
        .collect();
    table(
        &["STATE", "SEVERITY", "RULE", "LABELS", "SINCE", "SUMMARY"],
        rows,
    );
    Ok(())
}

pub async fn silence(cli: &Cli, cmd: &SilenceCommand) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    match cmd {
        SilenceCommand::Add {
            matchers,
            duration,
            comment,
        } => {
            let body = CreateSilence {
                matchers: matchers.clone(),
                duration: duration.clone(),
                comment: comment.clone(),
            };
            let s: SilenceView = api.post("/api/v1/alerts/silences", &body).await?;
            if cli.json {
                print_json(&s);
            } else {
                println!("{} until {}", s.id, s.ends_at);
            }
        }
        SilenceCommand::List => {
            let items: Vec<SilenceView> = api.get("/api/v1/alerts/silences").await?;
            if cli.json {
                print_json(&items);
                return Ok(());
            }
            let rows = items
                .iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        s.matchers.join(","),
                        s.ends_at.clone(),
                        s.created_by.clone(),
                        s.comment.clone(),
                    ]
                })
                .collect();
            table(&["ID", "MATCHERS", "ENDS", "BY", "COMMENT"], rows);
        }
        SilenceCommand::Expire { id } => {
            api.delete_empty(&format!("/api/v1/alerts/silences/{id}"))
                .await?;
            println!("silence {id} ended");
        }
    }
    Ok(())
}

pub async fn sink(cli: &Cli, cmd: &SinkCommand) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    match cmd {
        SinkCommand::Add {
            name,
            url,
            kind,
            password_file,
            min_severity,
            rules,
            nodes,
            services,
            labels: label_args,
        } => {
            let labels = label_args
                .iter()
                .map(|l| {
                    l.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| anyhow::anyhow!("--label {l}: use KEY=VALUE"))
                })
                .collect::<anyhow::Result<_>>()?;
            let filters = SinkFilters {
                rules: rules.clone(),
                nodes: nodes.clone(),
                services: services.clone(),
                labels,
            };
            let password = match password_file {
                Some(p) => Some(std::fs::read_to_string(p)?.trim().to_owned()),
                None => None,
            };
            let body = CreateSink {
                name: name.clone(),
                kind: kind.clone(),
                url: url.clone(),
                min_severity: min_severity.clone(),
                password,
                filters,
            };
            let created: CreatedSink = api.post("/api/v1/alerts/sinks", &body).await?;
            if cli.json {
                print_json(&created);
            } else if kind == "email" {
                eprintln!("sink {name} added");
            } else {
                println!("{}", created.secret);
                eprintln!(
                    "sink {name} added; verify its messages with the secret above (shown once)"
                );
            }
        }
        SinkCommand::List => {
            let items: Vec<SinkView> = api.get("/api/v1/alerts/sinks").await?;
            if cli.json {
                print_json(&items);
                return Ok(());
            }
            let rows = items
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.kind.clone(),
                        s.url.clone(),
                        s.min_severity.clone(),
                    ]
                })
                .collect();
            table(&["NAME", "KIND", "URL", "MIN SEVERITY"], rows);
        }
        SinkCommand::Test { name } => {
            api.post_empty(&format!("/api/v1/alerts/sinks/{name}/test"))
                .await?;
            println!("test message delivered to {name}");
        }
        SinkCommand::Rm { name } => {
            api.delete_empty(&format!("/api/v1/alerts/sinks/{name}"))
                .await?;
            println!("sink {name} removed");
        }
        SinkCommand::History => history(cli, &api).await?,
    }
    Ok(())
}

/// The newest notifications and how their delivery went.
async fn history(cli: &Cli, api: &Api) -> anyhow::Result<()> {
    let items: Vec<NotificationView> = api.get("/api/v1/alerts/notifications").await?;
    if cli.json {
        print_json(&items);
        return Ok(());
    }
    let rows = items
        .iter()
        .map(|n| {
            vec![
                n.created_at.clone(),
                n.sink.clone(),
                n.payload["type"].as_str().unwrap_or("").to_owned(),
                n.payload["data"]["group"].as_str().unwrap_or("").to_owned(),
                n.state.clone(),
                n.attempts.to_string(),
                n.last_error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "CREATED", "SINK", "TYPE", "GROUP", "STATE", "TRIES", "ERROR",
        ],
        rows,
    );
    Ok(())
}
