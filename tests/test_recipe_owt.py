"""The paper's recipe learns with torchvision's AlexNet too (issue #16): tests/test_recipe.py's check for the owt
variant, in its own file so that scripts/test.sh's second worker runs it beside the paper net's."""

from __future__ import annotations

import test_recipe
from test_recipe import archive  # noqa: F401 - the module-scoped 4-class archive fixture


def test_owt_recipe_learns_four_classes(archive):  # noqa: F811
    test_recipe.test_paper_recipe_learns_four_classes(archive, "owt")
