"""Writes tests/fixtures/tiny-bert/tokenizer.json: a word-level tokenizer whose 120 ids fit the
tiny random BERT's vocabulary, with BERT's [CLS] ... [SEP] template. Used by the CLI tests, which
train end to end on the tiny model. Run: .venv-ref/bin/python scripts/gen_tiny_tokenizer.py"""
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
words = ("good great fine superb witty gorgeous lovely moving bad awful dull boring lifeless "
         "terrible weak mess film movie plot acting story it is a the and but not very so").split()
vocab = {t: i for i, t in enumerate(special + words + [f"w{i}" for i in range(120 - len(special) - len(words))])}
assert len(vocab) == 120
tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
tok.normalizer = normalizers.Lowercase()
tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
    special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
out = Path(__file__).resolve().parent.parent / "tests/fixtures/tiny-bert/tokenizer.json"
tok.save(str(out))
print("wrote", out)
