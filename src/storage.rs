//! `nebula images NODE`, `nebula volumes NODE` and `nebula prune NODE`: a node's images and
//! volumes with sizes and users, and a prune that shows what goes before it removes exactly
//! that.

use std::io::{BufRead, Write};

use clap::Args;
use nebula_types::api::containers::{PrunePreview, PruneRequest, PruneResult, StorageView};

use crate::client::{print_json, table, Api};
use crate::Cli;

#[derive(Args, Debug)]
pub struct PruneArgs {
    node: String,
    /// Unused volumes too (they hold data; the node must allow it: docker.control = "all").
    #[arg(long)]
    volumes: bool,
    /// Remove without asking (what goes is printed all the same).
    #[arg(short, long)]
    yes: bool,
    /// Only images whose tag or id, and volumes whose name, contain this.
    #[arg(long = "match")]
    matching: Option<String>,
}

/// `1.2 GiB`, `340 MiB`, `12 KiB`.
pub fn size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn short_id(id: &str) -> String {
    id.trim_start_matches("sha256:").chars().take(12).collect()
}

fn users(v: &[String]) -> String {
    if v.is_empty() {
        "unused".into()
    } else {
        v.join(",")
    }
}

async fn storage(api: &Api, node: &str) -> anyhow::Result<StorageView> {
    api.get(&format!("/api/v1/nodes/{node}/storage")).await
}

fn usage_line(v: &StorageView) {
    let d = &v.disk;
    eprintln!(
        "{}: images {}, containers {}, volumes {}; {} reclaimable",
        v.node,
        size(d.images_bytes),
        size(d.containers_bytes),
        size(d.volumes_bytes),
        size(d.reclaimable_bytes)
    );
}

pub async fn images(cli: &Cli, node: &str) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let v = storage(&api, node).await?;
    if cli.json {
        print_json(&v.images);
        return Ok(());
    }
    usage_line(&v);
    let rows = v
        .images
        .iter()
        .map(|i| {
            vec![
                short_id(&i.id),
                if i.tags.is_empty() {
                    "<none>".into()
                } else {
                    i.tags.join(",")
                },
                size(i.size_bytes),
                i.created.chars().take(10).collect(),
                users(&i.containers),
            ]
        })
        .collect();
    table(&["ID", "TAGS", "SIZE", "CREATED", "USED BY"], rows);
    Ok(())
}

pub async fn volumes(cli: &Cli, node: &str) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let v = storage(&api, node).await?;
    if cli.json {
        print_json(&v.volumes);
        return Ok(());
    }
    usage_line(&v);
    let rows = v
        .volumes
        .iter()
        .map(|vol| {
            vec![
                vol.name.clone(),
                vol.driver.clone(),
                vol.size_bytes.map_or_else(|| "?".into(), size),
                users(&vol.containers),
            ]
        })
        .collect();
    table(&["NAME", "DRIVER", "SIZE", "USED BY"], rows);
    Ok(())
}

pub async fn prune(cli: &Cli, a: &PruneArgs) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let mut q = vec![("volumes", a.volumes.to_string())];
    if let Some(m) = &a.matching {
        q.push(("match", m.clone()));
    }
    let path = format!("/api/v1/nodes/{}/storage/prune", a.node);
    let preview: PrunePreview = api.get_query(&path, &q).await?;
    if preview.images.is_empty() && preview.volumes.is_empty() {
        eprintln!("nothing unused on {}", a.node);
        return Ok(());
    }
    eprintln!("would remove from {} ({}):", a.node, size(preview.bytes));
    for i in &preview.images {
        let tags = if i.tags.is_empty() {
            "<none>".into()
        } else {
            i.tags.join(",")
        };
        eprintln!(
            "  image  {}  {tags}  {}",
            short_id(&i.id),
            size(i.size_bytes)
        );
    }
    for v in &preview.volumes {
        let s = v.size_bytes.map_or_else(|| "?".into(), size);
        eprintln!("  volume {}  {s}", v.name);
    }
    if !a.yes {
        eprint!("remove these? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("nothing removed");
            return Ok(());
        }
    }
    let req = PruneRequest {
        images: preview.images.iter().map(|i| i.id.clone()).collect(),
        volumes: preview.volumes.iter().map(|v| v.name.clone()).collect(),
    };
    let done: PruneResult = api
        .post(&format!("/api/v1/nodes/{}/storage/prune", a.node), &req)
        .await?;
    if cli.json {
        print_json(&done);
        return Ok(());
    }
    for (name, why) in &done.skipped {
        eprintln!("left {name}: {why}");
    }
    println!(
        "removed {} of {}, freed {}",
        done.removed.len(),
        req.images.len() + req.volumes.len(),
        size(done.reclaimed_bytes)
    );
    Ok(())
}
