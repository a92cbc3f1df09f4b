//! Output filters on what models say: API keys (known shapes, and long high-entropy tokens),
//! e-mail addresses, phone numbers, card numbers (Luhn-checked), a profanity list and
//! code-injection patterns. Each rule has an action: `redact` (replace the match), `block`
//! (refuse the whole answer), `warn` (let it through, flag it in a header and the audit log),
//! `log` (audit only) or `off`. Every hit is an audit event.
//!
//! Streams are filtered as they flow: the assistant's text from each SSE event goes into a
//! buffer, the buffer is scanned, and only text that no match can still reach is sent: the
//! last `hold_back` characters, and the run of non-space characters they end in, wait for more.
//! A secret split across chunks is therefore whole in the buffer when it is found. With a
//! `block` rule on, the answer is buffered whole and checked before anything is sent.

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Off,
    Log,
    Warn,
    Redact,
    Block,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilterConfig {
    pub api_keys: Action,
    pub email: Action,
    pub phone: Action,
    pub card: Action,
    pub profanity: Action,
    pub code_injection: Action,
    /// Words the profanity rule matches (whole words, any case); empty: a short built-in list.
    pub profanity_words: Vec<String>,
    /// Most bytes of a stream held back while a match may still grow there (the word being
    /// written, and a number before it); usually a word or less is held.
    pub hold_back: usize,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            api_keys: Action::Redact,
            email: Action::Redact,
            phone: Action::Log,
            card: Action::Redact,
            profanity: Action::Warn,
            code_injection: Action::Warn,
            profanity_words: Vec::new(),
            hold_back: 512,
        }
    }
}

/// One rule that matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hit {
    pub rule: &'static str,
    pub action: Action,
    /// The matched text with its middle masked (never the whole secret).
    pub sample: String,
}

static KEY_SHAPES: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?x)
        sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}
        | gh[pousr]_[A-Za-z0-9]{36,}
        | github_pat_[A-Za-z0-9_]{40,}
        | AKIA[0-9A-Z]{16}
        | xox[abprs]-[A-Za-z0-9-]{10,}
        | AIza[0-9A-Za-z_-]{35}
        | nbl_[A-Za-z0-9_]{20,}
        | -----BEGIN\ [A-Z ]*PRIVATE\ KEY-----",
    )
    .expect("static regex")
});
static TOKEN_RUN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[A-Za-z0-9_\-+/=]{32,}").expect("static regex"));
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
        .expect("static regex")
});
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}[ .-]\d{3,4}[ .-]\d{3,4}")
        .expect("static regex")
});
static CARD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(?:\d[ -]?){12,18}\d\b").expect("static regex"));
static INJECTION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)
        <script\b | javascript: | \bon(?:load|error)\s*=
        | ;\s*drop\s+table\b | '\s*or\s+'1'\s*=\s*'1
        | \brm\s+-rf\s+/ | \$\(\s*curl\b | \bcurl\s+[^|\n]*\|\s*(?:ba)?sh\b
        | \beval\s*\( | \bos\.system\s*\( | \b__import__\s*\(",
    )
    .expect("static regex")
});
const PROFANITY: &[&str] = &[
    "fuck", "shit", "bitch", "bastard", "asshole", "cunt", "dickhead",
];

/// Bits of entropy per character.
fn entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in s.bytes() {
        counts[b as usize] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = f64::from(*c) / n;
            -p * p.log2()
        })
        .sum()
}

/// A long token that looks random: high entropy, letters and digits mixed.
fn random_token(s: &str) -> bool {
    let digits = s.bytes().filter(u8::is_ascii_digit).count();
    let letters = s.bytes().filter(u8::is_ascii_alphabetic).count();
    digits >= 4 && letters >= 8 && entropy(s) >= 4.0
}

fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(*d);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    digits.len() >= 13 && sum.is_multiple_of(10)
}

fn mask(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= 6 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 2..].iter().collect();
    format!("{head}…{tail}")
}

/// The compiled rules.
#[derive(Debug)]
pub struct Filters {
    cfg: FilterConfig,
    profanity: Option<Regex>,
    /// Every active rule's pattern in one set: one pass tells which patterns match at all
    /// (for most texts, none), and only those look for their matches.
    any: Option<regex::RegexSet>,
    /// Each pattern's place in `any` (`None`: its rule is off).
    slots: [Option<usize>; Pattern::COUNT],
}

