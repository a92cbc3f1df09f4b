//! Filtering an OpenAI-style SSE stream as it flows.

use serde_json::Value;

use crate::rules::mask;
use crate::{blocked, Action, Filters, Hit, StreamText};

/// `usage` of an answer or of a stream's chunk: prompt and completion tokens.
pub fn usage_of(v: &Value) -> Option<(u64, u64)> {
    let u = v.get("usage")?;
    Some((
        u.get("prompt_tokens")?.as_u64()?,
        u.get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    ))
}

/// Filters an OpenAI-style SSE stream (`data: {json}` events) as it flows: the text of each
/// choice (`delta.content`, or `text` for completions) goes through its own [`StreamText`],
/// the rest of the event is kept. With a `block` rule, events are held until the end and
/// replaced by one `content_filter` finish when a block rule matched.
///
/// It also reads the stream's usage from the event that reports it, however the bytes were
/// cut, and drops it from what is sent when the client did not ask for it (the gateway asks
/// the backend for usage, for accounting).
#[derive(Debug, Default)]
pub struct SseFilter {
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no end of an event.
    searched: usize,
    /// Each choice's text, by its index.
    texts: std::collections::BTreeMap<u64, StreamText>,
    /// Under a `block` rule, each choice's whole text, scanned once at the end as a whole
    /// answer is: a match longer than the look-back still blocks.
    whole: std::collections::BTreeMap<u64, String>,
    /// The stream is a completion's (`text`), not a chat's (`delta.content`).
    completion: bool,
    held: Vec<u8>,
    done: bool,
    /// What a block rule held has been let go (or replaced): once only.
    released: bool,
    /// Leave usage out of what is sent: the client did not ask for it.
    pub strip_usage: bool,
    /// Prompt and completion tokens, once the stream has reported them.
    pub usage: Option<(u64, u64)>,
}

/// Does an event mention usage at all (most do not)?
fn mentions_usage(event: &[u8]) -> bool {
    event.windows(7).any(|w| w == b"\"usage\"")
}

impl SseFilter {
    pub fn new(strip_usage: bool) -> Self {
        SseFilter {
            strip_usage,
            ..SseFilter::default()
        }
    }

    /// Every rule that matched, in every choice.
    pub fn hits(&self) -> Vec<Hit> {
        self.texts.values().flat_map(|t| t.hits.clone()).collect()
    }

    fn blocked(&self) -> bool {
        self.texts.values().any(|t| blocked(&t.hits))
    }

    /// Bytes in; bytes to send now out. Only whole events go on; a partial one waits.
    pub fn push(&mut self, filters: &Filters, bytes: &[u8]) -> Vec<u8> {
        self.buf.extend_from_slice(bytes);
        let mut buf = std::mem::take(&mut self.buf);
        let mut out = Vec::with_capacity(buf.len() + 64);
        let mut from = 0;
        let mut look = self.searched.min(buf.len());
        while let Some(end) = find_event_end(&buf, look) {
            self.event(filters, &buf[from..end], &mut out);
            from = end;
            look = end;
        }
        buf.drain(..from);
        // An event arriving in many pieces is searched once: the next search starts where
        // this one ended (less the two bytes an end could begin with).
        self.searched = buf.len().saturating_sub(2);
        self.buf = buf;
        out
    }

