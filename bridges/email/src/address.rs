//! Email addresses: normalising them, telling ours from foreign ones, and the ghost user
//! that stands for an outside address in Matrix (`@_email_bob=40example.com:server`).

/// The prefix of every ghost's localpart.
pub const GHOST_PREFIX: &str = "_email_";

/// An address as compared: domain lowercased, local part lowercased too (every mail
/// system this bridge meets treats it case-insensitively), surrounding `<>` and spaces
/// removed. `None` when it is not `local@domain`.
pub fn normalise(addr: &str) -> Option<String> {
    let a = addr
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    let (local, domain) = a.rsplit_once('@')?;
    if local.is_empty()
        || domain.is_empty()
        || a.len() > 254
        || local.len() > 64
        || !domain
            .chars()
            .all(|c| c.is_alphanumeric() || c == '.' || c == '-')
        || domain.starts_with('.')
        || domain.ends_with('.')
        || local.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return None;
    }
    Some(format!(
        "{}@{}",
        local.to_lowercase(),
        domain.to_lowercase()
    ))
}

pub fn domain_of(addr: &str) -> &str {
    addr.rsplit_once('@').map(|(_, d)| d).unwrap_or_default()
}

pub fn local_of(addr: &str) -> &str {
    addr.rsplit_once('@').map(|(l, _)| l).unwrap_or(addr)
}

/// The ghost localpart of an outside address: characters Matrix allows in a localpart
/// stay, every other byte becomes `=XX` (so `@` is `=40`), and it decodes back.
pub fn ghost_localpart(addr: &str) -> String {
    let mut out = String::from(GHOST_PREFIX);
    for b in addr.bytes() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'+' => out.push(b as char),
            _ => out.push_str(&format!("={b:02x}")),
        }
    }
    out
}

/// The address a ghost localpart stands for.
pub fn address_of_ghost(localpart: &str) -> Option<String> {
    let rest = localpart.strip_prefix(GHOST_PREFIX)?;
    let mut bytes = Vec::with_capacity(rest.len());
    let mut it = rest.bytes();
    while let Some(b) = it.next() {
        if b == b'=' {
            let hi = it.next()?;
            let lo = it.next()?;
            let hex = [hi, lo];
            bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            bytes.push(b);
        }
    }
    let addr = String::from_utf8(bytes).ok()?;
    normalise(&addr)
}

/// Whether a sender matches a list entry: a whole address or `@domain`.
pub fn listed(addr: &str, list: &[String]) -> bool {
    list.iter().any(|entry| {
        let entry = entry.trim().to_lowercase();
        match entry.strip_prefix('@') {
            Some(domain) => domain_of(addr) == domain,
            None => addr == entry,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_normalise_and_ghosts_round_trip() {
        assert_eq!(
            normalise(" <Bob.Smith@Example.COM> ").as_deref(),
            Some("bob.smith@example.com")
        );
        for bad in [
            "",
            "bob",
            "@example.com",
            "bob@",
            "bob@exa mple.com",
            "a b@c.d",
        ] {
            assert_eq!(normalise(bad), None, "{bad}");
        }
        let addr = "o'brien+tag@example.co.uk";
        let local = ghost_localpart(addr);
        assert_eq!(local, "_email_o=27brien+tag=40example.co.uk");
        assert!(
            local
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._=-+".contains(&b))
        );
        assert_eq!(address_of_ghost(&local).as_deref(), Some(addr));
        assert_eq!(address_of_ghost("alice"), None);
        assert_eq!(address_of_ghost("_email_bob=4"), None);
    }

    #[test]
    fn sender_lists_take_addresses_and_domains() {
        let list = vec!["@spam.example".to_owned(), "eve@example.org".to_owned()];
        assert!(listed("x@spam.example", &list));
        assert!(listed("eve@example.org", &list));
        assert!(!listed("bob@example.org", &list));
    }
}
