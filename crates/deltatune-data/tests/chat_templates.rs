//! Chat templates of the decoder families rendered as transformers' `apply_chat_template`
//! renders them (tests/fixtures/tokenizers/chat_templates.json, made by
//! `scripts/gen_tokenizer_fixtures.py` with transformers' `render_jinja_template`; the
//! templates are copies listed in tests/fixtures/tokenizers/templates/SOURCES.md).

use std::path::{Path, PathBuf};

use deltatune_data::generation::{
    apply_chat_template, render_chat_template, render_chat_template_at, ChatMessage,
};
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizers")
}

fn fixture() -> Value {
    let p = dir().join("chat_templates.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn template(fx: &Value, name: &str) -> String {
    let file = fx["templates"][name].as_str().unwrap();
    std::fs::read_to_string(dir().join("templates").join(file)).unwrap()
}

/// Seconds since 1970 of the fixture's `strftime_now` date (`YYYY-MM-DD`), at noon UTC.
fn fixture_time(fx: &Value) -> i64 {
    let d = fx["strftime_now"].as_str().unwrap();
    let p: Vec<i64> = d.split('-').map(|x| x.parse().unwrap()).collect();
    // Days from civil (proleptic Gregorian), the inverse of what the renderer uses.
    let (y, m, day) = (p[0] - i64::from(p[1] <= 2), p[1], p[2]);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) * 86_400 + 12 * 3600
}

#[test]
fn family_templates_render_as_transformers() {
    let fx = fixture();
    let now = fixture_time(&fx);
    let mut rendered = 0;
    let mut refused = 0;
    for r in fx["renderings"].as_array().unwrap() {
        let name = r["template"].as_str().unwrap();
        let chat = r["chat"].as_str().unwrap();
        let msgs: Vec<ChatMessage> = serde_json::from_value(fx["chats"][chat].clone()).unwrap();
        let agp = r["add_generation_prompt"].as_bool().unwrap();
        let bos = r["bos_token"].as_str().unwrap_or("");
        let eos = r["eos_token"].as_str().unwrap_or("");
        let what = format!("{name} / {chat} / generation prompt {agp} / bos {bos:?}");
        let got = render_chat_template_at(&template(&fx, name), &msgs, agp, bos, eos, now);
        match (&r["rendered"], &r["error"]) {
            (Value::String(want), _) => {
                assert_eq!(got.as_deref(), Ok(want.as_str()), "{what}");
                rendered += 1;
            }
            (_, Value::String(msg)) => {
                let err = got.expect_err(&what);
                assert!(
                    err.contains(msg.as_str()) && err.contains("refused these messages"),
                    "{what}: {err}"
                );
                refused += 1;
            }
            _ => panic!("{what}: neither rendered nor error"),
        }
    }
    assert!(rendered >= 120 && refused >= 4, "{rendered} {refused}");
}

#[test]
fn gemma3_folds_the_system_turn_and_prompts_the_model() {
    let fx = fixture();
    let msgs = vec![
        ChatMessage {
            role: "system".into(),
            content: "Be brief.".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: " Hi ".into(),
        },
    ];
    let t = template(&fx, "gemma3");
    let got = render_chat_template(&t, &msgs, true, "<bos>", "<eos>").unwrap();
    assert_eq!(
        got,
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    );
    // deltatune's own entry point leaves BOS to the tokenizer.
    let got = apply_chat_template(Some(&t), &msgs, false).unwrap();
    assert_eq!(got, "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n");
}

#[test]
fn strftime_now_formats_like_python() {
    // 2024-02-29 (a leap day, a Thursday) 07:05:09 UTC; 1969-12-31 (before the epoch).
    let t = "{{ strftime_now('%d %b %Y|%Y-%m-%d|%B %A %a %y|%H:%M:%S|100%%') }}";
    let got = render_chat_template_at(t, &[], false, "", "", 1_709_190_309).unwrap();
    assert_eq!(
        got,
        "29 Feb 2024|2024-02-29|February Thursday Thu 24|07:05:09|100%"
    );
    let got = render_chat_template_at("{{ strftime_now('%Y-%m-%d %A') }}", &[], false, "", "", -1)
        .unwrap();
    assert_eq!(got, "1969-12-31 Wednesday");
    let err =
        render_chat_template_at("{{ strftime_now('%Q') }}", &[], false, "", "", 0).unwrap_err();
    assert!(err.contains("%Q is not a directive"), "{err}");
}

#[test]
fn python_string_methods_and_exceptions() {
    let t = "{{ ' a b '.strip() }}|{{ 'x</think>y'.split('</think>')[-1] }}|\
             {{ 'abc'.startswith('ab') }}|{{ '\\n\\nz'.lstrip('\\n') }}|{{ [1, 2, 3][::-1] }}";
    let got = render_chat_template_at(t, &[], false, "", "", 0).unwrap();
    // Booleans print as Python prints them.
    assert_eq!(got, "a b|y|True|z|[3, 2, 1]");
    let err = render_chat_template_at(
        "{{ raise_exception('no system role') }}",
        &[],
        false,
        "",
        "",
        0,
    )
    .unwrap_err();
    assert_eq!(
        err,
        "the chat template refused these messages: no system role"
    );
}
