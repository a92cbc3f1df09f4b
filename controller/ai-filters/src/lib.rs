//! Output filters on what models say: API keys (known shapes, and long high-entropy tokens),
//! e-mail addresses, phone numbers, card numbers (Luhn-checked), a profanity list and
//! code-injection patterns. Each rule has an action: `redact` (replace the match), `block`
//! (refuse the whole answer), `warn` (let it through, flag it in a header and the audit log),
//! `log` (audit only) or `off`. Every hit is an audit event.
//!
//! Streams are filtered as they flow: the assistant's text from each SSE event goes into a
//! buffer, which is scanned together with the end of what was already sent, and only text that
//! no redaction can still grow into is sent. A secret split across chunks is therefore whole
//! when it is found, and a pattern written word by word is found as in a whole answer. With a
//! `block` rule on, the answer is buffered whole and checked before anything is sent.

mod rules;
mod sse;
mod stream;

pub use sse::{usage_of, SseFilter};
pub use stream::StreamText;

use regex::Regex;
use rules::{
    accepted, cards, holds_random_token, mask, CARD, EMAIL, INJECTION, KEY_SHAPES, PHONE,
    PROFANITY, TOKEN_RUN,
};
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
    /// Most bytes of a stream held back while a redaction may still grow there (usually a word
    /// or less is held), and how far back each scan looks over text already sent, for matches
    /// that span pieces.
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

impl FilterConfig {
    /// Every rule off: answers pass through untouched.
    pub fn off() -> Self {
        FilterConfig {
            api_keys: Action::Off,
            email: Action::Off,
            phone: Action::Off,
            card: Action::Off,
            profanity: Action::Off,
            code_injection: Action::Off,
            ..FilterConfig::default()
        }
    }
}

/// The rules' names, as hits carry them (and moderation settings name them).
pub const RULE_KINDS: [&str; 6] = [
    "api_key",
    "email",
    "phone",
    "card",
    "profanity",
    "code_injection",
];

/// Every rule on with `action`: moderation checks a message against all of them and decides
/// per rule what to do.
pub fn all_rules(action: Action) -> FilterConfig {
    FilterConfig {
        api_keys: action,
        email: action,
        phone: action,
        card: action,
        profanity: action,
        code_injection: action,
        ..FilterConfig::default()
    }
}

/// The least `hold_back`: a secret shorter than this is always whole when it is scanned.
pub const MIN_HOLD_BACK: usize = 64;

/// One rule that matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hit {
    pub rule: &'static str,
    pub action: Action,
    /// The matched text with its middle masked (never the whole secret).
    pub sample: String,
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
    /// The `redact` rules' patterns: where in a stream's unsent text a redaction could still be
    /// growing (held until it is whole).
    growing: Option<Live>,
    /// Every active rule's patterns: where in the text a stream already dealt with a match
    /// could still be under way (kept, to be scanned again with what comes next).
    open: Option<Live>,
}

/// Patterns as one lazy DFA, without their word-boundary checks (a looser pattern finds a
/// little more still under way, never less), with its caches kept warm across streams.
#[derive(Debug)]
struct Live {
    dfa: regex_automata::hybrid::dfa::DFA,
    caches: std::sync::Mutex<Vec<regex_automata::hybrid::dfa::Cache>>,
}

impl Live {
    fn new(patterns: &[String]) -> Result<Option<Live>, String> {
        if patterns.is_empty() {
            return Ok(None);
        }
        let dfa = regex_automata::hybrid::dfa::DFA::builder()
            .configure(
                regex_automata::hybrid::dfa::DFA::config()
                    // Every pattern followed to its end, not only the one that would win a
                    // search: a long run that is not yet an address is both a token and an
                    // address being written.
                    .match_kind(regex_automata::MatchKind::All)
                    .cache_capacity(1 << 20),
            )
            .build_many(patterns)
            .map_err(|e| format!("output filters: {e}"))?;
        Ok(Some(Live {
            dfa,
            caches: std::sync::Mutex::default(),
        }))
    }

