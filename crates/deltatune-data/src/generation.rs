//! Data for generation tasks (decoder training): JSON lines of
//! prompt/completion pairs or chats.
//!
//! Each non-blank line of the file is one JSON object, either
//! * `{"prompt": "...", "completion": "..."}` (the field names are settable,
//!   see [`load_generation_jsonl`]; other fields are ignored), or
//! * `{"messages": [{"role": "system", "content": "..."}, {"role": "user",
//!   "content": "..."}, {"role": "assistant", "content": "..."}]}`: a chat whose
//!   last message must come from the `assistant`; it is the completion, the
//!   messages before it are the prompt context.
//!
//! A line that has the prompt field is read as a prompt/completion pair (a
//! `messages` field beside it is ignored); otherwise a line with `messages` is a
//! chat. The completion must not be empty or all whitespace (there would be
//! nothing to learn); an empty prompt is allowed. A UTF-8 byte order mark is
//! ignored, blank lines are skipped, and a file without any record is an error.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::list_names;
use crate::{DataError, Result};

/// Default name of the prompt field.
pub const DEFAULT_PROMPT_FIELD: &str = "prompt";
/// Default name of the completion field.
pub const DEFAULT_COMPLETION_FIELD: &str = "completion";
/// Name of the chat field.
pub const MESSAGES_FIELD: &str = "messages";
/// Role of the messages that are completions.
pub const ASSISTANT_ROLE: &str = "assistant";

/// A prompt and the completion the model should learn to produce after it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PromptCompletion {
    /// Text given to the model (no loss on it).
    pub prompt: String,
    /// Text the model learns to continue the prompt with.
    pub completion: String,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (any non-empty role is kept as written).
    pub role: String,
    /// The message text.
    pub content: String,
}

/// Renders `messages` with a model's Jinja chat template (`bos_token`/`eos_token` empty, as
/// the tokenizer adds its own), ending with the assistant's turn when `add_generation_prompt`.
/// The error is a message for the user. See [`render_chat_template`].
pub fn apply_chat_template(
    template: Option<&str>,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> std::result::Result<String, String> {
    let Some(template) = template else {
        return Err(
            "this model has no chat template (tokenizer.chat_template in the GGUF, \
                    chat_template in tokenizer_config.json); use prompt/completion lines instead \
                    of messages"
                .into(),
        );
    };
    render_chat_template(template, messages, add_generation_prompt, "", "")
}

/// Renders `messages` with a Jinja chat template as transformers' `apply_chat_template` does
/// (its renderer: blocks trimmed and left-stripped, `raise_exception(msg)`,
/// `strftime_now(format)` on today's UTC date, `namespace`, loop controls, `tojson`, and
/// Python's string and dict methods such as `.strip()`, `.split()`, `.startswith()`,
/// `.items()`), with `bos_token` and `eos_token` as given. The error is a message for the user
/// (a template's `raise_exception` message is in it).
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> std::result::Result<String, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    render_chat_template_at(
        template,
        messages,
        add_generation_prompt,
        bos_token,
        eos_token,
        now,
    )
}

/// [`render_chat_template`] with `strftime_now` reading `unix_seconds` (UTC) instead of the
/// clock.
pub fn render_chat_template_at(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
    unix_seconds: i64,
) -> std::result::Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_function(
        "strftime_now",
        move |format: String| -> std::result::Result<String, minijinja::Error> {
            strftime(&format, unix_seconds)
                .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| format!("the model's chat template does not parse: {e}"))?;
    let msgs: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
        .collect();
    env.get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => msgs,
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            })
        })
        .map_err(|e| match e.kind() {
            minijinja::ErrorKind::InvalidOperation => format!(
                "the chat template refused these messages: {}",
                e.detail().unwrap_or("(no message)")
            ),
            _ => format!("rendering the chat template: {e}"),
        })
}

