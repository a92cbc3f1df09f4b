//! `nebula backup` and `nebula migrate`: a backup of a running controller through its API, a
//! restore into a new data dir (and an empty database), and moving an embedded-SQLite
//! controller to PostgreSQL.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use nebula_controller::backup;
use nebula_types::api::secrets::TakeBackup;
use tokio::io::AsyncWriteExt;

use crate::client::{error_of, Api};
use crate::Cli;

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Take a backup of the running controller into FILE: every table, and the key files
    /// (fleet CA, release-signing key, secret key) sealed with a passphrase.
    Create {
        file: PathBuf,
        #[command(flatten)]
        pass: Passphrase,
    },
    /// Restore FILE into a new data dir (and, with --database-url, an empty database). The
    /// controller then starts from it with the same flags; agents reconnect as before.
    Restore {
        file: PathBuf,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        pass: Passphrase,
    },
    /// Show a backup's header: when, from which version and engine (no passphrase needed).
    Inspect { file: PathBuf },
}

#[derive(Args, Debug)]
pub struct Passphrase {
    /// A file holding the passphrase (default: read from standard input).
    #[arg(long, env = "NEBULA_BACKUP_PASSPHRASE_FILE")]
    passphrase_file: Option<PathBuf>,
}

impl Passphrase {
    pub fn read(&self) -> anyhow::Result<String> {
        let mut text = String::new();
        match &self.passphrase_file {
            Some(f) => {
                text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?
            }
            None => {
                let mut stdin = std::io::stdin();
                if stdin.is_terminal() {
                    eprintln!("Passphrase for the keys (then Enter and Ctrl-D):");
                }
                stdin
                    .read_to_string(&mut text)
                    .context("reading the passphrase")?;
            }
        }
        Ok(text.trim_end_matches(['\r', '\n']).to_owned())
    }
}

/// The controller a restore or migration writes: its config file, data dir and database.
#[derive(Args, Debug)]
pub struct Target {
    /// The controller's TOML config (its data dir, database and key file are used).
    #[arg(long, env = "NEBULA_CONFIG")]
    config: Option<PathBuf>,
    /// The new data dir.
    #[arg(long, env = "NEBULA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// An empty database (default: SQLite in the data dir).
    #[arg(long, env = "NEBULA_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Where the secret key file goes (default `<data_dir>/secret.key`).
    #[arg(long, env = "NEBULA_SECRET_KEY_FILE")]
    secret_key_file: Option<PathBuf>,
}

impl Target {
    pub fn config(&self) -> anyhow::Result<nebula_controller::ControllerConfig> {
        let mut c = crate::serve::config_file(self.config.as_deref())?;
        if let Some(d) = &self.data_dir {
            c.data_dir = d.clone();
        }
        if let Some(u) = &self.database_url {
            c.database_url = Some(u.clone());
        }
        if let Some(f) = &self.secret_key_file {
            c.secrets.key_file = Some(f.clone());
        }
        Ok(c)
    }
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The empty database to move to (`postgres://...`).
    #[arg(long)]
    to: String,
    /// The database to move from (default: the SQLite file of the data dir).
    #[arg(long)]
    from: Option<String>,
    #[arg(long, env = "NEBULA_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "NEBULA_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

fn spinner(template: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template(template).expect("static template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

pub async fn backup(cli: &Cli, cmd: &BackupCommand) -> anyhow::Result<()> {
    match cmd {
        BackupCommand::Create { file, pass } => create(cli, file, &pass.read()?).await,
        BackupCommand::Restore { file, target, pass } => {
            let passphrase = pass.read()?;
            let config = target.config()?;
            let bar = spinner("{spinner} restoring: {msg} ({elapsed})");
            let done = backup::restore(file, &config, &passphrase, |line| {
                bar.set_message(format!("line {line}"))
            })
            .await;
            bar.finish_and_clear();
            let done = done?;
            println!(
                "restored {} rows in {} tables (backup of {}, from {}) into {}",
                done.rows,
                done.tables,
                done.header_created_at,
                done.source,
                config.data_dir.display()
            );
            for f in &done.key_files {
                println!("  key file {}", f.display());
            }
            println!(
                "start it with: nebula serve --data-dir {}{}",
                config.data_dir.display(),
                match &config.database_url {
                    Some(_) => " --database-url ...",
                    None => "",
                }
            );
            Ok(())
        }
        BackupCommand::Inspect { file } => {
            let h = backup::inspect(file)?;
            println!(
                "{}: nebula-backup v{}, taken {} by nebula {} from {} (schema {}), keys sealed with {}",
                file.display(),
                h.version,
                h.created_at,
                h.nebula_version,
                h.source,
                h.schema_version,
                h.keys.kdf
            );
            Ok(())
        }
    }
}

async fn create(cli: &Cli, file: &Path, passphrase: &str) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let resp = api
        .http_long()
        .post(format!("{}/api/v1/backup", api.base))
        .bearer_auth(&api.token)
        .json(&TakeBackup {
            passphrase: passphrase.to_owned(),
        })
        .send()
        .await
        .with_context(|| format!("cannot reach the controller at {}", api.base))?;
    if !resp.status().is_success() {
        return Err(error_of(resp).await);
    }
    let partial = file.with_extension("partial");
    let mut out = nebula_controller::backup::create_private(&partial)
        .await
        .with_context(|| format!("creating {}", partial.display()))?;
    let bar = spinner("{spinner} backing up: {msg} ({elapsed})");
    let mut bytes = 0u64;
    let mut body = resp.bytes_stream();
    let result: anyhow::Result<()> = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.context("the backup broke off (see the controller's log)")?;
            out.write_all(&chunk).await?;
            bytes += chunk.len() as u64;
            bar.set_message(HumanBytes(bytes).to_string());
        }
        out.sync_all().await?;
        Ok(())
    }
    .await;
    bar.finish_and_clear();
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(e);
    }
    tokio::fs::rename(&partial, file).await?;
    let h = backup::inspect(file)?;
    println!(
        "wrote {} ({}), taken {} from {}",
        file.display(),
        HumanBytes(bytes),
        h.created_at,
        h.source
    );
    Ok(())
}

pub async fn migrate(args: &MigrateArgs) -> anyhow::Result<()> {
    let mut config = crate::serve::config_file(args.config.as_deref())?;
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    let from = args.from.clone().unwrap_or_else(|| config.database_url());
    let bar = spinner("{spinner} copying the database ({elapsed})");
    let done = backup::migrate(&from, &args.to).await;
    bar.finish_and_clear();
    let done = done?;
    println!(
        "copied {} rows in {} tables from {} to {} in {:.1}s",
        done.rows,
        done.tables,
        nebula_controller::store::redact_url(&from),
        nebula_controller::store::redact_url(&args.to),
        done.took.as_secs_f64()
    );
    println!(
        "start the controller with --database-url (the same data dir keeps the CA and keys, so agents reconnect as they are)"
    );
    Ok(())
}
