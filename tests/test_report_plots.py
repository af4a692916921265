"""The report's run/skip heatmap is labelled with the tokens' text, so a reader sees which words skip which layers."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dlo.report_plots import TOKEN_LABEL_CHARS, plot_heatmap, token_labels

TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tiny" / "base"
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)  # byte-level BPE: tokens carry their leading spaces


def example(ids: list[int], layers: int = 4) -> dict:
    run = torch.rand(layers, len(ids), generator=torch.Generator().manual_seed(0)) < 0.5
    return {"input_ids": ids, "run": run}


def tick_labels(fig) -> list[list[str]]:
    return [[t.get_text() for t in ax.get_xticklabels()] for ax in fig.axes]


def test_heatmap_ticks_are_the_tokens_text(tokenizer, tmp_path):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    fig = plot_heatmap([example(ids)], str(tmp_path / "heatmap.png"), tokenizer)
    (labels,) = tick_labels(fig)
    assert len(labels) == len(ids) > 10
    assert [tokenizer.decode([i]).replace(" ", "␣").replace("\n", "\\n") for i in ids] == labels
    assert "".join(labels).replace("␣", " ").replace("\\n", "\n") == TEXT  # every token, in order
    assert any(label.startswith("␣") for label in labels)  # word boundaries are visible
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_token_labels_escape_and_truncate(tokenizer):
    ids = tokenizer("<|assistant|>\n$5\tyes", add_special_tokens=False)["input_ids"]
    labels = token_labels(tokenizer, ids)
    assert labels[0] == "<|assistant|>"[:TOKEN_LABEL_CHARS - 1] + "…"  # 13 characters, cut to 12
    assert "\\n" in labels and "\\t" in "".join(labels)
    assert "\\$" in "".join(labels)  # a bare $ would switch matplotlib to math mode
    assert all(len(label) <= TOKEN_LABEL_CHARS + 1 for label in labels)


def test_long_sequences_are_labelled_too(tokenizer, tmp_path):
    ids = tokenizer(" ".join([TEXT] * 6), add_special_tokens=False)["input_ids"]
    short = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    fig = plot_heatmap([example(ids), example(short)], str(tmp_path / "heatmap.png"), tokenizer)
    long_labels, short_labels = tick_labels(fig)
    assert len(ids) > 100 and long_labels == token_labels(tokenizer, ids)
    assert short_labels == token_labels(tokenizer, short)
    assert fig.get_figwidth() > 10  # widened so the labels do not overlap


def test_without_a_tokenizer_the_axis_is_positions(tmp_path):
    fig = plot_heatmap([example([5, 6, 7])], str(tmp_path / "heatmap.png"))
    assert fig.axes[0].get_xlabel() == "token position"
