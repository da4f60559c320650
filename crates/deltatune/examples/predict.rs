//! Class probabilities from a trained classifier adapter (ours or PEFT's SEQ_CLS folder).
//!
//! ```text
//! cargo run --release -p deltatune --example predict -- ADAPTER_DIR [--base MODEL] TEXT...
//! cargo run --release -p deltatune --example predict -- tests/fixtures/decoders/qwen2-seqcls-lora \
//!     --base tests/fixtures/decoders/qwen2 "hello there"
//! ```

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: predict ADAPTER_DIR [--base MODEL] TEXT..."))?;
    let mut rest: Vec<String> = args.collect();
    let base = match rest.iter().position(|a| a == "--base") {
        Some(i) if i + 1 < rest.len() => {
            let b = rest.remove(i + 1);
            rest.remove(i);
            Some(b)
        }
        _ => None,
    };
    let clf = match &base {
        Some(b) => deltatune::Adapter::load_on(&dir, b)?,
        None => deltatune::Adapter::load(&dir)?,
    };
    let texts: Vec<&str> = rest.iter().map(String::as_str).collect();
    for (text, p) in texts.iter().zip(clf.predict(&texts)?) {
        println!("{}\t{:.4}\t{text}", p.label, p.probability);
    }
    Ok(())
}