    /// The stream ended (with or without `[DONE]`): what is still held, filtered.
    pub fn finish(&mut self, filters: &Filters) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.buf.is_empty() {
            self.searched = 0;
            let rest = std::mem::take(&mut self.buf);
            self.event(filters, &rest, &mut out);
        }
        if !filters.active() {
            return out;
        }
        if !self.done {
            self.flush_texts(filters, &mut out);
        }
        if filters.blocks() {
            self.scan_whole(filters);
            out.extend(self.release_held());
        }
        out
    }

    /// The whole text of each choice through the rules, once: a `block` hit the stream's
    /// look-back missed is added to that choice's hits.
    fn scan_whole(&mut self, filters: &Filters) {
        for (i, text) in std::mem::take(&mut self.whole) {
            let st = self.texts.entry(i).or_default();
            if blocked(&st.hits) {
                continue;
            }
            for (s, e, rule, action) in filters.apply_hits(&text) {
                if action == Action::Block {
                    st.hits.push(Hit {
                        rule,
                        action,
                        sample: mask(&text[s..e]),
                    });
                }
            }
        }
    }

    /// The text each choice still holds, as one last chunk per choice.
    fn flush_texts(&mut self, filters: &Filters, out: &mut Vec<u8>) {
        let indexes: Vec<u64> = self.texts.keys().copied().collect();
        for i in indexes {
            let tail = self
                .texts
                .get_mut(&i)
                .map(|t| t.finish(filters))
                .unwrap_or_default();
            if tail.is_empty() {
                continue;
            }
            let v = if self.completion {
                serde_json::json!({"object": "text_completion", "choices": [{"index": i, "text": tail, "finish_reason": null}]})
            } else {
                serde_json::json!({"object": "chat.completion.chunk", "choices": [{"index": i, "delta": {"content": tail}, "finish_reason": null}]})
            };
            self.emit(filters, format!("data: {v}\n\n").as_bytes(), out);
        }
    }

    fn release_held(&mut self) -> Vec<u8> {
        if std::mem::replace(&mut self.released, true) {
            return Vec::new();
        }
        if self.blocked() {
            self.held.clear();
            let v = serde_json::json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]});
            format!("data: {v}\n\ndata: [DONE]\n\n").into_bytes()
        } else {
            std::mem::take(&mut self.held)
        }
    }

    fn emit(&mut self, filters: &Filters, bytes: &[u8], out: &mut Vec<u8>) {
        if filters.blocks() {
            self.held.extend_from_slice(bytes);
        } else {
            out.extend_from_slice(bytes);
        }
    }

    fn event(&mut self, filters: &Filters, event: &[u8], out: &mut Vec<u8>) {
        let active = filters.active();
        if !active && !mentions_usage(event) {
            // Nothing to filter and no usage: the event goes on as it came.
            out.extend_from_slice(event);
            return;
        }
        let text = String::from_utf8_lossy(event);
        let data = text
            .lines()
            .find_map(|l| l.strip_prefix("data:"))
            .map(str::trim);
        let Some(data) = data else {
            // A comment or keep-alive: pass it on.
            self.emit(filters, event, out);
            return;
        };
        if data == "[DONE]" {
            self.done = true;
            if active {
                self.flush_texts(filters, out);
                if filters.blocks() {
                    self.scan_whole(filters);
                    let blocked = self.blocked();
                    out.extend(self.release_held());
                    if blocked {
                        return;
                    }
                }
            }
            out.extend_from_slice(b"data: [DONE]\n\n");
            return;
        }
        let Ok(mut v) = serde_json::from_str::<Value>(data) else {
            self.emit(filters, event, out);
            return;
        };
        let mut changed = false;
        if let Some(u) = v.get("usage") {
            let reported = !u.is_null();
            if reported {
                self.usage = usage_of(&v).or(self.usage);
            }
            // Left out for a client that did not ask: the count, and the `null` that
            // OpenAI-style servers put on every other chunk once it is asked for.
            if self.strip_usage {
                if let Some(o) = v.as_object_mut() {
                    o.remove("usage");
                }
                if reported && v["choices"].as_array().is_none_or(Vec::is_empty) {
                    return;
                }
                changed = true;
            }
        }
        if active {
            self.filter_choices(filters, &mut v);
        } else if !changed {
            out.extend_from_slice(event);
            return;
        }
        self.emit(filters, format!("data: {v}\n\n").as_bytes(), out);
    }

    /// Each choice's text through its own stream filter.
    fn filter_choices(&mut self, filters: &Filters, v: &mut Value) {
        let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) else {
            return;
        };
        for (n, ch) in choices.iter_mut().enumerate() {
            let index = ch.get("index").and_then(Value::as_u64).unwrap_or(n as u64);
            let finishing = ch.get("finish_reason").is_some_and(|f| !f.is_null());
            let text = self.texts.entry(index).or_default();
            let field = if ch.get("delta").is_some() {
                ch.get_mut("delta")
                    .and_then(Value::as_object_mut)
                    .map(|d| (d, "content"))
            } else if ch.get("text").is_some() {
                self.completion = true;
                ch.as_object_mut().map(|c| (c, "text"))
            } else {
                None
            };
            let Some((obj, key)) = field else {
                let tail = if finishing {
                    text.finish(filters)
                } else {
                    String::new()
                };
                if !tail.is_empty() {
                    if self.completion {
                        ch["text"] = Value::String(tail);
                    } else {
                        ch["delta"] = serde_json::json!({"content": tail});
                    }
                }
                continue;
            };
            let mut sent = match obj.get(key).and_then(Value::as_str) {
                Some(piece) => {
                    if filters.blocks() {
                        self.whole.entry(index).or_default().push_str(piece);
                    }
                    text.push(filters, piece)
                }
                None => String::new(),
            };
            if finishing {
                sent.push_str(&text.finish(filters));
            }
            if obj.contains_key(key) || !sent.is_empty() {
                obj.insert(key.into(), Value::String(sent));
            }
        }
    }
}

