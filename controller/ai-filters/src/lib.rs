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
        | -----BEGIN\ [A-Z\ ]*PRIVATE\ KEY-----",
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

/// A byte a key's run is made of (`TOKEN_RUN`'s class).
fn key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+' | b'/' | b'=')
}

/// A run (ASCII, from `TOKEN_RUN`) that is, or holds, a random token: one glued to a long
/// plain prefix or suffix (`AAAA…Zk3P9q…`) still counts. Windows of 32 bytes, 4 apart, and
/// the last 32.
fn holds_random_token(run: &str) -> bool {
    const W: usize = 32;
    random_token(run)
        || (run.len() > W
            && (0..=run.len() - W)
                .step_by(4)
                .chain([run.len() - W])
                .any(|i| run.get(i..i + W).is_some_and(random_token)))
}

/// The matches of `re` in `text` that `keep` accepts, as (start, end): `keep` gives the end of
/// what it accepts of a match (all of it, or less). One it rejects does not hide one that
/// starts inside it.
fn accepted(
    re: &Regex,
    text: &str,
    keep: impl Fn(regex::Match<'_>) -> Option<usize>,
) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(m) = re.find_at(text, at) {
        match keep(m) {
            Some(end) => {
                out.push((m.start(), end));
                at = end;
            }
            None => at = m.start() + text[m.start()..].chars().next().map_or(1, char::len_utf8),
        }
        if at >= text.len() {
            break;
        }
    }
    out
}

