"""Words to ImageNet classes, through WordNet 3.0 (Debian's ``wordnet-base``: ``/usr/share/wordnet``).

A query word reaches a class when the class *is* what the word names or a kind of it: the word's usual senses
(WordNet's sense-tagged ones, the most frequent first; the first sense when none is tagged) and every hyponym of
them, so "dog" reaches each breed and "vehicle" cars, trucks and boats. A word that is one of a class's ImageNet
names reaches that class whatever its sense ("cup" is ImageNet's cup although WordNet ranks that sense fifth). Words
are letters and digits of any script ("café", "日本"), looked up case-folded and without accents ("Café" is "cafe":
the vocabulary is ASCII) and reported as typed; plurals and other inflections go through WordNet's own noun rules and
exception list (morphy); two- and three-word names ("golden retriever", "hot dog") are tried before single words.
Symbols and emoji ("🐱", "<") are not words: they are reported as ignored, like stop words. ImageNet class ids are
WordNet noun offsets (``n02123045`` is offset 2123045 in ``data.noun``), which is how classes meet the graph.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata
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
# A query is split on each character's class: w a letter or digit (any script), m a mark (an accent, an emoji's
# variation selector, the zero-width joiner of an emoji sequence: part of what it follows), c a hyphen or apostrophe
# and d a dot (inside a word: "jack-o'-lantern", "T-shirt"; the abbreviation "R.V." keeps its last dot), s a symbol
# or emoji (a skin tone too), space for the rest (spaces, other punctuation, control characters).
CLASSES = {"-": "c", "'": "c", "\u2019": "c", ".": "d", "\u200d": "m"}
CATEGORY_CLASSES = {"L": "w", "N": "w", "M": "m", "S": "s"}  # by a Unicode category's first letter; others: space
TOKEN = re.compile(r"(?P<word>(?:w[wm]*d)+w[wm]*d|w[wm]*(?:[cd]+w[wm]*)*)|[sm]+")


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
    unmatched: tuple[str, ...]  # words that reach no class, as typed, each once
    ignored: tuple[str, ...]  # stop words ("a", "photo of", ...) and symbols ("🐱"), as typed, each once

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
        """Split ``text`` into terms (longest known names first), each with the classes it reaches; and the words
        that reach none, and the stop words then the symbols, each once (as first typed) in the query's order."""
        tokens = split(text)
        typed = [t for t, is_word in tokens if is_word]
        words = [fold(t) for t in typed]
        terms: dict[str, Term] = {}  # by what was looked up: "Cat" and "cat" are one term, like one unmatched word
        unmatched: dict[str, str] = {}
        ignored: dict[str, str] = {}
        i = 0
        while i < len(words):
            for size in range(min(LONGEST_NAME, len(words) - i), 0, -1):
                phrase, said = words[i : i + size], " ".join(typed[i : i + size])
                if size == 1 and phrase[0] in STOP_WORDS:
                    ignored.setdefault(phrase[0], said)
                    break
                lemma = self.lemma("_".join(phrase))
                classes = self.classes_of(lemma) if lemma else ()
                if classes:
                    terms.setdefault(" ".join(phrase), Term(said, lemma.replace("_", " ") if lemma else "", classes))
                    break
                if size == 1:
                    unmatched.setdefault(phrase[0], said)
            i += size
        for symbol in (t for t, is_word in tokens if not is_word):
            ignored.setdefault(symbol, symbol)
        return TextQuery(tuple(terms.values()), tuple(unmatched.values()), tuple(ignored.values()))


def split(text: str) -> list[tuple[str, bool]]:
    """The words (True) and symbols (False) of ``text`` as typed, in order (``CLASSES``, ``TOKEN``): "café 日本 🐱"
    is café, 日本 and 🐱; "<script>alert(1)" is <, script, >, alert and 1."""
    text = unicodedata.normalize("NFC", text)  # an accent typed as a combining mark is one letter with its letter
    classes = "".join(CLASSES.get(c) or CATEGORY_CLASSES.get(unicodedata.category(c)[0], " ") for c in text)
    return [(text[m.start() : m.end()], m.group("word") is not None) for m in TOKEN.finditer(classes)]


def fold(word: str) -> str:
    """How a word is looked up: case-folded ("Straße" -> "strasse"), without accents ("café" -> "cafe") and in plain
    forms ("ﬁ" -> "fi", a typographic apostrophe -> "'")."""
    plain = unicodedata.normalize("NFKD", word.casefold()).replace("\u2019", "'")
    return "".join(c for c in plain if unicodedata.category(c)[0] != "M")


@functools.cache
def vocabulary(folder: Path = WORDNET) -> Vocabulary:
    """The one vocabulary of this process per folder, loaded on first use (~0.6 s). Damaged files are missing ones
    (text queries answered 500, not 503 ``no_vocabulary``: review 50)."""
    try:
        return Vocabulary(folder)
    except (OSError, ValueError, IndexError) as exc:  # (UnicodeDecodeError is a ValueError)
        raise VocabularyMissing(f"WordNet in {folder} cannot be read ({type(exc).__name__}: {exc}); reinstall "
                                "Debian's wordnet-base, or set BUCKETLENS_WORDNET to the folder holding index.noun"
                                ) from exc


def describe(classes: Iterable[int]) -> list[dict[str, str]]:
    table = labels.classes()
    return [{"id": table[c].synset, "name": table[c].name} for c in classes]
