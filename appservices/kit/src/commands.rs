//! Bot commands: defined once, parsed from `!prefix name args…` messages or from the
//! structured `m.bot.command` content (MSC4391), with `help` generated from the
//! definitions and command-description state events for clients that offer them.

use base64::Engine;
use ruma::UserId;
use serde_json::{Value as JsonValue, json};
use sha2::{Digest, Sha256};

/// MSC4391's state event type for a command description (unstable prefix).
pub const DESCRIPTION_EVENT_TYPE: &str = "org.matrix.msc4391.command_description";
/// MSC4391's content block for a structured invocation (unstable prefix).
pub const INVOCATION_KEY: &str = "org.matrix.msc4391.command";

/// One parameter of a command.
#[derive(Clone, Debug)]
pub struct Param {
    pub key: &'static str,
    /// An MSC4391 type: `string`, `integer`, `boolean`, `user_id`, `room_alias`…
    pub kind: &'static str,
    pub description: &'static str,
    pub required: bool,
}

/// One command of a bot.
#[derive(Clone, Debug)]
pub struct Command {
    pub name: &'static str,
    pub params: Vec<Param>,
    pub description: &'static str,
}

/// What a user asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct Invocation {
    pub command: String,
    /// Positional arguments as typed (the rest of the line is the last one's, for
    /// commands whose last parameter is free text).
    pub args: Vec<String>,
    /// Named arguments when the client sent the structured form.
    pub structured: Option<JsonValue>,
}

impl Invocation {
    /// The argument for parameter `index` (by position) or `key` (structured form).
    pub fn arg(&self, index: usize, key: &str) -> Option<String> {
        if let Some(s) = &self.structured
            && let Some(v) = s.get(key)
        {
            return Some(match v {
                JsonValue::String(s) => s.clone(),
                other => other.to_string(),
            });
        }
        self.args.get(index).cloned()
    }
}

/// The commands of one bot, recognised after `prefix` (`"!"` for `!ping`, `"!email "`
/// for `!email new …`).
#[derive(Clone, Debug)]
pub struct Commands {
    pub prefix: String,
    pub list: Vec<Command>,
}

impl Commands {
    pub fn new(prefix: &str, mut list: Vec<Command>) -> Self {
        if !list.iter().any(|c| c.name == "help") {
            list.push(Command {
                name: "help",
                params: vec![],
                description: "List the commands and what they do",
            });
        }
        Self {
            prefix: prefix.to_owned(),
            list,
        }
    }