/// The civil date (year, month 1..=12, day 1..=31) of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days_from_civil inverse, on 400-year eras.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Python's `datetime.strftime` for the directives chat templates use (`%d %b %Y`,
/// `%Y-%m-%d`, `%B`, `%A`, ...), on the UTC time `unix_seconds`.
fn strftime(format: &str, unix_seconds: i64) -> std::result::Result<String, String> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let month = MONTHS[m as usize - 1];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(k) = chars.next() else {
            return Err(format!("strftime_now({format:?}): a lone % at the end"));
        };
        match k {
            'd' => out.push_str(&format!("{d:02}")),
            'm' => out.push_str(&format!("{m:02}")),
            'Y' => out.push_str(&format!("{y:04}")),
            'y' => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            'b' => out.push_str(&month[..3]),
            'B' => out.push_str(month),
            'a' => out.push_str(&DAYS[weekday][..3]),
            'A' => out.push_str(DAYS[weekday]),
            'H' => out.push_str(&format!("{:02}", secs / 3600)),
            'M' => out.push_str(&format!("{:02}", secs / 60 % 60)),
            'S' => out.push_str(&format!("{:02}", secs % 60)),
            '%' => out.push('%'),
            other => {
                return Err(format!(
                    "strftime_now({format:?}): %{other} is not a directive deltatune renders \
                     (it knows %d %m %Y %y %b %B %a %A %H %M %S %%)"
                ))
            }
        }
    }
    Ok(out)
}

/// One generation example. Serializes to the JSON line it was read from
/// (`{"prompt", "completion"}` with the default names, or `{"messages"}`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GenExample {
    /// A plain prompt/completion pair.
    PromptCompletion {
        /// See [`PromptCompletion::prompt`].
        prompt: String,
        /// See [`PromptCompletion::completion`].
        completion: String,
    },
    /// A chat; the last message is from the assistant.
    Chat {
        /// Messages in order; never empty, the last has role `assistant`.
        messages: Vec<ChatMessage>,
    },
}

impl GenExample {
    /// The text to learn: the completion, or the last (assistant) message.
    pub fn completion(&self) -> &str {
        match self {
            GenExample::PromptCompletion { completion, .. } => completion,
            GenExample::Chat { messages } => messages.last().map_or("", |m| m.content.as_str()),
        }
    }

    /// The chat context before the completion (empty for prompt/completion pairs).
    pub fn context(&self) -> &[ChatMessage] {
        match self {
            GenExample::PromptCompletion { .. } => &[],
            GenExample::Chat { messages } => &messages[..messages.len().saturating_sub(1)],
        }
    }
}

impl From<PromptCompletion> for GenExample {
    fn from(p: PromptCompletion) -> Self {
        GenExample::PromptCompletion {
            prompt: p.prompt,
            completion: p.completion,
        }
    }
}

/// Reads generation examples from a JSON lines file (see the module docs),
/// taking prompt/completion pairs from the fields `prompt_field` and
/// `completion_field` (defaults [`DEFAULT_PROMPT_FIELD`],
/// [`DEFAULT_COMPLETION_FIELD`]).
pub fn load_generation_jsonl(
    path: &Path,
    prompt_field: &str,
    completion_field: &str,
) -> Result<Vec<GenExample>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DataError::FileNotFound {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(DataError::io("read", path, e)),
    };
    parse_generation_jsonl(&bytes, path, prompt_field, completion_field)
}

/// [`load_generation_jsonl`] on bytes already in memory; `path` is only used
/// in error messages.
pub fn parse_generation_jsonl(
    bytes: &[u8],
    path: &Path,
    prompt_field: &str,
    completion_field: &str,
) -> Result<Vec<GenExample>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i as u64 + 1;
        let s = std::str::from_utf8(raw).map_err(|e| DataError::NonUtf8 {
            path: path.to_path_buf(),
            line,
            column_note: String::new(),
            detail: e.to_string(),
        })?;
        let s = s.trim();
        if s.is_empty() {
            continue;
        }
        out.push(parse_line(s, path, line, prompt_field, completion_field)?);
    }
    if out.is_empty() {
        return Err(DataError::EmptyFile {
            path: path.to_path_buf(),
            detail: " (no JSON lines)".to_string(),
        });
    }
    Ok(out)
}

