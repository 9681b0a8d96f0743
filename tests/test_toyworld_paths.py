"""Which trained VAE a later stage uses: this run's checkpoint first, the shipped one when only a later stage
is retrained against shipped assets, and a clear error when there is neither."""

from __future__ import annotations

import pytest

from loraloom.evaluation.toyworld.trainers import Paths


def _vae(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_this_runs_vae_comes_first_then_the_shipped_one(tmp_path):
    paths = Paths(tmp_path / "work", tmp_path / "assets")
    shipped = _vae(tmp_path / "assets" / "model" / "vae")
    assert paths.trained_vae() == shipped
    own = _vae(tmp_path / "work" / "vae" / "final")
    assert paths.trained_vae() == own


def test_no_vae_anywhere_says_which_stage_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="--stage vae"):
        Paths(tmp_path / "work", tmp_path / "assets").trained_vae()
