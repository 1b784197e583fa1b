//! Turning mail bodies into Matrix message content and back: HTML cut down to what
//! Matrix clients render, quoted history trimmed (the room already holds it), and plain
//! text for mail made from a message's HTML.

use std::collections::{HashMap, HashSet};

/// The HTML Matrix clients render (the spec's list of tags and attributes).
pub fn sanitise_html(html: &str) -> String {
    let tags: HashSet<&str> = [
        "font",
        "del",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "blockquote",
        "p",
        "a",
        "ul",
        "ol",
        "sup",
        "sub",
        "li",
        "b",
        "i",
        "u",
        "strong",
        "em",
        "strike",
        "s",
        "code",
        "hr",
        "br",
        "div",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
        "caption",
        "pre",
        "span",
        "details",
        "summary",
    ]
    .into_iter()
    .collect();
    let mut attrs: HashMap<&str, HashSet<&str>> = HashMap::new();
    attrs.insert(
        "font",
        ["data-mx-bg-color", "data-mx-color", "color"]
            .into_iter()
            .collect(),
    );
    attrs.insert(
        "span",
        ["data-mx-bg-color", "data-mx-color", "data-mx-spoiler"]
            .into_iter()
            .collect(),
    );
    attrs.insert("a", ["href", "name"].into_iter().collect());
    attrs.insert("ol", ["start"].into_iter().collect());
    let schemes: HashSet<&str> = ["http", "https", "ftp", "mailto", "magnet"]
        .into_iter()
        .collect();
    ammonia::Builder::default()
        .tags(tags)
        .tag_attributes(attrs)
        .generic_attributes(HashSet::new())
        .url_schemes(schemes)
        .link_rel(Some("noopener"))
        .clean_content_tags(["script", "style", "head", "title"].into_iter().collect())
        .clean(html)
        .to_string()
        .trim()
        .to_owned()
}

/// Where a mail client's quoted history starts in HTML.
const HTML_QUOTE_MARKERS: [&str; 7] = [
    "<div class=\"gmail_quote",
    "<blockquote type=\"cite\"",
    "<div id=\"divRplyFwdMsg\"",
    "<div id=\"appendonsend\"",
    "<div class=\"moz-cite-prefix\"",
    "<div class=\"yahoo_quoted\"",
    "-----Original Message-----",
];

/// The HTML before the quoted history, when that leaves something to read.
pub fn trim_html_quote(html: &str) -> &str {
    let lower = html.to_ascii_lowercase();
    let cut = HTML_QUOTE_MARKERS
        .iter()
        .filter_map(|m| lower.find(&m.to_ascii_lowercase()))
        .min();
    match cut {
        Some(i) if has_text(&html[..i]) => &html[..i],
        _ => html,
    }
}

fn has_text(html: &str) -> bool {
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag && !c.is_whitespace() => return true,
            _ => {}
        }
    }
    false
}

fn is_attribution(line: &str, next: Option<&str>) -> bool {
    let l = line.trim();
    let joined = match next {
        Some(n) => format!("{l} {}", n.trim()),
        None => l.to_owned(),
    };
    let starts = ["On ", "Le ", "Am ", "El ", "Il "];
    let ends = [
        "wrote:",
        "a écrit :",
        "a écrit:",
        "schrieb:",
        "escribió:",
        "ha scritto:",
    ];
    (starts.iter().any(|s| l.starts_with(s))
        && (ends.iter().any(|e| l.ends_with(e)) || ends.iter().any(|e| joined.ends_with(e))))
        || l == "-----Original Message-----"
        || l.starts_with("________________________________")
}

/// The text before the quoted history: cut at the attribution line (`On … wrote:`, an
/// Outlook separator) or drop a trailing block of `>` lines. Quotes interleaved with
/// answers stay.
pub fn trim_text_quote(text: &str) -> &str {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut offset = 0;
    let mut cut = None;
    for (i, line) in lines.iter().enumerate() {
        if is_attribution(line, lines.get(i + 1).copied()) {
            cut = Some(offset);
            break;
        }
        offset += line.len();
    }
    let head = match cut {
        Some(i) => &text[..i],
        None => {
            // A trailing block of quoted lines.
            let mut end = text.len();
            for line in lines.iter().rev() {
                let t = line.trim();
                if t.starts_with('>') || t.is_empty() {
                    end -= line.len();
                } else {
                    break;
                }
            }
            &text[..end]
        }
    };
    if head.trim().is_empty() {
        text.trim_end()
    } else {
        head.trim_end()
    }
}

