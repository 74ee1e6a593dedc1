"""Words to ImageNet classes, through WordNet 3.0 (Debian's ``wordnet-base``: ``/usr/share/wordnet``).

A query word reaches a class when the class *is* what the word names or a kind of it: the word's usual senses
(WordNet's sense-tagged ones, the most frequent first; the first sense when none is tagged) and every hyponym of
them, so "dog" reaches each breed and "vehicle" cars, trucks and boats. A word that is one of a class's ImageNet
names reaches that class whatever its sense ("cup" is ImageNet's cup although WordNet ranks that sense fifth). Words
are lower-cased; plurals and other inflections go through WordNet's own noun rules and exception list (morphy);
two- and three-word names ("golden retriever", "hot dog") are tried before single words. ImageNet class ids are
WordNet noun offsets (``n02123045`` is offset 2123045 in ``data.noun``), which is how classes meet the graph.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Iterable

from . import labels

WORDNET = Path("/usr/share/wordnet")  # Debian's wordnet-base; BUCKETLENS_WORDNET elsewhere (bucketlens/settings.py)
STOP_WORDS = frozenset(
    "a an and any at by for from in into is it of on or some the to with photo photos picture pictures image "
    "images showing".split()
)
# morphy's noun rules (WordNet's morph.c): suffix -> replacement, tried in order.
NOUN_RULES = (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
              ("ies", "y"))
LONGEST_NAME = 3  # words in the longest name tried as one


class VocabularyMissing(RuntimeError):
    """WordNet's files are not installed."""


@dataclasses.dataclass(frozen=True)
class Term:
    text: str  # the words of the query this term stands for
    lemma: str  # what WordNet calls it (``dogs`` -> ``dog``)
    classes: tuple[int, ...]  # the ImageNet classes it reaches, by index


@dataclasses.dataclass(frozen=True)
class TextQuery:
    terms: tuple[Term, ...]
    unmatched: tuple[str, ...]  # words that reach no class
    ignored: tuple[str, ...]  # stop words ("a", "photo of", ...)

    @property
    def classes(self) -> frozenset[int]:
        return frozenset(c for term in self.terms for c in term.classes)


class Vocabulary:
    def __init__(self, folder: Path = WORDNET) -> None:
        files = [folder / name for name in ("index.noun", "data.noun", "noun.exc")]
        if not all(f.exists() for f in files):
            raise VocabularyMissing(f"text search needs WordNet 3.0 in {folder} (install Debian's wordnet-base, "
                                    "or set BUCKETLENS_WORDNET to the folder holding index.noun)")
        self.senses: dict[str, tuple[int, ...]] = {}  # lemma -> the synsets a query means by it (usual senses)
        self.all_senses: dict[str, tuple[int, ...]] = {}
        for line in files[0].read_text(encoding="utf-8").splitlines():
            if line.startswith(" "):
                continue  # the licence header
            fields = line.split()
            lemma, synset_count, pointer_count = fields[0], int(fields[2]), int(fields[3])
            tagged = int(fields[5 + pointer_count])
            offsets = tuple(int(o) for o in fields[6 + pointer_count : 6 + pointer_count + synset_count])
            self.all_senses[lemma] = offsets
            self.senses[lemma] = offsets[: max(1, tagged)]
        self.exceptions = {inflected: base for inflected, base, *_ in
                           (line.split() for line in files[2].read_text(encoding="utf-8").splitlines())}
        self.below = self._descendant_classes(files[1])
        self.names: dict[str, set[int]] = {}  # an ImageNet name, lower-case -> classes
        for c in labels.classes():
            for name in c.names:
                self.names.setdefault(name.lower().replace(" ", "_"), set()).add(c.index)

    @staticmethod
    def _descendant_classes(data: Path) -> dict[int, set[int]]:
        """Synset offset -> the ImageNet classes at or below it, following hypernym links up from each class."""
        below: dict[int, set[int]] = {}
        parents: dict[int, list[int]] = {}
        with open(data, "rb") as handle:
            def up(offset: int) -> list[int]:
                if offset not in parents:
                    handle.seek(offset)  # an offset is the synset's byte position in data.noun
                    fields = handle.readline().decode("utf-8").split(" | ")[0].split()
                    words = int(fields[3], 16)
                    at = 4 + 2 * words
                    pointers = int(fields[at])
                    ptrs = [fields[at + 1 + 4 * i : at + 5 + 4 * i] for i in range(pointers)]
                    parents[offset] = [int(p[1]) for p in ptrs if p[0] in ("@", "@i") and p[2] == "n"]
                return parents[offset]

            for c in labels.classes():
                todo, seen = [int(c.synset[1:])], set()
                while todo:
                    offset = todo.pop()
                    if offset in seen:
                        continue
                    seen.add(offset)
                    below.setdefault(offset, set()).add(c.index)
                    todo.extend(up(offset))
        return below

    def lemma(self, word: str) -> str | None:
        """The WordNet noun (or ImageNet name) ``word`` inflects, or None: morphy's exception list, then its rules."""
        known = lambda w: w in self.senses or w in self.names  # noqa: E731
        if known(word):
            return word
        if word in self.exceptions and known(self.exceptions[word]):
            return self.exceptions[word]
        for suffix, replacement in NOUN_RULES:
            if word.endswith(suffix) and known(base := word[: len(word) - len(suffix)] + replacement):
                return base
        return None

    def classes_of(self, lemma: str) -> tuple[int, ...]:
        found = set(self.names.get(lemma, ()))
        for offset in self.senses.get(lemma, ()):
            found |= self.below.get(offset, set())
        return tuple(sorted(found))

    def match(self, text: str) -> TextQuery:
        """Split ``text`` into terms (longest known names first), each with the classes it reaches."""
        words = re.findall(r"[a-z0-9][a-z0-9'.-]*", text.lower())
        terms: list[Term] = []
        unmatched: list[str] = []
        ignored: list[str] = []
        i = 0
        while i < len(words):
            for size in range(min(LONGEST_NAME, len(words) - i), 0, -1):
                phrase = words[i : i + size]
                if size == 1 and phrase[0] in STOP_WORDS:
                    ignored.append(phrase[0])
                    break
                lemma = self.lemma("_".join(phrase))
                classes = self.classes_of(lemma) if lemma else ()
                if classes:
                    terms.append(Term(" ".join(phrase), lemma.replace("_", " ") if lemma else "", classes))
                    break
                if size == 1:
                    unmatched.append(phrase[0])
            i += size
        return TextQuery(tuple(terms), tuple(unmatched), tuple(ignored))


@functools.cache
def vocabulary(folder: Path = WORDNET) -> Vocabulary:
    """The one vocabulary of this process per folder, loaded on first use (~0.6 s)."""
    return Vocabulary(folder)


def describe(classes: Iterable[int]) -> list[dict[str, str]]:
    table = labels.classes()
    return [{"id": table[c].synset, "name": table[c].name} for c in classes]
