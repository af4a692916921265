"""Mixed-depth testbed: in one sequence, answer tokens that need 0, 1 or 2 layers more than the base has.

The records are those of the walk testbed (dlo/tiny/depth_tasks.py: a random cycle f over ``nodes``
letters as shuffled ``key value ,`` pairs, a start letter, the walk from it), except that the walk moves two
letters at once from every second letter of the alphabet (b, d, f, ...) and one from the others::

    user:       q d , d m , m q , ... , ? d
    assistant:  path d q d m                   (x_i = f(f(x_(i-1))) if x_(i-1) is b, d, f, ..., else f(x_(i-1)))

So how deep a walk letter is depends on the letter before it, which every layer sees. A walk letter's class
is ``hop<h>``: ``hop1`` is one lookup of the current letter (a value bound to its key, then matched: two
layers in sequence, as in the walk testbed) and ``hop2`` looks the first result up again (three layers);
``path``, the copied start letter and the closing ``<|end|>`` (``format`` and ``copy``) need no added layer. A
one-layer base predicts walk letters at about chance (ln ``nodes`` nats), the base plus one added layer can
learn hop1 but not hop2, and only the base plus two added layers can learn every class: a static model with
the compute of one added layer must lose hop2, whichever layer it keeps, while a per-token depth can give
the third layer to the tokens that need it. The base model, its pretraining and the files written are
those of the walk testbed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dlo.tiny.depth_tasks import LETTERS, PATH, QUERY, SEPARATOR, chat_record, check_letters, pairs_text, shuffled_cycle


def hops_from(letter: str) -> int:
    """Letters the walk leaves by two steps: every second letter of the alphabet (b, d, f, ...)."""
    return 2 if LETTERS.index(letter) % 2 else 1


@dataclass(frozen=True)
class MixedDepthSpec:
    nodes: int = 10  # letters in each record's cycle
    walk: int = 9  # steps per answer (a walk may revisit letters)
    alphabet: int = 24  # the cycle's letters are drawn from the first `alphabet` letters

    kind = "mixed"
    token_classes = ("format", "copy", "hop1", "hop2")
    words = (PATH, SEPARATOR, QUERY)

    def __post_init__(self):
        check_letters(self.nodes, self.alphabet)
        if not 1 <= self.walk <= 32:
            raise ValueError(f"walk={self.walk}: must be in [1, 32]")

    def make_record(self, rng: random.Random) -> dict:
        pairs, successor = shuffled_cycle(rng, self.nodes, self.alphabet)
        letter = rng.choice(list(successor))
        walk, classes = [letter], ["format", "copy"]
        for _ in range(self.walk):
            hops = hops_from(letter)
            for _ in range(hops):
                letter = successor[letter]
            walk.append(letter)
            classes.append(f"hop{hops}")
        user = pairs_text(pairs) + f" {QUERY} {walk[0]}"
        return chat_record("mixed-depth", user, " ".join([PATH, *walk]), [*classes, "format"])
