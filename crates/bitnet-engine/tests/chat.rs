//! Chat templates against transformers' apply_chat_template, stop strings, and KV-cache reuse
//! between turns.

use bitnet_engine::chat::{
    is_placeholder_template, Chat, ChatTemplate, Message, StopStrings, BITNET_TEMPLATE,
};
use bitnet_engine::sampler::SamplingParams;
use bitnet_engine::Model;
use std::path::PathBuf;

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(rel)
}

/// Reference strings made once with transformers (scripts/make_chat_template_cases.py): the
/// rendering must be identical, character for character.
#[test]
fn templates_render_exactly_as_transformers() {
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("chat/template_cases.json")).unwrap())
            .unwrap();
    let mut n = 0;
    for case in d["cases"].as_array().unwrap() {
        let t = &d["templates"][case["template"].as_str().unwrap()];
        let tmpl = ChatTemplate::new(
            t["source"].as_str().unwrap(),
            t["bos_token"].as_str().unwrap(),
            t["eos_token"].as_str().unwrap(),
        )
        .unwrap();
        let messages: Vec<Message> = serde_json::from_value(
            d["conversations"][case["conversation"].as_str().unwrap()].clone(),
        )
        .unwrap();
        let got = tmpl
            .render(&messages, case["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(
            got,
            case["expected"].as_str().unwrap(),
            "{} / {}",
            case["template"],
            case["conversation"]
        );
        n += 1;
    }
    assert_eq!(n, 32);
}

#[test]
fn placeholder_template_is_replaced_by_the_bitnet_one() {
    // tiny-i2_s.gguf carries bitnet.cpp's placeholder (REFERENCE.md trap 9).
    let m = Model::load(&data("tiny/gguf/tiny-i2_s.gguf")).unwrap();
    let tok = m.tokenizer.clone().unwrap();
    assert!(is_placeholder_template(tok.chat_template().unwrap()));
    let t = ChatTemplate::for_tokenizer(&tok).unwrap();
    assert!(t.builtin);
    assert_eq!(t.source, BITNET_TEMPLATE);
    let s = t
        .render(
            &[Message::new("system", "S"), Message::new("user", " hi ")],
            true,
        )
        .unwrap();
    assert_eq!(s, "System: S<|eot_id|>User: hi<|eot_id|>Assistant: ");
    let bad = ChatTemplate::new("{{ raise_exception('no') }}", "", "").unwrap();
    assert!(bad
        .render(&[], true)
        .unwrap_err()
        .to_string()
        .contains("no"));
}

#[test]
fn stop_strings_are_held_back_and_never_shown() {
    let mut s = StopStrings::new(vec!["STOP".into(), "\n\n".into()]);
    assert_eq!(s.push("Hello S"), ("Hello ".to_string(), false));
    assert_eq!(s.push("T"), (String::new(), false));
    assert_eq!(s.push("x"), ("STx".to_string(), false));
    assert_eq!(s.push(" wor"), (" wor".to_string(), false));
    assert_eq!(s.push("ld\n"), ("ld".to_string(), false));
    assert_eq!(s.push("\nmore"), (String::new(), true));
    assert_eq!(s.text(), "Hello STx world");
    let mut s = StopStrings::new(vec!["éx".into()]);
    assert_eq!(s.push("aé"), ("a".to_string(), false));
    assert_eq!(s.finish(), "é");
}

/// A second turn reuses the cache: its logits equal those of running the whole conversation
/// in one pass (bit-identical, since positions do not depend on how the prompt was chunked).
#[test]
fn second_turn_reuses_the_cache_and_matches_a_full_pass() {
    let m = Model::load(&data("tiny/gguf/tiny-tq2_0.gguf")).unwrap();
    let greedy = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    let mut chat = Chat::new(&m, 512, greedy, 6).unwrap();
    chat.system = Some("Be brief.".into());
    chat.turn("Hello there", |_| true).unwrap();
    let before = chat.session().pos();
    let r2 = chat.turn("And then?", |_| true).unwrap();
    // Only the new turn's tokens were processed.
    assert!(
        r2.timings.prompt_tokens < before,
        "prompt {} vs cached {before}",
        r2.timings.prompt_tokens
    );
    // The same token sequence in one pass.
    let n_prompt = before + r2.timings.prompt_tokens;
    let seq = chat.session().tokens()[..n_prompt].to_vec();
    let mut fresh = m.new_session(512);
    let full = m.forward(&mut fresh, &seq, false).unwrap();
    assert_eq!(full, &r2.first_logits[..]);
}

#[test]
fn context_overflow_drops_old_turns_but_never_truncates_the_message() {
    let m = Model::load(&data("tiny/gguf/tiny-tq2_0.gguf")).unwrap();
    let greedy = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    let mut chat = Chat::new(&m, 96, greedy, 4).unwrap();
    chat.system = Some("sys".into());
    let mut dropped = 0;
    for i in 0..12 {
        let r = chat
            .turn(&format!("message number {i} with some words"), |_| true)
            .unwrap();
        dropped += r.dropped_turns;
        assert!(chat.session().pos() <= 96);
    }
    assert!(dropped > 0);
    assert_eq!(chat.system.as_deref(), Some("sys"));
    assert!(chat
        .messages
        .iter()
        .any(|m| m.content == "message number 11 with some words"));
    let long = "word ".repeat(200);
    let e = chat.turn(&long, |_| true).unwrap_err().to_string();
    assert!(e.contains("context"), "{e}");
    assert!(!chat.messages.iter().any(|m| m.content == long));
}