fn parse_line(
    s: &str,
    path: &Path,
    line: u64,
    prompt_field: &str,
    completion_field: &str,
) -> Result<GenExample> {
    let err = |message: String| DataError::GenJson {
        path: path.to_path_buf(),
        line,
        message,
    };
    let value: serde_json::Value =
        serde_json::from_str(s).map_err(|e| err(format!("invalid JSON: {e}")))?;
    let obj = value.as_object().ok_or_else(|| {
        err(format!(
            "expected a JSON object, found {}",
            json_kind(&value)
        ))
    })?;
    let missing = |role: &'static str, field: &str| DataError::MissingField {
        path: path.to_path_buf(),
        line,
        role,
        field: field.to_string(),
        available: if obj.is_empty() {
            "none".to_string()
        } else {
            list_names(&obj.keys().collect::<Vec<_>>())
        },
    };
    let string_field = |name: &str, role: &str| -> Result<String> {
        match obj.get(name) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(err(format!(
                "field `{name}` (the {role}) must be a string, found {}",
                json_kind(other)
            ))),
            None => unreachable!("checked by the caller"),
        }
    };
    if obj.contains_key(prompt_field) {
        let prompt = string_field(prompt_field, "prompt")?;
        if !obj.contains_key(completion_field) {
            return Err(missing("completion", completion_field));
        }
        let completion = string_field(completion_field, "completion")?;
        if completion.trim().is_empty() {
            return Err(err(format!(
                "field `{completion_field}` (the completion) is empty; remove the line or fill in the completion"
            )));
        }
        return Ok(GenExample::PromptCompletion { prompt, completion });
    }
    let Some(messages) = obj.get(MESSAGES_FIELD) else {
        return Err(missing("prompt", prompt_field));
    };
    let arr = messages.as_array().ok_or_else(|| {
        err(format!(
            "field `{MESSAGES_FIELD}` must be an array of {{\"role\", \"content\"}} objects, found {}",
            json_kind(messages)
        ))
    })?;
    if arr.is_empty() {
        return Err(err(format!("field `{MESSAGES_FIELD}` is an empty array")));
    }
    let mut out = Vec::with_capacity(arr.len());
    for (k, m) in arr.iter().enumerate() {
        let at = format!("`{MESSAGES_FIELD}[{k}]`");
        let mo = m.as_object().ok_or_else(|| {
            err(format!(
                "{at} must be an object with `role` and `content`, found {}",
                json_kind(m)
            ))
        })?;
        let get = |key: &str| -> Result<String> {
            match mo.get(key) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(err(format!(
                    "{at}: `{key}` must be a string, found {}",
                    json_kind(other)
                ))),
                None => Err(err(format!(
                    "{at} has no `{key}` (fields: {})",
                    if mo.is_empty() {
                        "none".to_string()
                    } else {
                        list_names(&mo.keys().collect::<Vec<_>>())
                    }
                ))),
            }
        };
        let role = get("role")?;
        if role.trim().is_empty() {
            return Err(err(format!("{at}: `role` is empty")));
        }
        let content = get("content")?;
        out.push(ChatMessage { role, content });
    }
    let last = out.last().expect("non-empty");
    if last.role != ASSISTANT_ROLE {
        return Err(err(format!(
            "the last message (`{MESSAGES_FIELD}[{}]`) has role `{}`; a chat must end with an `{ASSISTANT_ROLE}` message, which is the completion",
            out.len() - 1,
            last.role
        )));
    }
    if last.content.trim().is_empty() {
        return Err(err(format!(
            "the last `{ASSISTANT_ROLE}` message (the completion) is empty"
        )));
    }
    Ok(GenExample::Chat { messages: out })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Writes `items` as JSON lines (one compact object per line, `\n` after
/// each) to `path` atomically (see [`crate::write_atomic`]).
pub fn write_jsonl_atomic<T: Serialize>(path: &Path, items: &[T]) -> Result<()> {
    let mut bytes = Vec::new();
    for it in items {
        serde_json::to_writer(&mut bytes, it).map_err(|e| {
            DataError::io(
                "serialize a JSON line for",
                path,
                std::io::Error::other(e.to_string()),
            )
        })?;
        bytes.push(b'\n');
    }
    crate::write_atomic(path, &bytes).map_err(|e| DataError::io("write", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Vec<GenExample>> {
        parse_generation_jsonl(
            s.as_bytes(),
            Path::new("data.jsonl"),
            "prompt",
            "completion",
        )
    }

    #[test]
    fn reads_pairs_and_chats() {
        let text = "\u{feff}{\"prompt\": \"Hi\", \"completion\": \" there\", \"id\": 3}\n\n\
            {\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, \
            {\"role\": \"user\", \"content\": \"2+2?\"}, {\"role\": \"assistant\", \"content\": \"4\"}]}\r\n";
        let ex = parse(text).unwrap();
        assert_eq!(
            ex[0],
            GenExample::PromptCompletion {
                prompt: "Hi".into(),
                completion: " there".into()
            }
        );
        assert_eq!(ex[1].completion(), "4");
        assert_eq!(ex[1].context().len(), 2);
        assert_eq!(ex[1].context()[1].content, "2+2?");
        assert!(ex[0].context().is_empty());
        // Round trip through write_jsonl_atomic.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.jsonl");
        write_jsonl_atomic(&p, &ex).unwrap();
        assert_eq!(
            load_generation_jsonl(&p, "prompt", "completion").unwrap(),
            ex
        );
    }

    #[test]
    fn configurable_field_names() {
        let ex = parse_generation_jsonl(
            b"{\"q\": \"a\", \"a\": \"b\"}\n",
            Path::new("x.jsonl"),
            "q",
            "a",
        )
        .unwrap();
        assert_eq!(ex[0].completion(), "b");
    }

    #[test]
    fn missing_field_names_file_line_field_and_available() {
        let e =
            parse("{\"prompt\":\"a\",\"completion\":\"b\"}\n\n{\"text\": \"x\", \"label\": 1}\n")
                .unwrap_err();
        assert!(
            matches!(
                &e,
                DataError::MissingField {
                    line: 3,
                    role: "prompt",
                    ..
                }
            ),
            "{e}"
        );
        let s = e.to_string();
        for want in [
            "data.jsonl",
            "line 3",
            "no field `prompt`",
            "(fields: `label`, `text`)",
            "data.prompt_field",
        ] {
            assert!(s.contains(want), "missing {want:?} in {s}");
        }
        let e = parse("{\"prompt\": \"x\", \"answer\": \"y\"}\n").unwrap_err();
        assert!(
            matches!(
                &e,
                DataError::MissingField {
                    line: 1,
                    role: "completion",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("data.completion_field"), "{e}");
        let e = parse("{}\n").unwrap_err();
        assert!(e.to_string().contains("(fields: none)"), "{e}");
    }

    #[test]
    fn type_and_content_errors() {
        let cases = [
            ("{\"prompt\": 1, \"completion\": \"b\"}", "must be a string, found a number"),
            ("{\"prompt\": \"a\", \"completion\": null}", "must be a string, found null"),
            ("{\"prompt\": \"a\", \"completion\": \"  \"}", "is empty"),
            ("[1, 2]", "expected a JSON object, found an array"),
            ("{\"prompt\": ", "invalid JSON"),
            ("{\"messages\": {}}", "must be an array"),
            ("{\"messages\": []}", "empty array"),
            ("{\"messages\": [\"hi\"]}", "`messages[0]` must be an object"),
            (
                "{\"messages\": [{\"role\": \"user\"}]}",
                "`messages[0]` has no `content` (fields: `role`)",
            ),
            (
                "{\"messages\": [{\"role\": \"\", \"content\": \"x\"}]}",
                "`role` is empty",
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}",
                "`content` must be a string",
            ),
            (
                "{\"messages\": [{\"role\": \"assistant\", \"content\": \"a\"}, {\"role\": \"user\", \"content\": \"b\"}]}",
                "has role `user`; a chat must end with an `assistant` message",
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"\"}]}",
                "(the completion) is empty",
            ),
        ];
        for (line, want) in cases {
            let text = format!("{{\"prompt\": \"ok\", \"completion\": \"ok\"}}\n{line}\n");
            let e = parse(&text).unwrap_err();
            assert!(
                matches!(&e, DataError::GenJson { line: 2, .. }),
                "{line}: {e}"
            );
            let s = e.to_string();
            assert!(s.contains(want) && s.contains("data.jsonl"), "{line}: {s}");
        }
        let e = parse_generation_jsonl(
            b"{\"prompt\":\"a\",\"completion\":\"b\"}\n\xff\n",
            Path::new("d.jsonl"),
            "prompt",
            "completion",
        )
        .unwrap_err();
        assert!(matches!(e, DataError::NonUtf8 { line: 2, .. }), "{e}");
    }

    #[test]
    fn empty_and_missing_files() {
        for text in ["", "\n \n", "\u{feff}"] {
            let e = parse(text).unwrap_err();
            assert!(matches!(e, DataError::EmptyFile { .. }), "{text:?}: {e}");
        }
        let e = load_generation_jsonl(
            Path::new("/nonexistent/deltatune/g.jsonl"),
            "prompt",
            "completion",
        )
        .unwrap_err();
        assert!(matches!(e, DataError::FileNotFound { .. }), "{e}");
    }
}
