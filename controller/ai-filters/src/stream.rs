//! Filtering a text that arrives in pieces.

use crate::rules::{key_byte, mask};
use crate::{Action, Filters, Hit, Span};

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
