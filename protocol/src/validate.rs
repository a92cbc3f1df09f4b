//! Validators for values that several crates check: names, labels, MAC addresses. Each
//! `validate_*` answers with the message a user sees.

/// The one rule for names that end up in labels, container names and filters (nodes,
/// services): 1-63 letters, digits, `-`, `_` or `.`, starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    name.len() <= 63
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A node name, with the rule spelled out when it breaks it.
pub fn validate_node_name(name: &str) -> Result<(), String> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(format!(
            "invalid node name `{name}`: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        ))
    }
}

/// A label: key of 1-63 letters, digits, `-`, `_`, `.` or `/`; value of at most 255
/// characters with no control characters.
pub fn validate_label(key: &str, value: &str) -> Result<(), String> {
    let key_ok = !key.is_empty()
        && key.len() <= 63
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
    if !key_ok {
        return Err(format!(
            "invalid label key `{key}`: use 1-63 letters, digits, '-', '_', '.' or '/'"
        ));
    }
    if value.len() > 255 || value.chars().any(|c| c.is_control()) {
        return Err(format!(
            "invalid value for label `{key}`: at most 255 characters, no control characters"
        ));
    }
    Ok(())
}

/// `52:54:00:12:34:56` or `52-54-00-12-34-56` to bytes.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    let bad = || format!("`{text}` is not a MAC address (write six hex pairs, 52:54:00:12:34:56)");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return Err(bad());
        }
        mac[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_labels_and_macs() {
        assert!(validate_node_name("gpu-box.1").is_ok());
        for bad in ["", "-x", "a b", &"x".repeat(64)] {
            assert!(validate_node_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_label("gpu/vendor", "nvidia").is_ok());
        assert!(validate_label("", "x").is_err());
        assert!(validate_label("k", "a\nb").is_err());
        assert!(validate_label("k", &"v".repeat(256)).is_err());
        assert_eq!(
            parse_mac("52-54-00-12-34-5f"),
            Ok([0x52, 0x54, 0, 0x12, 0x34, 0x5f])
        );
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Ok([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        for bad in ["52:54:00:12:34", "52:54:00:12:34:5", "zz:54:00:12:34:56"] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }
}