/// Plain text from HTML for a mail's text part: block ends become line breaks, links
/// keep their target, entities are decoded.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::new();
    let mut rest = html;
    let mut href: Option<String> = None;
    while let Some(lt) = rest.find('<') {
        out.push_str(&decode_entities(&rest[..lt]));
        let Some(gt) = rest[lt..].find('>') else {
            rest = "";
            break;
        };
        let tag = &rest[lt + 1..lt + gt];
        let name = tag
            .trim_start_matches('/')
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let closing = tag.starts_with('/');
        match name.as_str() {
            "br" => out.push('\n'),
            "p" | "div" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "tr" | "pre" | "blockquote"
            | "ul" | "ol"
                if closing =>
            {
                out.push('\n')
            }
            "li" if !closing => out.push_str("\n• "),
            "a" if !closing => {
                href = tag
                    .split("href=\"")
                    .nth(1)
                    .and_then(|h| h.split('"').next())
                    .map(decode_entities);
            }
            "a" => {
                if let Some(h) = href.take()
                    && !out.ends_with(&h)
                {
                    out.push_str(&format!(" <{h}>"));
                }
            }
            _ => {}
        }
        rest = &rest[lt + gt + 1..];
    }
    out.push_str(&decode_entities(rest));
    let mut text = String::new();
    let mut blank = 0;
    for line in out.lines() {
        if line.trim().is_empty() {
            blank += 1;
            if blank > 1 {
                continue;
            }
        } else {
            blank = 0;
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text.trim().to_owned()
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_cut_to_what_matrix_renders() {
        let dirty = r#"<html><head><style>p{}</style></head><body onload="x()">
<p style="color:red">Hi <b>Alice</b> <a href="https://example.com" onclick="evil()">link</a>
<a href="javascript:alert(1)">bad</a><img src="https://tracker.example/p.gif"><script>alert(1)</script>
<table><tr><td>cell</td></tr></table></p></body></html>"#;
        let clean = sanitise_html(dirty);
        assert!(clean.contains("<b>Alice</b>"), "{clean}");
        assert!(
            clean.contains(r#"<a href="https://example.com" rel="noopener">link</a>"#),
            "{clean}"
        );
        for bad in [
            "script",
            "onclick",
            "onload",
            "javascript",
            "style",
            "<img",
            "tracker",
        ] {
            assert!(!clean.contains(bad), "{bad} in {clean}");
        }
        assert!(clean.contains("<td>cell</td>"));
    }

    #[test]
    fn quoted_history_is_trimmed() {
        let text = "Sounds good, see you then.\r\n\r\nOn Mon, 3 Nov 2026 at 10:00, Alice <alice@salon.test>\r\nwrote:\r\n> Shall we meet?\r\n";
        assert_eq!(trim_text_quote(text), "Sounds good, see you then.");
        let outlook = "Yes.\n\n________________________________\nFrom: Alice\nSent: Monday\n";
        assert_eq!(trim_text_quote(outlook), "Yes.");
        let trailing = "Fine by me.\n\n> earlier\n> text\n";
        assert_eq!(trim_text_quote(trailing), "Fine by me.");
        let interleaved = "> question one\nanswer one\n> question two\nanswer two\n";
        assert_eq!(trim_text_quote(interleaved), interleaved.trim_end());
        let only_quote = "> everything quoted\n";
        assert_eq!(trim_text_quote(only_quote), only_quote.trim_end());
        let html =
            r#"<div>Agreed!</div><div class="gmail_quote"><blockquote>old</blockquote></div>"#;
        assert_eq!(trim_html_quote(html), "<div>Agreed!</div>");
    }

    #[test]
    fn html_becomes_readable_text() {
        let t = html_to_text(
            r#"<p>Hello &amp; welcome</p><ul><li>one</li><li>two</li></ul><p>See <a href="https://x.example/a?b=1&amp;c=2">the plan</a><br>Bye</p>"#,
        );
        assert_eq!(
            t,
            "Hello & welcome\n\n• one\n• two\nSee the plan <https://x.example/a?b=1&c=2>\nBye"
        );
    }
}