    /// The command in a message's content, if it holds one of ours.
    pub fn parse(&self, content: &JsonValue) -> Option<Invocation> {
        if let Some(structured) = content.get(INVOCATION_KEY) {
            let name = structured.get("command")?.as_str()?;
            self.list.iter().find(|c| c.name == name)?;
            return Some(Invocation {
                command: name.to_owned(),
                args: Vec::new(),
                structured: structured.get("arguments").cloned(),
            });
        }
        let body = content.get("body")?.as_str()?.trim();
        let rest = body.strip_prefix(self.prefix.as_str())?;
        let mut words = rest.split_whitespace();
        let name = words.next()?;
        let command = self
            .list
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(name))?;
        let mut args: Vec<String> = words.map(str::to_owned).collect();
        // A last free-text parameter takes the rest of the line.
        if let Some(last) = command.params.last()
            && last.kind == "string"
            && args.len() > command.params.len()
        {
            let keep = command.params.len() - 1;
            let tail = args.split_off(keep).join(" ");
            args.push(tail);
        }
        Some(Invocation {
            command: command.name.to_owned(),
            args,
            structured: None,
        })
    }

    fn usage(&self, c: &Command) -> String {
        let mut s = format!("{}{}", self.prefix, c.name);
        for p in &c.params {
            if p.required {
                s.push_str(&format!(" <{}>", p.key));
            } else {
                s.push_str(&format!(" [{}]", p.key));
            }
        }
        s
    }

    /// The help text, plain and HTML, generated from the definitions.
    pub fn help(&self, title: &str) -> (String, String) {
        let mut plain = format!("{title}\n");
        let mut html = format!("<p>{}</p><ul>", escape(title));
        for c in &self.list {
            let usage = self.usage(c);
            plain.push_str(&format!("• {usage} — {}\n", c.description));
            html.push_str(&format!(
                "<li><code>{}</code> — {}",
                escape(&usage),
                escape(c.description)
            ));
            if !c.params.is_empty() {
                html.push_str("<ul>");
                for p in &c.params {
                    plain.push_str(&format!("    {}: {}\n", p.key, p.description));
                    html.push_str(&format!(
                        "<li><code>{}</code>: {}</li>",
                        escape(p.key),
                        escape(p.description)
                    ));
                }
                html.push_str("</ul>");
            }
            html.push_str("</li>");
        }
        html.push_str("</ul>");
        (plain.trim_end().to_owned(), html)
    }

    /// MSC4391 command-description state events: `(state_key, content)` per command.
    pub fn description_events(&self, bot: &UserId) -> Vec<(String, JsonValue)> {
        self.list
            .iter()
            .map(|c| {
                let digest = Sha256::digest(format!("{}{bot}", c.name).as_bytes());
                let state_key = base64::engine::general_purpose::STANDARD.encode(digest);
                let params: Vec<JsonValue> = c
                    .params
                    .iter()
                    .map(|p| {
                        json!({
                            "key": p.key,
                            "type": p.kind,
                            "description": { "m.text": [{ "body": p.description }] },
                            "required": p.required,
                        })
                    })
                    .collect();
                (
                    state_key,
                    json!({
                        "command": c.name,
                        "parameters": params,
                        "description": { "m.text": [{ "body": c.description }] },
                    }),
                )
            })
            .collect()
    }
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands() -> Commands {
        Commands::new(
            "!email ",
            vec![Command {
                name: "new",
                params: vec![
                    Param {
                        key: "address",
                        kind: "string",
                        description: "Who to write to",
                        required: true,
                    },
                    Param {
                        key: "subject",
                        kind: "string",
                        description: "The subject",
                        required: true,
                    },
                ],
                description: "Start an email thread",
            }],
        )
    }

    #[test]
    fn text_commands_parse_and_the_last_text_parameter_takes_the_rest() {
        let c = commands();
        let inv = c
            .parse(&json!({ "body": "!email new bob@example.com Budget for 2027" }))
            .unwrap();
        assert_eq!(inv.command, "new");
        assert_eq!(inv.args, vec!["bob@example.com", "Budget for 2027"]);
        assert_eq!(c.parse(&json!({ "body": "!email unknown" })), None);
        assert_eq!(c.parse(&json!({ "body": "hello" })), None);
        assert_eq!(
            c.parse(&json!({ "body": "!email help" })).unwrap().command,
            "help"
        );
    }

    #[test]
    fn structured_invocations_and_help_come_from_the_definitions() {
        let c = commands();
        let inv = c
            .parse(&json!({ "body": "whatever", INVOCATION_KEY: { "command": "new", "arguments": { "address": "a@b.c", "subject": "Hi" } } }))
            .unwrap();
        assert_eq!(inv.arg(0, "address").as_deref(), Some("a@b.c"));
        let (plain, html) = c.help("Email bridge");
        assert!(
            plain.contains("!email new <address> <subject> — Start an email thread"),
            "{plain}"
        );
        assert!(plain.contains("!email help"));
        assert!(html.contains("<code>!email new &lt;address&gt; &lt;subject&gt;</code>"));
        let bot = UserId::parse("@emailbot:example.org").unwrap();
        let events = c.description_events(&bot);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].1["command"], "new");
        assert_eq!(events[0].1["parameters"][0]["key"], "address");
        assert_eq!(events[0].0.len(), 44, "base64 of a sha256");
    }
}
