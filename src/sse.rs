//! Server-sent events as the controller sends them (`event:` and `data:` lines, a blank line
//! between events), read from a streaming HTTP answer.

use anyhow::Context;

/// Reads events from an answer; `next` gives `(event, data)` until the stream ends.
pub struct Events {
    resp: reqwest::Response,
    buf: String,
}

impl Events {
    /// Send `req` (asking for an event stream); the API's error becomes an error.
    pub async fn open(req: reqwest::RequestBuilder, base: &str) -> anyhow::Result<Self> {
        let resp = req
            .header("accept", "text/event-stream")
            .send()
            .await
            .with_context(|| format!("cannot reach the controller at {base}"))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.json::<nebula_types::api::ErrorBody>().await;
            let message = body.map_or_else(|_| "no details".to_owned(), |b| b.error.message);
            anyhow::bail!("{status}: {message}");
        }
        Ok(Events {
            resp,
            buf: String::new(),
        })
    }

    /// The next event, `None` at the end of the stream. Comments (keep-alives) are skipped.
    pub async fn next(&mut self) -> anyhow::Result<Option<(String, String)>> {
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                let mut event = String::from("message");
                let mut data = String::new();
                let mut any = false;
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event:") {
                        event = e.trim().to_owned();
                        any = true;
                    } else if let Some(d) = line.strip_prefix("data:") {
                        if !data.is_empty() {
                            data.push('\n');
                        }
                        data.push_str(d.strip_prefix(' ').unwrap_or(d));
                        any = true;
                    }
                }
                if any {
                    return Ok(Some((event, data)));
                }
                continue;
            }
            match self
                .resp
                .chunk()
                .await
                .context("reading the event stream")?
            {
                Some(chunk) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                None => return Ok(None),
            }
        }
    }
}
