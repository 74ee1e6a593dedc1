"""Text search over the labels the workers keep (``vision/labels.py``), and label suggestions for autocomplete.

A query's words become ImageNet classes (``vision/words.py``); objects are ranked by the probability their kept
labels give those classes (summed). The vocabulary is the classifier's 1000 concepts: no names of people, no text
inside images, no open vocabulary (README, "Text search").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from vision import labels, words

from .backend import Index, Indexed
from .filters import Filter

SUGGESTIONS = 20  # labels returned by /labels at most


@dataclasses.dataclass
class TextAnswer:
    hits: list[tuple[Indexed, float]]
    query: words.TextQuery

    def public(self) -> dict[str, Any]:
        """What the answer says about the words: the classes each matched, and the words that matched nothing."""
        return {"matched": [{"text": t.text, "lemma": t.lemma, "labels": words.describe(t.classes)}
                            for t in self.query.terms],
                "unmatched": list(self.query.unmatched), "ignored": list(self.query.ignored)}


def search(index: Index, vocabulary: words.Vocabulary, text: str, k: int, where: Filter | None = None
           ) -> TextAnswer:
    query = vocabulary.match(text)
    hits = index.text_search(query.classes, k, where) if query.classes else []
    return TextAnswer(hits, query)


def suggest(index: Index, prefix: str, limit: int = SUGGESTIONS) -> list[dict[str, Any]]:
    """Labels whose names have a word starting with ``prefix`` (every label when it is empty), the most used
    first, with how many indexed objects keep each. Words are compared as text search looks them up
    (``words.fold``: "Éspr" suggested nothing, where a search for "Éspresso" finds espresso)."""
    counts = index.label_counts()
    wanted = words.fold(prefix.strip())
    found = []
    for c, names in _folded_names():
        if not wanted or any(w.startswith(wanted) for n in names for w in [n, *n.split()]):
            found.append((counts.get(c.index, 0), c))
    found.sort(key=lambda item: (-item[0], item[1].name.lower()))
    return [{"id": c.synset, "name": c.name, "names": list(c.names), "count": n} for n, c in found[:limit]]


@functools.cache
def _folded_names() -> tuple[tuple[labels.ImageNetClass, tuple[str, ...]], ...]:
    """Each class with its names as ``words.fold`` makes them, folded once (autocomplete asks at each keystroke)."""
    return tuple((c, tuple(words.fold(n) for n in c.names)) for c in labels.classes())
