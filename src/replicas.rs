//! `nebula replicas`: the controllers of this control plane and which one leads.

use nebula_types::api::tasks::ReplicasView;

use crate::client::{print_json, table, Api};
use crate::Cli;

pub async fn replicas(cli: &Cli) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let v: ReplicasView = api.get("/api/v1/replicas").await?;
    if cli.json {
        print_json(&v);
        return Ok(());
    }
    let now = nebula_protocol::time::UnixMillis::now().as_i64();
    let rows = v
        .replicas
        .iter()
        .map(|r| {
            vec![
                format!(
                    "{}{}",
                    &r.id[..r.id.len().min(12)],
                    if r.id == v.this { " (this)" } else { "" }
                ),
                r.hostname.clone(),
                if r.leader {
                    "leader".into()
                } else {
                    "follower".into()
                },
                r.http_url.clone(),
                r.quic_addr.clone(),
                r.sessions.to_string(),
                r.version.clone(),
                format!("{}s ago", (now - r.seen_at).max(0) / 1000),
            ]
        })
        .collect();
    table(
        &[
            "REPLICA", "HOST", "ROLE", "HTTP", "QUIC", "AGENTS", "VERSION", "SEEN",
        ],
        rows,
    );
    match (v.mode.as_str(), v.term) {
        ("single", _) => println!("one controller on SQLite: it always leads"),
        (_, Some(term)) => println!("term {term}"),
        _ => println!("no leader elected yet"),
    }
    Ok(())
}

#[derive(clap::Subcommand, Debug)]
pub enum ReplicaCommand {
    /// On a replica's host: write a bundle of the fleet's keys (CA, release-signing key,
    /// secret key) sealed with a passphrase, for a new replica.
    Add {
        /// Where the bundle goes.
        out: std::path::PathBuf,
        #[command(flatten)]
        target: crate::backup::Target,
        #[command(flatten)]
        pass: crate::backup::Passphrase,
    },
    /// On the new host: install a bundle into an empty data dir, then start `nebula serve`
    /// with the same database URL as the other replicas.
    Join {
        bundle: std::path::PathBuf,
        #[command(flatten)]
        target: crate::backup::Target,
        #[command(flatten)]
        pass: crate::backup::Passphrase,
    },
}

pub fn replica(cmd: &ReplicaCommand) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use nebula_controller::backup::replica;
    match cmd {
        ReplicaCommand::Add { out, target, pass } => {
            let config = target.config()?;
            let text = replica::make_bundle(&config, &pass.read()?)?;
            nebula_controller::ca::write_private(out, text.as_bytes())?;
            println!(
                "wrote {}: copy it to the new host and run `nebula replica join {}` there",
                out.display(),
                out.file_name().and_then(|n| n.to_str()).unwrap_or("BUNDLE")
            );
            Ok(())
        }
        ReplicaCommand::Join {
            bundle,
            target,
            pass,
        } => {
            let config = target.config()?;
            let text = std::fs::read_to_string(bundle)
                .with_context(|| format!("reading {}", bundle.display()))?;
            let pin = replica::install_bundle(&text, &config, &pass.read()?)?;
            println!(
                "installed the fleet's keys (CA pin {pin}) into {}; start it with `nebula serve --data-dir {} --database-url ...` (the other replicas' database)",
                config.data_dir.display(),
                config.data_dir.display()
            );
            Ok(())
        }
    }
}
