"""The paper's recipe learns with torchvision's AlexNet too: tests/test_recipe.py's check over seeds for the owt
variant, in its own file so that scripts/test.sh's workers run it beside the paper net's."""

from __future__ import annotations

import test_recipe


def test_owt_recipe_learns_over_seeds():
    test_recipe.judge("owt")  # seeds, steps and bar: test_recipe.py's docstring
