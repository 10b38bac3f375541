"""The README's preset table is what the code builds: every preset has a row, its shapes are the config's, and
each parameter count equals the model's at the precision printed (`3.74 B` is 3.735–3.745 billion)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import REPO

from csm_train import CSM, CSMConfig
from csm_train.model import _PRESETS

UNITS = {"B": 1e9, "M": 1e6, "K": 1e3}
FIGURE = re.compile(r"(\d[\d,]*(?:\.\d+)?)(?:\s*([BMK]))?")


def preset_rows() -> dict[str, list[str]]:
    """`| \\`name\\` | backbone | depth decoder | parameters |` rows of the README's model table, by preset."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| preset | backbone"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[re.fullmatch(r"`(\w+)`(?: = .*)?", cells[0]).group(1)] = cells[1:]
    return rows


def printed(figure: str, count: int) -> bool:
    """`count` written at `figure`'s precision: `1,552,791,552` exactly, `13.8 M` to one decimal, `250 M` whole."""
    number, unit = FIGURE.fullmatch(figure.strip()).groups()
    if unit is None:
        return int(number.replace(",", "")) == count
    decimals = len(number.split(".")[1]) if "." in number else 0
    return round(count / UNITS[unit], decimals) == float(number)


def shapes(cell: str) -> tuple[list[int], str]:
    """`28 / 3072 / 24 / 8 / 8192 (Llama-3.2-3B)` → ([28, 3072, 24, 8, 8192], what is in parentheses)."""
    match = re.fullmatch(r"([\d /]+?)\s*(?:\((.*)\))?", cell)
    return [int(x) for x in match.group(1).split("/")], match.group(2) or ""


def test_every_preset_has_a_row():
    assert sorted(preset_rows()) == sorted(_PRESETS)


@pytest.mark.parametrize("name", sorted(_PRESETS))
def test_the_row_is_what_the_code_builds(name):
    config = CSMConfig.preset(name)
    with torch.device("meta"):
        model = CSM(config)
    backbone, decoder, parameters = preset_rows()[name]
    for cell, part in ((backbone, config.backbone), (decoder, config.decoder)):
        assert shapes(cell)[0] == [part.num_layers, part.dim, part.num_heads, part.num_kv_heads, part.ffn_dim], cell
    decoder_note = shapes(decoder)[1]
    if FIGURE.fullmatch(decoder_note):  # the depth decoder's own size: its transformer
        assert printed(decoder_note, sum(p.numel() for p in model.decoder.parameters())), decoder
    total = model.num_parameters()
    head, _, note = parameters.partition("(")
    assert printed(head, total), f"{name}: the README says {head.strip()}, the code builds {total:,}"
    if "outside the embedding tables" in note:
        outside = total - model.text_embeddings.weight.numel() - model.audio_embeddings.weight.numel()
        assert printed(note.split("outside")[0], outside), f"{name}: {note} vs {outside:,}"
    if "text vocab" in note:
        assert f"text vocab {config.text_vocab_size})" in note


def test_the_check_reads_figures_at_their_precision():
    assert printed("3.74 B", 3_739_029_504) and not printed("3.71 B", 3_739_029_504)
    assert printed("250 M", 250_104_832) and not printed("251 M", 250_104_832)
    assert printed("1,552,791,552", 1_552_791_552) and not printed("1,552,791,553", 1_552_791_552)
