"""Labels: the head's class order checked on photos whose class is known, both runtimes, the words that reach
classes through WordNet (synonyms, hyponyms, plurals, names of several words), and the wire form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bucketlens.settings import Settings
from infra.samples import skimage_data
from vision import labels, words
from vision.decode import decode
from vision.embedders import Embedder
from vision.embedders.onnx_runtime import OnnxEmbedder
from vision.embedders.torch_runtime import TorchEmbedder
from vision.models import DEFAULT_MODEL, RECIPES

KNOWN = {"chelsea.png": {"tabby", "tiger cat", "Egyptian cat"}, "coffee.png": {"espresso", "cup", "coffee mug"},
         "rocket.jpg": {"missile", "projectile"}, "motorcycle_left.png": {"moped", "motor scooter"}}


def names(found: labels.Labels) -> list[str]:
    return [labels.classes()[i].name for i, _ in found]


@pytest.fixture(scope="module", params=["torch", "onnx"])
def embedder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    settings = Settings(home=tmp_path_factory.mktemp("home"))
    recipe = RECIPES[DEFAULT_MODEL]
    return TorchEmbedder(settings, recipe, "cpu") if request.param == "torch" else OnnxEmbedder(settings, recipe)


def test_the_head_names_what_is_in_known_photos(embedder: Embedder) -> None:
    batch = np.stack([decode((skimage_data() / n).read_bytes(), 50_000_000) for n in KNOWN])
    vectors, found = embedder.describe(batch)
    assert np.allclose(vectors, embedder.embed(batch), atol=1e-5)
    for (name, expected), top in zip(KNOWN.items(), found):
        assert top is not None and len(top) == labels.KEPT
        assert expected & set(names(top)[:2]), (name, names(top))  # rocket: "drilling platform" may come first
        probs = [p for _, p in top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_the_swish_graphs_keep_no_labels(tmp_path: Path) -> None:
    """The first builds' graphs (vision/models.py, ``activation``): their head is meaningless, so no labels."""
    old = OnnxEmbedder(Settings(home=tmp_path), RECIPES["lite0-copy-v2"])
    image = decode((skimage_data() / "chelsea.png").read_bytes(), 50_000_000)
    assert old.describe(image[None])[1] == [None]


def test_the_class_table_is_the_sorted_imagenet_list() -> None:
    table = labels.classes()
    assert len(table) == 1000 and [c.synset for c in table] == sorted(c.synset for c in table)
    assert table[281].name == "tabby" and table[967].name == "espresso"


def test_labels_wire_form_round_trips_and_refuses_garbage() -> None:
    found = ((281, 0.5), (285, 0.25))
    assert labels.decode(labels.encode(found)) == found
    for bad in ("", "1000:0.5", "3:1.5", "x:y", "3"):
        with pytest.raises(ValueError):
            labels.decode(bad)


@pytest.fixture(scope="module")
def vocabulary() -> words.Vocabulary:
    return words.vocabulary()


def reached(vocabulary: words.Vocabulary, text: str) -> set[str]:
    return {labels.classes()[c].name for c in vocabulary.match(text).classes}


def test_words_reach_classes_by_synonym_hyponym_and_name(vocabulary: words.Vocabulary) -> None:
    dogs = reached(vocabulary, "dog")
    assert len(dogs) > 100 and {"golden retriever", "Chihuahua", "pug"} <= dogs and "hotdog" not in dogs
    vehicles = reached(vocabulary, "vehicle")
    assert {"sports car", "trailer truck", "canoe", "speedboat"} <= vehicles
    assert "espresso" in reached(vocabulary, "coffee")
    assert reached(vocabulary, "cup") == {"cup"}  # ImageNet's name, though WordNet ranks that sense fifth
    assert "missile" in reached(vocabulary, "rocket")
    assert reached(vocabulary, "tabby cat") == {"tabby"}  # a name of two words, before its single words
    assert reached(vocabulary, "hot dog") == {"hotdog"}


@pytest.mark.parametrize(("word", "lemma"), [
    ("dogs", "dog"), ("boxes", "box"), ("churches", "church"), ("ponies", "pony"), ("mice", "mouse"),
    ("geese", "goose"), ("glass", "glass"), ("Cats", "cat"), ("golden retrievers", "golden_retriever"),
])
def test_plurals_and_inflections(vocabulary: words.Vocabulary, word: str, lemma: str) -> None:
    assert vocabulary.lemma(word.lower().replace(" ", "_")) == lemma


def test_unknown_and_stop_words_are_reported(vocabulary: words.Vocabulary) -> None:
    query = vocabulary.match("a photo of the xyzzy and a cat")
    assert query.unmatched == ("xyzzy",) and set(query.ignored) == {"a", "photo", "of", "the", "and"}
    assert [t.lemma for t in query.terms] == ["cat"]


def test_missing_wordnet_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(words.VocabularyMissing, match="wordnet-base"):
        words.Vocabulary(tmp_path)


def test_a_damaged_wordnet_is_a_missing_one(tmp_path: Path) -> None:
    """Damaged files made every text query a 500 (a parse error), not 503 ``no_vocabulary`` (review 50)."""
    for name in ("index.noun", "data.noun", "noun.exc"):
        (tmp_path / name).write_bytes(b"cat n 1 x\n\xff\xfe")
    with pytest.raises(words.VocabularyMissing, match="cannot be read .* wordnet-base"):
        words.vocabulary(tmp_path)


def test_autocomplete_folds_accents_and_case_as_text_search_does() -> None:
    """``/labels?q=Éspr`` suggested nothing while a text search for "Éspresso" found espresso (an independent
    review): both now compare words through ``words.fold``."""
    from types import SimpleNamespace

    from index_service.text import suggest

    index = SimpleNamespace(label_counts=lambda: {})
    for typed in ("Éspr", "espr", "ESPR", " Espr "):
        assert "espresso" in [s["name"] for s in suggest(index, typed)], typed  # type: ignore[arg-type]
    assert suggest(index, "zzzqx") == []  # type: ignore[arg-type]
