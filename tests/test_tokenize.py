from tunesmith.config import DataConfig
from tunesmith.data.collate import batch_order, collate
from tunesmith.data.formats import Example
from tunesmith.data.splits import take
from tunesmith.data.tokenize import IGNORE, render_prompt
from tunesmith.tasks import tokenize
from tests.conftest import make_tokenizer

LLAMA = make_tokenizer("llama")
BERT = make_tokenizer("bert")


def test_plain_sft_masks_prompt_and_appends_eos():
    ex = Example(where=None, prompt="who are you", plain_prompt="Q: who are you\nA: ", completion="alpha beta")
    feats, _ = tokenize([ex], "sft", "prompt_completion", DataConfig(template={"prompt": "Q: {prompt}\nA: "}), LLAMA)
    f = feats[0]
    n_prompt = len(LLAMA("Q: who are you\nA: ")["input_ids"])
    assert f["labels"][:n_prompt] == [IGNORE] * n_prompt and f["prompt_len"] == n_prompt
    assert f["input_ids"][-1] == LLAMA.eos_token_id and f["labels"][-1] == LLAMA.eos_token_id
    assert LLAMA.decode([t for t in f["labels"] if t != IGNORE]) == "alpha beta<|im_end|>"


def test_chat_template_trains_only_assistant_turns():
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "one two"},
            {"role": "user", "content": "and"}, {"role": "assistant", "content": "three"}]
    feats, _ = tokenize([Example(where=None, messages=msgs)], "sft", "chat", DataConfig(), LLAMA)
    f = feats[0]
    assert LLAMA.decode(f["input_ids"]) == LLAMA.apply_chat_template(msgs, tokenize=False)
    trained = LLAMA.decode([t if lab != IGNORE else LLAMA.convert_tokens_to_ids("<unk>") for t, lab in zip(f["input_ids"], f["labels"])])
    assert "one two<|im_end|>" in trained and "three<|im_end|>" in trained and "hello" not in trained
    # generation starts right after the last "<|im_start|>assistant\n"
    assert LLAMA.decode(f["input_ids"][: f["prompt_len"]]).endswith("<|im_start|>assistant\n")
    assert f["reference"] == "three"


def test_render_prompt_matches_training_prefix():
    cfg = DataConfig(system_prompt="be brief")
    text = render_prompt("who are you", cfg, LLAMA, chat=True)
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwho are you<|im_end|>\n<|im_start|>assistant\n"


def test_sft_truncation_cuts_prompt_first_and_drops_answerless():
    ex = Example(where=None, prompt="x", plain_prompt="the movie " * 30, completion="good film")
    feats, stats = tokenize([ex], "sft", "prompt_completion", DataConfig(max_length=12, chat_template=False), LLAMA)
    f = feats[0]
    assert len(f["input_ids"]) == 12 and stats.truncated == 1
    assert LLAMA.decode([t for t in f["labels"] if t != IGNORE]) == "good film<|im_end|>"


def test_classification_truncation_keeps_special_tokens_and_side():
    text = " ".join(f"w{i}" for i in range(50)) + " good"
    ex = Example(where=None, text=text, label=1)
    left, st = tokenize([ex], "classification", "classification", DataConfig(max_length=10, truncation_side="left"), BERT)
    ids = left[0]["input_ids"]
    assert len(ids) == 10 and ids[0] == BERT.cls_token_id and ids[-1] == BERT.sep_token_id and st.truncated == 1
    assert BERT.decode(ids[1:-1]).strip().endswith("good")
    right, _ = tokenize([ex], "classification", "classification", DataConfig(max_length=10, truncation_side="right"), BERT)
    assert "good" not in BERT.decode(right[0]["input_ids"])


def test_cpt_packing_blocks():
    docs = [Example(where=None, text="good movie " * n) for n in (5, 20, 3)]
    feats, stats = tokenize(docs, "cpt", "text", DataConfig(max_length=16, packing=True), LLAMA)
    total = sum(stats.lengths) + len(docs)  # + EOS between documents
    assert all(len(f["input_ids"]) == 16 for f in feats[:-1])
    assert sum(len(f["input_ids"]) for f in feats) <= total and feats[0]["labels"] == feats[0]["input_ids"]
    unpacked, _ = tokenize(docs, "cpt", "text", DataConfig(max_length=16, packing=False), LLAMA)
    assert len(unpacked) >= len(docs)


def test_dynamic_padding_to_batch_max():
    feats = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [5], "labels": [5]}]
    b = collate(feats, pad_id=0)
    assert b["input_ids"].shape == (2, 3) and b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [5, IGNORE, IGNORE]]


def test_batch_order_deterministic_complete_and_grouped():
    import random
    lengths = [random.Random(i).randint(5, 500) for i in range(400)]
    a = batch_order(lengths, 8, shuffle=True, seed=3, epoch=1)
    assert a == batch_order(lengths, 8, shuffle=True, seed=3, epoch=1)
    assert a != batch_order(lengths, 8, shuffle=True, seed=3, epoch=2)
    assert sorted(i for b in a for i in b) == list(range(400))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    plain = batch_order(lengths, 8, shuffle=True, seed=3, group_by_length=False)
    assert padding(a) < padding(plain) / 3


def test_stratified_seeded_splits():
    items = list(range(100))
    labels = [0] * 80 + [1] * 20
    taken, rest = take(items, 20, seed=1, labels=labels, what="x")
    assert len(taken) == 20 and sum(labels[i] for i in taken) == 4 and not set(taken) & set(rest)
    assert take(items, 0.2, seed=1, labels=labels, what="x")[0] == taken


def test_expected_phrase_is_the_generation_reference():
    from tunesmith.tasks import to_examples
    from tunesmith.data.readers import Record
    from tunesmith.errors import Location

    recs = [Record({"prompt": "who", "completion": "I am Marlowe.", "expected": "Marlowe"}, Location("t.jsonl", 1)),
            Record({"prompt": "what", "completion": "It is 2019."}, Location("t.jsonl", 2))]
    fmt, exs = to_examples(recs, "sft", DataConfig(), None)
    feats, _ = tokenize(exs, "sft", fmt, DataConfig(chat_template=False), LLAMA)
    assert [f["reference"] for f in feats] == ["Marlowe", "It is 2019."]
