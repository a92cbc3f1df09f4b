//! `.env` files as people write them: `NAME=value`, `export NAME=value`, comments, blank lines,
//! single quotes (taken as they are), double quotes (with `\n`, `\"` and `\\`), and a `#`
//! comment after an unquoted value.

use super::SecretValue;

#[derive(Debug, Default)]
pub struct Parsed {
    pub pairs: Vec<(String, SecretValue)>,
    /// `line N: why`, never with the value.
    pub refused: Vec<String>,
}

pub fn parse(text: &str) -> Parsed {
    let mut out = Parsed::default();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((name, rest)) = line.split_once('=') else {
            out.refused.push(format!("line {n}: not NAME=value"));
            continue;
        };
        let name = name.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            out.refused.push(format!("line {n}: not NAME=value"));
            continue;
        }
        match value(rest.trim_start()) {
            Ok(v) => out.pairs.push((name.to_owned(), SecretValue::new(v))),
            Err(why) => out.refused.push(format!("line {n}: {why}")),
        }
    }
    out
}

fn value(rest: &str) -> Result<String, &'static str> {
    if let Some(body) = rest.strip_prefix('\'') {
        let end = body.find('\'').ok_or("a single quote is not closed")?;
        return Ok(body[..end].to_owned());
    }
    if let Some(body) = rest.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return Ok(out),
                '\\' => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some(c @ ('"' | '\\')) => out.push(c),
                    Some(c) => {
                        out.push('\\');
                        out.push(c);
                    }
                    None => break,
                },
                c => out.push(c),
            }
        }
        return Err("a double quote is not closed");
    }
    let v = match rest.find(" #") {
        Some(i) => &rest[..i],
        None => rest,
    };
    Ok(v.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotenv_lines_as_people_write_them() {
        let p = parse(
            "# a comment\n\nDB_PASSWORD=hunter2\nexport API_KEY = 'sk-1 #2'\nMOTD=\"two\\nlines \\\"q\\\"\"\nPLAIN=a b # note\nbroken line\nOPEN=\"never closed\n=nothing\n",
        );
        let got: Vec<(&str, &str)> = p
            .pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect();
        assert_eq!(
            got,
            [
                ("DB_PASSWORD", "hunter2"),
                ("API_KEY", "sk-1 #2"),
                ("MOTD", "two\nlines \"q\""),
                ("PLAIN", "a b"),
            ]
        );
        assert_eq!(
            p.refused,
            [
                "line 7: not NAME=value",
                "line 8: a double quote is not closed",
                "line 9: not NAME=value"
            ]
        );
        assert!(
            !format!("{p:?}").contains("hunter2"),
            "Debug shows no value"
        );
    }
}