    /// The earliest place in `text` (from `floor` on) where a match could start and still be
    /// under way at the end of `text`: from there to the end, no pattern is ruled out. The
    /// text's length when there is none.
    fn start(&self, text: &str, floor: usize) -> usize {
        let caches = || self.caches.lock().unwrap_or_else(|p| p.into_inner());
        let mut cache = caches().pop().unwrap_or_else(|| self.dfa.create_cache());
        let from = self.start_in(&mut cache, text, floor);
        caches().push(cache);
        from
    }

    fn start_in(
        &self,
        cache: &mut regex_automata::hybrid::dfa::Cache,
        text: &str,
        floor: usize,
    ) -> usize {
        use regex_automata::{util::start, Anchored};
        let dfa = &self.dfa;
        let Ok(begin) = dfa.start_state(cache, &start::Config::new().anchored(Anchored::Yes))
        else {
            return floor;
        };
        let bytes = text.as_bytes();
        'starts: for i in (floor..bytes.len()).filter(|i| text.is_char_boundary(*i)) {
            let mut state = begin;
            for b in &bytes[i..] {
                match dfa.next_state(cache, state, *b) {
                    Ok(s) if s.is_dead() || s.is_quit() => continue 'starts,
                    Ok(s) => state = s,
                    // The cache gave up: say "from here", to be safe, and start it afresh.
                    Err(_) => {
                        cache.reset(dfa);
                        return i;
                    }
                }
            }
            return i;
        }
        text.len()
    }
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
        if cfg.hold_back < MIN_HOLD_BACK {
            return Err(format!(
                "output filters: hold_back is {} bytes; it must be at least {MIN_HOLD_BACK}, or a secret split across pieces could go out in clear",
                cfg.hold_back
            ));
        }
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
        // The same without its word boundaries, for the DFAs of `growing` and `open`.
        let profanity_loose = format!(
            r"(?i)(?:{})\w*",
            words
                .iter()
                .map(|w| regex::escape(w))
                .collect::<Vec<_>>()
                .join("|")
        );
        let mut patterns: Vec<&str> = Vec::new();
        let mut redacting: Vec<String> = Vec::new();
        let mut active: Vec<String> = Vec::new();
        let mut slots = [None; Pattern::COUNT];
        for (action, pattern, re) in [
            (cfg.api_keys, Pattern::KeyShapes, KEY_SHAPES.as_str()),
            (cfg.api_keys, Pattern::TokenRun, TOKEN_RUN.as_str()),
            (cfg.email, Pattern::Email, EMAIL.as_str()),
            (cfg.phone, Pattern::Phone, PHONE.as_str()),
            (cfg.card, Pattern::Card, CARD.as_str()),
            (cfg.code_injection, Pattern::Injection, INJECTION.as_str()),
            (
                if profanity.is_some() {
                    cfg.profanity
                } else {
                    Action::Off
                },
                Pattern::Profanity,
                profanity.as_ref().map_or("", Regex::as_str),
            ),
        ] {
            if action == Action::Off {
                continue;
            }
            slots[pattern as usize] = Some(patterns.len());
            patterns.push(re);
            // The built-in patterns hold no escaped backslash, so every `\b` is a boundary.
            let loose = match pattern {
                Pattern::Profanity => profanity_loose.clone(),
                _ => re.replace(r"\b", ""),
            };
            if action == Action::Redact {
                redacting.push(loose.clone());
            }
            active.push(loose);
        }
        let growing = Live::new(&redacting)?;
        let open = Live::new(&active)?;
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
            growing,
            open,
        })
    }

    /// Where in `text` (from `floor` on) the earliest match of a `redact` rule could still be
    /// growing; the text's length when there is none.
    fn growing_from(&self, text: &str, floor: usize) -> usize {
        self.growing
            .as_ref()
            .map_or(text.len(), |l| l.start(text, floor))
    }

    /// Where in `text` (from `floor` on) the earliest match of any rule could still be under
    /// way; the text's length when there is none.
    fn open_from(&self, text: &str, floor: usize) -> usize {
        self.open
            .as_ref()
            .map_or(text.len(), |l| l.start(text, floor))
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
                if holds_random_token(m.as_str()) {
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
            for (s, e) in cards(text) {
                out.push((s, e, "card", c.card));
            }
        }
        if matched(Pattern::Phone) {
            let cards: Vec<(usize, usize)> = out
                .iter()
                .filter(|s| s.2 == "card")
                .map(|s| (s.0, s.1))
                .collect();
            for (s, e) in accepted(&PHONE, text, |m| {
                (9..=15)
                    .contains(&m.as_str().bytes().filter(u8::is_ascii_digit).count())
                    .then_some(m.end())
            }) {
                // Cards do not overlap and come in order: only the last one starting before the
                // number can hold it.
                let before = cards.partition_point(|(cs, _)| *cs <= s);
                let in_card = before > 0 && cards[before - 1].1 >= e;
                if !in_card {
                    out.push((s, e, "phone", c.phone));
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
        // (Sorted by start: it is inside one when the furthest end of that rule so far reaches
        // its end.)
        let mut kept: Vec<Span> = Vec::with_capacity(out.len());
        let mut reach: Vec<(&'static str, usize)> = Vec::new();
        for s in out {
            match reach.iter_mut().find(|(rule, _)| *rule == s.2) {
                Some((_, end)) if *end >= s.1 => continue,
                Some((_, end)) => *end = s.1,
                None => reach.push((s.2, s.1)),
            }
            kept.push(s);
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
            // A redaction that overlaps the one before covers what is left of it.
            if action != Action::Redact || end <= at {
                continue;
            }
            out.push_str(&text[at..start.max(at)]);
            out.push_str(&format!("[REDACTED:{rule}]"));
            at = end;
        }
        out.push_str(&text[at..]);
        (out, hits)
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

/// Filter a whole stored answer (a chat or completion JSON document): the document with its
/// texts redacted (and emptied, `finish_reason: content_filter`, when a rule blocks), the
/// rules that matched under `nebula_filtered`, and the hits; `None` when it is not JSON or
/// nothing matched.
pub fn filter_answer(filters: &Filters, body: &[u8]) -> Option<(Vec<u8>, Vec<Hit>)> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let hits = filter_body(filters, &mut v);
    if hits.is_empty() {
        return None;
    }
    if blocked(&hits) {
        if let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) {
            for ch in choices {
                for ptr in ["/message/content", "/text"] {
                    if let Some(t) = ch.pointer_mut(ptr) {
                        *t = Value::String(String::new());
                    }
                }
                ch["finish_reason"] = Value::String("content_filter".into());
            }
        }
    }
    let mut rules: Vec<&str> = hits.iter().map(|h| h.rule).collect();
    rules.sort_unstable();
    rules.dedup();
    v["nebula_filtered"] = serde_json::json!(rules);
    Some((serde_json::to_vec(&v).ok()?, hits))
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
    fn a_stored_answer_is_redacted_and_says_which_rules_matched() {
        let answer = br#"{"choices":[{"message":{"role":"assistant","content":"write to bob@example.com"},"finish_reason":"stop"}]}"#;
        let (body, hits) = filter_answer(&f(), answer).expect("a hit");
        let v: Value = serde_json::from_slice(&body).unwrap();
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            !text.contains("bob@example.com") && text.contains("[REDACTED:"),
            "{text}"
        );
        assert_eq!(v["nebula_filtered"][0], hits[0].rule);
        assert!(filter_answer(&f(), br#"{"choices":[{"message":{"content":"fine"}}]}"#).is_none());
        assert!(filter_answer(&f(), b"not json bob@example.com").is_none());
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

    /// What `StreamText` holds of `t`: from where a redaction could still be growing.
    fn held<'a>(filters: &Filters, t: &'a str) -> &'a str {
        &t[filters.growing_from(t, t.len().saturating_sub(512))..]
    }

    #[test]
    fn only_what_a_redaction_could_still_grow_into_is_held() {
        let f = f();
        assert_eq!(held(&f, "Hello there, how are yo"), "yo");
        assert_eq!(held(&f, "Hello there "), "");
        assert_eq!(held(&f, "the card 4242 4242 42"), "4242 4242 42");
        assert_eq!(held(&f, "it costs 12 dollars a"), "a");
        assert_eq!(held(&f, "here: -----BEGIN RSA "), "-----BEGIN RSA ");
        // Phones are only logged by default: the number goes on as it grows.
        assert_eq!(held(&f, "call +1 (415) 555-"), "555-");
        let phones = Filters::new(FilterConfig {
            phone: Action::Redact,
            ..FilterConfig::default()
        })
        .unwrap();
        assert_eq!(held(&phones, "call +1 (415) 555-"), "+1 (415) 555-");
        // Nothing redacts: nothing is held.
        let none = Filters::new(FilterConfig {
            api_keys: Action::Warn,
            email: Action::Log,
            card: Action::Off,
            ..FilterConfig::default()
        })
        .unwrap();
        assert_eq!(held(&none, "Hello there, how are yo"), "");
        // The cap.
        let long = "x".repeat(600);
        assert_eq!(held(&f, &long).len(), 512);
    }

    /// Send `text` through a `StreamText` in the given pieces; what came out, and the rules hit.
    fn stream(filters: &Filters, pieces: &[&str]) -> (String, Vec<&'static str>) {
        let mut s = StreamText::default();
        let mut out = String::new();
        for p in pieces {
            out.push_str(&s.push(filters, p));
        }
        out.push_str(&s.finish(filters));
        (out, s.hits.iter().map(|h| h.rule).collect())
    }

    /// `text` cut after every space, as a model writes it: one word per event.
    fn words(text: &str) -> Vec<&str> {
        text.split_inclusive(' ').collect()
    }

    #[test]
    fn a_match_written_one_word_at_a_time_is_found_as_in_a_whole_answer() {
        let f = f();
        // A private key's header spans spaces; it is redacted whole, and the key body too.
        let key = "Sure: -----BEGIN RSA PRIVATE KEY----- MIIEowIBAAKCAQEAx4Zq9Lr2Tb7Wm0Vn3Kd8Yp5Hs1Jf6Gc end";
        let whole = f.apply(key).0;
        assert_eq!(
            whole, "Sure: [REDACTED:api_key] [REDACTED:api_key] end",
            "whole"
        );
        for pieces in [words(key), key.split_inclusive('-').collect()] {
            let (out, rules) = stream(&f, &pieces);
            assert_eq!(out, whole, "{pieces:?}");
            assert_eq!(rules, ["api_key", "api_key"], "{pieces:?}");
        }
        // A warned pattern across words is found once; the text goes on unchanged.
        let pipe = "Run curl -fsSL https://get.example.sh | sh to install it, then log in.";
        let (out, rules) = stream(&f, &words(pipe));
        assert_eq!(out, pipe);
        assert_eq!(rules, ["code_injection"]);
        // The same rule set to redact holds the command until it is whole.
        let redact = Filters::new(FilterConfig {
            code_injection: Action::Redact,
            ..FilterConfig::default()
        })
        .unwrap();
        let text = "Then do rm -rf / and reboot.";
        let (out, rules) = stream(&redact, &words(text));
        assert_eq!(out, redact.apply(text).0);
        assert_eq!(out, "Then do [REDACTED:code_injection] and reboot.");
        assert_eq!(rules, ["code_injection"]);
        // A word list entry with a space in it.
        let words_with_space = Filters::new(FilterConfig {
            profanity: Action::Redact,
            profanity_words: vec!["son of a gun".into()],
            ..FilterConfig::default()
        })
        .unwrap();
        let (out, rules) = stream(&words_with_space, &words("you son of a gun, really"));
        assert_eq!(out, "you [REDACTED:profanity], really");
        assert_eq!(rules, ["profanity"]);
    }

    #[test]
    fn an_address_longer_than_a_token_is_held_until_whole() {
        let (out, rules) = stream(
            &f(),
            &[
                "write to ",
                "customer_support_team_for_enterprise@",
                "example.com thanks",
            ],
        );
        assert_eq!(out, "write to [REDACTED:email] thanks");
        assert_eq!(rules, ["email"]);
    }

    #[test]
    fn a_logged_run_longer_than_the_look_back_is_one_finding() {
        let filters = Filters::new(FilterConfig {
            api_keys: Action::Log,
            ..FilterConfig::default()
        })
        .unwrap();
        // 4 KB of base64-like text with no space, as a model would print a blob.
        let blob = random_run(4096, 2);
        let pieces: Vec<&str> = blob
            .as_bytes()
            .chunks(16)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        let (out, rules) = stream(&filters, &pieces);
        assert_eq!(out, blob, "logged, not changed");
        assert_eq!(rules, ["api_key"]);
    }

    #[test]
    fn a_secret_longer_than_the_hold_is_one_redaction_however_long() {
        let token = random_run(2000, 1);
        let text = format!("the token is {token} and that is all");
        let pieces: Vec<&str> = text
            .as_bytes()
            .chunks(16)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        let (out, rules) = stream(&f(), &pieces);
        assert_eq!(out, "the token is [REDACTED:api_key] and that is all");
        assert_eq!(rules, ["api_key"]);
        // Its run goes on past the look-back with plain characters: still the same secret.
        let text = format!(
            "the token is {}{} and that is all",
            token,
            "abc".repeat(300)
        );
        let pieces: Vec<&str> = text
            .as_bytes()
            .chunks(16)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        assert_eq!(
            stream(&f(), &pieces).0,
            "the token is [REDACTED:api_key] and that is all"
        );
    }

    #[test]
    fn a_match_that_starts_in_a_long_run_is_found_once_it_is_whole() {
        // The run is longer than the look-back, so the address's start is cut off before its
        // `@` arrives: it is found all the same.
        for action in [Action::Block, Action::Redact, Action::Log] {
            let filters = Filters::new(FilterConfig {
                email: action,
                ..FilterConfig::off()
            })
            .unwrap();
            let run = "a".repeat(600);
            let (_, rules) = stream(&filters, &[&run, "@example.com and more"]);
            assert_eq!(rules, ["email"], "{action:?}");
        }
    }

    #[test]
    fn a_number_that_fails_luhn_does_not_hide_a_card_and_overlaps_are_covered() {
        // The first run of digits the card pattern sees starts at the phone number and fails
        // the Luhn check; the card after it is still found.
        let (out, hits) = f().apply("+1 415-555-0132 4111 1111 1111 1111 ok");
        assert!(!out.contains("4111 1111 1111 1111"), "{out}");
        assert!(hits.iter().any(|h| h.rule == "card"), "{hits:?}");
        // A phone number that begins inside a card: what it adds is redacted too.
        let phones = Filters::new(FilterConfig {
            phone: Action::Redact,
            ..FilterConfig::default()
        })
        .unwrap();
        let (out, _) = phones.apply("4111 1111 1111 1111 555-0132 ok");
        assert_eq!(out, "[REDACTED:card][REDACTED:phone] ok");
    }

    #[test]
    fn a_token_glued_to_plain_text_still_counts() {
        let (out, _) = f().apply(&format!(
            "see {}Zk3P9qLw0x7VbN2mRt5YcA8sD1fG4hJ6 here",
            "A".repeat(64)
        ));
        assert_eq!(out, "see [REDACTED:api_key] here");
    }

    #[test]
    fn a_look_back_too_short_to_hold_a_secret_is_refused() {
        let e = Filters::new(FilterConfig {
            hold_back: 8,
            ..FilterConfig::default()
        })
        .unwrap_err();
        assert!(e.contains("hold_back"), "{e}");
    }

    #[test]
    fn a_warned_match_that_grows_is_one_finding() {
        let (out, rules) = stream(&f(), &["you bastard", "s, all of you"]);
        assert_eq!(out, "you bastards, all of you");
        assert_eq!(rules, ["profanity"]);
        // Two of them are two.
        let (_, rules) = stream(&f(), &["bastard ", "and bastard"]);
        assert_eq!(rules, ["profanity", "profanity"]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 512,
            max_global_rejects: 100_000,
            ..proptest::prelude::ProptestConfig::default()
        })]
        /// However an answer is cut into pieces, the stream hides whatever the whole answer
        /// hides; for words apart (matches that do not overlap) it reads as the whole answer:
        /// every redaction made, none split, no text lost or doubled.
        #[test]
        fn a_stream_cut_anywhere_reads_as_the_whole_answer(
            parts in proptest::collection::vec(0usize..PARTS.len() + 2, 1..40),
            cuts in proptest::collection::vec(1usize..12, 1..80),
            strict in proptest::bool::ANY,
            apart in proptest::bool::ANY,
        ) {
            let filters = Filters::new(if strict {
                FilterConfig {
                    phone: Action::Redact,
                    profanity: Action::Redact,
                    code_injection: Action::Redact,
                    ..FilterConfig::default()
                }
            } else {
                FilterConfig::default()
            })
            .unwrap();
            // And two runs longer than the look-back: plain, and a token.
            let long = ["abc".repeat(200), random_run(600, 7)];
            let parts: Vec<&str> = parts
                .iter()
                .map(|i| PARTS.get(*i).copied().unwrap_or_else(|| &long[i - PARTS.len()]))
                .collect();
            let text = parts.join(if apart { " " } else { "" });
            let chars: Vec<char> = text.chars().collect();
            let mut s = StreamText::default();
            let mut out = String::new();
            let (mut at, mut k) = (0, 0);
            while at < chars.len() {
                let n = cuts[k % cuts.len()].min(chars.len() - at);
                let piece: String = chars[at..at + n].iter().collect();
                out.push_str(&s.push(&filters, &piece));
                at += n;
                k += 1;
            }
            out.push_str(&s.finish(&filters));
            let whole = filters.apply(&text).0;
            // A match longer than the look-back cannot be held whole (`curl` and 600 bytes
            // before the `| sh`; a plain run that a token at its end makes a secret): only a
            // `block` rule sees it, at the end. A run known to be a secret within the look-back
            // is redacted as one however long.
            let hold = filters.hold_back();
            let held_whole = filters.spans(&text).iter().all(|(s, e, ..)| {
                e - s <= hold
                    || text
                        .get(*s..s + hold)
                        .is_some_and(|head| !head.contains(char::is_whitespace) && holds_random_token(head))
            });
            proptest::prop_assume!(held_whole);
            for (start, end, ..) in filters.spans(&text).iter().filter(|s| s.3 == Action::Redact) {
                let secret = &text[*start..*end];
                proptest::prop_assert!(
                    out.matches(secret).count() <= whole.matches(secret).count(),
                    "{:?} shows {:?}: {:?}", text, secret, out
                );
            }
            if apart {
                proptest::prop_assert_eq!(out, whole, "{:?}", text);
                // And finds what the whole answer's scan finds (and perhaps more: `<script>`
                // seen before the `curl … | sh` around it is whole).
                let expected = filters.apply(&text).1;
                for h in &expected {
                    let count = |hits: &[Hit]| hits.iter().filter(|x| x.rule == h.rule).count();
                    proptest::prop_assert!(
                        count(&s.hits) >= count(&expected),
                        "{:?}: {:?}", text, s.hits
                    );
                }
            }
        }
    }

    /// `n` characters that look random (a key, a blob), the same for the same `seed`.
    fn random_run(n: usize, seed: u32) -> String {
        let mut x = seed.wrapping_mul(0x9e37_79b9) | 1;
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                alphabet[(x % 64) as usize] as char
            })
            .collect()
    }

    /// What the answers of the property test are made of.
    const PARTS: &[&str] = &[
        "the ",
        "moon ",
        "is",
        " ",
        "\n",
        ", ",
        ". ",
        "12 ",
        "-",
        "(",
        ")",
        "é",
        "日本 ",
        "sk-proj-Q3vT9xLmA7pK2wZr8YbN4cD6",
        "ada@example.org",
        "grace@",
        "example.net",
        "4111 1111 1111 1111",
        "4242 ",
        "+1 415-555-0132",
        "-----BEGIN RSA PRIVATE KEY-----",
        "AKIAIOSFODNN7EXAMPLE",
        "Zk3P9qLw0x7VbN2mRt5YcA8sD1fG4hJ6",
        "rm -rf /",
        "curl ",
        "https://x.sh ",
        "| sh",
        "bastard",
        "<script>",
    ];

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
