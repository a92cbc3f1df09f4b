//! `nebula secret`: values go in from standard input or a file (never the command line) and
//! never come back; names, versions, who and when are listed.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use nebula_types::api::secrets::{ImportEnv, Imported, Rekeyed, SecretSet, SecretView, SetSecret};

use crate::client::{print_json, table, Api};
use crate::Cli;

#[derive(Subcommand, Debug)]
pub enum SecretCommand {
    /// Store a new version of NAME: the value from standard input (one trailing newline
    /// dropped), or from --from-file as it is.
    Set {
        name: String,
        #[arg(long)]
        from_file: Option<PathBuf>,
    },
    /// Every secret: name, latest version, who and when.
    List,
    /// One secret's versions.
    Show { name: String },
    /// Remove a secret and every version of it.
    Rm { name: String },
    /// Import a .env file (NAME=value lines); values equal to the latest version are skipped.
    Import { file: PathBuf },
    /// Encrypt every version under a new key and drop the keys no version uses (run again to
    /// resume an interrupted rotation).
    Rekey,
}

fn read_value(from_file: Option<&PathBuf>) -> anyhow::Result<String> {
    if let Some(f) = from_file {
        return std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()));
    }
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("Type the value, then Enter and Ctrl-D:");
    }
    let mut v = String::new();
    stdin.read_to_string(&mut v).context("reading the value")?;
    if v.ends_with('\n') {
        v.pop();
        if v.ends_with('\r') {
            v.pop();
        }
    }
    Ok(v)
}

pub async fn secret(cli: &Cli, cmd: &SecretCommand) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    match cmd {
        SecretCommand::Set { name, from_file } => {
            let value = read_value(from_file.as_ref())?;
            let path = format!("/api/v1/secrets/{name}");
            let set: SecretSet = api
                .send_json(reqwest::Method::PUT, &path, &SetSecret { value })
                .await?;
            if cli.json {
                print_json(&set);
            } else {
                println!("{} version {}", set.name, set.version);
            }
        }
        SecretCommand::List => {
            let list: Vec<SecretView> = api.get("/api/v1/secrets").await?;
            if cli.json {
                print_json(&list);
                return Ok(());
            }
            let rows = list
                .into_iter()
                .map(|s| {
                    vec![
                        s.name,
                        s.latest.to_string(),
                        s.versions.len().to_string(),
                        s.updated_by,
                        s.updated_at,
                    ]
                })
                .collect();
            table(&["NAME", "LATEST", "VERSIONS", "BY", "AT"], rows);
        }
        SecretCommand::Show { name } => {
            let s: SecretView = api.get(&format!("/api/v1/secrets/{name}")).await?;
            if cli.json {
                print_json(&s);
                return Ok(());
            }
            let rows = s
                .versions
                .into_iter()
                .map(|v| vec![v.version.to_string(), v.created_by, v.created_at, v.key_id])
                .collect();
            table(&["VERSION", "BY", "AT", "KEY"], rows);
        }
        SecretCommand::Rm { name } => {
            api.delete_empty(&format!("/api/v1/secrets/{name}")).await?;
            println!("removed {name}");
        }
        SecretCommand::Import { file } => {
            let env = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            let out: Imported = api
                .post("/api/v1/secrets/import", &ImportEnv { env })
                .await?;
            if cli.json {
                print_json(&out);
                return Ok(());
            }
            for s in &out.set {
                println!("set {} version {}", s.name, s.version);
            }
            for n in &out.unchanged {
                println!("unchanged {n}");
            }
            for r in &out.refused {
                eprintln!("refused {r}");
            }
            anyhow::ensure!(out.refused.is_empty(), "some lines were not imported");
        }
        SecretCommand::Rekey => {
            let out: Rekeyed = api.post("/api/v1/secrets/rekey", &()).await?;
            if cli.json {
                print_json(&out);
                return Ok(());
            }
            println!(
                "key {}: {} version(s) encrypted again; removed keys: {}",
                out.key_id,
                out.reencrypted,
                if out.removed_keys.is_empty() {
                    "none".to_owned()
                } else {
                    out.removed_keys.join(", ")
                }
            );
        }
    }
    Ok(())
}
