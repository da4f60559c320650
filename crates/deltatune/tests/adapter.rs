//! `Adapter`: a PEFT SEQ_CLS folder on the tiny Qwen2 decoder (tests/fixtures/decoders; its class
//! logits are checked against PEFT's in the methods crate) loads through the library and
//! predicts; a missing folder is a clear error.

use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/decoders")
}

#[test]
fn a_peft_classifier_on_a_decoder_predicts_the_same_alone_and_in_a_batch() {
    let base = fixtures().join("qwen2").display().to_string();
    let clf = deltatune::Adapter::load_on(fixtures().join("qwen2-seqcls-lora"), &base).unwrap();
    assert_eq!(clf.labels(), ["LABEL_0", "LABEL_1", "LABEL_2"]);
    let texts = ["hello there", "the cat sat on the mat", "a"];
    let together = clf.predict(&texts).unwrap();
    assert_eq!(together.len(), 3);
    for (t, p) in texts.iter().zip(&together) {
        assert_eq!(p.probabilities.len(), 3);
        assert!((p.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let best = p.probabilities.iter().cloned().fold(f32::MIN, f32::max);
        assert_eq!(p.probability, best);
        assert_eq!(
            p.label,
            clf.labels()[p.probabilities.iter().position(|&v| v == best).unwrap()]
        );
        let alone = clf.predict(&[t]).unwrap().remove(0);
        for (a, b) in alone.probabilities.iter().zip(&p.probabilities) {
            assert!((a - b).abs() < 1e-6, "{t}: {a} alone, {b} in a batch");
        }
    }
    // The texts differ, and so do their probabilities (the head and the LoRA are in use).
    assert_ne!(together[0].probabilities, together[1].probabilities);
}

#[test]
fn a_missing_adapter_folder_is_named() {
    let err = deltatune::Adapter::load("no/such/folder").err().unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("no/such/folder") && msg.contains("does not exist"),
        "{msg}"
    );
}
