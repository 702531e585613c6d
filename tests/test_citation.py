"""The X-STARS publication is cited the same way in the README, the model card and CITATION.cff:
the JSTARS 2025 article beside the arXiv preprint."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from factories import tiny_model
from xstars_models.publish.card import CITATION, model_card

ROOT = Path(__file__).resolve().parents[1]
DOI = "10.1109/JSTARS.2025.3566457"


def test_citation_cff_names_the_journal_article_and_the_preprint():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    article = cff["preferred-citation"]
    assert (article["doi"], article["volume"], article["start"], article["end"], article["year"]) == (DOI, 18, 12278, 12289, 2025)
    assert [a["family-names"] for a in article["authors"]] == ["Marsocci", "Audebert"]
    assert any(i["value"] == "arXiv:2405.09922" for ref in cff["references"] for i in ref["identifiers"])


def test_bibtex_in_card_and_readme_matches_the_cff():
    assert re.search(r"volume\s*=\s*\{18\}", CITATION) and "pages   = {12278--12289}" in CITATION
    assert f"doi     = {{{DOI}}}" in CITATION and "arXiv:2405.09922" in CITATION
    assert CITATION in (ROOT / "README.md").read_text()
    card = model_card(tiny_model().config, "org/name")
    assert "## Citation\n\n```bibtex\n" + CITATION + "\n```" in card