/// The patterns of the one-pass check.
#[derive(Debug, Clone, Copy)]
enum Pattern {
    KeyShapes,
    TokenRun,
    Email,
    Phone,
    Card,
    Injection,
    Profanity,
}

impl Pattern {
    const COUNT: usize = 7;
}

/// A match: byte range, rule, action.
pub type Span = (usize, usize, &'static str, Action);

impl Filters {
    pub fn new(cfg: FilterConfig) -> Result<Self, String> {
        let words: Vec<String> = if cfg.profanity_words.is_empty() {
            PROFANITY.iter().map(|w| (*w).to_owned()).collect()
        } else {
            cfg.profanity_words.clone()
        };
        let profanity = if cfg.profanity == Action::Off || words.is_empty() {
            None
        } else {
            let alt: Vec<String> = words.iter().map(|w| regex::escape(w)).collect();
            Some(
                Regex::new(&format!(r"(?i)\b(?:{})\w*\b", alt.join("|")))
                    .map_err(|e| format!("profanity words: {e}"))?,
            )
        };
        let mut patterns: Vec<&str> = Vec::new();
        let mut slots = [None; Pattern::COUNT];
        let on = |a: Action| a != Action::Off;
        for (active, pattern, re) in [
            (on(cfg.api_keys), Pattern::KeyShapes, KEY_SHAPES.as_str()),
            (on(cfg.api_keys), Pattern::TokenRun, TOKEN_RUN.as_str()),
            (on(cfg.email), Pattern::Email, EMAIL.as_str()),
            (on(cfg.phone), Pattern::Phone, PHONE.as_str()),
            (on(cfg.card), Pattern::Card, CARD.as_str()),
            (
                on(cfg.code_injection),
                Pattern::Injection,
                INJECTION.as_str(),
            ),
            (
                profanity.is_some(),
                Pattern::Profanity,
                profanity.as_ref().map_or("", Regex::as_str),
            ),
        ] {
            if active {
                slots[pattern as usize] = Some(patterns.len());
                patterns.push(re);
            }
        }
        let any = if patterns.is_empty() {
            None
        } else {
            Some(regex::RegexSet::new(patterns).map_err(|e| format!("output filters: {e}"))?)
        };
        Ok(Filters {
            cfg,
            profanity,
            any,
            slots,
        })
    }

    /// Is any rule on? With none, answers pass through untouched (and nothing is held back).
    pub fn active(&self) -> bool {
        [
            self.cfg.api_keys,
            self.cfg.email,
            self.cfg.phone,
            self.cfg.card,
            self.cfg.profanity,
            self.cfg.code_injection,
        ]
        .iter()
        .any(|a| *a != Action::Off)
    }

    pub fn blocks(&self) -> bool {
        [
            self.cfg.api_keys,
            self.cfg.email,
            self.cfg.phone,
            self.cfg.card,
            self.cfg.profanity,
            self.cfg.code_injection,
        ]
        .contains(&Action::Block)
    }

    pub fn hold_back(&self) -> usize {
        self.cfg.hold_back
    }

    fn spans(&self, text: &str) -> Vec<Span> {
        let Some(set) = &self.any else {
            return Vec::new();
        };
        let found = set.matches(text);
        if !found.matched_any() {
            return Vec::new();
        }
        let matched = |p: Pattern| self.slots[p as usize].is_some_and(|i| found.matched(i));
        let c = &self.cfg;
        let mut out: Vec<Span> = Vec::new();
        if matched(Pattern::KeyShapes) {
            for m in KEY_SHAPES.find_iter(text) {
                out.push((m.start(), m.end(), "api_key", c.api_keys));
            }
        }
        if matched(Pattern::TokenRun) {
            for m in TOKEN_RUN.find_iter(text) {
                if random_token(m.as_str()) {
                    out.push((m.start(), m.end(), "api_key", c.api_keys));
                }
            }
        }
        if matched(Pattern::Email) {
            for m in EMAIL.find_iter(text) {
                out.push((m.start(), m.end(), "email", c.email));
            }
        }
        if matched(Pattern::Card) {
            for m in CARD.find_iter(text) {
                let digits: Vec<u8> = m
                    .as_str()
                    .bytes()
                    .filter(u8::is_ascii_digit)
                    .map(|b| b - b'0')
                    .collect();
                if luhn(&digits) {
                    out.push((m.start(), m.end(), "card", c.card));
                }
            }
        }
        if matched(Pattern::Phone) {
            for m in PHONE.find_iter(text) {
                let digits = m.as_str().bytes().filter(u8::is_ascii_digit).count();
                let is_card = out
                    .iter()
                    .any(|(s, e, r, _)| *r == "card" && *s <= m.start() && m.end() <= *e);
                if (9..=15).contains(&digits) && !is_card {
                    out.push((m.start(), m.end(), "phone", c.phone));
                }
            }
        }
        if let Some(p) = self
            .profanity
            .as_ref()
            .filter(|_| matched(Pattern::Profanity))
        {
            for m in p.find_iter(text) {
                out.push((m.start(), m.end(), "profanity", c.profanity));
            }
        }
        if matched(Pattern::Injection) {
            for m in INJECTION.find_iter(text) {
                out.push((m.start(), m.end(), "code_injection", c.code_injection));
            }
        }
        out.sort_by_key(|s| (s.0, std::cmp::Reverse(s.1)));
        // One hit per place: a match inside an earlier one of the same rule is the same finding.
        let mut kept: Vec<Span> = Vec::with_capacity(out.len());
        for s in out {
            if !kept.iter().any(|k| k.2 == s.2 && k.0 <= s.0 && s.1 <= k.1) {
                kept.push(s);
            }
        }
        kept
    }

    /// Does anything in `text` match (no redacted copy made)?
    pub fn apply_hits(&self, text: &str) -> Vec<Span> {
        self.spans(text)
    }

    /// Scan `text`: the text with redactions made, and every hit.
    pub fn apply(&self, text: &str) -> (String, Vec<Hit>) {
        let spans = self.spans(text);
        let mut hits = Vec::new();
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (start, end, rule, action) in spans {
            hits.push(Hit {
                rule,
                action,
                sample: mask(&text[start..end]),
            });
            if action != Action::Redact || start < at {
                continue;
            }
            out.push_str(&text[at..start]);
            out.push_str(&format!("[REDACTED:{rule}]"));
            at = end;
        }
        out.push_str(&text[at..]);
        (out, hits)
    }
}

/// Where the held part of `text` starts: the word still being written (a key or an address may
/// still grow there) and, before it, a run of digits and separators (a card or phone number
/// may still grow there). Everything before it can go. At most `max_hold` bytes are held.
fn hold_from(text: &str, max_hold: usize) -> usize {
    let word_start = text
        .char_indices()
        .rev()
        .find(|(_, c)| c.is_whitespace())
        .map_or(0, |(i, c)| i + c.len_utf8());
    let mut cut = word_start;
    let numberish = |c: char| c.is_ascii_digit() || " +-().".contains(c);
    let mut digits = text[word_start..].chars().any(|c| c.is_ascii_digit());
    for (i, c) in text[..word_start].char_indices().rev() {
        if !numberish(c) {
            break;
        }
        digits |= c.is_ascii_digit();
        cut = i;
    }
    if !digits {
        cut = word_start;
    }
    let floor = text.len().saturating_sub(max_hold);
    let mut cut = cut.max(floor);
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    cut
}

/// A streaming filter over one answer's text.
#[derive(Debug, Default)]
pub struct StreamText {
    pending: String,
    pub hits: Vec<Hit>,
}

impl StreamText {
    /// Add text; returns what can be sent now.
    pub fn push(&mut self, filters: &Filters, text: &str) -> String {
        self.pending.push_str(text);
        let (scanned, hits) = filters.apply(&self.pending);
        let cut = hold_from(&scanned, filters.hold_back());
        if cut == 0 {
            return String::new();
        }
        // The redactions in the part being sent are final: keep them, and the hits inside it
        // (a match still growing in the held part is seen again).
        let sent = scanned[..cut].to_owned();
        let rest = scanned[cut..].to_owned();
        let sent_hits = hits.len() - filters.apply(&rest).1.len();
        self.hits.extend(hits.into_iter().take(sent_hits));
        self.pending = rest;
        sent
    }

    /// The end of the answer: everything left, filtered.
    pub fn finish(&mut self, filters: &Filters) -> String {
        let (out, hits) = filters.apply(&std::mem::take(&mut self.pending));
        self.hits.extend(hits);
        out
    }
}

/// Filter the text of a whole (non-streamed) answer in place: chat `message.content` and
/// completion `text` of every choice.
pub fn filter_body(filters: &Filters, body: &mut Value) -> Vec<Hit> {
    let mut hits = Vec::new();
    if let Some(choices) = body.get_mut("choices").and_then(Value::as_array_mut) {
        for ch in choices {
            for ptr in ["/message/content", "/text"] {
                if let Some(v) = ch.pointer_mut(ptr) {
                    if let Some(s) = v.as_str() {
                        let (out, h) = filters.apply(s);
                        *v = Value::String(out);
                        hits.extend(h);
                    }
                }
            }
        }
    }
    hits
}

/// Does any hit block the answer?
pub fn blocked(hits: &[Hit]) -> bool {
    hits.iter().any(|h| h.action == Action::Block)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f() -> Filters {
        Filters::new(FilterConfig::default()).unwrap()
    }

    #[test]
    fn secrets_emails_and_cards_are_redacted_and_reported() {
        let (out, hits) = f().apply(
            "key sk-proj-AbCdEf0123456789XyZaBcDeF mail ada@example.org card 4111 1111 1111 1111 ok",
        );
        assert_eq!(
            out,
            "key [REDACTED:api_key] mail [REDACTED:email] card [REDACTED:card] ok"
        );
        let rules: Vec<&str> = hits.iter().map(|h| h.rule).collect();
        assert_eq!(rules, ["api_key", "email", "card"]);
        assert!(hits.iter().all(|h| !h.sample.contains("0123456789")));
        // A number that fails Luhn is not a card.
        let (out, hits) = f().apply("order 4111 1111 1111 1112 shipped");
        assert!(hits.iter().all(|h| h.rule != "card"), "{hits:?}");
        assert!(out.contains("4111 1111 1111 1112"));
    }

    #[test]
    fn random_tokens_count_as_keys_but_words_do_not() {
        let (out, _) = f().apply("token Zk3P9qLw0x7VbN2mRt5YcA8sD1fG4hJ6 end");
        assert_eq!(out, "token [REDACTED:api_key] end");
        let (out, hits) = f().apply("internationalization_and_localization_frameworks are fine");
        assert!(hits.is_empty(), "{hits:?}");
        assert!(out.starts_with("internationalization"));
    }

    #[test]
    fn phones_profanity_and_injection_are_reported_by_their_actions() {
        let (out, hits) = f().apply("call +1 415-555-0132, you bastard: <script>alert(1)</script>");
        assert_eq!(
            out, "call +1 415-555-0132, you bastard: <script>alert(1)</script>",
            "log and warn do not change text"
        );
        let rules: Vec<(&str, Action)> = hits.iter().map(|h| (h.rule, h.action)).collect();
        assert!(rules.contains(&("phone", Action::Log)), "{rules:?}");
        assert!(rules.contains(&("profanity", Action::Warn)), "{rules:?}");
        assert!(
            rules.contains(&("code_injection", Action::Warn)),
            "{rules:?}"
        );
    }

    #[test]
    fn a_secret_split_across_chunks_is_caught() {
        let filters = f();
        let text = "Here it is: sk-proj-AbCdEf0123456789XyZaBcDeF and write to ada@example.org today. Thanks for asking, that is all.";
        for size in [1, 3, 7, 16] {
            let mut s = StreamText::default();
            let mut out = String::new();
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(size) {
                out.push_str(&s.push(&filters, &piece.iter().collect::<String>()));
            }
            out.push_str(&s.finish(&filters));
            assert_eq!(
                out,
                "Here it is: [REDACTED:api_key] and write to [REDACTED:email] today. Thanks for asking, that is all.",
                "chunks of {size}"
            );
            let rules: Vec<&str> = s.hits.iter().map(|h| h.rule).collect();
            assert_eq!(rules, ["api_key", "email"], "chunks of {size}");
        }
    }

    #[test]
    fn only_the_word_being_written_and_a_number_before_it_are_held() {
        fn held(t: &str) -> &str {
            &t[hold_from(t, 512)..]
        }
        assert_eq!(held("Hello there, how are yo"), "yo");
        assert_eq!(held("Hello there "), "");
        assert_eq!(held("the card 4242 4242 42"), " 4242 4242 42");
        assert_eq!(held("call +1 (415) 555-"), " +1 (415) 555-");
        assert_eq!(held("it costs 12 dollars a"), "a");
        // The cap.
        let long = "x".repeat(600);
        assert_eq!(held(&long).len(), 512);
    }

    #[test]
    fn block_rules_are_known() {
        let cfg = FilterConfig {
            api_keys: Action::Block,
            ..FilterConfig::default()
        };
        let filters = Filters::new(cfg).unwrap();
        assert!(filters.blocks());
        let (_, hits) = filters.apply("AKIAIOSFODNN7EXAMPLE");
        assert!(blocked(&hits));
        assert!(!f().blocks());
    }
}

/// Filters an OpenAI-style SSE stream (`data: {json}` events) as it flows: the text of each
/// chunk (`choices[0].delta.content`, or `choices[0].text` for completions) goes through a
/// [`StreamText`], the rest of the event is kept. With a `block` rule, events are held until the
/// end and replaced by one `content_filter` finish when a block rule matched.
#[derive(Debug, Default)]
pub struct SseFilter {
    buf: Vec<u8>,
    pub text: StreamText,
    held: Vec<u8>,
    done: bool,
    /// What a block rule held has been let go (or replaced): once only.
    released: bool,
}

/// The text field of a chunk, if it has one.
fn text_field(v: &mut Value) -> Option<&mut Value> {
    let ch = v.get_mut("choices")?.get_mut(0)?;
    if ch.get("delta").is_some() {
        ch.get_mut("delta")?.get_mut("content")
    } else {
        ch.get_mut("text")
    }
}

impl SseFilter {
    /// Bytes in; bytes to send now out.
    pub fn push(&mut self, filters: &Filters, bytes: &[u8]) -> Vec<u8> {
        if !filters.active() {
            return bytes.to_vec();
        }
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = find_event_end(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end).collect();
            self.event(filters, &event, &mut out);
        }
        out
    }

    /// The stream ended (with or without `[DONE]`): what is still held, filtered.
    pub fn finish(&mut self, filters: &Filters) -> Vec<u8> {
        let mut out = Vec::new();
        if !filters.active() {
            return out;
        }
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            self.event(filters, &rest, &mut out);
        }
        if !self.done {
            let tail = self.text.finish(filters);
            if !tail.is_empty() {
                let v = serde_json::json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": tail}, "finish_reason": null}]});
                self.emit(filters, format!("data: {v}\n\n").as_bytes(), &mut out);
            }
        }
        if filters.blocks() {
            out.extend(self.release_held());
        }
        out
    }

    fn release_held(&mut self) -> Vec<u8> {
        if std::mem::replace(&mut self.released, true) {
            return Vec::new();
        }
        if blocked(&self.text.hits) {
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
            let tail = self.text.finish(filters);
            if !tail.is_empty() {
                let v = serde_json::json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": tail}, "finish_reason": null}]});
                self.emit(filters, format!("data: {v}\n\n").as_bytes(), out);
            }
            if filters.blocks() {
                if blocked(&self.text.hits) {
                    out.extend(self.release_held());
                    return;
                }
                out.extend(self.release_held());
            }
            out.extend_from_slice(b"data: [DONE]\n\n");
            return;
        }
        let Ok(mut v) = serde_json::from_str::<Value>(data) else {
            self.emit(filters, event, out);
            return;
        };
        let finishing = v
            .pointer("/choices/0/finish_reason")
            .is_some_and(|f| !f.is_null());
        if let Some(field) = text_field(&mut v) {
            let piece = field.as_str().unwrap_or_default().to_owned();
            let mut sent = self.text.push(filters, &piece);
            if finishing {
                sent.push_str(&self.text.finish(filters));
            }
            *field = Value::String(sent);
        } else if finishing {
            let tail = self.text.finish(filters);
            if !tail.is_empty() {
                if let Some(delta) = v
                    .pointer_mut("/choices/0/delta")
                    .and_then(Value::as_object_mut)
                {
                    delta.insert("content".into(), Value::String(tail));
                }
            }
        }
        self.emit(filters, format!("data: {v}\n\n").as_bytes(), out);
    }
}

/// End of the first complete SSE event in `buf` (after its blank line).
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod sse_tests {
    use super::*;

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
        let rules: Vec<&str> = f.text.hits.iter().map(|h| h.rule).collect();
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
}
