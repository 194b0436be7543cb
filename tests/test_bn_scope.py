"""Genie-D with BatchNorm statistics matched over the whole set (gen.bn_scope 'set', DGH) against per batch."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sadag.errors import ConfigError
from sadag.generation import generate_genie
from sadag.generation.bn_stats import bn_layers, bn_statistics_losses, capture_bn_inputs
from test_generation import SPEC, small_cfg, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_losses(model: torch.nn.Module, images: torch.Tensor, groups: int) -> torch.Tensor:
    with torch.no_grad(), capture_bn_inputs(model) as captured:
        model(images)
        return bn_statistics_losses(captured, bn_layers(model), groups)


def test_one_batch_is_the_same_in_either_scope() -> None:
    cfg = small_cfg(num_images=4, batch_size=4, genie_iters=5, swing=False)
    per_batch = generate_genie(tiny_model(), SPEC, cfg, seed=3)[0]
    whole_set = generate_genie(tiny_model(), SPEC, replace(cfg, bn_scope="set"), seed=3)[0]
    torch.testing.assert_close(per_batch.images, whole_set.images, atol=1e-6, rtol=0)


def test_the_set_scope_matches_the_statistics_of_the_whole_set_better() -> None:
    model = tiny_model()
    cfg = small_cfg(num_images=32, batch_size=8, genie_iters=40, swing=False)
    sets = {scope: torch.cat([b.images for b in generate_genie(model, SPEC, replace(cfg, bn_scope=scope), seed=1)])
            for scope in ("batch", "set")}
    whole = {scope: _bn_losses(model, x, 1).item() for scope, x in sets.items()}
    each = {scope: _bn_losses(model, x, 4).mean().item() for scope, x in sets.items()}
    assert whole["set"] < whole["batch"]  # what it optimizes
    assert each["batch"] < each["set"]  # what it gives up: a batch alone need not look like the data


@pytest.mark.parametrize(("fields", "only", "message"), [
    (dict(num_images=10, batch_size=4), None, "10 is not a multiple of gen.batch_size 4"),
    (dict(parallel_batches=1), None, "would split them: leave it 0"),
    (dict(), [0], "cannot make a subset of the batches"),
])
def test_what_the_set_scope_cannot_do_is_refused(fields: dict, only: list | None, message: str) -> None:
    cfg = small_cfg(bn_scope="set", **fields)
    with pytest.raises(ConfigError, match=message):
        generate_genie(tiny_model(), SPEC, cfg, seed=0, only=only)
