//! The rules' patterns and checks: key shapes and random tokens, e-mail, phone and card
//! numbers (Luhn), profanity, code injection.

use std::sync::LazyLock;

use regex::Regex;

pub(crate) static KEY_SHAPES: LazyLock<Regex> = LazyLock::new(|| {
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
pub(crate) static TOKEN_RUN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[A-Za-z0-9_\-+/=]{32,}").expect("static regex"));
pub(crate) static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
        .expect("static regex")
});
pub(crate) static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}[ .-]\d{3,4}[ .-]\d{3,4}")
        .expect("static regex")
});
pub(crate) static CARD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(?:\d[ -]?){12,18}\d\b").expect("static regex"));
pub(crate) static INJECTION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?ix)
        <script\b | javascript: | \bon(?:load|error)\s*=
        | ;\s*drop\s+table\b | '\s*or\s+'1'\s*=\s*'1
        | \brm\s+-rf\s+/ | \$\(\s*curl\b | \bcurl\s+[^|\n]*\|\s*(?:ba)?sh\b
        | \beval\s*\( | \bos\.system\s*\( | \b__import__\s*\(",
    )
    .expect("static regex")
});
pub(crate) const PROFANITY: &[&str] = &[
    "fuck", "shit", "bitch", "bastard", "asshole", "cunt", "dickhead",
];

/// Bits of entropy per character.
pub(crate) fn entropy(s: &str) -> f64 {
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
pub(crate) fn random_token(s: &str) -> bool {
    let digits = s.bytes().filter(u8::is_ascii_digit).count();
    let letters = s.bytes().filter(u8::is_ascii_alphabetic).count();
    digits >= 4 && letters >= 8 && entropy(s) >= 4.0
}

/// A byte a key's run is made of (`TOKEN_RUN`'s class).
pub(crate) fn key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+' | b'/' | b'=')
}

/// A run (ASCII, from `TOKEN_RUN`) that is, or holds, a random token: one glued to a long
/// plain prefix or suffix (`AAAA…Zk3P9q…`) still counts. Windows of 32 bytes, 4 apart, and
/// the last 32.
pub(crate) fn holds_random_token(run: &str) -> bool {
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
pub(crate) fn accepted(
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
pub(crate) fn cards(text: &str) -> Vec<(usize, usize)> {
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

pub(crate) fn luhn(digits: &[u8]) -> bool {
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

pub(crate) fn mask(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= 6 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 2..].iter().collect();
    format!("{head}…{tail}")
}