/// End of the first complete SSE event in `buf` (after its blank line).
/// Where the first event in `buf` ends, looking from `from` on: after the first line feed that
/// an empty line follows (`\n\n`, or `\n\r\n` as in `\r\n\r\n`).
fn find_event_end(buf: &[u8], mut from: usize) -> Option<usize> {
    while let Some(i) = buf[from..].iter().position(|b| *b == b'\n') {
        let i = from + i;
        match buf.get(i + 1..) {
            Some([b'\n', ..]) => return Some(i + 2),
            Some([b'\r', b'\n', ..]) => return Some(i + 3),
            _ => from = i + 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Action, FilterConfig};

    fn chunk(content: &str) -> String {
        format!(
            "data: {}\n\n",
            serde_json::json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]})
        )
    }

    fn content_of(sse: &[u8]) -> String {
        String::from_utf8_lossy(sse)
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect()
    }

    #[test]
    fn a_stream_split_at_odd_places_is_redacted_and_ends_with_done() {
        let filters = Filters::new(FilterConfig::default()).unwrap();
        let text =
            "the key is sk-proj-AbCdEf0123456789XyZaBcDeF and the card 4111 1111 1111 1111, bye";
        let mut raw = String::new();
        for piece in text.chars().collect::<Vec<_>>().chunks(5) {
            raw.push_str(&chunk(&piece.iter().collect::<String>()));
        }
        raw.push_str("data: [DONE]\n\n");
        // Cut the bytes at places unrelated to events.
        let mut f = SseFilter::default();
        let mut out = Vec::new();
        for piece in raw.as_bytes().chunks(37) {
            out.extend(f.push(&filters, piece));
        }
        out.extend(f.finish(&filters));
        assert_eq!(
            content_of(&out),
            "the key is [REDACTED:api_key] and the card [REDACTED:card], bye"
        );
        assert!(String::from_utf8_lossy(&out).ends_with("data: [DONE]\n\n"));
        let rules: Vec<&str> = f.hits().iter().map(|h| h.rule).collect();
        assert_eq!(rules, ["api_key", "card"]);
    }

    #[test]
    fn a_block_rule_holds_the_stream_and_replaces_it() {
        let filters = Filters::new(FilterConfig {
            email: Action::Block,
            ..FilterConfig::default()
        })
        .unwrap();
        let mut f = SseFilter::default();
        let mut out = f.push(&filters, chunk("write to ada@").as_bytes());
        assert!(out.is_empty(), "held");
        out.extend(f.push(&filters, chunk("example.org now").as_bytes()));
        out.extend(f.push(&filters, b"data: [DONE]\n\n"));
        out.extend(f.finish(&filters));
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("\"finish_reason\":\"content_filter\""),
            "{text}"
        );
        assert!(!text.contains("ada@"), "{text}");
        // One end, whether the stream ended with `[DONE]` and then closed or not.
        assert_eq!(text.matches("content_filter").count(), 1, "{text}");
        assert_eq!(text.matches("[DONE]").count(), 1, "{text}");

        // Nothing blocked: what was held goes out once, then one `[DONE]`.
        let mut f = SseFilter::default();
        let mut out = f.push(&filters, chunk("nothing to see").as_bytes());
        out.extend(f.push(&filters, b"data: [DONE]\n\n"));
        out.extend(f.finish(&filters));
        let text = String::from_utf8_lossy(&out);
        assert_eq!(content_of(&out), "nothing to see", "{text}");
        assert_eq!(text.matches("[DONE]").count(), 1, "{text}");
    }

    #[test]
    fn a_block_rule_sees_the_whole_answer_however_long_the_match() {
        let filters = Filters::new(FilterConfig {
            code_injection: Action::Block,
            ..FilterConfig::default()
        })
        .unwrap();
        let mut f = SseFilter::default();
        let mut out = f.push(&filters, chunk("run curl ").as_bytes());
        for _ in 0..150 {
            out.extend(f.push(&filters, chunk("-H x ").as_bytes()));
        }
        out.extend(f.push(&filters, chunk("| sh now").as_bytes()));
        out.extend(f.push(&filters, b"data: [DONE]\n\n"));
        out.extend(f.finish(&filters));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("content_filter"), "{text}");
        assert!(!text.contains("curl"), "{text}");
        assert_eq!(text.matches("[DONE]").count(), 1, "{text}");
    }

    #[test]
    fn each_choice_of_a_stream_is_filtered_on_its_own() {
        let filters = Filters::new(FilterConfig::default()).unwrap();
        let event = |i: u32, content: &str| {
            format!(
                "data: {}\n\n",
                serde_json::json!({"object": "chat.completion.chunk", "choices": [{"index": i, "delta": {"content": content}, "finish_reason": null}]})
            )
        };
        // Two answers (`n: 2`) interleaved, each with an address cut in two.
        let mut f = SseFilter::default();
        let mut out = Vec::new();
        for (i, piece) in [
            (0, "mail ada@"),
            (1, "or grace@"),
            (0, "example.org now"),
            (1, "example.net, ok"),
        ] {
            out.extend(f.push(&filters, event(i, piece).as_bytes()));
        }
        out.extend(f.push(&filters, b"data: [DONE]\n\n"));
        out.extend(f.finish(&filters));
        let mut text = [String::new(), String::new()];
        for d in String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        {
            let i = d["choices"][0]["index"].as_u64().unwrap() as usize;
            text[i].push_str(d["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        }
        assert_eq!(
            text,
            ["mail [REDACTED:email] now", "or [REDACTED:email], ok"]
        );
        assert_eq!(f.hits().len(), 2);
    }

    #[test]
    fn usage_is_read_however_the_bytes_are_cut_and_left_out_unless_asked_for() {
        let usage = "data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":9}}\n\n";
        let raw = format!("{}{usage}data: [DONE]\n\n", chunk("hello there"));
        for active in [true, false] {
            let filters = Filters::new(if active {
                FilterConfig::default()
            } else {
                FilterConfig::off()
            })
            .unwrap();
            for strip in [false, true] {
                for size in [1, 7, 64, raw.len()] {
                    let mut f = SseFilter::new(strip);
                    let mut out = Vec::new();
                    for piece in raw.as_bytes().chunks(size) {
                        out.extend(f.push(&filters, piece));
                    }
                    out.extend(f.finish(&filters));
                    let text = String::from_utf8_lossy(&out);
                    let case = format!("active {active}, strip {strip}, pieces of {size}: {text}");
                    assert_eq!(f.usage, Some((3, 9)), "{case}");
                    assert_eq!(text.contains("\"usage\""), !strip, "{case}");
                    assert_eq!(content_of(&out), "hello there", "{case}");
                    assert!(text.ends_with("data: [DONE]\n\n"), "{case}");
                    if !active && !strip {
                        assert_eq!(text, raw, "nothing to filter: the bytes go on as they came");
                    }
                }
            }
        }
    }
}