/// Card numbers in `text`: runs of digits (spaces or dashes between) that pass the Luhn
/// check. A run that fails may hold a card: one that ends sooner (a card followed by a phone
/// number), or one that starts later (a number followed by a card).
fn cards(text: &str) -> Vec<(usize, usize)> {
    let boundary = |end: usize| {
        text[end..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    };
    accepted(&CARD, text, |m| {
        // Each digit's value, and where the run ends after it.
        let (values, ends): (Vec<u8>, Vec<usize>) = m
            .as_str()
            .bytes()
            .enumerate()
            .filter(|(_, b)| b.is_ascii_digit())
            .map(|(i, b)| (b - b'0', m.start() + i + 1))
            .unzip();
        (13..=values.len())
            .rev()
            .find(|n| boundary(ends[n - 1]) && luhn(&values[..*n]))
            .map(|n| ends[n - 1])
    })
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

/// A streaming filter over one answer's text (one choice of it).
///
/// Text arrives in pieces. What no `redact` match can still reach is sent at once; the rest
/// (the word being written, a number still growing, a private key's header still being
/// written) waits for more. Every scan also looks back over the last `hold_back` bytes already
/// sent, so a match that spans pieces (`curl … | sh` written one word at a time) is found
/// however the text was cut.
#[derive(Debug, Default)]
pub struct StreamText {
    /// Received, not yet sent (as the model wrote it).
    pending: String,
    /// The end of the text already dealt with (as the model wrote it, so that every scan sees
    /// what a scan of the whole answer sees there): context for matches that span pieces.
    tail: String,
    /// Bytes of the answer dealt with so far; `tail` ends there.
    done: usize,
    /// Hits recorded whose start is still within the look-back (offset in the answer, rule): a
    /// match seen again, or grown, is not a second finding.
    seen: Vec<(usize, &'static str)>,
    /// `tail` was cut inside a match (a run longer than the look-back): the rules of what a scan
    /// finds at its start, found before.
    clipped: Vec<&'static str>,
    /// No match can begin before these places (offsets in the answer) and still be under way,
    /// for `Filters::open_from` and `Filters::growing_from`: a place ruled out stays ruled out
    /// as text is added, so each check starts where the last one found something.
    open_at: usize,
    grow_at: usize,
    /// Where the last redaction sent ends (offset in the answer): a secret longer than
    /// `hold_back` goes out as one redaction however many pieces it comes in.
    redacted_to: usize,
    /// A secret longer than `hold_back` was sent redacted up to the end of the text so far,
    /// and may go on: what continues its run (key characters, no break) is part of it.
    open_secret: bool,
    /// The cut was pushed to the end of a redaction that began before the hold's limit.
    forced: bool,
    pub hits: Vec<Hit>,
}

impl StreamText {
    /// Add text; returns what can be sent now.
    pub fn push(&mut self, filters: &Filters, text: &str) -> String {
        self.pending.push_str(text);
        self.release(filters, false)
    }

    /// The end of the answer: everything left, filtered.
    pub fn finish(&mut self, filters: &Filters) -> String {
        self.release(filters, true)
    }

    fn release(&mut self, filters: &Filters, all: bool) -> String {
        if self.open_secret {
            let n = self.pending.bytes().take_while(|b| key_byte(*b)).count();
            if n < self.pending.len() {
                self.open_secret = false;
            }
            if n > 0 {
                self.tail.push_str(&self.pending[..n]);
                self.pending.drain(..n);
                self.done += n;
                self.redacted_to = self.done;
                self.trim_tail(filters, &[]);
            }
        }
        if self.pending.is_empty() {
            return String::new();
        }
        let t = self.tail.len();
        let base = self.done - t;
        let mut window = String::with_capacity(t + self.pending.len());
        window.push_str(&self.tail);
        window.push_str(&self.pending);
        let spans = filters.spans(&window);
        self.forced = false;
        let cut = if all {
            self.pending.len()
        } else {
            self.cut(filters, &spans, t)
        };
        let end = t + cut;
        let mut out = String::with_capacity(cut);
        let mut at = t;
        for &(s, e, rule, action) in &spans {
            if s >= end {
                break;
            }
            // In what was dealt with before: found then. (A match that reaches past the cut is
            // not a redaction, which is never split: it is found now, and not again as it
            // grows.)
            if e <= t {
                continue;
            }
            let found_before =
                s == 0 && self.clipped.contains(&rule) || self.seen.contains(&(base + s, rule));
            if !found_before {
                self.seen.push((base + s, rule));
                self.hits.push(Hit {
                    rule,
                    action,
                    sample: mask(&window[s..e]),
                });
            }
            if action == Action::Redact && e > at {
                out.push_str(&window[at..s.max(at)]);
                let goes_on = s < t && self.redacted_to == base + t;
                if !goes_on {
                    out.push_str("[REDACTED:");
                    out.push_str(rule);
                    out.push(']');
                }
                at = e;
                self.redacted_to = base + e;
            }
        }
        out.push_str(&window[at.min(end)..end]);
        self.tail.push_str(&self.pending[..cut]);
        self.pending.drain(..cut);
        self.done += cut;
        self.open_secret = self.forced
            && self.redacted_to == self.done
            && self.tail.bytes().next_back().is_some_and(key_byte);
        self.trim_tail(filters, &spans);
        let from = self.done - self.tail.len();
        self.seen.retain(|(o, _)| *o >= from);
        out
    }

    /// Keep of `tail` only what the next scan needs: from the start of the word where the
    /// earliest match still under way begins (at least the last word, so that word boundaries
    /// are seen as in the whole answer), and never from inside a match found (`spans`, in the
    /// tail's places), so that the next scan finds the matches a scan of the whole answer finds
    /// there; at most `hold_back` bytes.
    fn trim_tail(&mut self, filters: &Filters, spans: &[Span]) {
        let mut floor = self.tail.len().saturating_sub(filters.hold_back().max(1));
        while !self.tail.is_char_boundary(floor) {
            floor += 1;
        }
        let base = self.done - self.tail.len();
        let mut from = floor.max(self.open_at.saturating_sub(base).min(self.tail.len()));
        while !self.tail.is_char_boundary(from) {
            from += 1;
        }
        let live = filters.open_from(&self.tail, from);
        self.open_at = base + live;
        let mut word = self.tail[..live]
            .char_indices()
            .rev()
            .find(|(_, c)| c.is_whitespace())
            .map_or(0, |(i, c)| i + c.len_utf8());
        while let Some(s) = spans
            .iter()
            .filter(|(s, e, ..)| *s < word && word < *e)
            .map(|(s, ..)| *s)
            .min()
        {
            word = s;
        }
        let keep = word.max(floor);
        if keep == 0 {
            return;
        }
        // Cut inside a match: what a scan finds at the start of what is kept began before it.
        self.clipped = spans
            .iter()
            .filter(|(s, e, ..)| *s < keep && keep < *e)
            .map(|s| s.2)
            .collect();
        self.tail.drain(..keep);
    }

    /// How much of `pending` can go now. Held: from where a `redact` match could still be
    /// growing to the end (at most `hold_back` bytes), and never part of a redaction.
    fn cut(&mut self, filters: &Filters, spans: &[Span], t: usize) -> usize {
        let text = &self.pending;
        let mut floor = text.len().saturating_sub(filters.hold_back());
        while !text.is_char_boundary(floor) {
            floor += 1;
        }
        let mut from = floor.max(self.grow_at.saturating_sub(self.done).min(text.len()));
        while !text.is_char_boundary(from) {
            from += 1;
        }
        let growing = filters.growing_from(text, from);
        self.grow_at = self.done + growing;
        let cut = t + growing;
        // A redaction is sent whole: hold one the cut would split, or, when holding it would
        // hold more than `hold_back`, send all of it now. Overlapping redactions are one.
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        for &(s, e, _, a) in spans {
            if a != Action::Redact {
                continue;
            }
            match ranges.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => ranges.push((s, e)),
            }
        }
        match ranges.iter().find(|(s, e)| *s < cut && cut < *e) {
            Some(&(s, _)) if s >= t + floor => s - t,
            Some(&(_, e)) => {
                self.forced = true;
                e - t
            }
            None => cut - t,
        }
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
