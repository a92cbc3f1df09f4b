//! `nebula container exec NODE NAME -- CMD...`: an interactive command in a container, over
//! the controller's WebSocket and the node's QUIC session. With a terminal (the default when
//! stdin is one) the local terminal goes to raw mode for the session and window size changes
//! follow; the command's exit status becomes this one's.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::client::Api;
use crate::Cli;

#[derive(Args, Debug)]
pub struct ExecArgs {
    node: String,
    container: String,
    /// No terminal even when stdin is one (for piping).
    #[arg(short = 'T', long)]
    no_tty: bool,
    /// The command and its arguments (default: sh).
    #[arg(last = true)]
    command: Vec<String>,
}

/// The terminal's raw mode, undone when dropped (also on an error or a panic).
#[cfg(unix)]
struct RawMode(rustix::termios::Termios);

#[cfg(unix)]
impl RawMode {
    fn enter() -> anyhow::Result<Self> {
        use rustix::termios::{tcgetattr, tcsetattr, OptionalActions};
        let stdin = rustix::stdio::stdin();
        let saved = tcgetattr(stdin).context("reading the terminal's mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(stdin, OptionalActions::Now, &raw).context("setting raw mode")?;
        Ok(RawMode(saved))
    }
}

#[cfg(unix)]
impl Drop for RawMode {
    fn drop(&mut self) {
        use rustix::termios::{tcsetattr, OptionalActions};
        let _ = tcsetattr(rustix::stdio::stdin(), OptionalActions::Now, &self.0);
    }
}

/// (rows, cols) of the local terminal.
fn window() -> (u16, u16) {
    #[cfg(unix)]
    if let Ok(w) = rustix::termios::tcgetwinsize(rustix::stdio::stdout()) {
        if w.ws_row > 0 && w.ws_col > 0 {
            return (w.ws_row, w.ws_col);
        }
    }
    (24, 80)
}

fn stdin_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

pub async fn exec(cli: &Cli, a: &ExecArgs) -> anyhow::Result<()> {
    let api = Api::new(cli)?;
    let tty = !a.no_tty && stdin_is_terminal();
    let command = if a.command.is_empty() {
        "sh".to_owned()
    } else {
        shlex::try_join(a.command.iter().map(String::as_str))
            .context("the command holds a NUL byte")?
    };
    let (rows, cols) = window();
    let ws_base = api
        .base
        .replacen("https://", "wss://", 1)
        .replacen("http://", "ws://", 1);
    let mut url = reqwest::Url::parse(&format!(
        "{ws_base}/api/v1/nodes/{}/containers/{}/exec",
        a.node, a.container
    ))?;
    url.query_pairs_mut()
        .append_pair("cmd", &command)
        .append_pair("tty", &tty.to_string())
        .append_pair("rows", &rows.to_string())
        .append_pair("cols", &cols.to_string());
    let mut req = url.as_str().into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", api.token)
            .parse()
            .context("the API token")?,
    );
    let (socket, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(s) => s,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_deref().unwrap_or_default();
            let message = serde_json::from_slice::<nebula_types::api::ErrorBody>(body)
                .map(|b| b.error.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
            anyhow::bail!("{}: {message}", resp.status());
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot reach the controller at {}", api.base))
        }
    };
    let (mut tx, mut rx) = socket.split();
    #[cfg(unix)]
    let _raw = if tty { Some(RawMode::enter()?) } else { None };

    // Local input (and window changes) to the command.
    let input = async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 16 * 1024];
        #[cfg(unix)]
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
        loop {
            #[cfg(unix)]
            let resized = async {
                match winch.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let resized = std::future::pending::<Option<()>>();
            tokio::select! {
                n = stdin.read(&mut buf) => match n {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Message::text(r#"{"eof":true}"#)).await;
                        // Keep the socket open for the rest of the output.
                        std::future::pending::<()>().await;
                    }
                    Ok(n) => {
                        if tx.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                },
                Some(()) = resized => {
                    let (rows, cols) = window();
                    let msg = format!(r#"{{"resize":{{"rows":{rows},"cols":{cols}}}}}"#);
                    if tx.send(Message::text(msg)).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    // The command's output to ours, until it exits.
    let output = async move {
        let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
        while let Some(msg) = rx.next().await {
            match msg? {
                Message::Binary(b) if !b.is_empty() => {
                    let w: &mut dyn Write = if b[0] == 2 { &mut err } else { &mut out };
                    w.write_all(&b[1..])?;
                    w.flush()?;
                }
                Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    if let Some(e) = v["error"].as_str() {
                        anyhow::bail!("{e}");
                    }
                    if v.get("exit").is_some() {
                        return Ok(v["exit"].as_i64());
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        anyhow::bail!("the session ended without an exit status")
    };
    let code = tokio::select! {
        code = output => code?,
        () = input => None,
    };
    #[cfg(unix)]
    drop(_raw);
    match code {
        Some(0) => Ok(()),
        Some(c) => Err(crate::jobs::ExitStatus(u8::try_from(c.clamp(1, 255)).unwrap_or(1)).into()),
        None => Err(crate::jobs::ExitStatus(1).into()),
    }
}
